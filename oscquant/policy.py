"""``policy="auto"``: per-layer k and FP8 fallback chosen from measurements, under a budget.

The rule (docs/analysis.md):

1. For every layer, measure on the calibration sample the relative 4-bit error of its
   input e(k) = ||Q(x_main) - x_main|| / ||x|| when the top-k channels (the rule of
   outliers.py) stay in BF16, for k = 0, 16, ..., cap (cap = max_outliers, at most a
   quarter of K).
2. FP8: the fair share of a layer is k_fair = bf16_budget * K rounded down to 16. The
   layers with the largest e(k_fair), the ones separation fixes least, fall back to FP8,
   as many as ``fp8_budget`` x (number of layers) allows. FP8's error is far below any
   4-bit error, so the budget is always spent. (A first version sent only layers above
   1.25x the Gaussian-data error to FP8; on SmolLM2 that left most of the budget unused
   and lost to the fixed policy: docs/analysis.md.)
3. k: the other layers start at k = 0. Channels are handed out 16 at a time to the layer
   whose noise power e(k)^2 drops the most per channel, until the BF16 channels reach
   ``bf16_budget`` of all their input channels or no step helps.

Sibling projections (q/k/v, gate/up: one input, so one curve) are decided as one unit in
steps 2 and 3, so that they keep one scheme and one k and can run stacked (siblings.py).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import torch

from . import formats
from .analysis import activation_error
from .calibration import ChannelStats
from .config import OUTLIER_MULTIPLE, LayerScheme
from .outliers import select_outlier_channels
from .siblings import sibling_units


@dataclass
class LayerChoice:
    scheme: LayerScheme
    k: int
    errors: list[float]  # e(k) on the grid 0, 16, ...


def error_curve(x: torch.Tensor, stats: ChannelStats, scheme: LayerScheme, cap: int) -> list[float]:
    """e(k) for k = 0, 16, ..., cap, with the channels outliers.py would pick for each k."""
    group = formats.block_size(scheme.format, scheme.group_size)
    return [activation_error(x, scheme.format, select_outlier_channels(stats, k, group), scheme.group_size)
            for k in range(0, cap + 1, OUTLIER_MULTIPLE)]


def auto_plan(layers: dict[str, LayerScheme], stats: dict[str, ChannelStats], samples: dict[str, list[torch.Tensor]],
              bf16_budget: float = 0.04, fp8_budget: float = 1 / 7, max_outliers: int = 256) -> dict[str, LayerChoice]:
    """``layers``: name -> the default 4-bit scheme of that layer (its k is ignored)."""
    curves, K = {}, {}
    for name, scheme in layers.items():
        if name not in samples:
            raise ValueError(f"no calibration sample reached {name}; give more calibration text")
        x = torch.cat(samples[name]).float()
        K[name] = x.shape[1]
        cap = min(max_outliers, K[name] // 4) // OUTLIER_MULTIPLE * OUTLIER_MULTIPLE
        curves[name] = error_curve(x, stats[name], scheme, cap)

    def err_at(name, k):
        c = curves[name]
        return c[min(k // OUTLIER_MULTIPLE, len(c) - 1)]

    # the units decided together: sibling projections read one input (siblings.py)
    units = sibling_units(layers)

    # step 2: FP8 for the layers that separation cannot fix, whole units, as many layers as the budget allows
    fair = {n: int(bf16_budget * K[n]) // OUTLIER_MULTIPLE * OUTLIER_MULTIPLE for n in layers}
    fp8, allowed = set(), int(fp8_budget * len(layers) + 1e-9)
    for unit in sorted(units, key=lambda u: max(err_at(n, fair[n]) for n in u), reverse=True):
        if len(fp8) + len(unit) <= allowed:
            fp8.update(unit)

    # step 3: greedy BF16 channels for the 4-bit layers, 16 a layer of a unit at a time
    four_bit = [u for u in units if u[0] not in fp8]
    budget = int(bf16_budget * sum(K[n] for u in four_bit for n in u))
    k = {n: 0 for u in four_bit for n in u}

    def gain(unit):  # the noise power one more step removes, per BF16 channel
        total = 0.0
        for n in unit:
            c, i = curves[n], k[n] // OUTLIER_MULTIPLE
            total += c[i] ** 2 - c[i + 1] ** 2 if i + 1 < len(c) else 0.0
        return total / (OUTLIER_MULTIPLE * len(unit))

    heap = [(-gain(u), i) for i, u in enumerate(four_bit)]
    heapq.heapify(heap)
    used = 0
    while heap:
        g, i = heapq.heappop(heap)
        cost = OUTLIER_MULTIPLE * len(four_bit[i])
        if -g <= 0:
            break
        if used + cost > budget:  # this unit no longer fits; a smaller one may
            continue
        for n in four_bit[i]:
            k[n] += OUTLIER_MULTIPLE
        used += cost
        heapq.heappush(heap, (-gain(four_bit[i]), i))

    plan = {}
    for n, scheme in layers.items():
        if n in fp8:
            plan[n] = LayerChoice(LayerScheme("fp8"), 0, curves[n])
        else:
            plan[n] = LayerChoice(replace(scheme, outliers=k[n], outlier_ratio=None), k[n], curves[n])
    return plan
