"""On the GPU: split-quantize alone (CUDA graph, L2 flushed): at few tokens with the default rows per
program, then at prefill shapes with rows per program 1/2/4/8 (sets the default in ops.split_quantize)."""
import torch

from oscquant.bench import HBM_BYTES_PER_S, _graph_time
from oscquant.config import LayerScheme
from oscquant.kernels.ops import layer_weights, split_quantize
from oscquant.kernels.triton_osc import MODE_F8, MODE_F16
from oscquant.linear import OSCLinear


def layer(k_in):
    lin = torch.nn.Linear(k_in, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    return layer_weights(OSCLinear.from_linear(lin, LayerScheme("mxfp4", 128), torch.arange(128)))


print("| M | K | mode | µs |\n|---|---|---|---|")
for k_in in (4096, 12288):
    kw = layer(k_in)
    for m in (1, 8, 16, 64, 256):
        x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
        for mode, name in ((MODE_F16, "f16"), (MODE_F8, "e4m3")):
            t = _graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", mode, kw.k_main))
            print(f"| {m} | {k_in} | {name} | {t:.1f} |", flush=True)

print("\n| M | K | rows | µs | % of memory roofline |\n|---|---|---|---|---|")
for m, k_in in ((4096, 4096), (4096, 12288), (16384, 4096), (4096, 2048)):
    kw = layer(k_in)
    x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
    bytes_ = m * k_in * 2 + m * kw.k_main + m * 128 * 2
    for rows in (1, 2, 4, 8):
        t = _graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main, rows=rows))
        print(f"| {m} | {k_in} | {rows} | {t:.1f} | {100 * bytes_ / HBM_BYTES_PER_S / (t * 1e-6):.0f} |", flush=True)
