"""MoE experts through the kernels: every (token, expert) pair of a layer in one launch per step.

A Qwen3-MoE block routes each token to k of E experts. Run as one OSC layer per expert, a step asks the host which
experts its tokens reached (a device-to-host copy, which a CUDA graph cannot capture) and then launches two kernels
per projection per expert reached. Here the experts' kernel weights are stacked once ([E, N, ...]); the router's
choice stays on the device as int32 expert ids, and one grouped split-quantize plus one grouped transposed GEMM per
projection take all T × k pairs at once, each program reading its tile's expert id and that expert's weights. The
work of a step has a fixed shape (T × k pairs, and a tile table sized for the worst routing), so a CUDA graph captures
it.

Decoding (fewer pairs than experts, which then seldom share an expert) runs one pair a program. A prompt's pairs are
sorted by expert on the device (``route``) and cut into tiles of up to 16-128 pairs of one expert, so that an expert's
weights are read once a tile instead of once a pair, and each MMA is filled by a tile's tokens instead of padded from
one. Past ``MAX_PAIRS`` pairs the experts' own layers run, each on all of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .layout import KernelWeights, kernel_weights
from .ops import FMT_IDS, GemmConfig, osc_gemm, split_quantize, supported

# above this many (token, expert) pairs a step runs the experts' own layers instead (each expert's GEMMs on all of its
# tokens). The grouped kernels in tiles of pairs measured faster than those up to here (H100, Qwen3-30B-A3B shapes,
# docs/bench/h100_moe_tiles_2026-12-06.md): 65536 pairs (an 8192-token prompt) 10.2 ms a layer eagerly against 67.1;
# larger steps were not measured
MAX_PAIRS = 65536
PROJECTIONS = ("gate_up_proj", "down_proj")  # convert.ExpertLinears' layers of each expert
PAIR_TILES = True  # False: one pair a program at any size (benchmarks compare the two)
# FP8 experts (the down_proj fallback) from this many pairs a step (in tiles): the plain FP8 GEMM over the tile table
# instead of the transposed one, 1.12-1.64x faster at 2048-65536 pairs on Qwen3-30B-A3B's down (H100,
# scripts/moe_tiles.py, docs/bench/h100_moe_plain_2026-12-07.md); fewer pairs were not measured
FP8_PLAIN_PAIRS = 2048
# from this many pairs a step (in tiles), every expert's 4-bit weights are expanded to e4m3 and the plain FP8 GEMM runs
# (grouped_config). None: never. Off: on the H100 the expansion of 30B-A3B's gate_up experts alone took ~750 µs, and the
# path beat the folded tiles only at 65536 pairs on 128 x 256 tiles, by 8 % (within run-to-run noise), and lost on
# 128 x 128 (same file)
EXPAND_PAIRS: int | None = None
# ... where the e4m3 copy of a projection's experts fits this many bytes (a workspace for the call: Qwen3-30B-A3B's
# gate_up 403 MB; Qwen3-235B-A22B's 1.6 GB would not, and keeps the tiles)
EXPAND_MAX_BYTES = 1 << 30


@dataclass
class StackedExperts:
    """The kernel weights of E experts' layers of one projection, stacked along a leading expert axis."""
    weights: KernelWeights  # codes [E, N, ...], rel_exp [E, N, Kk/32], row_scale [E, N], w_outlier [E, N, k],
    # outlier_idx [E, k], keep [E, Kk], bias [E, N] or None

    @property
    def experts(self) -> int:
        return self.weights.row_scale.shape[0]

    @property
    def out_features(self) -> int:
        return self.weights.row_scale.shape[1]


def _unlike(layers: list) -> str | None:
    """None if ``layers`` are OSC layers of one format, shape and outlier count (what one stack holds), else why not."""
    from ..linear import OSCLinear

    if not layers or not all(isinstance(m, OSCLinear) for m in layers):
        return "not every expert's layer of a projection is an OSC layer"
    first = layers[0]
    key = (first.scheme.format, first.scheme.group_size, first.in_features, first.out_features, first.k,
           first.bias is not None)
    for m in layers:
        if (m.scheme.format, m.scheme.group_size, m.in_features, m.out_features, m.k, m.bias is not None) != key:
            return (f"the experts' layers differ ({m.extra_repr()} against {first.extra_repr()}); the grouped kernels "
                    "need one format, shape and outlier count for all experts")
    return None


@torch.compiler.disable  # built once, eagerly: never traced into a compiled step
def stack_experts(layers: list) -> StackedExperts:
    """Stack the kernel weights of one projection's expert layers (OSCLinear, one scheme and shape for all). Each
    layer's own kernel weights then become views into the stack, so that its own calls (long prompts) add no copy."""
    why = _unlike(layers)
    if why:
        raise ValueError(f"stack_experts takes the OSC layers of one projection of every expert: {why}")
    first = layers[0]
    dev = first.compute_device
    kws = [kernel_weights(m, frag=False) for m in layers]

    def stack(name):
        parts = [getattr(kw, name) for kw in kws]
        return None if parts[0] is None else torch.stack(parts).contiguous()

    w = KernelWeights(kws[0].fmt, stack("codes"), stack("rel_exp"), stack("row_scale"), kws[0].k_main,
                      stack("w_outlier"), stack("outlier_idx"), stack("keep"), stack("bias"))
    for e, m in enumerate(layers):  # the layers' own kernel weights: views, and no fragment layout of their own
        m._cache[("kernel", dev)] = KernelWeights(
            w.fmt, w.codes[e], None if w.rel_exp is None else w.rel_exp[e], w.row_scale[e], w.k_main,
            w.w_outlier[e], w.outlier_idx[e], w.keep[e], None if w.bias is None else w.bias[e])
        if w.codes.is_cuda:
            m.park_codes()  # the stack is the GPU's one copy of the experts' codes
    return StackedExperts(w)


@dataclass
class Routing:
    """A step's (token, expert) pairs in the order the grouped kernels take them, and their token tiles."""
    experts: torch.Tensor  # int32 [P]: each pair's expert
    tokens: torch.Tensor  # int32 [P]: each pair's token row
    tiles: torch.Tensor  # int32 [tiles, 3]: (first pair, pairs <= tile_m, expert); unused slots have 0 pairs
    tile_m: int
    order: torch.Tensor | None  # int64 [P]: pair p is the router's order[p]-th (token, slot); None: the router's order


def tile_rows(pairs: int, experts: int) -> int:
    """Pairs a program of the grouped GEMM: one while a step's pairs hardly meet on an expert (decoding), else its
    pairs sorted by expert and cut into tiles of 16-128 pairs of one expert, each tile reading its expert's weights
    once: twice the pairs an expert gets on average, rounded up to a power of two (H200, scripts/moe_tiles.py,
    docs/bench/h200_moe_tiles_2026-12-06.md: 32 best at 16 an expert, 128 at 128 and 512)."""
    if pairs < experts or not PAIR_TILES:
        return 1
    return min(128, max(16, triton.next_power_of_2(2 * triton.cdiv(pairs, experts))))


def route(top_k_index: torch.Tensor, num_experts: int, tile_m: int | None = None) -> Routing:
    """The grouped kernels' plan for a router's choice top_k_index [T, k], all on its device (no host sync, so a
    CUDA graph captures it): with tile_m > 1 the pairs sorted by expert (stably) and cut into tiles of at most tile_m
    pairs of one expert. The tile table has room for the most tiles any routing needs, cdiv(P, tile_m) + min(E, P)."""
    t, k = top_k_index.shape
    p = t * k
    dev = top_k_index.device
    experts = top_k_index.reshape(-1).to(torch.int32)
    tokens = torch.arange(p, device=dev, dtype=torch.int32) // k
    tile_m = tile_m or tile_rows(p, num_experts)
    if tile_m == 1:
        tiles = torch.stack([torch.arange(p, device=dev, dtype=torch.int32), torch.ones_like(experts), experts], 1)
        return Routing(experts, tokens, tiles, 1, None)
    order = torch.argsort(experts, stable=True)
    experts, tokens = experts[order], tokens[order]
    counts = torch.zeros(num_experts, device=dev, dtype=torch.int32).scatter_add_(
        0, experts.long(), torch.ones_like(experts))
    per_expert = (counts + tile_m - 1) // tile_m
    tiles_end = torch.cumsum(per_expert, 0, dtype=torch.int32)  # tile slots [end - per_expert, end) are expert e's
    first_pair = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    slots = torch.arange(triton.cdiv(p, tile_m) + min(num_experts, p), device=dev, dtype=torch.int32)
    e = torch.searchsorted(tiles_end, slots, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    j = slots - (tiles_end[e] - per_expert[e])  # the slot's tile within its expert (past the last one: unused)
    rows = (counts[e] - j * tile_m).clamp_(0, tile_m)
    tiles = torch.stack([first_pair[e] + j * tile_m, rows, e], 1).to(torch.int32).contiguous()
    return Routing(experts, tokens, tiles, tile_m, order)


def grouped_config(pairs: int, n: int, k_pad: int, fmt: str, tile_m: int = 1, experts: int = 1,
                   group: int = 0) -> GemmConfig:
    """The grouped GEMM's config. One pair a program (tile_m = 1): the transposed GEMM, 32 weight rows on 2 warps as
    the decode configs of gemm_config, FP16 operands for 4-bit weights and e4m3 for FP8 ones. Tiles of tile_m pairs:
    as fold_config's, 64 weight rows on 4 warps up to 32 pairs a tile, 128 on 8 warps from 64 (the block factors
    folded into e4m3 weights for MXFP4). Split-K (a power of two up to 8, at least 2 steps of 128 columns each) until
    about two programs an SM. FP8 experts in tiles from ``FP8_PLAIN_PAIRS`` pairs, and 4-bit ones from
    ``EXPAND_PAIRS`` (off) where the expanded copy of the ``experts`` experts fits ``EXPAND_MAX_BYTES``: the plain FP8
    GEMM over the tile table (4-bit weights expanded to e4m3 first, beside split-quantize), 128 weight rows a tile on 4
    warps, or 256 on 8 warps for tiles of 128 pairs (the best of scripts/moe_tiles.py's configs at 2048-65536 pairs).
    NVFP4 keeps FP16 operands and the transposed GEMM throughout (its weights have no e4m3 form), and so does INT4 with
    ``group`` scales (each group's partial products get its scales)."""
    fits = experts * n * k_pad <= EXPAND_MAX_BYTES
    plain = fmt == "fp8" and pairs >= FP8_PLAIN_PAIRS
    expand = fmt in ("mxfp4", "int4") and not group and EXPAND_PAIRS is not None and pairs >= EXPAND_PAIRS and fits
    if tile_m > 1 and (plain or expand):
        wide = tile_m >= 128
        return GemmConfig(tile_m, 256 if wide else 128, 1, True, 8 if wide else 4, 3 if wide else 4, expand=expand,
                          pdl=expand)
    bn, warps = (32, 2) if tile_m == 1 else (64, 4) if tile_m <= 32 else (128, 8)
    programs = triton.cdiv(n, bn) * triton.cdiv(pairs, tile_m)
    split = 1
    while split < 8 and programs * split < 264 and k_pad // (128 * split * 2) >= 2:
        split *= 2
    if tile_m == 1:
        return GemmConfig(1, 32, split, fmt == "fp8", 2, 6 if k_pad > n else 3, swap=True)
    stages = 4 if split == 1 and tile_m * bn <= 64 * 64 else 3
    return GemmConfig(tile_m, bn, split, fmt in ("mxfp4", "fp8"), warps, stages, swap=True, fold=fmt == "mxfp4")


def grouped_linear(x: torch.Tensor, rows: torch.Tensor, routing: Routing, stacked: StackedExperts,
                   cfg: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [P, N]: row p is x[rows[p]] through expert routing.experts[p]'s layer (split-quantize and the dual-path
    GEMM), for x [T, K] and int32 rows [P] on x's device (``out``: y's buffer). The expert ids are not checked
    against E on the host (that would wait for the GPU); they come from the router's top-k, which cannot exceed it."""
    w = stacked.weights
    experts = routing.experts
    if x.dim() != 2 or x.shape[1] > w.k_main or rows.shape != experts.shape or rows.dim() != 1:
        raise ValueError(f"grouped_linear takes x [T, K <= {w.k_main}] and int32 rows of the routing's shape [P]; "
                         f"got x {tuple(x.shape)}, rows {tuple(rows.shape)}, experts {tuple(experts.shape)}")
    if rows.dtype != torch.int32 or experts.dtype != torch.int32:
        raise ValueError(f"rows and experts must be int32 (got {rows.dtype}, {experts.dtype})")
    if w.fmt not in FMT_IDS:
        raise ValueError(f"no grouped kernel for format {w.fmt}")
    p = rows.numel()
    cfg = cfg or grouped_config(p, stacked.out_features, w.k_main, w.fmt, routing.tile_m, stacked.experts, w.group)
    if cfg.bm < routing.tile_m:
        raise ValueError(f"the routing's tiles hold up to {routing.tile_m} pairs, more than the config's {cfg.bm}")
    x = x.contiguous()
    # the weight expansion (long prompts) reads only the weights: it runs beside split-quantize (overlap.py)
    xo, a, sa = split_quantize(x, w.keep, w.outlier_idx, w.fmt, cfg.mode, w.k_main, src=rows, grp=experts,
                               pdl=cfg.expand and cfg.pdl, shared_beside=False, group=w.group)
    y = out if out is not None else torch.empty(p, stacked.out_features, dtype=x.dtype, device=x.device)
    if p == 0:
        return y
    return osc_gemm(a, sa, w, xo, x.dtype, cfg, out=y, groups=routing.tiles)


def experts_supported(projections: list[list], x: torch.Tensor) -> str | None:
    """None if the grouped kernels can run these experts on x (each projection's layers alike, in a format with a
    kernel), else why not. An MoE model quantized with per-layer choices (policy="auto") may differ between experts;
    its experts then run one by one."""
    for layers in projections:
        why = _unlike(layers) or supported(layers[0], x)
        if why:
            return why
    return None


@torch.library.custom_op("oscquant::osc_grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, tiles: torch.Tensor, tile_m: int,
                      codes: torch.Tensor, rel_exp: torch.Tensor | None, row_scale: torch.Tensor,
                      w_outlier: torch.Tensor, outlier_idx: torch.Tensor, keep: torch.Tensor,
                      bias: torch.Tensor | None, fmt: str, k_main: int) -> torch.Tensor:
    w = KernelWeights(fmt, codes, rel_exp, row_scale, k_main, w_outlier, outlier_idx, keep, bias)
    return grouped_linear(x, rows, Routing(experts, rows, tiles, tile_m, None), StackedExperts(w))


@grouped_linear_op.register_fake
def _(x, rows, experts, tiles, tile_m, codes, rel_exp, row_scale, w_outlier, outlier_idx, keep, bias, fmt, k_main):
    return x.new_empty(rows.shape[0], row_scale.shape[1])


def _grouped(x, rows, routing: Routing, stacked: StackedExperts) -> torch.Tensor:
    """grouped_linear; under torch.compile through the custom op, which it sees as one opaque call (as the OSC
    layers' own ``oscquant::osc_linear``)."""
    if not torch.compiler.is_compiling():
        return grouped_linear(x, rows, routing, stacked)
    w = stacked.weights
    return grouped_linear_op(x, rows, routing.experts, routing.tiles, routing.tile_m, w.codes, w.rel_exp,
                             w.row_scale, w.w_outlier, w.outlier_idx, w.keep, w.bias, w.fmt, w.k_main)


def experts_forward(module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """convert.ExpertLinears' step through the grouped kernels: gate_up for every (token, expert) pair, the
    activation, down, then each token's pairs summed with the router's weights. Static shapes, no host sync."""
    t, k = top_k_index.shape
    gate_up, down = (module.stacked(p, hidden.device) for p in PROJECTIONS)
    routing = route(top_k_index, gate_up.experts)
    gate, up = _grouped(hidden, routing.tokens, routing, gate_up).chunk(2, dim=-1)
    pairs = torch.arange(t * k, device=hidden.device, dtype=torch.int32)
    h = _grouped(module.act_fn(gate) * up, pairs, routing, down).float()
    weights = top_k_weights.reshape(-1, 1).float()
    if routing.order is None:
        h = h * weights
    else:  # back to the router's order (a permutation: deterministic, where adding by token would not be)
        h = torch.empty_like(h).index_copy_(0, routing.order, h * weights[routing.order])
    return h.reshape(t, k, -1).sum(1).to(hidden.dtype)
