"""Saving and loading quantized models.

A checkpoint is a directory:
  model.safetensors   every tensor of the quantized model (packed codes, scales, BF16
                      outlier columns, index lists, and the float embeddings/norms/lm_head)
  osc_config.json     format version, library versions, where the model came from, the
                      OSCConfig, and per layer its scheme, k and outlier channel list; also
                      the SHA-256 of model.safetensors, checked on load
  config.json         the transformers model config
  tokenizer files     from ``tokenizer.save_pretrained``

Everything is written into a temporary sibling directory that is renamed into
place only when complete, so an interrupted save never leaves a half-written
checkpoint behind, and an existing one is replaced only by a whole new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LayerScheme, OSCConfig

CONFIG_NAME = "osc_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: the main path spans all K channels, outlier columns zero (1 gathered K - k)


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"oscquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """safetensors refuses shared storage (tied embeddings): keep one name, record the aliases."""
    seen, tensors, aliases = {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save_quantized(model, tokenizer, out_dir: str | os.PathLike, source: dict | None = None, extra: dict | None = None) -> Path:
    if not hasattr(model, "osc_plan"):
        raise ValueError("this model was not quantized with oscquant.quantize; nothing OSC to save")
    from .norms import has_fused_norms
    from .siblings import has_siblings
    if has_siblings(model):
        raise ValueError("this model's sibling projections run stacked (fuse_siblings), which a checkpoint does not "
                         "hold; save it before fuse_siblings, or load the checkpoint again and save that")
    if has_fused_norms(model):
        raise ValueError("this model's RMSNorms run inside its OSC layers (fuse_norms), which a checkpoint does not "
                         "hold; save it before fuse_norms, or load the checkpoint again and save that")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors, aliases = _dedupe(model.state_dict())
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "source": source or getattr(model, "osc_source", {}),
            "model_type": model.config.model_type,
            "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "osc_config": model.osc_config.to_dict(),
            "layers": {
                name: {"scheme": asdict(e["scheme"]), "k": e["k"],
                       "outlier_idx": model.get_submodule(name).outlier_idx.tolist()}
                for name, e in model.osc_plan.items()
            },
            "aliases": aliases,
            "weights_sha256": _sha256(tmp / WEIGHTS_NAME),
            **(extra or {}),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():  # make the data durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg = path / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not an oscquant checkpoint ({CONFIG_NAME} missing)")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is corrupted ({e}); re-run oscquant quantize") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')}, this oscquant reads "
                              f"{FORMAT_VERSION}; re-quantize with this version")
    return meta


def load_quantized(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """Returns (model, tokenizer), the model's float tensors in ``dtype`` (default: the dtype it was quantized in; the
    OSC layers' encoded weights never change). Raises CheckpointError for a damaged or mismatched checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .convert import build_empty

    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    if _sha256(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights} does not match the checksum in {CONFIG_NAME}: the file is corrupted "
                              "or truncated; re-run oscquant quantize")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {weights}: {e}") from e
    for name, target in meta.get("aliases", {}).items():
        state[name] = state[target]

    config = AutoConfig.from_pretrained(path)
    if config.model_type != meta["model_type"]:
        raise CheckpointError(f"config.json says {config.model_type}, {CONFIG_NAME} says {meta['model_type']}")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    plan = {n: {"scheme": LayerScheme(**e["scheme"]), "k": e["k"]} for n, e in meta["layers"].items()}
    try:
        build_empty(model, plan)
    except ValueError as e:
        raise CheckpointError(f"{path} does not match its model config: {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit its own model config: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its model: missing tensors {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, e in meta["layers"].items():
        if model.get_submodule(name).outlier_idx.tolist() != e["outlier_idx"]:
            raise CheckpointError(f"the outlier channels of {name} differ between {WEIGHTS_NAME} and {CONFIG_NAME}")
    if any(p.is_meta for p in list(model.parameters()) + list(model.buffers())):
        raise CheckpointError(f"{path} leaves some model tensors unset")
    model.osc_config = OSCConfig.from_dict(meta["osc_config"])
    model.osc_source = meta.get("source", {})
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    # float buffers that are not saved (rotary tables) follow the dtype the model ran in, or the one asked for
    model.to(dtype or getattr(torch, meta.get("dtype", "float32")))
    return model.to(device).eval(), tok
