"""Measuring how well a layer's activation outliers cluster in fixed channels.

Everything here is computed from two things calibration gives: the per-channel
statistics over all tokens (:class:`~oscquant.calibration.ChannelStats`) and a sample
of raw activation rows (a few whole sequences) kept per layer.

Definitions (docs/analysis.md has the reasoning):

top-t set of a token    the t channels with the largest |x| in that token (t = 16)
channel persistence     fraction of tokens whose top-t set contains the channel
persistence score       mean overlap |top-t(token) ∩ C| / t, where C is the t most
                        persistent channels: 1 when every token has the same outliers,
                        about t/K when they are scattered at random
token Jaccard           mean Jaccard index of the top-t sets of random token pairs
sequence Jaccard        mean Jaccard index between sequences of their top-t channels by max|x|
energy share            share of sum(x^2) held by the selected outlier channels
quant error             ||Q(x) - x|| / ||x|| per token, 4-bit, without and with separation
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn
from tqdm.auto import tqdm

from . import formats
from .calibration import ChannelStats, collect_stats, linear_modules
from .outliers import select_outlier_channels

SEPARATION_GAIN = 1.25  # separating k channels must cut the 4-bit error by this factor
NOISE_MARGIN = 1.25  # "no strong outliers": 4-bit error within this factor of Gaussian data's


@dataclass
class LayerReport:
    name: str
    kind: str  # qkv, o, gate/up, down, other
    in_features: int
    k: int
    outliers: list[int]
    persistence_score: float
    token_jaccard: float
    sequence_jaccard: float
    energy_share: float
    quant_error: float  # 4-bit, no separation
    quant_error_osc: float  # 4-bit main path, k channels in BF16
    quant_error_fp8: float
    max_ratio: float  # max|x| of the largest channel over the median channel's
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def layer_kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    for kind, leaves in (("qkv", ("q_proj", "k_proj", "v_proj", "qkv_proj")), ("o", ("o_proj",)),
                         ("gate/up", ("gate_proj", "up_proj", "gate_up_proj")), ("down", ("down_proj",))):
        if leaf in leaves:
            return kind
    return "other"


def collect_samples(model: nn.Module, batches: list[torch.Tensor], layer_names=None, sample_seqs: int = 4,
                    topk: int = 16, progress: bool = True) -> tuple[dict[str, ChannelStats], dict[str, list[torch.Tensor]]]:
    """Statistics over all batches, plus the raw input rows of the first ``sample_seqs`` sequences."""
    layers = linear_modules(model, layer_names)
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = []
    for n, m in layers.items():
        def keep(mod, args, n=n):
            if len(samples[n]) < sample_seqs:
                x = args[0].detach()
                samples[n].append(x.reshape(-1, x.shape[-1]).to(torch.bfloat16).cpu())
        handles.append(m.register_forward_pre_hook(keep))
    try:
        stats = collect_stats(model, batches, layers.keys(), topk, progress)
    finally:
        for h in handles:
            h.remove()
    return stats, {n: s for n, s in samples.items() if s}


def topk_sets(x: torch.Tensor, t: int) -> torch.Tensor:
    return x.abs().topk(min(t, x.shape[1]), dim=1).indices


def persistence_score(x: torch.Tensor, t: int = 16) -> float:
    top = topk_sets(x, t)
    counts = torch.bincount(top.flatten(), minlength=x.shape[1])
    consensus = torch.zeros(x.shape[1], dtype=torch.bool)
    consensus[counts.topk(top.shape[1]).indices] = True
    return consensus[top].float().mean().item()


def mean_jaccard(sets: torch.Tensor, channels: int, pairs: int = 2000, seed: int = 0) -> float:
    """Mean Jaccard index over random pairs of rows of ``sets`` (each row a set of channel ids)."""
    n = sets.shape[0]
    if n < 2:
        return float("nan")
    member = torch.zeros(n, channels, dtype=torch.bool)
    member.scatter_(1, sets, True)
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, n, (pairs,), generator=g)
    b = (a + torch.randint(1, n, (pairs,), generator=g)) % n  # never a row with itself
    inter = (member[a] & member[b]).sum(1).float()
    union = (member[a] | member[b]).sum(1).float()
    return (inter / union).mean().item()


def activation_error(x: torch.Tensor, fmt: str, keep: torch.Tensor | None = None, group_size=None) -> float:
    """Relative error of 4-bit (or fp8) per-token quantization; ``keep`` channels stay exact
    (zeroed in the quantized input, as OSCLinear's main path does)."""
    x = x.float()
    main = x
    if keep is not None and keep.numel():
        main = x.index_fill(1, keep, 0.0)
    block = formats.block_size(fmt, group_size) or 1
    padded = nn.functional.pad(main, (0, (-main.shape[1]) % block))
    q = formats.fake_quantize(padded, fmt, per_row_global=True,
                              **({"group_size": group_size} if group_size else {}))[:, :main.shape[1]]
    return ((q - main).norm() / x.norm().clamp(min=1e-30)).item()


def analyze_layer(name: str, stats: ChannelStats, rows: list[torch.Tensor], k: int, fmt: str = "mxfp4",
                  group_size=None, t: int = 16) -> LayerReport:
    x = torch.cat(rows).float()
    channels = x.shape[1]
    group = formats.block_size(fmt, group_size)
    idx = select_outlier_channels(stats, k, group)
    seq_sets = torch.stack([r.float().abs().amax(0).topk(min(t, channels)).indices for r in rows])
    energy = stats.sqsum
    score = persistence_score(x, t)
    med = stats.absmax.median().clamp(min=1e-30)
    rep = LayerReport(
        name=name, kind=layer_kind(name), in_features=channels, k=k, outliers=idx.tolist(),
        persistence_score=score,
        token_jaccard=mean_jaccard(topk_sets(x, t), channels),
        sequence_jaccard=mean_jaccard(seq_sets, channels, pairs=200),
        energy_share=(energy[idx].sum() / energy.sum().clamp(min=1e-30)).item() if k else 0.0,
        quant_error=activation_error(x, fmt, None, group_size),
        quant_error_osc=activation_error(x, fmt, idx, group_size),
        quant_error_fp8=activation_error(x, "fp8"),
        max_ratio=(stats.absmax.max() / med).item(),
        verdict="",
    )
    rep.verdict = verdict(rep, fmt, group_size)
    return rep


@lru_cache(maxsize=None)
def gaussian_error(fmt: str, channels: int, group_size=None, tokens: int = 1024) -> float:
    """The 4-bit error of outlier-free (Gaussian) activations: the floor no separation can beat."""
    g = torch.Generator().manual_seed(0)
    return activation_error(torch.randn(tokens, channels, generator=g), fmt, None, group_size)


def verdict(r: LayerReport, fmt: str = "mxfp4", group_size=None) -> str:
    """One line per layer, from measurements only.

    persistent: keeping its k outlier channels in BF16 cuts the 4-bit error by >= 1.25x.
    no strong outliers: its 4-bit error is within 1.25x of Gaussian data's anyway.
    weakly clustered: neither; the error stays high whatever channels are kept: FP8 advised.
    """
    if r.quant_error >= SEPARATION_GAIN * r.quant_error_osc:
        return "persistent (OSC fits)"
    if r.quant_error <= NOISE_MARGIN * gaussian_error(fmt, r.in_features, group_size):
        return "no strong outliers (plain 4-bit fits)"
    return "weakly clustered (fallback advised)"


def analyze(model: nn.Module, batches: list[torch.Tensor], k_of=lambda name, K: 16, fmt: str = "mxfp4",
            layer_names=None, sample_seqs: int = 4, progress: bool = True):
    """Returns (reports by layer, stats, samples)."""
    stats, samples = collect_samples(model, batches, layer_names, sample_seqs, progress=progress)
    reports = {}
    for name in tqdm(list(samples), desc="analyzing", disable=not progress, unit="layer"):
        reports[name] = analyze_layer(name, stats[name], samples[name], k_of(name, stats[name].absmax.numel()), fmt)
    return reports, stats, samples
