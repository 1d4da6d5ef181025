"""Programmatic dependent launch (Hopper): a kernel starts while the one before it still runs.

An OSC layer is two launches (split-quantize, then the GEMM), and at decode sizes each launch
costs about as much as the work itself. Launched with ``launch_pdl=True``, a kernel's programs
start as soon as every program of the kernel before it has called :func:`release_dependents`
(split-quantize does so first thing), and :func:`wait_inputs` blocks them until that kernel has
finished and its writes are visible. Every load and store comes after the wait, so correctness
does not depend on the overlap: what is saved is the launch latency. Without the launch
attribute both instructions are no-ops.

Used (``GemmConfig.pdl``, set in ops.gemm_config) for every GEMM that waits for its inputs this way:
- the fragment GEMM (M <= 8): 0.3-1.0 µs faster per layer (all shapes but 8B down at 8 tokens, 0.1-0.3 µs
  slower);
- the wgmma GEMM above 64 tokens, which copies its first weight tiles (constant) by TMA before its wait: 2-6 %
  faster at 256 tokens;
- the Triton transposed GEMMs, and the wgmma GEMM up to 64 tokens, launched only once split-quantize's programs
  have issued their stores (``GemmConfig.pdl_late``): launched from split-quantize's start they were slower on most
  shapes, up to 9 µs (its few register-heavy programs hold their SMs, and the GEMM's programs crowd onto the
  others); launched late they are 0.2-0.8 µs faster back to back than without overlap on all 19 rows measured.
Prefetching the weights into L2 during the wait was slower (docs/bench/h200_pdl_rows_2026-11-29.md,
docs/bench/h200_wgmma_pdl_2026-11-29.md, docs/bench/h200_pdl_late_2026-11-30.md).

The helpers are plain ``triton.jit`` functions of inline PTX; the Gluon fragment GEMM calls them too.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream launch now (it still waits for this one in wait_inputs)."""
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def wait_inputs(PDL: tl.constexpr):
    """Block until the kernel before this one has completed and its memory is visible."""
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
