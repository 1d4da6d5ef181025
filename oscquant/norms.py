"""RMSNorms that the OSC layers after them run inside their split-quantize.

In a decoder block the RMSNorm before attention feeds only q/k/v, and the one before the MLP only gate/up. Where
every reader of a norm's output is an OSC layer, the norm can run in those layers' split-quantize kernel, which loads
each whole row into registers anyway: one sum of squares and a multiply there, instead of the norm's own kernels
(Hugging Face's RMSNorm is about seven elementwise kernels, each a launch of a few µs at decode) and one round trip
of the activations through memory. The PyTorch path calls the norm module itself first, so on it nothing changes.

:func:`fuse_norms` finds such norms by running the model once on a few tokens: hooks record which modules read each
norm's output. A norm is fused when its output is read only by OSC layers (or siblings of a stacked one) that read
nothing else, and when its formula is one the kernel computes (checked bit for bit against the module on a random
input). Its module is then replaced by :class:`NormInLayers`, which passes its input on; each reading layer gets it
as ``input_norm``. A second run on the reference path must give the same logits bit for bit, or every fusion is
undone: that catches a reader the hooks cannot see (a norm's output used outside any module).

Fused models are for inference, like :func:`oscquant.siblings.fuse_siblings`: save checkpoints before fusing.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import nn

from .linear import OSCLinear
from .siblings import Sibling

# (kind, factor = 1 + weight): kind 1 rounds the normalized row to the input dtype before the factors (Llama, Qwen3),
# kind 2 rounds once after them (Gemma, whose factors are 1 + weight)
_FORMULAS = ((1, False), (2, True), (2, False))


def rms_norm(x: torch.Tensor, factor: torch.Tensor, eps: float, kind: int) -> torch.Tensor:
    """What the kernel computes (up to the order of its sum), in the torch operations Hugging Face's norms use."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == 1:
        h = h.to(x.dtype).float()
    return (h * factor).to(x.dtype)


def _eps(m: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(m, name, None), float):
            return getattr(m, name)
    return None


@torch.no_grad()
def norm_formula(m: nn.Module) -> tuple[int, bool, float] | None:
    """(kind, add_one, eps) if ``m`` is an RMSNorm whose output the kernel reproduces, else None."""
    w, eps = getattr(m, "weight", None), _eps(m)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or eps is None or isinstance(m, (OSCLinear, nn.Linear)):
        return None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.numel(), generator=g) * 3).to(device=w.device, dtype=w.dtype)
    try:
        want = m(x)
    except Exception:  # not a module that maps one tensor to one tensor
        return None
    if not isinstance(want, torch.Tensor) or want.shape != x.shape or want.dtype != x.dtype:
        return None
    for kind, add_one in _FORMULAS:
        if torch.equal(rms_norm(x, w.float() + 1 if add_one else w.float(), eps, kind), want):
            return kind, add_one, eps
    return None


class NormInLayers(nn.Module):
    """Stands in for an RMSNorm whose readers are all OSC layers that run it themselves: passes its input on."""

    def __init__(self, norm: nn.Module, kind: int, add_one: bool, eps: float):
        super().__init__()
        self.norm = norm  # a submodule: model.to() moves its weight, and the reference path calls it
        self.kind, self.add_one, self.eps = kind, add_one, eps
        self._kernel: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def kernel_norm(self, device):
        """The norm as split-quantize takes it (kernels.ops.KernelNorm), built once per device."""
        if device not in self._kernel:
            from .kernels.ops import KernelNorm

            w = self.norm.weight.detach().to(device).float()
            self._kernel[device] = KernelNorm((w + 1 if self.add_one else w).contiguous(), self.eps, self.kind)
        return self._kernel[device]

    def _apply(self, fn, *args, **kwargs):
        self._kernel = {}
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"run by the OSC layers after it (kind {self.kind}, eps={self.eps})"


def _reader_layer(m: nn.Module) -> OSCLinear | None:
    """The OSC layer that computes a reader's output: itself, or the stacked layer of a sibling."""
    if isinstance(m, OSCLinear):
        return m
    if isinstance(m, Sibling):
        return m.stacked.layer
    return None


def probe_ids(model: nn.Module, probe: torch.Tensor | None) -> torch.Tensor:
    """The token ids a fusion checks the model on (default: 8 random tokens of its vocabulary), on its device."""
    if probe is None:
        probe = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    return probe.to(next(model.parameters()).device)


def reference_logits(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``probe`` with every OSC layer on the reference path, for the checks before and after
    fusing (a Hugging Face output, a tuple or a tensor)."""
    from .backends import forced

    with forced("reference"):
        out = model(probe, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def keep_if_unchanged(model: nn.Module, probe: torch.Tensor | None, fusion: str, what: str, apply, undo,
                      change: str) -> bool:
    """Apply a fusion (``apply()``, in place) and keep it only if the model's logits on ``probe`` (probe_ids) on the
    reference path stay the same bit for bit; else ``undo()`` it. Warns, naming ``fusion``, and returns False when the
    model does not run on the probe (``what`` is left unfused) or its output changed (with ``change``)."""
    probe = probe_ids(model, probe)
    try:
        before = reference_logits(model, probe)
    except Exception as e:
        warnings.warn(f"oscquant.{fusion}: the model did not run on {tuple(probe.shape)} token ids ({e}); its {what} "
                      "are left unfused (pass probe= with inputs it takes)", stacklevel=3)
        return False
    apply()
    if not torch.equal(before, reference_logits(model, probe)):
        undo()
        warnings.warn(f"oscquant.{fusion}: the model's output changed with {change}; left unfused", stacklevel=3)
        return False
    return True


def _trace_readers(model: nn.Module, norms: list[str], probe: torch.Tensor):
    """Run the model on ``probe`` on the reference path with hooks: (its logits, for each norm the leaf modules that
    read one of its outputs in the order they first did, and the readers that read anything else too)."""
    modules = dict(model.named_modules())
    made, read, alive = {}, defaultdict(list), []  # id(norm output) -> norm; reader -> its inputs

    def on_norm(name):
        def hook(_, __, out):
            made[id(out)] = name
            alive.append(out)  # held until the end, so that no id is reused
        return hook

    def on_read(name):
        def hook(_, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            read[name].append(x)
            alive.append(x)
        return hook

    hooks = [modules[n].register_forward_hook(on_norm(n)) for n in norms]
    hooks += [m.register_forward_pre_hook(on_read(n), with_kwargs=True) for n, m in modules.items()
              if n not in norms and n and (not any(True for _ in m.children()) or isinstance(m, Sibling))]
    try:
        logits = reference_logits(model, probe)
    finally:
        for h in hooks:
            h.remove()
    readers = defaultdict(dict)
    for reader, xs in read.items():
        for x in xs:
            if id(x) in made:
                readers[made[id(x)]][reader] = None
    mixed = {r for r, xs in read.items() if len({made.get(id(x)) for x in xs}) > 1}
    return logits, {n: list(r) for n, r in readers.items()}, mixed


@torch.no_grad()
def fuse_norms(model: nn.Module, probe: torch.Tensor | None = None) -> list[str]:
    """Run each RMSNorm whose readers are all OSC layers inside those layers, in place. ``probe``: token ids for the
    two checking runs (default: 8 random tokens of ``model.config.vocab_size``). Returns what was fused, as
    "norm -> reader, reader"; fuse siblings first (fuse_siblings) so that a stacked layer runs its norm once."""
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, NormInLayers))  # fused before
    formulas = {name: f for name, m in model.named_modules() if not isinstance(m, NormInLayers)
                and not name.startswith(inside or ("\0",)) and (f := norm_formula(m)) is not None}
    if not formulas or not any(isinstance(m, OSCLinear) for m in model.modules()):
        return []
    probe = probe_ids(model, probe)
    try:
        before, readers, mixed = _trace_readers(model, list(formulas), probe)
    except Exception as e:  # a model that takes other inputs: it keeps its norms as modules
        warnings.warn(f"oscquant.fuse_norms: the model did not run on {tuple(probe.shape)} token ids ({e}); its norms "
                      "are left unfused (pass probe= with inputs it takes)", stacklevel=2)
        return []

    modules = dict(model.named_modules())
    undo, fused = [], []
    for name, (kind, add_one, eps) in formulas.items():
        names = readers.get(name, [])
        layers = [_reader_layer(modules[r]) for r in names]
        if not names or mixed & set(names) or any(la is None or la.input_norm is not None for la in layers):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        stand_in = NormInLayers(modules[name], kind, add_one, eps)
        setattr(parent, leaf, stand_in)
        for la in layers:
            object.__setattr__(la, "input_norm", stand_in)  # not a submodule: the parent holds it
        undo.append((parent, leaf, modules[name], layers))
        # a stacked layer reads what its siblings were given: named by them
        by_siblings = {id(modules[r].stacked.layer) for r in names if isinstance(modules[r], Sibling)}
        fused.append(f"{name} -> {', '.join(r for r in names if id(modules[r]) not in by_siblings)}")
    if not undo:
        return []
    if not torch.equal(before, reference_logits(model, probe)):
        for parent, leaf, norm, layers in undo:
            setattr(parent, leaf, norm)
            for la in layers:
                object.__setattr__(la, "input_norm", None)
        warnings.warn("oscquant.fuse_norms: the model's output changed with its norms run inside the OSC layers "
                      "(a norm's output is used outside the modules seen reading it); left unfused", stacklevel=2)
        return []
    return fused


def has_fused_norms(model: nn.Module) -> bool:
    return any(isinstance(m, NormInLayers) for m in model.modules())
