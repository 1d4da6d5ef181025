import json

import pytest
import torch
from test_calibration import planted_activations, stats_of
from tiny import batches, tiny_model

from oscquant import OSCConfig, OSCLinear, quantize
from oscquant.analysis import analyze_layer, mean_jaccard, persistence_score
from oscquant.config import LayerScheme
from oscquant.outliers import select_outlier_channels
from oscquant.policy import auto_plan

FIXED = (7, 50, 51, 130, 200, 201, 202, 240)


def layer_data(kind, seed=0):
    if kind == "fixed":
        x = planted_activations(planted=FIXED, seed=seed)
    elif kind == "moving":  # as many outliers per token as "fixed" has, each token its own channels
        x = planted_activations(planted=(), seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        hot = torch.rand(x.shape, generator=g).argsort(dim=1)[:, :len(FIXED)]
        x.scatter_(1, hot, 40 * torch.ones(hot.shape))
    else:
        x = planted_activations(planted=(), seed=seed)
    return x


def test_persistence_metrics_separate_fixed_from_moving():
    fixed, moving, plain = (layer_data(k) for k in ("fixed", "moving", "plain"))
    assert persistence_score(fixed, 8) > 0.9
    assert persistence_score(moving, 8) < 0.3
    sets_fixed = fixed.abs().topk(8, dim=1).indices
    sets_moving = moving.abs().topk(8, dim=1).indices
    assert mean_jaccard(sets_fixed, 256) > 0.8 > 0.2 > mean_jaccard(sets_moving, 256)


def test_verdicts():
    verdicts = {}
    for kind in ("fixed", "moving", "plain"):
        x = layer_data(kind)
        rep = analyze_layer(kind, stats_of(x), [x[:256], x[256:]], 16)
        verdicts[kind] = rep.verdict
        if kind == "fixed":
            assert set(FIXED) <= set(rep.outliers)
            assert rep.energy_share > 0.8 and rep.quant_error_osc < rep.quant_error / 2
    assert verdicts == {"fixed": "persistent (OSC fits)", "moving": "weakly clustered (fallback advised)",
                        "plain": "no strong outliers (plain 4-bit fits)"}


def test_auto_policy_picks_fp8_for_moving_and_channels_for_fixed_outliers():
    data = {k: layer_data(k, seed=i) for i, k in enumerate(("fixed", "moving", "plain"))}
    stats = {k: stats_of(x) for k, x in data.items()}
    samples = {k: [x[:256], x[256:]] for k, x in data.items()}
    layers = {k: LayerScheme("mxfp4") for k in data}
    plan = auto_plan(layers, stats, samples, bf16_budget=0.05, fp8_budget=1 / 3)
    assert plan["moving"].scheme.format == "fp8"
    fixed = plan["fixed"]
    assert fixed.scheme.format == "mxfp4" and fixed.k >= 16
    assert set(FIXED) <= set(select_outlier_channels(stats["fixed"], fixed.k, 32).tolist())
    assert plan["plain"].scheme.format == "mxfp4"
    # the budget: at most 5% of the 4-bit layers' 512 input channels
    assert plan["fixed"].k + plan["plain"].k <= 0.05 * 512
    # without an FP8 budget the moving layer stays 4-bit
    plan0 = auto_plan(layers, stats, samples, bf16_budget=0.05, fp8_budget=0)
    assert all(c.scheme.format == "mxfp4" for c in plan0.values())


def test_auto_policy_on_a_model_respects_both_budgets():
    model = tiny_model("qwen3")
    plan = quantize(model, OSCConfig.auto("mxfp4", bf16_budget=0.25, fp8_budget=0.2), batches(), progress=False)
    layers = [m for m in model.modules() if isinstance(m, OSCLinear)]
    assert len(layers) == len(plan) == 14
    fp8 = [m for m in layers if m.scheme.format == "fp8"]
    four = [m for m in layers if m.scheme.format == "mxfp4"]
    assert len(fp8) <= 0.2 * 14
    assert sum(m.k for m in four) <= 0.25 * sum(m.in_features for m in four)
    assert any(m.k for m in four), "planted outliers must earn some BF16 channels"
    q = model.model.layers[0].self_attn.q_proj
    assert q.k == 0 or {5, 17, 40} & set(q.outlier_idx.tolist())


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_auto_policy_decides_siblings_together_so_they_stack(arch):
    """q/k/v and gate/up read one input: the auto policy gives each group one scheme and one k (with 16 channels a
    layer at a time, the budget used to run out inside a group), so fuse_siblings stacks every group."""
    from oscquant import fuse_siblings
    from oscquant.siblings import sibling_units

    assert sibling_units(["a.q_proj", "a.k_proj", "a.o_proj", "a.v_proj", "b.gate_proj", "b.up_proj", "c.up_proj"]) \
        == [["a.q_proj", "a.k_proj", "a.v_proj"], ["a.o_proj"], ["b.gate_proj", "b.up_proj"], ["c.up_proj"]]
    model = tiny_model(arch)
    quantize(model, OSCConfig.auto("mxfp4", 0.04, 0.143), batches(8, 64), progress=False)
    for block in model.model.layers:
        for parent, group in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            assert len({(getattr(parent, n).scheme.format, getattr(parent, n).k) for n in group}) == 1
    assert len(fuse_siblings(model)) == 2 * model.config.num_hidden_layers


def test_policy_config_validation():
    with pytest.raises(ValueError, match="unknown policy"):
        OSCConfig(policy="magic")
    with pytest.raises(ValueError, match="bf16_budget"):
        OSCConfig.auto(bf16_budget=1.5)
    cfg = OSCConfig.auto("nvfp4", 0.03, 0.1)
    assert OSCConfig.from_dict(cfg.to_dict()) == cfg


def test_analyze_cli_writes_a_readable_report(tmp_path, capsys):
    from test_cli import TEXT
    from tiny import tiny_tokenizer

    from oscquant import cli

    tok = tiny_tokenizer(TEXT)
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT)
    code = cli.main(["analyze", str(tmp_path / "m"), "--calib", str(tmp_path / "t.txt"), "--out",
                     str(tmp_path / "rep"), "--calib-samples", "4", "--seq-len", "32", "--outliers", "16"])
    assert code == 0, capsys.readouterr().err
    rep = tmp_path / "rep"
    data = json.loads((rep / "report.json").read_text())
    assert len(data["layers"]) == 14
    assert {l["kind"] for l in data["layers"]} == {"qkv", "o", "gate/up", "down"}
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert "summary.png" in pngs and len(pngs) == 1 + 14  # two decoder layers: first and last drawn
    page = (rep / "index.md").read_text()
    assert "![summary](summary.png)" in page and "| down |" in page
    for p in rep.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
