"""What to do with each linear layer: one small dataclass per scheme, one config per model.

A :class:`LayerScheme` says how one layer runs (number format, how many input
channels stay in BF16). :class:`OSCConfig` maps layer names to schemes: the
first rule whose regular expression matches the module's name wins, else the
default applies. The baselines are configs too: ``OSCConfig.rtn()`` is plain
round-to-nearest W4A4, ``OSCConfig.w8a8()`` is FP8 everywhere.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .formats import FORMATS, SEARCHED_FORMATS, check_format

OUTLIER_MULTIPLE = 16  # the BF16 branch's K must suit a 16-wide tensor-core step


@dataclass(frozen=True)
class LayerScheme:
    format: str = "mxfp4"  # mxfp4 | nvfp4 | int4 | fp8 | none (leave the layer in float)
    outliers: int = 0  # k: input channels kept in BF16, a multiple of 16
    outlier_ratio: float | None = None  # instead of k: this share of K, rounded down to 16
    group_size: int | None = None  # int4 only: columns per scale (None: per row)
    # 4-bit formats: each weight block's (row's, group's) scale by least squared error, weighted by the channels'
    # mean square activation where calibration ran (formats.quantize); None: on
    scale_search: bool | None = None

    def __post_init__(self):
        if self.format != "none":
            check_format(self.format)
        if self.group_size is not None and self.format != "int4":
            raise ValueError(f"group_size applies to int4 only, not {self.format}")
        if self.scale_search and self.format not in SEARCHED_FORMATS:
            raise ValueError(f"scale_search applies to 4-bit weights ({', '.join(SEARCHED_FORMATS)}) only, "
                             f"not {self.format}")
        if self.outliers < 0 or self.outliers % OUTLIER_MULTIPLE:
            raise ValueError(
                f"outliers={self.outliers} must be a non-negative multiple of {OUTLIER_MULTIPLE} "
                f"(try {max(0, self.outliers // OUTLIER_MULTIPLE * OUTLIER_MULTIPLE)})"
            )
        if self.outlier_ratio is not None and not 0 <= self.outlier_ratio < 1:
            raise ValueError(f"outlier_ratio={self.outlier_ratio} must lie in [0, 1)")

    @property
    def searches_scales(self) -> bool:
        """Whether the layer's weights get their scales by least squared error (the 4-bit formats)."""
        return self.format in SEARCHED_FORMATS and self.scale_search is not False

    def outliers_for(self, in_features: int) -> int:
        """The k this scheme gives a layer with ``in_features`` input channels."""
        if self.format == "none":
            return 0
        if self.outlier_ratio is not None:
            k = int(self.outlier_ratio * in_features) // OUTLIER_MULTIPLE * OUTLIER_MULTIPLE
        else:
            k = self.outliers
        if k >= in_features:
            raise ValueError(
                f"{k} outlier channels cannot be taken from a layer with only {in_features} input "
                f"channels; lower --outliers below {in_features}"
            )
        return k


@dataclass
class OSCConfig:
    default: LayerScheme = field(default_factory=lambda: LayerScheme("mxfp4", 128))
    rules: list[tuple[str, LayerScheme]] = field(
        default_factory=lambda: [(r"down_proj", LayerScheme("fp8"))]
    )
    skip: list[str] = field(default_factory=lambda: [r"lm_head"])  # never quantized
    persistence_topk: int = 16  # top-k per token used to measure token persistence
    # policy="auto" (policy.py) replaces the fixed k and the fallback rules by measured choices
    policy: str = "fixed"
    bf16_budget: float = 0.04  # auto: BF16 channels / input channels of the 4-bit layers
    fp8_budget: float = 1 / 7  # auto: FP8 layers / quantized layers
    max_outliers: int = 256  # auto: k cap per layer (also at most K/4)
    sample_seqs: int = 4  # auto: calibration sequences kept whole to measure errors on
    # GPTQ (gptq.py): 4-bit weights rounded column by column, each column's error pushed onto the rest through the
    # inverse input Hessian; needs calibration batches and one more pass over them per gptq_memory_gb of Hessians
    gptq: bool = False
    gptq_memory_gb: float = 4.0

    def __post_init__(self):
        if self.policy not in ("fixed", "auto"):
            raise ValueError(f"unknown policy {self.policy!r}; use 'fixed' or 'auto'")
        if not 0 <= self.bf16_budget < 1 or not 0 <= self.fp8_budget <= 1:
            raise ValueError("bf16_budget must lie in [0, 1) and fp8_budget in [0, 1]")
        if not self.gptq_memory_gb > 0:
            raise ValueError(f"gptq_memory_gb={self.gptq_memory_gb} must be positive (GiB of Hessians held at once)")

    def scheme_for(self, name: str) -> LayerScheme | None:
        """The scheme of the module called ``name``, or None to leave it alone."""
        if any(re.search(p, name) for p in self.skip):
            return None
        for pattern, scheme in self.rules:
            if re.search(pattern, name):
                return None if scheme.format == "none" else scheme
        return None if self.default.format == "none" else self.default

    # ---- presets, the same system for OSC and the baselines
    @classmethod
    def osc(cls, fmt: str = "mxfp4", outliers: int = 128, outlier_ratio: float | None = None,
            fallback: str | None = "fp8", fallback_pattern: str = r"down_proj",
            group_size: int | None = None, scale_search: bool | None = None, gptq: bool = False) -> "OSCConfig":
        rules = [] if fallback in (None, "none") else [(fallback_pattern, LayerScheme(fallback))]
        return cls(LayerScheme(fmt, outliers, outlier_ratio, group_size, scale_search), rules, gptq=gptq)

    @classmethod
    def rtn(cls, fmt: str = "mxfp4", group_size: int | None = None, scale_search: bool | None = None,
            gptq: bool = False) -> "OSCConfig":
        """Plain round-to-nearest W4A4: no outlier channels, no fallback (``gptq``: GPTQ's rounding, no outliers)."""
        return cls.osc(fmt, 0, fallback=None, group_size=group_size, scale_search=scale_search, gptq=gptq)

    @classmethod
    def w8a8(cls) -> "OSCConfig":
        return cls(LayerScheme("fp8"), [])

    @classmethod
    def auto(cls, fmt: str = "mxfp4", bf16_budget: float = 0.04, fp8_budget: float = 1 / 7,
             group_size: int | None = None, scale_search: bool | None = None, **kw) -> "OSCConfig":
        """Measured per-layer k and FP8 fallback under the two budgets (see policy.py)."""
        return cls(LayerScheme(fmt, 0, None, group_size, scale_search), [], policy="auto", bf16_budget=bf16_budget,
                   fp8_budget=fp8_budget, **kw)

    def to_dict(self) -> dict:
        return {
            "default": asdict(self.default),
            "rules": [[p, asdict(s)] for p, s in self.rules],
            "skip": list(self.skip),
            "persistence_topk": self.persistence_topk,
            "policy": self.policy,
            "bf16_budget": self.bf16_budget,
            "fp8_budget": self.fp8_budget,
            "max_outliers": self.max_outliers,
            "sample_seqs": self.sample_seqs,
            "gptq": self.gptq,
            "gptq_memory_gb": self.gptq_memory_gb,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "OSCConfig":
        extra = {k: d[k] for k in ("persistence_topk", "policy", "bf16_budget", "fp8_budget", "max_outliers",
                                   "sample_seqs", "gptq", "gptq_memory_gb") if k in d}
        return cls(LayerScheme(**d["default"]), [(p, LayerScheme(**s)) for p, s in d["rules"]], list(d["skip"]),
                   **extra)


__all__ = ["FORMATS", "LayerScheme", "OSCConfig", "OUTLIER_MULTIPLE"]
