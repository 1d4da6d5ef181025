"""Where the time of `oscquant bench model` goes, per model (BF16, OSC siblings apart, OSC stacked): wall-clock ms of a
prefill and a decode step (host included), torch.profiler's kernel table, and cProfile's host-side functions for OSC.

    python3 scripts/profile_model.py [--layers 4] [--prefill 512] [--out out/profile.txt]
"""
import argparse
import copy
import cProfile
import io
import os
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

from oscquant.bench_model import _attention_backends, build
from oscquant.config import OSCConfig
from oscquant.convert import quantize
from oscquant.siblings import fuse_siblings


def wall_ms(fn, reps=10):
    """ms a call until the GPU has finished too (host_overhead.host_us stops its clock before that wait)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / reps


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--out", default="out/profile.txt")
    a = p.parse_args()
    model = build(a.layers, device="cuda")
    osc = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, 4096, (1, 128), generator=g).cuda() for _ in range(4)]
    quantize(osc, OSCConfig.osc("mxfp4", 128), calib, progress=False)
    stacked = copy.deepcopy(osc)
    fuse_siblings(stacked)
    ids = torch.randint(0, 4096, (1, a.prefill), generator=g).cuda()
    lines = []
    for name, m in (("BF16", model), ("OSC apart", osc), ("OSC stacked", stacked)):
        with _attention_backends("cuda"):
            cache = DynamicCache()
            m(ids, past_key_values=cache, use_cache=True)
            steps = {"prefill": lambda: m(ids, use_cache=False),
                     # the same position again and again (the cache still grows by one a step)
                     "decode": lambda: m(ids[:, :1], past_key_values=cache, use_cache=True)}
            lines.append(f"== {name}: wall ms a forward, prefill {wall_ms(steps['prefill']):.3f}, "
                         f"decode step {wall_ms(steps['decode']):.3f}")
            for what, fn in steps.items():
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                lines.append(f"-- {name} {what}, 3 forwards, by device time")
                lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=50))
                if name != "BF16":
                    cp = cProfile.Profile()
                    cp.enable()
                    for _ in range(10):
                        fn()
                    torch.cuda.synchronize()
                    cp.disable()
                    s = io.StringIO()
                    pstats.Stats(cp, stream=s).sort_stats("tottime").print_stats(30)
                    lines.append(f"-- {name} {what}, 10 forwards, host functions by own time")
                    lines.append(s.getvalue())
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(ln for ln in lines if ln.startswith("==")))


if __name__ == "__main__":
    main()
