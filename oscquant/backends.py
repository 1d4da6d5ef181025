"""The one place that decides which implementation runs an OSC linear layer.

``reference``: the PyTorch path of :mod:`oscquant.linear` (any device, float32 math).
``triton``: the GPU kernels of :mod:`oscquant.kernels`, loaded on the first CUDA input;
a kernel says for each call whether it can take it, and the reference runs otherwise.
``OSCQUANT_BACKEND=reference`` forces the reference everywhere; ``OSCQUANT_BACKEND=triton``
insists on the kernels (an error where they cannot run, and on the CPU it runs them in
Triton's interpreter when TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable

import torch

from .linear import OSCLinear, reference_forward

# name -> (accepts(layer, x) -> bool, forward(layer, x) -> Tensor), tried in order
_KERNELS: dict[str, tuple[Callable, Callable]] = {}


def register(name: str, accepts: Callable, forward: Callable) -> None:
    _KERNELS[name] = (accepts, forward)


_loaded = False


def _load_kernels() -> None:
    """Import the GPU kernels on first need only: CPU-only users never pay for importing Triton."""
    global _loaded
    if not _loaded:
        _loaded = True
        from .kernels import register

        register()


_forced: str | None = None


@contextmanager
def forced(name: str):
    """Run every OSC layer on backend ``name`` inside the block, whatever OSCQUANT_BACKEND says (norms.py checks its
    fusion on the reference path)."""
    global _forced
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def _wanted(x: torch.Tensor) -> str:
    """OSCQUANT_BACKEND (default auto), the kernels loaded first where they may run on x."""
    wanted = _forced or os.environ.get("OSCQUANT_BACKEND", "auto")
    if wanted != "reference" and (x.is_cuda or wanted == "triton"):
        _load_kernels()
    return wanted


def choose(layer: OSCLinear, x: torch.Tensor) -> str:
    wanted = _wanted(x)
    if wanted == "reference":
        return "reference"
    for name, (accepts, _) in _KERNELS.items():
        if wanted in ("auto", name) and accepts(layer, x):
            return name
    if wanted not in ("auto", "reference"):
        raise RuntimeError(
            f"OSCQUANT_BACKEND={wanted!r} cannot run this layer ({layer.extra_repr()}, input on "
            f"{x.device}); known backends: reference, {', '.join(_KERNELS) or '(none registered)'}"
        )
    return "reference"


# MoE experts taken whole (convert.ExpertLinears): (accepts(module, hidden, top_k_index) -> bool, forward)
_EXPERTS: list[tuple[Callable, Callable]] = []


def register_experts(accepts: Callable, forward: Callable) -> None:
    _EXPERTS.append((accepts, forward))


def experts_forward(module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """An MoE block's experts step through a backend that runs all its (token, expert) pairs at once (the grouped
    kernels, kernels/moe.py), or None: then the caller runs each expert reached through its own layers."""
    if _wanted(hidden) == "reference":
        return None
    for accepts, forward in _EXPERTS:
        if accepts(module, hidden, top_k_index):
            return forward(module, hidden, top_k_index, top_k_weights)
    return None


def linear_forward(layer: OSCLinear, x: torch.Tensor) -> torch.Tensor:
    """x is the layer's input; where it runs the RMSNorm before it (norms.py), that norm's input; where it computes a
    gated MLP's act(gate) * up (gated.py), gate and up side by side. A stacked q/k/v layer may run the q and k heads'
    norms on its output (head_norms.py)."""
    name = choose(layer, x)
    if name != "reference":
        return _KERNELS[name][1](layer, x)
    if layer.input_gate is not None:
        x = layer.input_gate(x)
    if layer.input_norm is not None:
        x = layer.input_norm.norm(x)
    y = reference_forward(layer, x)
    return y if layer.output_norm is None else layer.output_norm(y)
