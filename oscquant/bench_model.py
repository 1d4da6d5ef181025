"""`oscquant bench model`: a Qwen3-8B-shaped model end to end, BF16 against OSC W4A4 with its sibling projections
run one by one and stacked (siblings.py), and stacked with the RMSNorms before them run in their split-quantize
(norms.py) and then also the MLPs' act(gate) * up in down_proj's (gated.py), side by side in one process.

The model is built from Qwen3's config class with random weights (speed does not depend on them): Qwen3-8B's layer
shapes (hidden 4096, intermediate 12288, 32 query and 8 KV heads of 128), a few decoder layers, and a small
vocabulary so that the (unquantized) lm_head does not hide the layers. It is quantized by the library's own path:
calibration on random tokens, the outlier channels picked per layer, FP8 for down_proj. Times are CUDA-event
medians, per decoder layer: eager forwards as Hugging Face's generate runs them by default (a prefill of P tokens, and
a decode step with a KV cache of P tokens), and both replayed from CUDA graphs (the decode step on a static cache),
which take the host's launch work away and leave the kernels' time.

Attention runs on one SDPA backend choice for every model, without cuDNN: PyTorch builds a cuDNN attention plan for
each new sequence length (about 10 ms of host time a layer on the H200), and the plans are cached across models, so
whichever model decoded first paid for all of them.
"""

from __future__ import annotations

import copy
import statistics
from contextlib import contextmanager
from dataclasses import dataclass

import torch

QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
# Qwen3-30B-A3B's layer shapes: 128 experts of 768, 8 a token
QWEN3_30B_A3B = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, decoder_sparse_step=1)


@dataclass
class ModelRow:
    variant: str
    prefill_ms: float  # P tokens, per decoder layer
    decode_ms: float  # one token after P, per decoder layer
    graph_ms: float | None = None  # the same decode step replayed from a CUDA graph (GPU only)
    prefill_graph_ms: float | None = None  # the prefill replayed from a CUDA graph (GPU only)
    compiled_ms: float | None = None  # the decode step compiled by torch.compile, then replayed from a CUDA graph
    prefill_compiled_ms: float | None = None  # the prefill compiled, then replayed from a CUDA graph


def build(layers: int = 4, vocab: int = 4096, dims: dict | None = None, device: str = "cuda",
          dtype: torch.dtype = torch.bfloat16, seed: int = 0, moe: bool = False):
    """Qwen3-8B's layer shapes (``moe``: Qwen3-30B-A3B's, a Qwen3-MoE model) with random weights."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    torch.manual_seed(seed)
    kind, shapes = (Qwen3MoeConfig, QWEN3_30B_A3B) if moe else (Qwen3Config, QWEN3_8B)
    cfg = kind(**(dims or shapes), num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=8192)
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
def measure(model, ids: torch.Tensor, prefill: int, device: str, reps: int) -> tuple[float, float, torch.Tensor]:
    """(prefill ms, decode-step ms, the first decode step's logits) for one model on ids [1, >= P + reps + 3]. The
    decode steps run one after another, as in generation: the cache grows from P to P + reps + 2 tokens."""
    from transformers import DynamicCache

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


@torch.no_grad()
def measure_graph(model, ids: torch.Tensor, prefill: int, reps: int, compile: bool = False) -> tuple[float, torch.Tensor]:
    """(ms, logits) of the decode step at position P (token ids[:, P]) replayed from a CUDA graph: a static KV cache
    filled by a prefill, the step (compiled first, with ``compile``) captured once and replayed."""
    from transformers import StaticCache

    from .generate import capture_graph, compiled_step, decode_step

    step = compiled_step() if compile else decode_step
    dev = ids.device
    cache = StaticCache(config=model.config, max_cache_len=prefill + 16)
    model(ids[:, :prefill], past_key_values=cache, cache_position=torch.arange(prefill, device=dev), use_cache=True)
    tok, pos = ids[:, prefill:prefill + 1].clone(), torch.tensor([prefill], device=dev)

    # every replay writes slot P again (decode_step sets the cache's count back to pos)
    replay, logits = capture_graph(lambda: step(model, cache, tok, pos), warmups=3)
    return _time_ms(replay, "cuda", reps), logits[0, -1].float().clone()


@torch.no_grad()
def measure_prefill_graph(model, ids: torch.Tensor, prefill: int, reps: int, compile: bool = False) -> float:
    """ms of the prefill of P tokens (no cache) replayed from a CUDA graph: the kernels' time without the host's
    (with ``compile``, the forward compiled by torch.compile first)."""
    from .generate import capture_graph

    forward = torch.compile(model.forward) if compile else model.forward
    replay, _ = capture_graph(lambda: forward(ids[:, :prefill], use_cache=False).logits, warmups=3)
    return _time_ms(replay, "cuda", reps)


def bench_model(layers: int = 4, prefill: int = 512, reps: int = 20, device: str = "cuda", dims: dict | None = None,
                vocab: int = 4096, fmt: str = "mxfp4", outliers: int = 128, compile: bool = False, moe: bool = False,
                group_size: int | None = None) -> tuple[list[ModelRow], dict]:
    """Rows for BF16, OSC with its sibling projections apart and stacked (and stacked with the RMSNorms before them run
    in their split-quantize, norms.py, then also the MLPs' act(gate) * up in down_proj's, gated.py), and the relative
    differences of their first
    decode step's logits (with, as strings, why a step could not be captured). ``compile`` (GPU): also the decode step
    and the prefill compiled by torch.compile, each then replayed from a CUDA graph. ``moe``: Qwen3-30B-A3B's shapes
    (a Qwen3-MoE model); its OSC rows run the experts one by one through their own layers (eager only: that loop asks
    the host which experts were reached), then through the grouped kernels (kernels/moe.py) one pair a program, and
    as the library does by default (in tiles of pairs where pairs meet on experts). ``fmt`` and ``group_size``: the
    OSC layers' 4-bit format (down_proj falls back to FP8 as by default)."""
    from .config import OSCConfig
    from .convert import quantize
    from .gated import fuse_gated_mlps
    from .head_norms import fuse_head_norms
    from .norms import fuse_norms
    from .siblings import fuse_siblings

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("oscquant bench model needs a CUDA GPU; none is visible (run it on a GPU machine)")
    model = build(layers, vocab, dims, device, torch.bfloat16 if device == "cuda" else torch.float32, moe=moe)
    osc = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, vocab, (1, 128), generator=g).to(device) for _ in range(4)]
    quantize(osc, OSCConfig.osc(fmt, outliers, group_size=group_size), calib, progress=False)
    stacked = copy.deepcopy(osc)
    fuse_siblings(stacked)
    normed = gated = None
    if not moe:  # the RMSNorms before q/k/v and gate/up run in their split-quantize (norms.py), and then also the
        # MLPs' act(gate) * up in down_proj's (gated.py)
        normed = copy.deepcopy(stacked)
        fuse_norms(normed)
        gated = copy.deepcopy(normed)
        fuse_gated_mlps(gated)
        fuse_head_norms(gated)  # and q_norm / k_norm on the stacked q/k/v output (head_norms.py)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, prefill + reps + 3), generator=g).to(device)
    rows, logits, notes = [], {}, {}
    variants = [("BF16" if device == "cuda" else "float", model)]
    if moe:
        variants += [(name, stacked) for name in (ONE_BY_ONE, PAIR_A_PROGRAM, TILED, EXPANDED)]
    else:
        variants += [("OSC, siblings apart", osc), ("OSC, siblings stacked", stacked), (NORMS_FUSED, normed), (GATED_FUSED, gated)]
    for name, m in variants:
        one_by_one = name == ONE_BY_ONE
        with _attention_backends(device), _experts_as(name):
            pre, dec, logits[name] = measure(m, ids, prefill, device, reps)
            row = ModelRow(name, pre / layers, dec / layers)
            if device == "cuda" and not one_by_one:
                try:
                    graph, graph_logits = measure_graph(m, ids, prefill, reps)
                    row.graph_ms = graph / layers
                    # the graphed step at position P computes what the eager one did
                    logits[name + ", CUDA graph"] = graph_logits
                except RuntimeError as e:
                    notes[f"{name}, decode step from a CUDA graph"] = _not_captured(e)
                try:
                    row.prefill_graph_ms = measure_prefill_graph(m, ids, prefill, reps) / layers
                except RuntimeError as e:  # MoE experts run one by one ask the host which experts were reached
                    notes[f"{name}, prefill from a CUDA graph"] = _not_captured(e)
                if compile:
                    comp, logits[name + ", compiled"] = measure_graph(m, ids, prefill, reps, compile=True)
                    row.compiled_ms = comp / layers
                    row.prefill_compiled_ms = measure_prefill_graph(m, ids, prefill, reps, compile=True) / layers
        rows.append(row)
    names = [r.variant for r in rows]

    def err(a, b):
        return ((logits[a] - logits[b]).norm() / logits[b].norm()).item()
    # the first decode step's logits: quantization's effect (both OSC models equally far from BF16), stacking's (only
    # the GEMMs' summation order, which W4A4's rounding of the next layers' inputs can magnify in a random model), and
    # the graph's (none)
    errs = {f"{n} vs {names[0]}": err(n, names[0]) for n in names[1:]}
    errs.update({f"{n} vs {names[1]}": err(n, names[1]) for n in names[2:]})
    if NORMS_FUSED in logits:  # only the sums of squares, added in another order, can move the logits
        errs[f"{NORMS_FUSED} vs OSC, siblings stacked"] = err(NORMS_FUSED, "OSC, siblings stacked")
        errs[f"{GATED_FUSED} vs {NORMS_FUSED}"] = err(GATED_FUSED, NORMS_FUSED)
    for name in names if device == "cuda" else ():  # a static cache and its attention kernels against the eager ones
        if name + ", CUDA graph" not in logits:
            continue
        errs[f"{name}, CUDA graph vs eager"] = err(name + ", CUDA graph", name)
        if name + ", compiled" in logits:
            errs[f"{name}, compiled vs not"] = err(name + ", compiled", name + ", CUDA graph")
    return rows, {**errs, **notes}


NORMS_FUSED, GATED_FUSED = "OSC, stacked, norms fused", "OSC, stacked, all fused (+ MLP activations, q/k norms)"


def _not_captured(e: RuntimeError) -> str:
    return f"not captured ({str(e).splitlines()[0][:120]})"


# the MoE model's OSC rows: the experts through their own layers, one expert at a time; through the grouped kernels
# (at any number of pairs, moe.MAX_PAIRS set aside) one (token, expert) pair a program; and grouped by tiles of pairs
# sorted by expert where pairs meet; and the same with every expert's weights expanded to e4m3 for the plain FP8 GEMM
# wherever a step runs in tiles (moe.EXPAND_PAIRS = 0)
ONE_BY_ONE, PAIR_A_PROGRAM, TILED, EXPANDED = "OSC, experts one by one", "OSC, experts grouped, a pair a program", \
    "OSC, experts grouped", "OSC, experts grouped, expanded"


@contextmanager
def _experts_as(variant: str):
    """Run MoE experts as the row ``variant`` says (other rows: the library's own choice)."""
    from .kernels import moe

    keep = moe.MAX_PAIRS, moe.PAIR_TILES, moe.EXPAND_PAIRS
    grouped = variant in (PAIR_A_PROGRAM, TILED, EXPANDED)
    moe.MAX_PAIRS = -1 if variant == ONE_BY_ONE else 1 << 30 if grouped else keep[0]
    moe.PAIR_TILES = variant != PAIR_A_PROGRAM and keep[1]
    moe.EXPAND_PAIRS = 0 if variant == EXPANDED else None if grouped else keep[2]
    try:
        yield
    finally:
        moe.MAX_PAIRS, moe.PAIR_TILES, moe.EXPAND_PAIRS = keep


def _attention_backends(device: str):
    """SDPA without cuDNN, for every model alike (the module docstring says why)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device != "cuda":
        return nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def markdown(rows: list[ModelRow], prefill: int) -> str:
    """One column per time (ms a decoder layer), each followed by its ratio to the first row (BF16)."""
    base = rows[0]
    cols = [(f"prefill of {prefill} tokens", "prefill_ms"), ("decode step", "decode_ms")]
    if base.graph_ms is not None:
        cols = [cols[0], (f"prefill of {prefill} tokens from a CUDA graph", "prefill_graph_ms"), cols[1],
                ("decode step from a CUDA graph", "graph_ms")]
    if base.compiled_ms is not None:
        cols += [(f"prefill of {prefill} tokens compiled, from a CUDA graph", "prefill_compiled_ms"),
                 ("decode step compiled, from a CUDA graph", "compiled_ms")]
    lines = ["| model | " + " | ".join(f"{title}, ms a layer | × {base.variant}" for title, _ in cols) + " |",
             "|---|" + "---|---|" * len(cols)]
    for r in rows:
        cells = ["- | -" if getattr(r, f) is None else f"{getattr(r, f):.3f} | -" if getattr(base, f) is None
                 else f"{getattr(r, f):.3f} | {getattr(base, f) / getattr(r, f):.2f}" for _, f in cols]
        lines.append(f"| {r.variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
