"""Side-by-side quality of several configs on one model: the demo's table.

The float model is calibrated once; each config is applied to a fresh copy and
scored on the same held-out windows, so rows differ only by the config.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from .calibration import collect_stats
from .config import OSCConfig
from .convert import plan_layers, quantize, summary
from .data import read_text, split_text, windows
from .evaluate import perplexity


@dataclass
class Row:
    name: str
    perplexity: float
    vs_float: float
    bits_per_weight: float | None
    bf16_share: float | None
    fp8_layers: int
    tokens: int
    accuracy: dict = field(default_factory=dict)  # lm-eval task -> {"acc", "acc_norm", "samples"} (tasks asked for)


def demo_configs(fmt: str = "mxfp4", outlier_ratio: float = 0.06,
                 group_size: int | None = None, gptq: bool = False) -> dict[str, OSCConfig | None]:
    """Float, plain RTN W4A4, OSC, and OSC with FP8 down_proj, in one 4-bit format (``group_size``: INT4's columns per
    scale); ``gptq``: the two OSC rows again with GPTQ-rounded weights."""
    name = f"{fmt} g{group_size}" if group_size else fmt
    configs = {
        "float (unquantized)": None,
        f"RTN W4A4 {name}, no outliers": OSCConfig.rtn(fmt, group_size),
        f"OSC W4A4 {name}": OSCConfig.osc(fmt, outlier_ratio=outlier_ratio, fallback=None, group_size=group_size),
        f"OSC W4A4 {name} + FP8 down_proj": OSCConfig.osc(fmt, outlier_ratio=outlier_ratio, fallback="fp8",
                                                          group_size=group_size),
    }
    if gptq:
        for label in list(configs)[2:]:
            cfg = dataclasses.replace(configs[label], gptq=True)
            configs[label.replace("OSC W4A4", "OSC W4A4 GPTQ")] = cfg
    return configs


def policy_configs(fmt: str = "mxfp4", bf16_budget: float = 0.04, fp8_budget: float = 1 / 7,
                   group_size: int | None = None) -> dict:
    """The fixed policy (one k for every layer, FP8 down_proj) against policy="auto", same budgets."""
    return {
        "float (unquantized)": None,
        f"fixed: k={bf16_budget:.0%} of K, FP8 down_proj": OSCConfig.osc(fmt, outlier_ratio=bf16_budget,
                                                                         group_size=group_size),
        f"auto: BF16 <= {bf16_budget:.0%}, FP8 <= {fp8_budget:.3g} of layers": OSCConfig.auto(fmt, bf16_budget,
                                                                                               fp8_budget, group_size),
    }


def compare(model, tokenizer, configs: dict[str, OSCConfig | None], text: str, calib_samples: int = 32,
            eval_windows: int = 32, seq_len: int = 512, progress: bool = True, tasks: list[str] = ()) -> list[Row]:
    for cfg in configs.values():  # a format or group size that does not fit fails before the calibration run
        if cfg is not None:
            plan_layers(model, cfg)
    calib = windows(tokenizer, split_text(text, "calib"), seq_len, calib_samples)
    held_text = split_text(text, "heldout")  # the perplexity's windows and, with tasks, sotu_next's items
    heldout = windows(tokenizer, held_text, seq_len, eval_windows)
    stats = None
    if any(c is not None and c.default.format != "none" for c in configs.values()):
        stats = collect_stats(model, calib, progress=progress)
    rows, base = [], None
    for name, cfg in configs.items():
        m = model
        if cfg is not None:
            m = copy.deepcopy(model)
            quantize(m, cfg, calib, stats=stats, progress=False)  # auto re-calibrates
        ppl = perplexity(m, tokenizer, batches=heldout, progress=progress, desc=name[:30])
        acc = {}
        if tasks:
            from .accuracy import accuracy
            acc = accuracy(m, tokenizer, list(tasks), held_text)
        base = base or ppl.perplexity
        s = summary(m) if cfg is not None else None
        rows.append(Row(name, ppl.perplexity, ppl.perplexity / base,
                        s and s["bits_per_weight"], s and s["bf16_channel_share"], s["fp8_layers"] if s else 0,
                        ppl.tokens, acc))
        del m
    return rows


def markdown_table(rows: list[Row]) -> str:
    tasks = list(rows[0].accuracy)
    out = ["| model | held-out perplexity | × float | bits/weight (linear layers) | BF16 channels (4-bit layers) | FP8 layers |"
           + "".join(f" {t} acc / acc_norm |" for t in tasks),
           "|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        bpw = f"{r.bits_per_weight:.2f}" if r.bits_per_weight is not None else "32 (float)"
        share = f"{100 * r.bf16_share:.1f}%" if r.bf16_share is not None else "-"
        accs = "".join(f" {r.accuracy[t]['acc']:.3f} / {r.accuracy[t].get('acc_norm', float('nan')):.3f} |"
                       for t in tasks)
        out.append(f"| {r.name} | {r.perplexity:.2f} | {r.vs_float:.3f} | {bpw} | {share} | {r.fp8_layers} |{accs}")
    return "\n".join(out)


def run_demo(calib_samples: int = 32, eval_windows: int = 32, seq_len: int = 512, fmt: str = "mxfp4",
             outlier_ratio: float = 0.06, progress: bool = True, policies: bool = False, tasks: list[str] = (),
             group_size: int | None = None, gptq: bool = False) -> list[Row]:
    from .models import load_model

    # the configs first: a bad format and group size fail before the model loads
    configs = (policy_configs(fmt, group_size=group_size) if policies
               else demo_configs(fmt, outlier_ratio, group_size, gptq))
    model, tok, _ = load_model("smollm2")
    return compare(model, tok, configs, read_text("sotu"), calib_samples, eval_windows, seq_len, progress, tasks)
