"""A gated MLP's act(gate) * up, run inside down_proj's split-quantize.

Llama's, Qwen3's and Gemma's MLPs compute down_proj(act_fn(gate_proj(x)) * up_proj(x)). With gate and up stacked
(siblings.py) one GEMM writes both side by side; the activation and the product are then two more elementwise kernels
and a round trip of [tokens, intermediate] activations through memory before down_proj's split-quantize reads them.
:func:`fuse_gated_mlps` has split-quantize read the stacked output instead and compute act(gate) * up on the row it
holds in registers: the MLP becomes a :class:`GatedMLP` that runs the stacked layer and then down_proj on its output,
and down_proj gets the activation as ``input_gate``. The PyTorch path computes act(gate) * up with the MLP's own
activation module first, so on it nothing changes; the fusion is kept only if the model's logits on a probe are the
same bit for bit there (the MLP's forward may be something else than the form above).

Fused models are for inference: save checkpoints before fusing.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import OSCLinear
from .siblings import Sibling

GATE, UP = 0, 1  # the slots of gate_proj and up_proj in their stacked layer (siblings.GROUPS)


@torch.no_grad()
def activation_kind(act: nn.Module) -> int | None:
    """1 (SiLU) or 2 (GELU's tanh form) if ``act`` computes one of them as torch does, else None."""
    x = torch.linspace(-12, 12, 4001)
    try:
        y = act(x)
    except Exception:  # not a module that maps one tensor to one tensor
        return None
    for kind, f in ((1, nn.functional.silu), (2, lambda t: nn.functional.gelu(t, approximate="tanh"))):
        if isinstance(y, torch.Tensor) and torch.equal(y, f(x)):
            return kind
    return None


class GateInLayer:
    """down_proj's input as its MLP computes it: act(gate) * up from gate and up side by side."""

    def __init__(self, act: nn.Module, kind: int):
        self.act, self.kind = act, kind

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up


class GatedMLP(nn.Module):
    """Stands in for a gated MLP whose down_proj computes act(gate) * up itself: the stacked gate/up layer, then
    down_proj on its output."""

    def __init__(self, mlp: nn.Module, stacked: OSCLinear):
        super().__init__()
        self.mlp = mlp  # a submodule: model.to() moves it, and its modules stay where they were
        object.__setattr__(self, "stacked", stacked)  # held by mlp already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.stacked(x))


def _fusable(mlp: nn.Module) -> tuple[OSCLinear, int] | None:
    """(the stacked gate/up layer, the activation kind) if the MLP's modules have the gated form's shape."""
    gate, up, down, act = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if not (isinstance(gate, Sibling) and isinstance(up, Sibling) and gate.stacked is up.stacked
            and (gate.slot, up.slot) == (GATE, UP) and len(gate.stacked.bounds) == 2 and isinstance(down, OSCLinear)
            and isinstance(act, nn.Module) and down.input_gate is None and down.input_norm is None
            and gate.out_features == up.out_features == down.in_features):
        return None
    kind = activation_kind(act)
    return None if kind is None else (gate.stacked.layer, kind)


@torch.no_grad()
def fuse_gated_mlps(model: nn.Module, probe: torch.Tensor | None = None) -> list[str]:
    """Run each gated MLP's act(gate) * up inside its down_proj, in place; needs gate and up stacked first
    (fuse_siblings). ``probe``: token ids for the two checking runs (default: 8 random tokens of
    ``model.config.vocab_size``). Returns the MLPs fused."""
    from .norms import keep_if_unchanged

    found = {name: f for name, m in model.named_modules() if not isinstance(m, GatedMLP) and (f := _fusable(m))}
    done = []  # (parent, leaf, mlp)

    def apply():
        for name, (stacked, kind) in found.items():
            mlp = model.get_submodule(name)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, GatedMLP(mlp, stacked))
            mlp.down_proj.input_gate = GateInLayer(mlp.act_fn, kind)
            done.append((parent, leaf, mlp))

    def undo():
        for parent, leaf, mlp in done:
            setattr(parent, leaf, mlp)
            mlp.down_proj.input_gate = None

    if found and keep_if_unchanged(model, probe, "fuse_gated_mlps", "MLPs", apply, undo,
                                   "act(gate) * up computed in down_proj (an MLP whose forward is not "
                                   "down_proj(act_fn(gate_proj(x)) * up_proj(x)))"):
        return list(found)
    return []
