"""GPTQ's cost on a GPU at Qwen3-8B's layer shapes (random weights): `quantize` of a few decoder layers with and
without GPTQ, `gptq.quantize_weight` alone per weight shape, beside round to nearest with the same scale search, and
four weights of one shape rounded one loop each against one batched loop (`gptq.quantize_weights`).
Usage: python3 scripts/gptq_time.py [layers] [calibration sequences of 512 tokens] [formats]
e.g. python3 scripts/gptq_time.py 2 32 mxfp4,int4. Prints a Markdown table; needs CUDA."""

import sys
import time

import torch

from oscquant import formats, gptq
from oscquant.bench_model import build
from oscquant.config import OSCConfig
from oscquant.convert import quantize


def _seconds(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gptq_time.py times GPTQ on a GPU; no CUDA device is visible")
    layers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seqs = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    fmts = (sys.argv[3] if len(sys.argv) > 3 else "mxfp4").split(",")
    torch.manual_seed(0)
    batches = [torch.randint(0, 4096, (1, 512)) for _ in range(seqs)]
    held_out = torch.randint(0, 4096, (4, 512), device="cuda")
    print(f"{torch.cuda.get_device_name()}, Qwen3-8B shapes, {layers} layers, {seqs} x 512 calibration tokens\n")
    print("| format | quantize, RTN (s) | quantize, GPTQ (s) | GPTQ / RTN | logits rel. error RTN | GPTQ |")
    print("|---|---|---|---|---|---|")
    for fmt in fmts:
        ref = build(layers)
        with torch.no_grad():
            want = ref(held_out).logits.float()
        row = []
        errs = []
        for use_gptq in (False, True):
            model = build(layers)
            cfg = OSCConfig.osc(fmt, gptq=use_gptq)
            row.append(_seconds(lambda m=model, c=cfg: quantize(m, c, batches, progress=False)))
            with torch.no_grad():
                got = model(held_out).logits.float()
            errs.append(((got - want).norm() / want.norm()).item())
            model = None
            torch.cuda.empty_cache()
        print(f"| {fmt} | {row[0]:.1f} | {row[1]:.1f} | {row[1] / row[0]:.1f} | {errs[0]:.4f} | {errs[1]:.4f} |")

    # the rounding alone, one weight at a time, against a Hessian from random inputs
    print("\n| format | weight rows × K | RTN with search (s) | GPTQ (s) |")
    print("|---|---|---|---|")
    for fmt in fmts:
        for rows, k in ((4096, 4096), (12288, 4096), (4096, 12288)):
            w = torch.randn(rows, k, device="cuda") * 0.02
            x = torch.randn(8192, k, device="cuda")
            h = x.T @ x
            imp = torch.diag(h)
            rtn = _seconds(lambda: formats.quantize(w, fmt, None, search=True, importance=imp / imp.max()))
            gq = _seconds(lambda: gptq.quantize_weight(w, h, fmt))
            print(f"| {fmt} | {rows} × {k} | {rtn:.2f} | {gq:.2f} |")

    # the batched rounding (gptq.quantize_layers): several blocks' weights of one shape, each with its own Hessian,
    # in one column loop, against one loop each; the codes must agree
    print("\n| format | weights × (rows × K) | one loop each (s) | one loop (s) | ratio | same codes |")
    print("|---|---|---|---|---|---|")
    for fmt in fmts:
        for count, rows, k in ((4, 4096, 4096), (4, 6144, 4096)):
            ws = [torch.randn(rows, k, device="cuda") * 0.02 for _ in range(count)]
            hs = []
            for _ in range(count):
                x = torch.randn(8192, k, device="cuda")
                hs.append(x.T @ x)
            alone, together = [], []
            t_alone = _seconds(lambda: alone.extend(gptq.quantize_weight(w, h, fmt) for w, h in zip(ws, hs)))
            t_together = _seconds(lambda: together.extend(gptq.quantize_weights(ws, hs, fmt)))
            same = all(torch.equal(a.codes, b.codes) for a, b in zip(alone, together))
            print(f"| {fmt} | {count} × ({rows} × {k}) | {t_alone:.2f} | {t_together:.2f} | "
                  f"{t_alone / t_together:.1f} | {same} |")


if __name__ == "__main__":
    main()
