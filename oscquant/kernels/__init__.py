"""GPU kernels (Triton) for OSC layers, registered with backends.py when Triton can run them.

Triton compiles them on first use; there is no build step. On a machine without CUDA
they still run under ``TRITON_INTERPRET=1`` (slowly), which is how CPU CI tests them; the
two Gluon kernels for sm_90 (frag_gemm.py, inline PTX; wgmma_gemm.py, TMA and wgmma) are left
out there (gemm_config takes the Triton paths), the first one's recipe replayed on the CPU by
layout.fragment_unpack, and both built by aot.py.
"""

from __future__ import annotations

import warnings


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_warned: set = set()


def register() -> None:
    """Put the Triton backend into backends.py; layers it cannot take run the reference (with one warning)."""
    if not triton_available():
        return
    from .. import backends
    from .ops import supported, triton_forward

    def accepts(layer, x):
        why = supported(layer, x)
        if why and x.is_cuda and why not in _warned:
            _warned.add(why)
            warnings.warn(f"oscquant: running the PyTorch reference path because {why}", stacklevel=3)
        return why is None

    backends.register("triton", accepts, triton_forward)

    from . import moe

    def accepts_experts(module, hidden, top_k_index):
        key = (hidden.device, hidden.dtype)
        if key not in module.kernel_checks:  # once per device and dtype: 2 x E layers to look at
            projections = [[getattr(m, p) for m in module] for p in moe.PROJECTIONS]
            module.kernel_checks[key] = moe.experts_supported(projections, hidden)
        if module.kernel_checks[key] is not None:
            return False
        for p in moe.PROJECTIONS:  # built now, outside any compiled step; the experts' own layers then run on views
            module.stacked(p, hidden.device)
        # up to moe.MAX_PAIRS pairs (prompts of 8192 tokens at 8 experts a token); past that, unmeasured, each
        # expert's own layer on all of its tokens
        return top_k_index.numel() <= moe.MAX_PAIRS

    backends.register_experts(accepts_experts, moe.experts_forward)
