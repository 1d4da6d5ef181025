"""GPTQ for the 4-bit weights: round one column at a time and push each column's rounding error onto the columns not
yet rounded, through the inverse of the layer's input Hessian H = sum over calibration tokens of x xᵀ (Frantar et
al., 2022, arXiv 2210.17323). It minimizes the layer's output error ||(W - Q) X|| rather than the weights' own.

Each block's scale (MXFP4, NVFP4, INT4 groups) is chosen when GPTQ reaches the block's first column, from the
weights as the earlier columns' errors have left them, by formats.quantize's scale search weighted by diag(H) (a
channel's sum of squares); INT4 with one scale per row takes its scales from the whole row first. The result is an
ordinary QTensor of the format: the kernels, checkpoints and reference path read it as any other.

The Hessians come from the float model's inputs (the main path's: the outlier channels zeroed), gathered for as
many layers at a time as ``memory_gb`` allows, one calibration pass per such group (OSCConfig.gptq, convert.py).
Siblings that read one input (q/k/v, gate/up) share one sum, which halves a decoder block's memory and passes.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import formats
from .calibration import run_batches

BLOCK_COLUMNS = 128  # columns rounded before their errors reach the rest in one matrix product (lazy batch updates)


def quantize_weight(w: torch.Tensor, h: torch.Tensor, fmt: str, group_size: int | None = None, search: bool = True,
                    damp: float = 0.01) -> formats.QTensor:
    """``w`` [rows, K] and its input Hessian ``h`` [K, K] (sum of x xᵀ; a channel that never fired has a zero row:
    its weights become zero, as they meet only zeros) -> the GPTQ-rounded QTensor. ``damp`` adds that share of
    diag(H)'s mean to the diagonal, which keeps the Cholesky factorization defined where H is singular."""
    return quantize_weights([w], [h], fmt, group_size, search, damp)[0]


def quantize_weights(ws: list[torch.Tensor], hs: list[torch.Tensor], fmt: str, group_size: int | None = None,
                     search: bool = True, damp: float = 0.01) -> list[formats.QTensor]:
    """:func:`quantize_weight` for several weights of one K at once, each with its own Hessian, in one column loop:
    the loop's many small operations, not its arithmetic, bound GPTQ on a GPU. Weights handed the same Hessian
    object (siblings: q/k/v, gate/up) are rounded as one weight of their rows together; those units must then have
    equal rows, and are stacked along a batch dimension. Every row comes out as :func:`quantize_weight` rounds it
    alone (an NVFP4 weight keeps its own per-tensor scale)."""
    if fmt not in formats.FP4_FORMATS:
        raise ValueError(f"GPTQ rounds 4-bit weights ({', '.join(formats.FP4_FORMATS)}), not {fmt}")
    if not ws or len(ws) != len(hs):
        raise ValueError(f"GPTQ needs one Hessian per weight, got {len(ws)} weights and {len(hs)} Hessians")
    k = ws[0].shape[1]
    for w, h in zip(ws, hs):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weights rounded together need one column count ({k}), got {tuple(w.shape)}")
        if h.shape != (k, k):
            raise ValueError(f"the Hessian must be [{k}, {k}] for a weight with {k} columns, got {tuple(h.shape)}")
    formats.check_columns(fmt, k, group_size)
    units = {}  # id(Hessian) -> indices of the weights that share it, in order
    for i, h in enumerate(hs):
        units.setdefault(id(h), []).append(i)
    order = [i for members in units.values() for i in members]
    if len({sum(ws[i].shape[0] for i in members) for members in units.values()}) > 1:
        raise ValueError("weights with distinct Hessians are rounded stacked, so their rows (siblings' summed) must be "
                         "equal; round weights of other row counts in a call of their own")
    w = torch.stack([torch.cat([ws[i].detach().float() for i in members]) for members in units.values()])
    h = torch.stack([hs[members[0]].detach().double() for members in units.values()])
    rows = [ws[i].shape[0] for i in order]
    gscale = None
    if fmt == "nvfp4":  # each weight's own FP32 scale, the max rule's, before any column moves (but after its dead
        # channels' columns are zeroed): one a row
        gscale = torch.cat([formats.quantize_nvfp4(ws[i].float().masked_fill(torch.diag(hs[i]) == 0, 0.0))
                            .global_scale.reshape(1, 1).expand(r, 1) for i, r in zip(order, rows)])
        gscale = gscale.reshape(w.shape[0], w.shape[1], 1)
    q, scales = _rounded(w, h, fmt, group_size, search, damp, gscale)
    out, at = [None] * len(ws), 0
    q, scales = q.reshape(-1, k), scales.flatten(0, 1)  # the batch's rows one after another, as ``order`` lists them
    for i, r in zip(order, rows):
        g = gscale.reshape(-1, 1)[at:at + 1] if gscale is not None else None
        out[i] = _encode(q[at:at + r], fmt, group_size, scales[at:at + r], g)
        at += r
    return out


def _rounded(w: torch.Tensor, h: torch.Tensor, fmt: str, group_size: int | None, search: bool, damp: float,
             gscale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over a batch: ``w`` [B, rows, K], ``h`` [B, K, K] (float64; both the caller's own stacks, overwritten) ->
    the rounded values [B, rows, K] and their scales [B, rows, K / block] (INT4 with one scale a row: [B, rows, 1]);
    ``gscale`` [B, rows, 1] for NVFP4."""
    if not torch.isfinite(h).all():
        raise ValueError("the layer's input Hessian holds NaN or Inf; check the calibration activations")
    b, rows, k = w.shape
    block = formats.block_size(fmt, group_size)
    dead = torch.diagonal(h, dim1=-2, dim2=-1) == 0  # [B, K]
    if dead.all(-1).any():
        raise ValueError("the layer's input Hessian is zero: no calibration token reached it")
    torch.diagonal(h, dim1=-2, dim2=-1)[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    h += (damp * diag.mean(-1))[:, None, None] * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the layer's input Hessian is not positive definite even with damp={damp}; raise damp") from e
    importance = torch.diagonal(h, dim1=-2, dim2=-1).float().clamp(min=0)
    # a scale-free weighting (only the ratios matter), each weight's own
    importance = importance / importance.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    # the scale search takes [rows, K] tensors: the batch's rows one after another, each with its weight's columns'
    imp_rows = importance[:, None, :].expand(b, rows, k)

    def search_scales(sub, col, width):  # sub [B, rows, width] -> its QTensor, every row's scale(s)
        imp = imp_rows[..., col:col + width].reshape(b * rows, width) if search else None
        if fmt == "nvfp4":  # under each row's own weight's per-tensor scale
            return formats.quantize_nvfp4(sub.reshape(b * rows, width), search=search, importance=imp,
                                          global_scale=gscale.reshape(-1, 1))
        # INT4 groups: a block is one group a row
        return formats.quantize(sub.reshape(b * rows, width), fmt, None, search=search, importance=imp)

    if block is None:  # INT4, one scale per row: from the whole row, first
        row_scales = search_scales(w, 0, k).scales.float().reshape(b, rows, 1)
    q_all = torch.zeros_like(w)
    scales, scale = [], row_scales if block is None else None
    step = max(BLOCK_COLUMNS, block or 0)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1, err1, hinv1 = w[..., i1:i2].clone(), torch.zeros(b, rows, i2 - i1, device=w.device), hinv[:, i1:i2, i1:i2]
        d = torch.diagonal(hinv1, dim1=-2, dim2=-1)[:, None, :]  # [B, 1, width]
        for i in range(i2 - i1):
            col = i1 + i
            if block is not None and col % block == 0:  # this block's scale, from the weights as they are now
                qb = search_scales(w1[..., i:i + block], col, block)
                scales.append(qb.scales.reshape(b, rows, -1))
                scale = formats.expanded_scales(qb)[:, :1].reshape(b, rows, 1)  # the block's one scale a row
            q = formats.on_grid(fmt, w1[..., i:i + 1], scale)
            q_all[..., col:col + 1] = q
            e = (w1[..., i:i + 1] - q) / d[..., i:i + 1]
            w1[..., i:] -= e * hinv1[:, i:i + 1, i:]
            err1[..., i:i + 1] = e
        w[..., i2:] -= err1 @ hinv[:, i1:i2, i2:]
    return q_all, (row_scales if block is None else torch.cat(scales, -1))


def _encode(q: torch.Tensor, fmt: str, group_size: int | None, scales: torch.Tensor, gscale) -> formats.QTensor:
    """Codes of values already on the grid of ``scales``; checked: they decode to exactly those values."""
    rows, k = q.shape
    if fmt == "int4":
        out = formats.QTensor("int4", torch.empty(0), scales, (rows, k), group_size)
    elif fmt == "mxfp4":
        out = formats.QTensor("mxfp4", torch.empty(0), scales, (rows, k), 32)
    else:
        out = formats.QTensor("nvfp4", torch.empty(0), scales, (rows, k), 16, gscale)
    out.codes = formats.pack_nibbles(formats.nibble_codes(fmt, q / formats.expanded_scales(out)))
    if not torch.equal(formats.dequantize(out), q):
        raise RuntimeError("GPTQ's rounded weights left their format's grid; this is a bug in oscquant.gptq")
    return out


def layer_hessians(model: nn.Module, batches: list[torch.Tensor], layers: dict[str, torch.Tensor],
                   memory_gb: float = 4.0, progress: bool = True):
    """Yield, after each calibration pass, [(name, H)] for the modules named in ``layers`` (name -> indices of its
    input channels to zero, the outlier channels) that the pass measured: H = sum of x xᵀ over the calibration tokens
    in float32 on the module's device, its outlier channels' rows and columns zero; None where no token reached the
    module (an MoE expert). Siblings that read one input (q/k/v, gate/up) share one sum, checked during the pass: a
    sibling that was handed another tensor gets its own in a later pass; siblings with the same outlier channels are
    handed the same H object (quantize_layers rounds them as one). As many sums at a time as fit in ``memory_gb``;
    each such group costs one pass over ``batches``."""
    from .siblings import sibling_units  # here, not at the top: siblings imports linear, which imports this module

    modules = {n: model.get_submodule(n) for n in layers}
    size_gb = {n: m.in_features ** 2 * 4 / 2 ** 30 for n, m in modules.items()}
    pending = _by_memory(sibling_units(layers), size_gb, memory_gb)
    passes = 0
    while pending:
        group = pending.pop(0)
        passes += 1
        hs, last, unshared = {}, {}, set()

        def hook(mod, args, n, lead):
            x = args[0]
            if n != lead:  # the lead's sum counts this call if the lead was just handed the same, unchanged tensor
                seen = last.get(lead)
                if seen is None or seen[0] is not x or seen[1] != x._version:
                    unshared.add(lead)
                return
            last[lead] = (x, x._version)
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if x.shape[0] == 0:
                return
            if lead not in hs:
                hs[lead] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            hs[lead].addmm_(x.T, x)

        handles = [modules[n].register_forward_pre_hook(lambda mod, a, n=n, lead=unit[0]: hook(mod, a, n, lead))
                   for unit in group for n in unit]
        try:
            run_batches(model, batches, f"GPTQ Hessians, pass {passes}/{passes + len(pending)}", progress,
                        [n for u in group for n in u])
        finally:
            for h in handles:
                h.remove()
            last.clear()
        again = [[n] for unit in group if unit[0] in unshared for n in unit]
        pending += _by_memory(again, size_gb, memory_gb)
        out = []
        for unit in (u for u in group if u[0] not in unshared):
            h_unit = hs.pop(unit[0], None)  # None: no calibration token reached it (an MoE expert)
            keys = [tuple(layers[n].tolist()) for n in unit]
            distinct = list(dict.fromkeys(keys))  # siblings with the same outlier channels keep one sum
            zeroed = {}
            for j, key in enumerate(distinct):
                h = h_unit if h_unit is None or j == len(distinct) - 1 else h_unit.clone()
                if h is not None and key:
                    idx = torch.tensor(key, device=h.device)
                    h[idx, :] = 0.0
                    h[:, idx] = 0.0
                zeroed[key] = h
            out += [(n, zeroed[key]) for n, key in zip(unit, keys)]
        yield out


def quantize_layers(jobs: dict[str, tuple], memory_gb: float = 4.0, progress: bool = True) -> dict[str, formats.QTensor]:
    """name -> (main weight [rows, K], its Hessian, format, group size, search) to name -> the QTensor
    :func:`quantize_weight` makes of it. Weights handed one Hessian object (siblings) round as one unit, and units of
    one format, K and rows go through :func:`quantize_weights`' column loop together: a pass's Hessians for several
    decoder blocks share one loop per layer shape. A batch holds at most ``memory_gb`` of working memory (about 24
    bytes a Hessian entry: two float64 copies and the float32 inverse factor; 12 a weight entry)."""
    units = {}
    for name, (w, h, fmt, group_size, search) in jobs.items():
        units.setdefault((id(h), fmt, group_size, search), []).append(name)
    shapes, size_gb = {}, {}
    for (_, fmt, group_size, search), names in units.items():
        rows, k = sum(jobs[n][0].shape[0] for n in names), jobs[names[0]][0].shape[1]
        shapes.setdefault((fmt, group_size, search, k, rows), []).append(names)
        size_gb[names[0]] = (24 * k * k + 12 * rows * k) / 2 ** 30
    work = [(key, batch) for key, us in shapes.items() for batch in _by_memory(us, size_gb, memory_gb)]
    out = {}
    for (fmt, group_size, search, _, _), batch in tqdm(work, desc="GPTQ", disable=not progress, unit="batch"):
        names = [n for unit in batch for n in unit]
        out.update(zip(names, quantize_weights([jobs[n][0] for n in names], [jobs[n][1] for n in names], fmt,
                                               group_size, search)))
    return out


def _by_memory(units: list[list[str]], size_gb: dict[str, float], memory_gb: float) -> list[list[list[str]]]:
    """Units (lists of layer names sharing one sum, sized by their first) in groups of at most ``memory_gb``."""
    groups, cur, used = [], [], 0.0
    for unit in units:
        size = size_gb[unit[0]]
        if cur and used + size > memory_gb:
            groups.append(cur)
            cur, used = [], 0.0
        cur.append(unit)
        used += size
    return groups + [cur] if cur else groups
