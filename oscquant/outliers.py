"""Offline choice of the outlier channels of one linear layer.

The rule (also in docs/method.md):

1. Statistic: m[c] = max |x[:, c]| over every calibration token.
2. Groups: the input channels are cut into the groups that share one scale in the
   4-bit format of the layer (32 for MXFP4, 16 for NVFP4, the int4 group, or the
   whole row for per-token INT4). An outlier hurts only its own group: it inflates
   that group's scale and crushes the other members to zero.
3. Rank within the group: score[c] = m[c] / median(m over c's group). A group that is
   uniformly large gets a large scale and loses nothing, so only channels that stand
   out from their own group score high.
4. k per layer: the layer's scheme gives k (a multiple of 16, or a share of K rounded
   down to 16). The k channels with the highest score over all groups are kept in
   BF16; ties go to the larger m[c]. The list is returned sorted, which keeps the
   gather coalesced.
"""

from __future__ import annotations

import torch

from .calibration import ChannelStats


def outlier_scores(absmax: torch.Tensor, group: int | None) -> torch.Tensor:
    """score[c] = m[c] / median of m over c's scaling group."""
    m = absmax.float()
    k = m.numel()
    g = group if group and k % group == 0 else k
    blocks = m.reshape(-1, g)
    med = blocks.median(dim=1, keepdim=True).values
    floor = m.abs().max().clamp(min=1e-30) * 1e-6  # an all-zero group must not divide by zero
    return (blocks / med.clamp(min=floor)).reshape(k)


def select_outlier_channels(stats: ChannelStats, k: int, group: int | None) -> torch.Tensor:
    """Indices (sorted, int64) of the k channels to keep in BF16."""
    channels = stats.absmax.numel()
    if not 0 <= k < channels:
        raise ValueError(f"cannot pick {k} outlier channels out of {channels}")
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    score = outlier_scores(stats.absmax, group)
    # lexicographic (score, m): scale m into [0, 1) as a tie-breaker below score's resolution
    m = stats.absmax.double()
    key = score.double() + 1e-9 * m / m.max().clamp(min=1e-30)
    return torch.sort(key.topk(k).indices).values
