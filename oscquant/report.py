"""The ``oscquant analyze`` report: figures (matplotlib, PNG), a Markdown page and a JSON of the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .analysis import LayerReport  # noqa: E402
from .calibration import ChannelStats  # noqa: E402

KINDS = ("qkv", "o", "gate/up", "down")
COLORS = {"qkv": "tab:blue", "o": "tab:orange", "gate/up": "tab:green", "down": "tab:red", "other": "tab:gray"}


def layer_index(name: str) -> int:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def default_figure_layers(names: list[str]) -> list[str]:
    """The first, middle and last decoder layer, every projection in them."""
    depths = sorted({layer_index(n) for n in names if layer_index(n) >= 0})
    if not depths:
        return names[:8]
    keep = {depths[0], depths[len(depths) // 2], depths[-1]}
    return [n for n in names if layer_index(n) in keep]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def layer_figure(rep: LayerReport, stats: ChannelStats, seq: torch.Tensor, path: Path) -> None:
    """Heatmap of |x| for one sequence, max|x| per channel, and channel persistence; outliers marked."""
    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), gridspec_kw={"height_ratios": [2.2, 1, 1]}, sharex=True,
                             layout="constrained")
    a = seq.float().abs().numpy()
    floor = max(float(a[a > 0].min()) if (a > 0).any() else 1e-6, float(a.max()) * 1e-4)
    im = axes[0].imshow(a.clip(min=floor), aspect="auto", interpolation="nearest", cmap="viridis",
                        norm=LogNorm(vmin=floor, vmax=max(float(a.max()), floor * 10)))
    fig.colorbar(im, ax=axes.tolist(), location="right", shrink=0.45, pad=0.01, label="|x| (log scale)")
    axes[0].set_ylabel("token position")
    axes[0].set_title(f"{rep.name}  ({rep.kind}, K={rep.in_features}, k={rep.k})  —  {rep.verdict}\n"
                      f"persistence score {rep.persistence_score:.2f}, token Jaccard {rep.token_jaccard:.2f}, "
                      f"sequence Jaccard {rep.sequence_jaccard:.2f}, energy in the k channels {rep.energy_share:.0%}, "
                      f"4-bit error {rep.quant_error:.3f} -> {rep.quant_error_osc:.3f} with OSC", fontsize=9)

    ch = torch.arange(stats.absmax.numel())
    idx = torch.tensor(rep.outliers, dtype=torch.long)
    axes[1].plot(ch, stats.absmax, lw=0.7, color="0.3")
    axes[1].scatter(idx, stats.absmax[idx], s=14, color="red", zorder=3, label=f"selected outliers (k={rep.k})")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max |x|")
    axes[1].legend(loc="upper right", fontsize=8)

    pers = stats.persistence
    axes[2].plot(ch, pers, lw=0.7, color="0.3")
    axes[2].scatter(idx, pers[idx], s=14, color="red", zorder=3)
    axes[2].set_ylim(0, 1.02)
    axes[2].set_ylabel(f"persistence\n(in top-{stats.topk})")
    axes[2].set_xlabel("input channel")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_figure(reports: list[LayerReport], path: Path) -> None:
    """Per layer type: persistence score over depth, and its spread; 4-bit error reduction by separation."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in KINDS:
        rs = sorted((r for r in reports if r.kind == kind), key=lambda r: layer_index(r.name))
        if rs:
            by_depth: dict[int, list[float]] = {}
            for r in rs:
                by_depth.setdefault(layer_index(r.name), []).append(r.persistence_score)
            d = sorted(by_depth)
            axes[0].plot(d, [sum(by_depth[i]) / len(by_depth[i]) for i in d], marker="o", ms=3, label=kind,
                         color=COLORS[kind])
    axes[0].set_xlabel("decoder layer")
    axes[0].set_ylabel("persistence score")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("outlier persistence by depth")
    axes[0].legend()
    present = [k for k in KINDS if any(r.kind == k for r in reports)]
    for ax, key, title in ((axes[1], "persistence_score", "persistence score by layer type"),
                           (axes[2], None, "4-bit error / error with OSC")):
        data = [[(getattr(r, key) if key else r.quant_error / max(r.quant_error_osc, 1e-30))
                 for r in reports if r.kind == k] for k in present]
        bp = ax.boxplot(data, patch_artist=True)
        ax.set_xticks(range(1, len(present) + 1), present)
        for patch, k in zip(bp["boxes"], present):
            patch.set_facecolor(COLORS[k])
            patch.set_alpha(0.6)
        ax.set_title(title)
    axes[1].set_ylim(0, 1)
    axes[2].axhline(1.25, ls="--", color="0.5", lw=0.8)
    axes[2].set_ylabel("error reduction (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, reports: dict[str, LayerReport], stats: dict[str, ChannelStats],
                 samples: dict[str, list[torch.Tensor]], figure_layers: list[str], meta: dict,
                 progress: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    reps = list(reports.values())
    summary_figure(reps, out / "summary.png")
    figs = {}
    for name in tqdm(figure_layers, desc="figures", disable=not progress, unit="fig"):
        figs[name] = f"layer_{safe_name(name)}.png"
        layer_figure(reports[name], stats[name], samples[name][0], out / figs[name])
    (out / "report.json").write_text(json.dumps({"meta": meta, "layers": [r.to_dict() for r in reps]}, indent=1))

    lines = [f"# Outlier analysis: {meta.get('model', '')}", "",
             f"Calibration: {meta.get('calibration', '')}. Format {meta.get('format')}, k per layer as listed; "
             "definitions in docs/analysis.md.", "", "![summary](summary.png)", "",
             "## Per layer type (medians)", "",
             "| type | layers | persistence score | token Jaccard | sequence Jaccard | energy in outliers | "
             "4-bit error | with OSC | FP8 error | verdicts |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS + ("other",):
        rs = [r for r in reps if r.kind == kind]
        if not rs:
            continue
        med = lambda a: sorted(getattr(r, a) for r in rs)[len(rs) // 2]  # noqa: E731
        verdicts = {}
        for r in rs:
            verdicts[r.verdict.split(" (")[0]] = verdicts.get(r.verdict.split(" (")[0], 0) + 1
        lines.append(f"| {kind} | {len(rs)} | {med('persistence_score'):.2f} | {med('token_jaccard'):.2f} | "
                     f"{med('sequence_jaccard'):.2f} | {med('energy_share'):.0%} | {med('quant_error'):.3f} | "
                     f"{med('quant_error_osc'):.3f} | {med('quant_error_fp8'):.3f} | "
                     + ", ".join(f"{v} {c}" for v, c in sorted(verdicts.items())) + " |")
    lines += ["", "## Every layer", "",
              "| layer | K | k | persistence | token J | seq J | energy | 4-bit err | OSC err | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reps:
        lines.append(f"| {r.name} | {r.in_features} | {r.k} | {r.persistence_score:.2f} | {r.token_jaccard:.2f} | "
                     f"{r.sequence_jaccard:.2f} | {r.energy_share:.0%} | {r.quant_error:.3f} | "
                     f"{r.quant_error_osc:.3f} | {r.verdict} |")
    lines += ["", "## Layer figures", ""]
    for name, f in figs.items():
        lines += [f"### {name}", "", f"![{name}]({f})", ""]
    page = out / "index.md"
    page.write_text("\n".join(lines))
    return page
