"""Host µs of the pieces of one OSC layer call (stacked q/k/v shape, 1 token): allocations, the config choice,
split-quantize launched plainly and overlapped, the whole call with and without programmatic dependent launch.

    python3 scripts/host_pieces.py
"""
import torch
from torch import nn

from oscquant.config import LayerScheme
from oscquant.kernels import ops
from oscquant.linear import OSCLinear

import sys
sys.path.insert(0, "scripts")
from host_overhead import host_us  # noqa: E402


@torch.no_grad()
def main():
    for n, k, m in ((6144, 4096, 1), (6144, 4096, 512)):
        lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4"), torch.arange(0, 1024, 8)).cuda()
        kw = ops.layer_weights(layer)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cfg = ops.layer_config(x, kw)
        xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, kw.fmt, cfg.mode, kw.k_main)
        pieces = {
            "4 x torch.empty": lambda: [torch.empty(m, 128, device="cuda") for _ in range(4)],
            "layer_config": lambda: ops.layer_config(x, kw),
            "split_quantize, plain": lambda: ops.split_quantize(x, kw.keep, kw.outlier_idx, kw.fmt, cfg.mode, kw.k_main),
            "split_quantize, overlapped": lambda: ops.split_quantize(x, kw.keep, kw.outlier_idx, kw.fmt, cfg.mode,
                                                                     kw.k_main, pdl=True),
            "GEMM alone": lambda: ops.osc_gemm(a, sa, kw, xo, x.dtype, cfg),
            "osc_linear_2d": lambda: ops.osc_linear_2d(x, kw),
        }
        for name, fn in pieces.items():
            print(f"M={m} {cfg.path}: {name}: {host_us(fn, 500):.1f} µs", flush=True)
        ops.PDL = False
        print(f"M={m} {cfg.path}: osc_linear_2d without PDL: {host_us(lambda: ops.osc_linear_2d(x, kw), 500):.1f} µs")
        ops.PDL = True


if __name__ == "__main__":
    main()
