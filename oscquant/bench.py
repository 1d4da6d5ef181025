"""``oscquant bench gemm``: OSC against BF16 and W8A8 GEMMs, side by side in one run, on one GPU.

Every column is captured in a CUDA graph and timed by replaying it with
``triton.testing.do_bench`` (median; the L2 cache is flushed before each replay), so
launch overhead and cache reuse favour no column. Up to 16 tokens BF16, FP8, OSC+split and the
OSC GEMM alone are also timed "back to back", as a decode step runs its layers: one graph of R calls
in a row, each on its own copy of the weights (> 256 MB in all, so none is read from L2), per call;
and a plain device copy of the GEMM's own bytes is timed as the columns are, the floor of this
harness for a kernel that moves them.

Columns: BF16 ``torch.matmul``; W8A8 INT8 ``torch._int_mm`` (cuBLAS needs M > 16);
W8A8 FP8 ``torch._scaled_mm`` with row-wise scales; OSC GEMM alone (activation already
quantized); OSC including split-quantize; the FP8-fallback layer (split + FP8 GEMM).
The W8A8 columns time the GEMM only, not their activation quantization; beside them torch's own cast of x to
e4m3 is timed (``cast_us``), the least a W8A8 FP8 layer pays for its activation and, where split-quantize runs at
that speed, what the large-M target leaves the OSC GEMM (``targets``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch

HBM_BYTES_PER_S = 4.3e12  # device-to-device copy on the H200, read + write (../shared/H200.md)
FP8_OPS_PER_S = 1463e12  # cuBLAS FP8 at 8192^3
BF16_OPS_PER_S = 794e12


def qwen3_shapes() -> list[tuple[str, int, int]]:
    """(name, N, K) of the Qwen3-8B linear layers and the Qwen3-30B-A3B attention, from their configs."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    c8 = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128)
    c30 = Qwen3MoeConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    out = []
    for tag, c in (("8B", c8), ("30B-A3B", c30)):
        q = c.num_attention_heads * c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        out += [(f"{tag} qkv", q + 2 * kv, c.hidden_size), (f"{tag} o", c.hidden_size, q)]
        if tag == "8B":
            out += [(f"{tag} gate+up", 2 * c.intermediate_size, c.hidden_size),
                    (f"{tag} down", c.hidden_size, c.intermediate_size)]
    return out


def format_layers(spec: str, k: int = 128, device: str = "cuda"):
    """For the scripts that time one 4-bit format (``spec``: "nvfp4", "int4", or "int4_g128" for INT4 with a scale per
    128 columns): yields (name, N, K, the random BF16 nn.Linear, its OSC layer's kernel weights with the first k
    channels separated) for each of qwen3_shapes."""
    from .config import LayerScheme
    from .kernels.ops import layer_weights
    from .linear import OSCLinear

    fmt, _, group = spec.partition("_g")
    for name, n, k_in in qwen3_shapes():
        lin = torch.nn.Linear(k_in, n, bias=False, device=device, dtype=torch.bfloat16)
        scheme = LayerScheme(fmt, k, group_size=int(group) if group else None)
        yield name, n, k_in, lin, layer_weights(OSCLinear.from_linear(lin, scheme, torch.arange(k)))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class Row:
    shape: str
    n: int
    k_in: int
    m: int
    k_out: int
    bf16_us: float
    int8_us: float | None
    fp8_us: float
    osc_gemm_us: float
    osc_us: float
    fallback_us: float
    osc_tbps: float
    osc_tflops: float
    roofline_pct: float
    gemm_roofline_pct: float
    vs_best_w8a8: float
    vs_bf16: float
    b2b_bf16_us: float | None = None  # back to back (M <= 16)
    b2b_fp8_us: float | None = None
    b2b_osc_us: float | None = None
    b2b_gemm_us: float | None = None  # the OSC GEMM alone, back to back
    b2b_gemm_roofline_pct: float | None = None
    copy_us: float | None = None  # a device copy moving the GEMM's own bytes, timed as the columns (flushed)
    copy_roofline_pct: float | None = None
    path: str | None = None  # the OSC GEMM's config (GemmConfig.label): which kernel made these numbers
    cast_us: float | None = None  # torch's BF16 -> e4m3 cast of x, timed as the columns are


def _need_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"oscquant bench {what} needs a CUDA GPU; none is visible (run it on a GPU machine, "
                           "e.g. scripts/gpu.sh)")


def _graph_time(fn, warmup: int = 3) -> float:
    """Median µs of replaying a CUDA graph of ``fn`` (L2 flushed before each replay)."""
    import triton

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return 1e3 * triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")


B2B_BYTES = 256 << 20


def _b2b_time(call, weights, nbytes: int) -> float:
    """µs per call in one graph of R back-to-back calls, call(weights_i) on R distinct copies of the
    weights (``weights`` clones itself), together more than B2B_BYTES so that L2 holds none of them."""
    copies = [weights() for _ in range(max(2, -(-B2B_BYTES // max(nbytes, 1))))]

    def run():
        for w in copies:
            call(w)
    return _graph_time(run) / len(copies)


def clone_weights(kw):
    """A copy of a layer's kernel weights in fresh memory (what the GEMM streams), for back-to-back timing."""
    frag = kw.frag and replace(kw.frag, words=kw.frag.words.clone(), exps=kw.frag.exps.clone())
    return replace(kw, codes=kw.codes.clone(), rel_exp=None if kw.rel_exp is None else kw.rel_exp.clone(),
                   w_outlier=kw.w_outlier.clone(), frag=frag)


def bench_shape(name: str, n: int, k_in: int, ms: list[int], k_outs: list[int], fmt: str = "mxfp4",
                group_size: int | None = None) -> list[Row]:
    from .config import LayerScheme
    from .kernels.ops import layer_config, layer_weights, osc_gemm, osc_linear_2d, split_for
    from .linear import OSCLinear

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    lin = torch.nn.Linear(k_in, n, bias=False, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=g)
    planted = torch.randperm(k_in, generator=torch.Generator().manual_seed(1))[:max(k_outs)]
    w8 = lin.weight.float()
    sw = w8.abs().amax(1, keepdim=True) / 448
    w_f8 = (w8 / sw).to(torch.float8_e4m3fn)
    sw_row = sw.T.contiguous()  # [1, N], made once outside the timed graphs
    w_i8 = torch.round(w8 / (w8.abs().amax(1, keepdim=True) / 127)).to(torch.int8)
    fallback = OSCLinear.from_linear(lin, LayerScheme("fp8"), torch.zeros(0, dtype=torch.long))
    fb_kw = layer_weights(fallback)
    rows = []
    for m in ms:
        x = torch.randn(m, k_in, device=dev, generator=g).to(torch.bfloat16)
        x[:, planted.to(dev)] *= 30
        x_f8 = (x.float() / (x.float().abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
        sx = torch.ones(m, 1, device=dev)
        x_i8 = torch.randint(-127, 127, (m, k_in), device=dev, dtype=torch.int8)
        bf16 = _graph_time(lambda: torch.matmul(x, lin.weight.T))
        fp8 = _graph_time(lambda: torch._scaled_mm(x_f8, w_f8.T, scale_a=sx, scale_b=sw_row,
                                                    out_dtype=torch.bfloat16))
        int8 = _graph_time(lambda: torch._int_mm(x_i8, w_i8.T)) if m > 16 else None
        fb = _graph_time(lambda: osc_linear_2d(x, fb_kw))
        x_cast = torch.empty(m, k_in, device=dev, dtype=torch.float8_e4m3fn)
        cast = _graph_time(lambda: x_cast.copy_(x))
        for k in k_outs:
            layer = OSCLinear.from_linear(lin, LayerScheme(fmt, k, group_size=group_size), planted[:k])
            kw = layer_weights(layer)
            cfg = layer_config(x, kw)
            xo, a, sa = split_for(x, kw, cfg)
            gemm = _graph_time(lambda: osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg))
            full = _graph_time(lambda: osc_linear_2d(x, kw, cfg))
            w_bytes = kw.codes.numel() + (kw.rel_exp.nbytes if kw.rel_exp is not None else 0) + 4 * n + 2 * n * k
            a_bytes = m * kw.k_main * a.element_size()
            gemm_bytes = w_bytes + a_bytes + 2 * m * k + 2 * m * n
            full_bytes = gemm_bytes + 2 * m * k_in + a_bytes + 2 * m * k  # split reads x, writes A and x_o
            ops = 2 * m * n * k_in
            floor_s = max(full_bytes / HBM_BYTES_PER_S,
                          2 * m * n * (k_in - k) / FP8_OPS_PER_S + 2 * m * n * k / BF16_OPS_PER_S)
            gemm_floor_s = max(gemm_bytes / HBM_BYTES_PER_S,
                               2 * m * n * (k_in - k) / FP8_OPS_PER_S + 2 * m * n * k / BF16_OPS_PER_S)
            best_w8a8 = min(t for t in (fp8, int8) if t is not None)
            b2b = {}
            if m <= 16:
                b2b = dict(
                    b2b_bf16_us=_b2b_time(lambda w: torch.matmul(x, w.T), lin.weight.clone, 2 * n * k_in),
                    b2b_fp8_us=_b2b_time(lambda w: torch._scaled_mm(x_f8, w.T, scale_a=sx, scale_b=sw_row,
                                                                    out_dtype=torch.bfloat16), w_f8.clone, n * k_in),
                    b2b_osc_us=_b2b_time(lambda w: osc_linear_2d(x, w, cfg), lambda: clone_weights(kw), w_bytes),
                    b2b_gemm_us=_b2b_time(lambda w: osc_gemm(a, sa, w, xo, torch.bfloat16, cfg),
                                          lambda: clone_weights(kw), w_bytes))
                b2b["b2b_gemm_roofline_pct"] = 100 * gemm_floor_s / (b2b["b2b_gemm_us"] * 1e-6)
                # the floor of this harness: nothing moving these bytes (half read, half written) can be faster
                src = torch.empty(gemm_bytes // 2, dtype=torch.uint8, device=dev)
                dst = torch.empty_like(src)
                b2b["copy_us"] = _graph_time(lambda: dst.copy_(src))
                b2b["copy_roofline_pct"] = 100 * gemm_bytes / HBM_BYTES_PER_S / (b2b["copy_us"] * 1e-6)
            rows.append(Row(name, n, k_in, m, k, bf16, int8, fp8, gemm, full, fb,
                            full_bytes / (full * 1e-6) / 1e12, ops / (full * 1e-6) / 1e12,
                            100 * floor_s / (full * 1e-6), 100 * gemm_floor_s / (gemm * 1e-6),
                            best_w8a8 / full, bf16 / full, **b2b, path=cfg.label, cast_us=cast))
    return rows


def bench_gemm(ms=(1, 8, 16, 64, 256, 1024, 4096, 16384), k_outs=(64, 128), shapes=None, progress=True,
               fmt: str = "mxfp4", group_size: int | None = None) -> list[Row]:
    from tqdm.auto import tqdm

    _need_cuda("gemm")
    rows = []
    for name, n, k in tqdm(shapes or qwen3_shapes(), desc=f"bench gemm {fmt}", disable=not progress):
        rows += bench_shape(name, n, k, list(ms), list(k_outs), fmt, group_size)
    return rows


def markdown(rows: list[Row]) -> str:
    head = ("| shape N×K | M | k | OSC GEMM path | BF16 µs | INT8 µs | FP8 µs | OSC GEMM µs | OSC+split µs | "
            "FP8 fallback µs | OSC TB/s | OSC TFLOP/s | % roofline (all) | % roofline (GEMM) | × best W8A8 | × BF16 |")
    out = [head, "|" + "---|" * 16]
    for r in rows:
        i8 = f"{r.int8_us:.1f}" if r.int8_us is not None else "n/a"
        out.append(f"| {r.shape} {r.n}×{r.k_in} | {r.m} | {r.k_out} | {r.path or 'n/a'} | {r.bf16_us:.1f} | {i8} | "
                   f"{r.fp8_us:.1f} | {r.osc_gemm_us:.1f} | {r.osc_us:.1f} | {r.fallback_us:.1f} | {r.osc_tbps:.2f} | "
                   f"{r.osc_tflops:.0f} | {r.roofline_pct:.0f} | {r.gemm_roofline_pct:.0f} | "
                   f"{r.vs_best_w8a8:.2f} | {r.vs_bf16:.2f} |")
    b2b = [r for r in rows if r.b2b_osc_us is not None]
    if b2b:
        out += ["", "Back to back (a graph of calls in a row on distinct weight copies, µs per call):", "",
                "| shape N×K | M | k | BF16 µs | FP8 µs | OSC+split µs | × FP8 | × BF16 | OSC GEMM µs | "
                "GEMM % roofline | copy of the GEMM's bytes, flushed: µs (% roofline) |", "|" + "---|" * 11]
        out += [f"| {r.shape} {r.n}×{r.k_in} | {r.m} | {r.k_out} | {r.b2b_bf16_us:.1f} | {r.b2b_fp8_us:.1f} | "
                f"{r.b2b_osc_us:.1f} | {r.b2b_fp8_us / r.b2b_osc_us:.2f} | {r.b2b_bf16_us / r.b2b_osc_us:.2f} | "
                + (f"{r.b2b_gemm_us:.1f} | {r.b2b_gemm_roofline_pct:.0f} | {r.copy_us:.1f} "
                   f"({r.copy_roofline_pct:.0f}) |" if r.b2b_gemm_us else "n/a | n/a | n/a |")
                for r in b2b]
    return "\n".join(out)


def targets(rows: list[Row]) -> list[str]:
    """The issue's three targets, checked row by row."""
    small = [r for r in rows if r.m <= 16]
    large = [r for r in rows if r.m >= 4096]
    mid = [r for r in rows if 16 < r.m < 4096]
    lines = [
        f"M <= 16, OSC+split >= 1.8x best W8A8: {sum(r.vs_best_w8a8 >= 1.8 for r in small)}/{len(small)} rows "
        f"(worst {min((r.vs_best_w8a8 for r in small), default=float('nan')):.2f}x)",
        f"M <= 16, GEMM >= 80% of its HBM roofline: {sum(r.gemm_roofline_pct >= 80 for r in small)}/{len(small)} "
        f"(worst {min((r.gemm_roofline_pct for r in small), default=float('nan')):.0f}%)",
        f"M >= 4096, OSC+split >= 0.9x cuBLAS FP8: {sum(r.fp8_us / r.osc_us >= 0.9 for r in large)}/{len(large)} "
        f"(worst {min((r.fp8_us / r.osc_us for r in large), default=float('nan')):.2f}x)",
        f"16 < M < 4096, not slower than BF16: {sum(r.vs_bf16 >= 1 for r in mid)}/{len(mid)} "
        f"(worst {min((r.vs_bf16 for r in mid), default=float('nan')):.2f}x)",
    ]
    cast = [r for r in large if r.cast_us]
    if cast:
        paid = [(r.cast_us + r.fp8_us) / r.osc_us for r in cast]
        lines.append(f"M >= 4096, OSC+split >= 0.9x (x cast to e4m3 + cuBLAS FP8), W8A8 paying for its activation: "
                     f"{sum(v >= 0.9 for v in paid)}/{len(paid)} (worst {min(paid):.2f}x)")
        # what 0.9x cuBLAS FP8 leaves the GEMM if split-quantize ran at the speed of torch's plain cast of x
        need = [2 * r.m * r.n * r.k_in / (r.fp8_us / 0.9 - r.cast_us) / 1e6 if r.fp8_us / 0.9 > r.cast_us
                else float("inf") for r in cast]
        lines.append(f"M >= 4096, GEMM TFLOP/s that 0.9x cuBLAS FP8 needs with split-quantize as fast as that cast: "
                     f"{min(need):.0f} to {max(need):.0f}; {sum(v > FP8_OPS_PER_S / 1e12 for v in need)}/{len(need)} "
                     f"rows above cuBLAS FP8's {FP8_OPS_PER_S / 1e12:.0f} at 8192^3")
    b2b = [r.b2b_fp8_us / r.b2b_osc_us for r in small if r.b2b_osc_us is not None]
    if b2b:
        lines.append(f"M <= 16 back to back, OSC+split >= 1.8x cuBLAS FP8: {sum(v >= 1.8 for v in b2b)}/{len(b2b)} "
                     f"(range {min(b2b):.2f}x to {max(b2b):.2f}x)")
    pct = [r.b2b_gemm_roofline_pct for r in small if r.b2b_gemm_roofline_pct is not None]
    if pct:
        lines.append(f"M <= 16 back to back, GEMM >= 80% of its HBM roofline: {sum(v >= 80 for v in pct)}/{len(pct)} "
                     f"(range {min(pct):.0f}% to {max(pct):.0f}%)")
    cp = [r.copy_roofline_pct for r in small if r.copy_roofline_pct is not None]
    if cp:
        lines.append(f"M <= 16, a plain copy of the GEMM's bytes, timed flushed as the GEMM: {min(cp):.0f}% to "
                     f"{max(cp):.0f}% of the same roofline")
        # the 1.8x target's ceiling in this harness: a layer that only moved its GEMM's bytes, at the copy's speed,
        # with no split-quantize and no arithmetic
        ceil = [_best_w8a8_us(r) / r.copy_us for r in small if r.copy_us]
        lines.append(f"M <= 16, that copy alone >= 1.8x best W8A8 (the target's ceiling here): "
                     f"{sum(v >= 1.8 for v in ceil)}/{len(ceil)} (range {min(ceil):.2f}x to {max(ceil):.2f}x)")
    return lines


def _best_w8a8_us(r: Row) -> float:
    """The faster W8A8 column of a row (INT8 where cuBLAS took the shape)."""
    return min(t for t in (r.int8_us, r.fp8_us) if t is not None)


def save(rows: list[Row], path_json: str | None = None, path_md: str | None = None) -> None:
    if path_json:
        with open(path_json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if path_md:
        with open(path_md, "w") as f:
            f.write(markdown(rows) + "\n\n" + "\n".join(f"- {t}" for t in targets(rows)) + "\n")


def load(path_json: str) -> list[Row]:
    """Rows saved by :func:`save` (a run on the GPU, re-plotted or re-tabled anywhere)."""
    with open(path_json) as f:
        data = json.load(f)
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise ValueError(f"{path_json} holds no benchmark rows; write one with `oscquant bench gemm --json`")
    try:
        return [Row(**d) for d in data]
    except TypeError as e:
        raise ValueError(f"{path_json} is not an `oscquant bench gemm --json` file: {e}") from None


DIFF_COLUMNS = (("OSC + split", "osc_us"), ("OSC GEMM", "osc_gemm_us"), ("cuBLAS FP8", "fp8_us"),
                ("cuBLAS BF16", "bf16_us"), ("b2b OSC + split", "b2b_osc_us"), ("b2b cuBLAS FP8", "b2b_fp8_us"))


def diff(base: list[Row], rows: list[Row], slower: float = 0.97) -> str:
    """Markdown comparing a run with an earlier one (``base``) on the rows both have: old time / new time by M
    (median and range over the M's rows) for OSC's and cuBLAS's columns, so that a change shows beside how much the
    baselines moved between the runs; then every row whose OSC + split took longer by more than 1 / ``slower``, with
    its GEMM alone and the rest (split-quantize's unhidden share) old and new."""
    old = {(r.shape, r.m, r.k_out): r for r in base}
    pairs = [(old[k], r) for r in rows if (k := (r.shape, r.m, r.k_out)) in old]
    if not pairs:
        raise ValueError("the two runs share no row (shape, M, k); compare runs of the same `oscquant bench gemm` grid")
    lines = ["| M | " + " | ".join(name for name, _ in DIFF_COLUMNS) + " |", "|---" * (1 + len(DIFF_COLUMNS)) + "|"]
    for m in sorted({new.m for _, new in pairs}):
        cells = []
        for _, field in DIFF_COLUMNS:
            v = sorted(getattr(a, field) / getattr(b, field) for a, b in pairs
                       if b.m == m and getattr(a, field) and getattr(b, field))
            cells.append(f"{v[len(v) // 2]:.2f} ({v[0]:.2f}-{v[-1]:.2f})" if v else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    worse = sorted(((a, b) for a, b in pairs if a.osc_us / b.osc_us < slower), key=lambda p: p[0].osc_us / p[1].osc_us)
    lines += ["", f"Rows whose OSC + split took longer than 1/{slower:.2f} of the earlier run: {len(worse)} of {len(pairs)}"]
    if worse:
        lines += ["", "| shape | M | k | OSC + split µs | old / new | OSC GEMM µs | old / new | rest µs (split-quantize's "
                  "share) | GEMM path |", "|---|---|---|---|---|---|---|---|---|"]
        for a, b in worse:
            path = (b.path or "n/a") if a.path == b.path else f"{a.path or 'n/a'} → {b.path or 'n/a'}"
            lines.append(f"| {b.shape} {b.n}×{b.k_in} | {b.m} | {b.k_out} | {a.osc_us:.1f} → {b.osc_us:.1f} | "
                         f"{a.osc_us / b.osc_us:.2f} | {a.osc_gemm_us:.1f} → {b.osc_gemm_us:.1f} | "
                         f"{a.osc_gemm_us / b.osc_gemm_us:.2f} | {a.osc_us - a.osc_gemm_us:.1f} → "
                         f"{b.osc_us - b.osc_gemm_us:.1f} | {path} |")
    return "\n".join(lines)


def _speed_panels(count: int):
    """A figure of ``count`` panels, three a row, sharing the speed axis (the two plots below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    return fig, axes


def _style_speed_panel(ax, title: str) -> None:
    """Both axes log 2 with plain tick labels (0.5, 1, 2 and 1, 4, ..., 16384 rather than powers of two), the BF16
    line at 1, the title and the grid."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens M")
    ax.grid(alpha=0.3, which="both")


def _save_speed_panels(fig, axes, used: int, title: str, path_png: str):
    """Labels, the first panel's legend, the spare panels hidden; written to path_png and closed."""
    import matplotlib.pyplot as plt

    for ax in axes[:, 0]:
        ax.set_ylabel("speed vs cuBLAS BF16 (×)")
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return fig


def plot(rows: list[Row], path_png: str, k_out: int | None = None):
    """One panel per layer shape: speed relative to cuBLAS BF16 against tokens M (both log scale) for
    OSC + split-quantize, the two cuBLAS W8A8 GEMMs and the FP8-fallback layer, k = k_out planted
    channels (the largest in the rows by default); the issue's targets as grey marks. Returns the figure."""
    k_out = k_out or max(r.k_out for r in rows)
    rows = [r for r in rows if r.k_out == k_out]
    shapes = list(dict.fromkeys((r.shape, r.n, r.k_in) for r in rows))
    if not shapes:
        raise ValueError(f"no rows with k = {k_out} planted channels to plot")
    fig, axes = _speed_panels(len(shapes))
    series = [("OSC + split (W4A4)", "osc_us", "C0", "o-"), ("cuBLAS FP8 W8A8", "fp8_us", "C1", "s--"),
              ("cuBLAS INT8 W8A8", "int8_us", "C2", "^--"), ("OSC FP8 fallback", "fallback_us", "C3", "x:")]
    for ax, (name, n, k) in zip(axes.flat, shapes):
        sel = sorted((r for r in rows if (r.shape, r.n, r.k_in) == (name, n, k)), key=lambda r: r.m)
        for label, field, color, style in series:
            pts = [(r.m, r.bf16_us / getattr(r, field)) for r in sel if getattr(r, field)]
            ax.plot(*zip(*pts), style, color=color, label=label, ms=4)
        for r in sel:  # the targets: 1.8x the best W8A8 up to 16 tokens, 0.9x cuBLAS FP8 from 4096
            if r.m <= 16:
                ax.plot(r.m, 1.8 * r.bf16_us / _best_w8a8_us(r), "_", color="grey", ms=12, mew=2)
            elif r.m >= 4096:
                ax.plot(r.m, 0.9 * r.bf16_us / r.fp8_us, "_", color="grey", ms=12, mew=2)
        _style_speed_panel(ax, f"{name} {n}×{k}")
    axes.flat[0].plot([], [], "_", color="grey", ms=12, mew=2, label="target (M ≤ 16, M ≥ 4096)")
    return _save_speed_panels(fig, axes, len(shapes),
                              f"oscquant bench gemm, k = {k_out} outlier channels (CUDA graphs, L2 flushed)", path_png)


def formats_table(runs: dict[str, list[Row]]) -> str:
    """Runs of `bench gemm` in several 4-bit formats (name -> rows; the first the reference, e.g. MXFP4) side by
    side: OSC + split-quantize µs per format on the rows of the first run, each format's speed over the first's, and
    each one's over BF16 (BF16 and FP8 from the first run). A row missing from a run shows as n/a."""
    names = list(runs)
    if not names:
        raise ValueError("formats_table needs at least one run")
    by_key = {n: {(r.shape, r.m, r.k_out): r for r in rows} for n, rows in runs.items()}
    lines = ["| shape | M | k | BF16 µs | FP8 µs | " + " | ".join(f"{n} µs" for n in names) + " | "
             + " | ".join(f"{n} × {names[0]}" for n in names[1:]) + (" | " if names[1:] else "")
             + " | ".join(f"{n} × BF16" for n in names) + " |"]
    lines.append("|" + "---|" * (5 + 3 * len(names) - 1))
    cell = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for key, base in by_key[names[0]].items():
        us = [by_key[n][key].osc_us if key in by_key[n] else None for n in names]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {base.bf16_us:.1f} | {base.fp8_us:.1f} | "
                     + " | ".join("n/a" if u is None else f"{u:.1f}" for u in us) + " | "
                     + " | ".join(cell(None if u is None else us[0] / u) for u in us[1:]) + (" | " if us[1:] else "")
                     + " | ".join(cell(None if u is None else base.bf16_us / u) for u in us) + " |")
    return "\n".join(lines)


def plot_formats(runs: dict[str, list[Row]], path_png: str, k_out: int | None = None):
    """One panel per layer shape: speed relative to cuBLAS BF16 against tokens M for OSC + split-quantize in each
    format of ``runs`` (name -> rows of `bench gemm`), and cuBLAS FP8 W8A8 from the first run. Returns the figure."""
    names = list(runs)
    k_out = k_out or max(r.k_out for r in runs[names[0]])
    shapes = list(dict.fromkeys(r.shape for r in runs[names[0]] if r.k_out == k_out))
    if not shapes:
        raise ValueError(f"no rows with k = {k_out} planted channels to plot")
    fig, axes = _speed_panels(len(shapes))
    for ax, shape in zip(axes.flat, shapes):
        for i, name in enumerate(names):
            sel = sorted((r for r in runs[name] if r.shape == shape and r.k_out == k_out), key=lambda r: r.m)
            ax.plot([r.m for r in sel], [r.bf16_us / r.osc_us for r in sel], "o-", color=f"C{i}", label=name, ms=4)
            if i == 0:
                ax.plot([r.m for r in sel], [r.bf16_us / r.fp8_us for r in sel], "s--", color="grey",
                        label="cuBLAS FP8 W8A8", ms=4)
        _style_speed_panel(ax, shape)
    return _save_speed_panels(fig, axes, len(shapes),
                              f"OSC + split-quantize by 4-bit format, k = {k_out} (CUDA graphs, L2 flushed)", path_png)


SWEEP_CONFIGS = {  # GemmConfig fields: bm, bn, split_k, op_f8, warps, stages, bk, expand
    "decode": [(16, bn, sk, False, w, st, 256, False) for bn, sk, w, st in
               [(32, 1, 4, 2), (32, 2, 4, 2), (32, 4, 4, 2), (32, 8, 4, 2), (64, 1, 4, 2), (64, 2, 4, 2),
                (64, 4, 4, 2), (64, 8, 4, 2), (128, 1, 4, 2), (128, 2, 8, 2), (128, 4, 8, 2), (32, 4, 2, 2),
                (64, 4, 8, 2), (32, 4, 4, 1), (64, 2, 4, 3)]],
    "prefill": [(bm, bn, 1, True, w, st, 128, True) for bm, bn, w, st in
                [(128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 4), (256, 128, 8, 3), (128, 128, 4, 4),
                 (64, 256, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4)]] + [(128, 128, 1, True, 8, 3, 128, False)],
}


def sweep(shapes=(("8B gate+up", 24576, 4096), ("8B o", 4096, 4096), ("8B down", 4096, 12288)), ms=(1, 16),
          k: int = 128) -> str:
    """Time the OSC GEMM alone under several tile configs; prints one line per (shape, M, config)."""
    _need_cuda("sweep")
    from .kernels.ops import GemmConfig, osc_gemm, split_quantize

    lines = ["| shape | M | BM | BN | split-K | FP8 ops | warps | stages | µs |", "|" + "---|" * 9]
    for case in sweep_cases(ms, k, shapes):
        m, kw = case.m, case.kw
        for c in SWEEP_CONFIGS["decode" if m <= 16 else "prefill"]:
            cfg = GemmConfig(*c)
            if m <= 16 or cfg.expand or m <= 1024:
                xo, a, sa = split_quantize(case.x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
                try:
                    t = _graph_time(lambda: osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg))
                except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                    lines.append(f"| {case.name} | {m} | {c} failed: {type(e).__name__} |")
                    continue
                lines.append(f"| {case.name} {case.n}×{case.k_in} | {m} | " + " | ".join(str(v) for v in c)
                             + f" | {t:.1f} |")
    return "\n".join(lines)


@dataclass
class SweepCase:
    """One (layer shape, M) of a config sweep: an MXFP4 OSC layer's kernel weights, a random BF16 input
    and the two cuBLAS baselines as calls on a weight (the layer's own by default)."""
    name: str
    n: int
    k_in: int
    m: int
    x: torch.Tensor
    kw: object
    weight: torch.Tensor  # BF16
    weight_f8: torch.Tensor
    x_f8: torch.Tensor  # cast ahead: the W8A8 columns time the GEMM alone
    ones_m: torch.Tensor  # row-wise scales for _scaled_mm
    ones_n: torch.Tensor

    def bf16(self, w=None):
        return torch.matmul(self.x, (self.weight if w is None else w).T)

    def fp8(self, w=None):
        return torch._scaled_mm(self.x_f8, (self.weight_f8 if w is None else w).T, scale_a=self.ones_m,
                                scale_b=self.ones_n, out_dtype=torch.bfloat16)


def sweep_cases(ms, k: int = 128, shapes=None):
    """The (shape, M) cases of a sweep, shape by shape (the Qwen3 shapes by default), k planted outlier channels."""
    from .config import LayerScheme
    from .kernels.ops import layer_weights
    from .linear import OSCLinear

    for name, n, k_in in shapes or qwen3_shapes():
        lin = torch.nn.Linear(k_in, n, bias=False, device="cuda", dtype=torch.bfloat16)
        kw = layer_weights(OSCLinear.from_linear(lin, LayerScheme("mxfp4", k), torch.arange(k)))
        w_f8 = lin.weight.to(torch.float8_e4m3fn)
        for m in ms:
            x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
            yield SweepCase(name, n, k_in, m, x, kw, lin.weight, w_f8, x.to(torch.float8_e4m3fn),
                            torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda"))
        torch.cuda.empty_cache()


SMALL_M_SWEEP = [  # transposed GEMM: bn, warps, stages, split-K
    (64, 4, 4, 1), (64, 4, 6, 1), (64, 4, 4, 2), (64, 4, 4, 4), (128, 4, 4, 1), (128, 4, 4, 2), (128, 8, 4, 1),
    (32, 2, 4, 1), (32, 2, 4, 2), (32, 2, 6, 4), (16, 1, 4, 2), (16, 1, 6, 4)]


def sweep_small(shapes=None, ms=(1, 16, 64), k: int = 128, configs=None) -> str:
    """The transposed small-M GEMM under several configs (each timed with its split-quantize),
    beside BF16, cuBLAS FP8, split-quantize alone and the untransposed decode GEMM, in one run."""
    _need_cuda("small")
    from .kernels.ops import GemmConfig, osc_linear_2d, split_quantize
    from .kernels.triton_osc import MODE_F16

    configs = configs or SMALL_M_SWEEP
    lines = ["| shape | M | BF16 | FP8 | split alone | untransposed (M <= 16) or default | " + " | ".join(map(str, configs)) + " |",
             "|" + "---|" * (6 + len(configs))]
    for c in sweep_cases(ms, k, shapes):
        x, kw, m, n = c.x, c.kw, c.m, c.n
        cells = [_graph_time(c.bf16), _graph_time(c.fp8),
                 _graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F16, kw.k_main))]
        # up to 16 rows the untransposed decode GEMM, above it the default path for this M
        old = GemmConfig(16, 64, 2, False, 4, 3, bk=256) if n >= 16384 else GemmConfig(16, 32, 4, False, 2, 2, bk=256)
        cells.append(_graph_time(lambda: osc_linear_2d(x, kw, old if m <= 16 else None)))
        mp = max(16, 1 << (m - 1).bit_length())
        for bn, w, st, sk in configs:
            cfg = GemmConfig(mp, bn, sk, False, w, st, swap=True)
            try:  # osc_linear_2d: split-quantize, then the GEMM under cfg
                cells.append(_graph_time(lambda: osc_linear_2d(x, kw, cfg)))
            except Exception as e:  # a config the compiler rejects
                print(f"{c.name} M={m} {cfg}: {type(e).__name__}: {e}")
                cells.append(float("nan"))
        lines.append(f"| {c.name} {n}×{c.k_in} | {m} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)
