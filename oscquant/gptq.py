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
    if fmt not in formats.FP4_FORMATS:
        raise ValueError(f"GPTQ rounds 4-bit weights ({', '.join(formats.FP4_FORMATS)}), not {fmt}")
    rows, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}] for a weight with {k} columns, got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("the layer's input Hessian holds NaN or Inf; check the calibration activations")
    formats.check_columns(fmt, k, group_size)
    block = formats.block_size(fmt, group_size)
    w = w.detach().float().clone()
    h = h.detach().double().clone()
    dead = torch.diag(h) == 0
    if dead.all():
        raise ValueError("the layer's input Hessian is zero: no calibration token reached it")
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the layer's input Hessian is not positive definite even with damp={damp}; raise damp") from e
    importance = torch.diag(h).float().clamp(min=0)
    if importance.max() > 0:
        importance = importance / importance.max()  # a scale-free weighting: only the ratios matter
    gscale = None
    if fmt == "nvfp4":  # one FP32 scale per tensor, the max rule's, before any column moves
        gscale = formats.quantize_nvfp4(w).global_scale
    if block is None:  # INT4, one scale per row: from the whole row, first
        row_q = formats.quantize(w, fmt, None, search=search, importance=importance if search else None)
        row_scale = row_q.scales.float().reshape(rows, 1)

    q_all = torch.zeros_like(w)
    scales, scale = [], row_scale if block is None else None
    step = max(BLOCK_COLUMNS, block or 0)
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if block is not None and col % block == 0:  # this block's scale, from the weights as they are now
                sub = w1[:, i:i + block]
                imp = importance[col:col + block] if search else None
                if fmt == "nvfp4":
                    qb = formats.quantize_nvfp4(sub, search=search, importance=imp, global_scale=gscale)
                else:
                    qb = formats.quantize(sub, fmt, group_size, search=search, importance=imp)
                scales.append(qb.scales)
                scale = formats.expanded_scales(qb)[:, :1]  # the block's one scale a row
            q = formats.on_grid(fmt, w1[:, i:i + 1], scale)
            q_all[:, col:col + 1] = q
            e = (w1[:, i:i + 1] - q) / hinv1[i, i]
            w1[:, i:] -= e * hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return _encode(q_all, fmt, group_size, row_q.scales if block is None else torch.cat(scales, 1), gscale)


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
    """Yield (name, H) for the modules named in ``layers`` (name -> indices of its input channels to zero, the
    outlier channels), H = sum of x xᵀ over the calibration tokens in float32 on the module's device, its outlier
    channels' rows and columns zero. Siblings that read one input (q/k/v, gate/up) share one sum, checked during the
    pass: a sibling that was handed another tensor gets its own in a later pass. As many sums at a time as fit in
    ``memory_gb``; each such group costs one pass over ``batches``."""
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
        for unit in tqdm([u for u in group if u[0] not in unshared], desc="GPTQ", disable=not progress, unit="input"):
            h_unit = hs.pop(unit[0], None)  # None: no calibration token reached it (an MoE expert)
            for i, n in enumerate(unit):
                h = h_unit if h_unit is None or i == len(unit) - 1 else h_unit.clone()
                if h is not None and layers[n].numel():
                    idx = layers[n].to(h.device)
                    h[idx, :] = 0.0
                    h[:, idx] = 0.0
                yield n, h


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
