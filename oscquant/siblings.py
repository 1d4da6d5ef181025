"""Sibling projections that read one input run as one OSC layer: q/k/v, and gate/up.

In a decoder block q_proj, k_proj and v_proj read the same hidden states, and so do gate_proj and up_proj. Calibrated
on that one input, siblings of one scheme get the same outlier channels, so their rows stack into one OSCLinear. It
computes the same products: every weight row is quantized on its own, and each token's activation is quantized over
K, which the siblings share. What changes is the work around them: one split-quantize (the kernels) or one activation
quantization (the PyTorch path) instead of three or two, and one GEMM of the stacked width, which is the layer shape
`oscquant bench gemm` times (Qwen3-8B qkv 6144 x 4096, gate+up 24576 x 4096). At decode, where a launch costs about
as much as its work, the count of launches is most of the time.

The block's own forward keeps calling q_proj(x), k_proj(x), v_proj(x): each sibling becomes a :class:`Sibling`. The
first call with an input runs the stacked layer; the other siblings take their columns of that output while the
input is the same tensor at the same version (an input changed in place between the calls is run again).

Fused models are for inference: save a checkpoint before :func:`fuse_siblings` (``save_quantized`` refuses after).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import OSCLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
STACKED_BUFFERS = ("w_outlier", "qweight", "wscale", "bias")  # one row per output feature: stacked


def sibling_units(names) -> list[list[str]]:
    """Layer names as the units a per-layer policy should decide together: each complete sibling group of one parent
    (q/k/v, gate/up) as one unit, every other layer alone, in the order the names come."""
    names = list(names)
    present, done, units = set(names), set(), []
    for name in names:
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        unit = [name]
        for group in GROUPS:
            members = [f"{parent}.{n}" if parent else n for n in group]
            if leaf in group and all(m in present for m in members):
                unit = members
        units.append(unit)
        done.update(unit)
    return units


def why_not_stackable(layers: list[OSCLinear]) -> str | None:
    """None if the layers can run as one stacked layer, else why not."""
    first = layers[0]
    for m in layers[1:]:
        if (m.in_features, m.scheme, m.k) != (first.in_features, first.scheme, first.k):
            return "different input sizes, schemes or outlier counts"
        if not torch.equal(m.outlier_idx, first.outlier_idx):
            return "different outlier channels"
        if not torch.equal(m.wscale_global, first.wscale_global):
            return "different per-tensor scales (NVFP4)"
        if (m.bias is None) != (first.bias is None) or (m.bias is not None and m.bias.dtype != first.bias.dtype):
            return "bias on some but not all"
    return None


@torch.no_grad()
def stack(layers: list[OSCLinear]) -> OSCLinear:
    """One OSCLinear whose output is the layers' outputs side by side."""
    reason = why_not_stackable(layers)
    if reason:
        raise ValueError(f"these layers cannot run as one: {reason}")
    first = layers[0]
    out = OSCLinear(first.in_features, sum(m.out_features for m in layers), first.scheme, first.k,
                    first.bias is not None, first.bias.dtype if first.bias is not None else torch.float32)
    dev = first.compute_device
    out.to(dev)
    out.outlier_idx.copy_(first.outlier_idx)
    out.wscale_global.copy_(first.wscale_global)
    for name in STACKED_BUFFERS:
        if getattr(first, name) is not None:  # codes parked in host memory (OSCLinear.park_codes) come back here
            getattr(out, name).copy_(torch.cat([getattr(m, name).to(dev) for m in layers]))
    return out


class Stacked(nn.Module):
    """The stacked layer of a sibling group, and the last output it computed, held until every sibling took its
    columns."""

    def __init__(self, layer: OSCLinear, widths: list[int]):
        super().__init__()
        self.layer = layer
        ends = torch.tensor(widths).cumsum(0).tolist()
        self.bounds = [(end - w, end) for w, end in zip(widths, ends)]
        self._x = self._y = None
        self._version = -1
        self._left: set = set()

    def take(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x or self._version != x._version:  # a new input: run the stacked layer once
            self._x, self._version, self._y = x, x._version, self.layer(x)
            self._left = set(range(len(self.bounds)))
        lo, hi = self.bounds[slot]
        y = self._y[..., lo:hi]
        self._left.discard(slot)
        if not self._left:  # every sibling has its columns: hold no tensor between forwards
            self._x = self._y = None
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All the siblings' outputs side by side."""
        return self.layer(x)


class Sibling(nn.Module):
    """Stands in for one projection of a stacked group: its columns of the stacked layer's output."""

    def __init__(self, stacked: Stacked, slot: int):
        super().__init__()
        object.__setattr__(self, "stacked", stacked)  # not a submodule: the parent holds it, once
        self.slot = slot
        lo, hi = stacked.bounds[slot]
        self.in_features, self.out_features = stacked.layer.in_features, hi - lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stacked.take(self.slot, x)

    def extra_repr(self) -> str:
        return f"columns {self.stacked.bounds[self.slot]} of the stacked layer"


def fuse_siblings(model: nn.Module) -> list[str]:
    """Run each group of OSC sibling projections (q/k/v, gate/up) that can be stacked as one layer, in place.
    Returns the groups fused, as "parent: q_proj+k_proj+v_proj"."""
    osc = {name: m for name, m in model.named_modules() if isinstance(m, OSCLinear)}
    fused = []
    for unit in sibling_units(osc):
        layers = [osc[n] for n in unit]
        if len(unit) == 1 or why_not_stackable(layers):
            continue
        parent_name = unit[0].rpartition(".")[0]
        parent, leaves = model.get_submodule(parent_name), [n.rpartition(".")[2] for n in unit]
        stacked = Stacked(stack(layers), [m.out_features for m in layers])
        parent.add_module("_".join(n.removesuffix("_proj") for n in leaves) + "_stacked", stacked)
        for slot, leaf in enumerate(leaves):
            setattr(parent, leaf, Sibling(stacked, slot))
        fused.append(f"{parent_name}: {'+'.join(leaves)}")
    return fused


def has_siblings(model: nn.Module) -> bool:
    return any(isinstance(m, Sibling) for m in model.modules())
