"""Calibration: run text through the model and record, per linear layer, what its input channels look like.

For every input channel c of every watched layer we keep, over all calibration tokens:
  absmax[c]   max |x|
  abssum[c]   sum |x|          (mean |x| = abssum / tokens)
  sqsum[c]    sum x^2          (the channel's share of the activation's energy)
  hits[c]     tokens for which c is among the token's ``topk`` channels by |x|
``hits / tokens`` is the channel's token persistence: near 1 for an outlier
that every token carries, near topk/K for a channel that is large only by chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class ChannelStats:
    tokens: int
    absmax: torch.Tensor
    abssum: torch.Tensor
    sqsum: torch.Tensor
    hits: torch.Tensor
    topk: int

    @classmethod
    def empty(cls, channels: int, topk: int) -> "ChannelStats":
        z = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        return cls(0, torch.zeros(channels), z(), z(), torch.zeros(channels, dtype=torch.long), topk)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).float()

    @property
    def mean_square(self) -> torch.Tensor:
        return (self.sqsum / max(self.tokens, 1)).float()

    @property
    def persistence(self) -> torch.Tensor:
        return (self.hits.double() / max(self.tokens, 1)).float()

    def update(self, x: torch.Tensor, name: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return  # an MoE expert that no token was routed to in this batch
        if not torch.isfinite(x).all():
            raise ValueError(
                f"calibration activations entering {name} contain NaN or Inf; the model "
                "overflows on this text in its current dtype: load it in float32 or bfloat16, "
                "or check the calibration text"
            )
        a = x.abs()
        self.tokens += x.shape[0]
        self.absmax = torch.maximum(self.absmax, a.amax(0).cpu())
        self.abssum += a.sum(0, dtype=torch.float64).cpu()
        self.sqsum += (x.double() ** 2).sum(0).cpu()
        k = min(self.topk, x.shape[1])
        top = a.topk(k, dim=1).indices
        self.hits += torch.bincount(top.flatten(), minlength=x.shape[1]).cpu()


def linear_modules(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    wanted = set(names) if names is not None else None
    return {
        n: m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (wanted is None or n in wanted)
    }


class _Enough(Exception):
    """Raised by the last block a pass needs: the rest of the forward (later blocks, the LM head) is not run."""


def last_block(model: nn.Module, names: Iterable[str]) -> nn.Module | None:
    """The deepest decoder block that holds one of the modules ``names``, in the model's list of blocks (a ModuleList
    named ``layers``, as Hugging Face's decoders have); None where some module lies outside those blocks (the LM
    head, say) or there is no such list: then the whole forward is needed."""
    names = list(names)
    for list_name, blocks in model.named_modules():
        if not (isinstance(blocks, nn.ModuleList) and list_name.rpartition(".")[2] == "layers"):
            continue
        deepest = -1
        for n in names:
            head, _, rest = n.partition(list_name + ".")
            index = rest.partition(".")[0]
            if head or not rest or not index.isdigit():
                break
            deepest = max(deepest, int(index))
        else:
            return blocks[deepest] if 0 <= deepest < len(blocks) else None
    return None


def run_batches(model: nn.Module, batches: list[torch.Tensor], desc: str, progress: bool = True,
                names: Iterable[str] | None = None) -> None:
    """``model`` over the calibration ``batches``; given the ``names`` of the modules whose inputs the pass records,
    each forward stops once the last block holding one of them has run (see :func:`last_block`)."""
    device = next(model.parameters()).device
    stop = last_block(model, names) if names is not None else None
    handle = stop.register_forward_hook(_enough) if stop is not None else None
    try:
        with torch.no_grad():
            for ids in tqdm(batches, desc=desc, disable=not progress, unit="seq"):
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Enough:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def _enough(module, args, output):
    raise _Enough


def collect_stats(
    model: nn.Module,
    batches: list[torch.Tensor],
    layer_names: Iterable[str] | None = None,
    topk: int = 16,
    progress: bool = True,
) -> dict[str, ChannelStats]:
    """Run ``batches`` (token id tensors [B, L]) and return per-layer input statistics."""
    batches = list(batches)
    if not batches or all(b.numel() == 0 for b in batches):
        raise ValueError("the calibration set is empty: give at least one non-empty sequence of text")
    layers = linear_modules(model, layer_names)
    if not layers:
        raise ValueError("no linear layers to calibrate were found in the model")
    stats = {n: ChannelStats.empty(m.in_features, topk) for n, m in layers.items()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: stats[n].update(args[0], n))
        for n, m in layers.items()
    ]
    try:
        run_batches(model, batches, "calibrating", progress, layers)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n, s in stats.items() if s.tokens == 0]
    for n in unseen:  # e.g. MoE experts that no calibration token reached
        del stats[n]
    return stats
