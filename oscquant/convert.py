"""Model conversion: the one entry point, ``quantize(model, config, calibration_batches)``.

It (1) splits fused MoE expert tensors into one nn.Linear per expert, (2) runs the
calibration text through the model to measure every linear layer's inputs,
(3) picks each layer's outlier channels and (4) swaps the nn.Linear for an
:class:`~oscquant.linear.OSCLinear`. Embeddings, norms, routers and lm_head stay as they are.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from tqdm.auto import tqdm

from . import formats, gptq
from .analysis import collect_samples
from .calibration import ChannelStats, collect_stats
from .config import LayerScheme, OSCConfig
from .linear import OSCLinear
from .outliers import select_outlier_channels
from .policy import auto_plan

# model_type values whose conversion is tested (tests/test_models.py)
SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "qwen3_moe", "gemma3_text")


def check_supported(model: nn.Module) -> None:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {mt!r} is not supported; oscquant converts {', '.join(SUPPORTED_MODEL_TYPES)} "
            "causal LMs (Gemma 3 through Gemma3ForCausalLM)"
        )


# ---------------------------------------------------------------- MoE experts
class ExpertLinears(nn.ModuleList):
    """MoE experts as one (gate_up_proj, down_proj) pair of nn.Linear per expert.

    transformers 5 keeps all experts in two 3-D parameters and multiplies with
    F.linear on slices; an OSC layer needs a module per expert so that each one
    gets its own calibration statistics, outlier channels and 4-bit weights.
    The forward is the same routing loop as the fused module's.
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        experts = []
        for e in range(gate_up.shape[0]):
            m = nn.Module()
            m.gate_up_proj = _linear_from(gate_up[e])
            m.down_proj = _linear_from(down[e])
            experts.append(m)
        super().__init__(experts)
        # kept out of the module tree so that self[e] and len(self) are the experts alone
        object.__setattr__(self, "act_fn", act_fn)
        self._clear()

    def _clear(self):
        self.kernel_checks: dict = {}  # (device, dtype) -> None, or why the grouped kernels cannot run
        self._stacks: dict = {}  # (projection, device) -> kernels.moe.StackedExperts

    def stacked(self, name: str, device):
        """The experts' ``name`` layers (gate_up_proj, down_proj) stacked for the grouped kernels, built once."""
        if (name, device) not in self._stacks:
            from .kernels.moe import stack_experts

            self._stacks[name, device] = stack_experts([getattr(m, name) for m in self])
        return self._stacks[name, device]

    def _apply(self, fn, *args, **kwargs):
        self._clear()  # moved or converted: the stacks are rebuilt from the layers
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from .backends import experts_forward

        # on the GPU, up to kernels.moe.MAX_PAIRS pairs (decoding and prompts): all (token, expert) pairs in one
        # grouped launch per projection, no host sync (kernels/moe.py)
        out = experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if out is not None:
            return out
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == e)
            gate, up = self[e].gate_up_proj(hidden_states[token_idx]).chunk(2, dim=-1)
            h = self[e].down_proj(self.act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


def _linear_from(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    return lin


def _is_fused_experts(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3


def unfuse_experts(model: nn.Module) -> int:
    """Replace fused expert modules in place; returns how many were replaced."""
    found = [(n, m) for n, m in model.named_modules() if _is_fused_experts(m)]
    for name, m in found:
        parent, attr = _parent(model, name)
        setattr(parent, attr, ExpertLinears(m.gate_up_proj.data, m.down_proj.data, m.act_fn))
    return len(found)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


# ---------------------------------------------------------------- the plan
def plan_layers(model: nn.Module, config: OSCConfig) -> dict[str, tuple[LayerScheme, int]]:
    """name -> (scheme, k) for every nn.Linear the config quantizes, validated up front."""
    plan = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        scheme = config.scheme_for(name)
        if scheme is None:
            continue
        formats.check_columns(scheme.format, m.in_features, scheme.group_size, what=f"{name}: in_features")
        plan[name] = (scheme, scheme.outliers_for(m.in_features))
    if not plan:
        raise ValueError("the config selects no linear layer of this model; check its rules and skip patterns")
    return plan


def _stats_for(name: str, stats: dict[str, ChannelStats]) -> ChannelStats:
    if name in stats:
        return stats[name]
    # An expert no calibration token reached: pool its siblings (same layer, same projection).
    pattern = re.escape(re.sub(r"\.\d+\.(?=[^.]+$)", ".#.", name)).replace("\\#", r"\d+")
    siblings = [s for n, s in stats.items() if re.fullmatch(pattern, n)]
    if not siblings or pattern == re.escape(name):
        raise ValueError(f"no calibration token reached {name}; give more calibration text")
    merged = ChannelStats.empty(siblings[0].absmax.numel(), siblings[0].topk)
    for s in siblings:
        merged.tokens += s.tokens
        merged.absmax = torch.maximum(merged.absmax, s.absmax)
        merged.abssum += s.abssum
        merged.sqsum += s.sqsum
        merged.hits += s.hits
    return merged


def quantize(
    model: nn.Module,
    config: OSCConfig | None = None,
    calibration_batches: list[torch.Tensor] | None = None,
    stats: dict[str, ChannelStats] | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Quantize ``model`` in place with OSC; returns the per-layer plan that was applied.

    ``calibration_batches`` are token-id tensors [batch, seq]. They are needed
    whenever some layer keeps outlier channels; ``stats`` can be passed instead
    when the caller has already calibrated (see :func:`collect_stats`). Where given, the
    channels' mean squares also weigh the 4-bit weights' scale search (formats.quantize),
    layers without outlier channels included.
    """
    config = config or OSCConfig()
    check_supported(model)
    unfuse_experts(model)
    plan = plan_layers(model, config)
    needs_calibration = config.policy == "auto" or any(k for _, k in plan.values())
    if needs_calibration and calibration_batches is None and (stats is None or config.policy == "auto"):
        raise ValueError("this config keeps outlier channels, so it needs calibration_batches")
    if config.gptq and calibration_batches is None:
        raise ValueError("GPTQ (config.gptq) needs calibration_batches to measure each layer's input Hessian")
    if config.policy == "auto":
        stats, samples = collect_samples(model, calibration_batches, plan.keys(), config.sample_seqs,
                                         config.persistence_topk, progress)
        choices = auto_plan({n: config.default for n in plan}, stats, samples, config.bf16_budget,
                            config.fp8_budget, config.max_outliers)
        plan = {n: (c.scheme, c.k) for n, c in choices.items()}
    elif stats is None and calibration_batches is not None and (
            needs_calibration or any(scheme.searches_scales for scheme, _ in plan.values())):
        # also without outlier channels: the channels' mean squares weigh the weights' scale search
        stats = collect_stats(model, calibration_batches, plan.keys(), config.persistence_topk, progress)
    chosen = {}  # name -> (its channels' mean squares, which weigh the scale search, or None; its outlier channels)
    for name, (scheme, k) in plan.items():
        st = _stats_for(name, stats) if stats is not None else None
        group = formats.block_size(scheme.format, scheme.group_size)
        chosen[name] = (st.mean_square if st is not None else None,
                        select_outlier_channels(st, k, group) if k else torch.zeros(0, dtype=torch.long))
    built = {}  # GPTQ's layers, built before any layer is replaced
    if config.gptq:
        # every Hessian from the float model, before any layer is replaced: each layer's own inputs
        rounded = [n for n, (s, _) in plan.items() if s.format in formats.FP4_FORMATS]
        for measured in gptq.layer_hessians(model, calibration_batches, {n: chosen[n][1] for n in rounded},
                                            config.gptq_memory_gb, progress):
            built.update(_gptq_layers(model, measured, plan, chosen, config.gptq_memory_gb, progress))
    applied = {}
    for name, (scheme, k) in tqdm(plan.items(), desc="quantizing", disable=not progress, unit="layer"):
        importance, idx = chosen[name]
        layer = built.pop(name, None)
        if layer is None:
            layer = OSCLinear.from_linear(model.get_submodule(name), scheme, idx, importance)
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer)
        applied[name] = {"scheme": scheme, "k": k}
    _layers_replaced(model)
    model.osc_config = config
    model.osc_plan = applied
    return applied


def _gptq_layers(model: nn.Module, measured: list[tuple[str, torch.Tensor | None]], plan: dict, chosen: dict,
                 memory_gb: float, progress: bool) -> dict[str, OSCLinear]:
    """The OSC layers of one Hessian pass's layers, their 4-bit weights rounded by GPTQ all in one go
    (gptq.quantize_layers: a column loop per layer shape, not per layer); a layer no token reached (h None), to
    nearest."""
    layers, jobs, padded = {}, {}, {}
    for name, h in measured:
        scheme, (importance, idx) = plan[name][0], chosen[name]
        linear = model.get_submodule(name)
        if h is None:
            layers[name] = OSCLinear.from_linear(linear, scheme, idx, importance)
            continue
        layers[name] = layer = OSCLinear.unrounded(linear, scheme, idx)
        # siblings handed one H keep one padded H, which is how quantize_layers knows to round them as one
        key = (id(h), layer.main_columns)
        if key not in padded:
            padded[key] = layer.main_hessian(h)
        hp = padded[key]
        jobs[name] = (layer.main_weight(linear), hp, scheme.format, scheme.group_size, scheme.searches_scales)
    for name, q in gptq.quantize_layers(jobs, memory_gb, progress).items():
        layers[name].set_main(q)
    return layers


def build_empty(model: nn.Module, plan: dict[str, dict]) -> None:
    """Give a freshly built float model the OSC layers of ``plan`` (weights to be loaded)."""
    unfuse_experts(model)
    for name, entry in plan.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint names layer {name}, which this model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"the checkpoint expects a linear layer at {name}, found {type(linear).__name__}")
        bias = linear.bias is not None
        layer = OSCLinear(linear.in_features, linear.out_features, entry["scheme"], entry["k"], bias,
                          linear.bias.dtype if bias else torch.float32)
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer)
    _layers_replaced(model)
    model.osc_plan = plan


def _layers_replaced(model: nn.Module) -> None:
    """MoE experts remember whether the grouped kernels take their layers (and stack them): ask again."""
    for m in model.modules():
        if isinstance(m, ExpertLinears):
            m._clear()


def summary(model: nn.Module) -> dict:
    """Bits per weight over the converted layers and the share of input channels kept in BF16."""
    layers = [m for m in model.modules() if isinstance(m, OSCLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.bits_per_weight() * m.in_features * m.out_features for m in layers)
    four_bit = [m for m in layers if m.scheme.format in formats.FP4_FORMATS]
    chans = sum(m.in_features for m in four_bit)
    return {
        "layers": len(layers),
        "fp8_layers": sum(m.scheme.format == "fp8" for m in layers),
        "bits_per_weight": bits / max(weights, 1),
        "bf16_channel_share": sum(m.k for m in four_bit) / max(chans, 1),
        "bf16_channel_share_all": sum(m.k for m in layers) / max(sum(m.in_features for m in layers), 1),
    }
