"""Programmatic dependent launch (Hopper): a kernel starts while the one before it still runs.

An OSC layer is two launches (split-quantize, then the GEMM), and at decode sizes each launch
costs about as much as the work itself. Launched with ``launch_pdl=True``, a kernel's programs
start as soon as every program of the kernel before it has called :func:`release_dependents`
(split-quantize does so first thing), and :func:`wait_inputs` blocks them until that kernel has
finished and its writes are visible. Every load and store comes after the wait, so correctness
does not depend on the overlap: what is saved is the launch latency. Without the launch
attribute both instructions are no-ops.

Used (``GemmConfig.pdl``, set in ops.gemm_config) for every GEMM that waits for its inputs this way, and for the
prefill path's weight expansion (which reads only the weights and waits at its end instead). Two things decide
whether starting early pays (docs/bench/h200_pdl_late_2026-11-30.md, docs/bench/h200_carveout_2026-11-30.md):
- **the shared-memory carve-out.** split-quantize needs almost no shared memory, so the driver runs it with a small
  carve-out, and a GEMM program that needs 80+ KB of shared memory cannot start on an SM where split-quantize still
  runs: its programs crowd onto the other SMs, and grids sized to fill the GPU run a partial second wave (early
  release was up to 9 µs slower than no overlap). :func:`prefer_shared_carveout` asks the driver to run
  split-quantize with the largest carve-out instead; with that, early release is 0.1-1.3 µs faster than late. The
  preference belongs to the compiled kernel, so the prefill path, whose weight expansion needs no shared memory,
  launches a split-quantize compiled apart (``SHARED_BESIDE``) that keeps the default carve-out and its L1 (the raised
  one cost it 2-15 µs at 256-4096 tokens);
- **registers**, where split-quantize's rows are long (K > 4096: 16384 lanes a row, 114 registers a thread on 8
  warps) and a GEMM program no longer fits beside it: there the GEMM is released once split-quantize's programs have
  issued their stores (``GemmConfig.pdl_late``), 0.2-0.8 µs faster back to back than no overlap.
The fragment GEMM (M <= 8) needs almost no shared memory and always starts early (0.3-1.0 µs faster per layer); the wgmma
GEMM copies its first weight tiles (constant) by TMA before its wait. Prefetching the weights into L2 during the wait
was slower (docs/bench/h200_pdl_rows_2026-11-29.md).

The device helpers are plain ``triton.jit`` functions of inline PTX; the Gluon fragment GEMM calls them too.
"""

from __future__ import annotations

import ctypes
import warnings

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


_CARVEOUT_SET: set = set()  # compiled kernels (id) already given the preference
_PREFER_NONE, _PREFER_SHARED = 0, 1  # CUfunc_cache: CU_FUNC_CACHE_PREFER_NONE, CU_FUNC_CACHE_PREFER_SHARED
_PREFERRED_CARVEOUT = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT


def set_shared_carveout(kernel, largest: bool = True) -> bool:
    """Set a compiled Triton kernel's driver preference to the largest shared-memory carve-out (as Triton does for
    kernels above 48 KB), or back to the driver's default; from its next launch on. False where the driver call is
    not available or refused."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        kernel._init_handles()
        fn = ctypes.c_void_p(kernel.function)
        return cuda.cuFuncSetCacheConfig(fn, _PREFER_SHARED if largest else _PREFER_NONE) == 0 and \
            cuda.cuFuncSetAttribute(fn, _PREFERRED_CARVEOUT, 100 if largest else -1) == 0
    except (OSError, AttributeError):
        return False


def prefer_shared_carveout(kernel) -> bool:
    """:func:`set_shared_carveout` once per compiled kernel, so that a dependent launched early that needs shared
    memory fits beside it; False (with one warning) where the driver call is not available."""
    if id(kernel) in _CARVEOUT_SET:
        return True
    _CARVEOUT_SET.add(id(kernel))
    ok = set_shared_carveout(kernel)
    if not ok:
        warnings.warn("oscquant: could not set split-quantize's shared-memory carve-out; overlapped launches of the "
                      "GEMM after it may be slower (set OSCQUANT_PDL=0 to launch them one after the other)",
                      RuntimeWarning, stacklevel=2)
    return ok
