"""Per-head RMSNorms of q and k (Qwen3, Qwen3-MoE, Gemma 3), run on the stacked q/k/v layer's output.

These models normalize every attention head of q and of k over its head_dim right after q_proj and k_proj (q_norm,
k_norm). In Hugging Face's code each norm is about seven elementwise kernels on a few thousand values a token: at
decode, some fourteen launches a layer that do almost no work. With q/k/v stacked (siblings.py) one GEMM writes q, k
and v side by side, so :func:`fuse_head_norms` has one kernel normalize the q and k heads of that output in place
after the GEMM (kernels/ops.head_norm_), and replaces q_norm and k_norm by :class:`NormRunBefore`, which passes its
input on. The PyTorch path runs the norm modules themselves on the stacked output, so on it nothing changes; the
fusion is kept only if the model's logits on a probe are the same bit for bit there (which fails where a model
normalizes something else than q_proj's and k_proj's outputs).

Fused models are for inference: save checkpoints before fusing.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import OSCLinear
from .norms import keep_if_unchanged, norm_formula
from .siblings import Sibling

Q, K = 0, 1  # the slots of q_proj and k_proj in their stacked layer (siblings.GROUPS)


class HeadNormsAfter:
    """What a stacked q/k/v layer runs on its output: q_norm on each of its q heads, k_norm on each k head."""

    def __init__(self, q_norm: nn.Module, k_norm: nn.Module, q_heads: int, k_heads: int, formula: tuple):
        self.q_norm, self.k_norm, self.q_heads, self.k_heads = q_norm, k_norm, q_heads, k_heads
        self.kind, self.add_one, self.eps = formula
        self.head_dim = q_norm.weight.numel()
        self._kernel: dict = {}

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """The reference path: the norm modules on the q and k columns, the v columns as they are."""
        d = self.head_dim
        a, b = self.q_heads * d, (self.q_heads + self.k_heads) * d
        q = self.q_norm(y[..., :a].unflatten(-1, (self.q_heads, d))).flatten(-2)
        k = self.k_norm(y[..., a:b].unflatten(-1, (self.k_heads, d))).flatten(-2)
        return torch.cat([q, k, y[..., b:]], -1)

    def kernel_norm(self, device):
        """The norms as the kernel takes them (kernels.ops.KernelHeadNorm), built once per device."""
        if device not in self._kernel:
            from .kernels.ops import KernelHeadNorm

            w = torch.stack([self.q_norm.weight.detach(), self.k_norm.weight.detach()]).to(device).float()
            self._kernel[device] = KernelHeadNorm((w + 1 if self.add_one else w).contiguous(), self.eps, self.kind,
                                                  self.q_heads, self.k_heads)
        return self._kernel[device]


class NormRunBefore(nn.Module):
    """Stands in for q_norm or k_norm, which the stacked q/k/v layer before it runs on its output: passes its input
    on."""

    def __init__(self, norm: nn.Module, heads: HeadNormsAfter):
        super().__init__()
        self.norm = norm  # a submodule: model.to() moves its weight
        object.__setattr__(self, "heads", heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _apply(self, fn, *args, **kwargs):
        self.heads._kernel = {}  # the weights move or change dtype: the kernel's factors are built again
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return "run by the stacked q/k/v layer on its output"


def _fusable(attn: nn.Module) -> tuple[OSCLinear, HeadNormsAfter] | None:
    """(the stacked q/k/v layer, its head norms) if the attention module has q/k norms the kernel reproduces after
    stacked q_proj and k_proj."""
    qn, kn, q, k = (getattr(attn, n, None) for n in ("q_norm", "k_norm", "q_proj", "k_proj"))
    if not (isinstance(q, Sibling) and isinstance(k, Sibling) and q.stacked is k.stacked
            and (q.slot, k.slot) == (Q, K) and isinstance(qn, nn.Module) and isinstance(kn, nn.Module)
            and not isinstance(qn, NormRunBefore) and q.stacked.layer.output_norm is None):
        return None
    fq, fk = norm_formula(qn), norm_formula(kn)
    if fq is None or fq != fk or qn.weight.numel() != kn.weight.numel():
        return None
    d = qn.weight.numel()
    if d & (d - 1) or q.out_features % d or k.out_features % d:  # the kernel holds a head in a power-of-two block
        return None
    return q.stacked.layer, HeadNormsAfter(qn, kn, q.out_features // d, k.out_features // d, fq)


@torch.no_grad()
def fuse_head_norms(model: nn.Module, probe: torch.Tensor | None = None) -> list[str]:
    """Run each attention's q_norm and k_norm on its stacked q/k/v layer's output, in place; needs q/k/v stacked first
    (fuse_siblings). ``probe``: token ids for the two checking runs (default: 8 random tokens of
    ``model.config.vocab_size``). Returns the attention modules fused."""
    found = {name: f for name, m in model.named_modules() if (f := _fusable(m))}

    def apply():
        for name, (layer, heads) in found.items():
            attn = model.get_submodule(name)
            attn.q_norm, attn.k_norm = NormRunBefore(heads.q_norm, heads), NormRunBefore(heads.k_norm, heads)
            object.__setattr__(layer, "output_norm", heads)  # not a submodule: the attention holds the norms

    def undo():
        for name, (layer, heads) in found.items():
            attn = model.get_submodule(name)
            attn.q_norm, attn.k_norm = heads.q_norm, heads.k_norm
            object.__setattr__(layer, "output_norm", None)

    if found and keep_if_unchanged(model, probe, "fuse_head_norms", "q/k norms", apply, undo,
                                   "its q/k norms run on the stacked q/k/v output (a norm that reads something else "
                                   "than q_proj's or k_proj's output)"):
        return list(found)
    return []
