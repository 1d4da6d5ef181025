"""`oscquant bench model`: a Qwen3-8B-shaped model end to end, BF16 against OSC W4A4 with its sibling projections
run one by one and stacked (siblings.py), side by side in one process.

The model is built from Qwen3's config class with random weights (speed does not depend on them): Qwen3-8B's layer
shapes (hidden 4096, intermediate 12288, 32 query and 8 KV heads of 128), a few decoder layers, and a small
vocabulary so that the (unquantized) lm_head does not hide the layers. It is quantized by the library's own path:
calibration on random tokens, the outlier channels picked per layer, FP8 for down_proj. Times are CUDA-event
medians of eager forwards, as Hugging Face's generate runs them: a prefill of P tokens, and one decode step (a
token with a KV cache of P tokens), both per decoder layer.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128)


@dataclass
class ModelRow:
    variant: str
    prefill_ms: float  # P tokens, per decoder layer
    decode_ms: float  # one token after P, per decoder layer


def build(layers: int = 4, vocab: int = 4096, dims: dict | None = None, device: str = "cuda",
          dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(**(dims or QWEN3_8B), num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=8192)
    with torch.device(device):  # initialised where it runs
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # a few persistent outlier channels, as trained LMs have
        model.get_input_embeddings().weight[:, :8] *= 20
    return model.eval()


def _time_ms(fn, device: str, reps: int) -> float:
    """Median ms of ``fn`` over ``reps`` runs after two warm-ups (CUDA events on the GPU, a wall clock elsewhere)."""
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


@torch.no_grad()
def measure(model, prefill: int, device: str, reps: int) -> tuple[float, float, torch.Tensor]:
    """(prefill ms, decode-step ms, the first decode step's logits) for one model. The decode steps run one after
    another, as in generation: the cache grows from P to P + reps + 2 tokens."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, prefill + reps + 3), generator=g).to(device)
    pre = _time_ms(lambda: model(ids[:, :prefill], use_cache=False), device, reps)
    cache = DynamicCache()
    model(ids[:, :prefill], past_key_values=cache, use_cache=True)
    pos = [prefill]
    first = []

    def step():
        out = model(ids[:, pos[0]:pos[0] + 1], past_key_values=cache, use_cache=True)
        pos[0] += 1
        if not first:
            first.append(out.logits[0, -1].float())
    dec = _time_ms(step, device, reps)
    return pre, dec, first[0]


def bench_model(layers: int = 4, prefill: int = 512, reps: int = 20, device: str = "cuda", dims: dict | None = None,
                vocab: int = 4096, fmt: str = "mxfp4", outliers: int = 128) -> tuple[list[ModelRow], dict]:
    """Rows for BF16, OSC with its sibling projections apart and stacked, and the relative differences of their first
    decode step's logits."""
    from .config import OSCConfig
    from .convert import quantize
    from .siblings import fuse_siblings

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("oscquant bench model needs a CUDA GPU; none is visible (run it on a GPU machine)")
    model = build(layers, vocab, dims, device, torch.bfloat16 if device == "cuda" else torch.float32)
    osc = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, vocab, (1, 128), generator=g).to(device) for _ in range(4)]
    quantize(osc, OSCConfig.osc(fmt, outliers), calib, progress=False)
    stacked = copy.deepcopy(osc)
    fuse_siblings(stacked)
    rows, logits = [], {}
    for name, m in (("BF16" if device == "cuda" else "float", model), ("OSC, siblings apart", osc),
                    ("OSC, siblings stacked", stacked)):
        pre, dec, logits[name] = measure(m, prefill, device, reps)
        rows.append(ModelRow(name, pre / layers, dec / layers))
    names = [r.variant for r in rows]

    def err(a, b):
        return ((logits[a] - logits[b]).norm() / logits[b].norm()).item()
    # the first decode step's logits: quantization's effect, and stacking's (none but the GEMMs' summation order)
    return rows, {f"{names[1]} vs {names[0]}": err(names[1], names[0]), f"{names[2]} vs {names[1]}": err(names[2], names[1])}


def markdown(rows: list[ModelRow], prefill: int) -> str:
    base = rows[0]
    lines = [f"| model | prefill of {prefill} tokens, ms a layer | × {base.variant} | decode step, ms a layer | "
             f"× {base.variant} |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant} | {r.prefill_ms:.3f} | {base.prefill_ms / r.prefill_ms:.2f} | {r.decode_ms:.3f} | "
                     f"{base.decode_ms / r.decode_ms:.2f} |")
    return "\n".join(lines)
