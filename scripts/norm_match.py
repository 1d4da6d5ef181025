"""On the GPU: how often split-quantize with the fused RMSNorm (norms.py) differs from split-quantize of torch's
norm output, per output, at Qwen3-8B's hidden size (bf16 rows with planted outlier channels, both roundings).
Usage: python3 scripts/norm_match.py [M list]"""
import sys

import torch

from oscquant.config import LayerScheme
from oscquant.kernels import ops
from oscquant.kernels.triton_osc import MODE_F8, MODE_F16
from oscquant.linear import OSCLinear
from oscquant.norms import rms_norm

g = torch.Generator().manual_seed(0)
k_in, n = 4096, 256
lin = torch.nn.Linear(k_in, n, bias=False)
idx = torch.randperm(k_in, generator=g)[:128]
layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 128), idx).cuda()
kw = ops.layer_weights(layer)
w = (torch.rand(k_in, generator=g) + 0.5).cuda()
print("| M | kind | mode | x_o differing | operands differing | row scales differing |\n|---|---|---|---|---|---|")
for m in [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1,16,512,4096").split(",")]:
    x = torch.randn(m, k_in, generator=g)
    x[:, idx] *= 40
    x = x.to(torch.bfloat16).cuda()
    for kind in (1, 2):
        for mode in (MODE_F16, MODE_F8):
            got = ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", mode, kw.k_main, norm=ops.KernelNorm(w, 1e-6, kind))
            want = ops.split_quantize(rms_norm(x, w, 1e-6, kind), kw.keep, kw.outlier_idx, "mxfp4", mode, kw.k_main)
            fr = [a.view(torch.uint8).ne(b.view(torch.uint8)).float().mean().item() if a.element_size() == 1
                  else a.ne(b).float().mean().item() for a, b in zip(got, want)]
            print(f"| {m} | {kind} | {'f16' if mode == MODE_F16 else 'e4m3'} | " + " | ".join(f"{f:.2e}" for f in fr) + " |")
