"""On the GPU: split-quantize alone (CUDA graph, L2 flushed). Few tokens with the default launch, then
prefill shapes: one row group a program (rows 1/2/4) against the persistent pipelined loop (rows x warps x
stages x programs an SM), beside torch's BF16 -> e4m3 cast of the same x (the same bytes but x_o).
``python3 scripts/split_rows.py [prefill]``: prefill only."""
import itertools
import sys

import torch

from oscquant.bench import HBM_BYTES_PER_S, _graph_time
from oscquant.config import LayerScheme
from oscquant.kernels.ops import layer_weights, split_quantize
from oscquant.kernels.triton_osc import MODE_F8, MODE_F16
from oscquant.linear import OSCLinear


def layer(k_in):
    lin = torch.nn.Linear(k_in, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    return layer_weights(OSCLinear.from_linear(lin, LayerScheme("mxfp4", 128), torch.arange(128)))


if "prefill" not in sys.argv:
    print("| M | K | mode | µs |\n|---|---|---|---|")
    for k_in in (4096, 12288):
        kw = layer(k_in)
        for m in (1, 8, 16, 64, 256):
            x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
            for mode, name in ((MODE_F16, "f16"), (MODE_F8, "e4m3")):
                t = _graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", mode, kw.k_main))
                print(f"| {m} | {k_in} | {name} | {t:.1f} |", flush=True)


def same(a, b):
    return all(torch.equal(u.view(torch.uint8), v.view(torch.uint8)) for u, v in zip(a, b))


print("\nPrefill, MODE_F8, k = 128. µs (% of the memory roofline: x read, operands and x_o written at 4.3 TB/s)")
print("| M | K | torch cast | default | one group a program: rows 1 / 2 / 4 | best persistent (rows, warps, stages, "
      "per SM) | next 3 | best × default |\n|---|---|---|---|---|---|---|---|")
for m, k_in in ((1024, 4096), (4096, 2048), (4096, 4096), (4096, 12288), (16384, 2048), (16384, 4096),
                (16384, 12288)):
    kw = layer(k_in)
    x = torch.randn(m, k_in, device="cuda").to(torch.bfloat16)
    bytes_ = m * k_in * 2 + m * kw.k_main + m * 128 * 2

    def pct(t):
        return f"{t:.1f} ({100 * bytes_ / HBM_BYTES_PER_S / (t * 1e-6):.0f})"

    f8 = torch.empty(m, k_in, device="cuda", dtype=torch.float8_e4m3fn)
    t_cast = _graph_time(lambda: f8.copy_(x))
    ref = split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main)
    t_def = _graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main))
    block = 1 << (kw.k_main - 1).bit_length()
    plain = []
    for rows in (1, 2, 4):
        if rows * block > 16384:
            plain.append("-")
            continue
        plain.append(f"{_graph_time(lambda: split_quantize(x, kw.keep, kw.outlier_idx, 'mxfp4', MODE_F8, kw.k_main, rows=rows)):.1f}")
    runs = []
    for rows, warps, stages, per_sm in itertools.product((1, 2, 4), (4, 8), (2, 3), (1, 2, 4, 8)):
        if rows * block > 16384:
            continue
        call = lambda: split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main, rows=rows,  # noqa: E731
                                      warps=warps, stages=stages, per_sm=per_sm)
        try:
            if not same(call(), ref):
                print(f"<!-- {m}x{k_in} {rows},{warps},{stages},{per_sm}: OUTPUT DIFFERS -->")
                continue
            runs.append((_graph_time(call), (rows, warps, stages, per_sm)))
        except Exception as e:  # out of shared memory or registers for this shape
            print(f"<!-- {m}x{k_in} {rows},{warps},{stages},{per_sm}: {str(e)[:80]} -->")
    runs.sort()
    best = runs[0]
    nxt = ", ".join(f"{t:.1f} {c}" for t, c in runs[1:4])
    print(f"| {m} | {k_in} | {pct(t_cast)} | {pct(t_def)} | {' / '.join(plain)} | {pct(best[0])} {best[1]} | {nxt} | "
          f"{t_def / best[0]:.2f} |", flush=True)
