import pytest
import torch
from torch import nn

from oscquant.calibration import ChannelStats, collect_stats
from oscquant.config import LayerScheme, OSCConfig
from oscquant.outliers import outlier_scores, select_outlier_channels


class TwoLayer(nn.Module):
    """A stand-in for a causal LM: embedding -> linear -> linear."""

    def __init__(self, vocab=50, d=64, planted=(5, 40), scale=30.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.emb.weight[:, list(planted)] *= scale
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, input_ids, use_cache=False):
        return self.fc2(self.fc1(self.emb(input_ids)))


def planted_activations(tokens=512, channels=256, planted=(7, 50, 51, 130, 200), persistent=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    if persistent:
        x[:, list(planted)] *= 40
    else:  # outliers on a different random channel for every token
        hot = torch.randint(0, channels, (tokens,), generator=g)
        x[torch.arange(tokens), hot] *= 40
    return x


def stats_of(x: torch.Tensor, topk=16) -> ChannelStats:
    s = ChannelStats.empty(x.shape[1], topk)
    s.update(x, "layer")
    return s


def test_stats_match_direct_computation():
    model = TwoLayer()
    batches = [torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stats = collect_stats(model, batches, progress=False)
    assert set(stats) == {"fc1", "fc2"}
    x = torch.cat([model.emb(b).reshape(-1, 64) for b in batches]).detach()
    s = stats["fc1"]
    assert s.tokens == 54
    assert torch.allclose(s.absmax, x.abs().amax(0))
    assert torch.allclose(s.mean_abs, x.abs().mean(0), atol=1e-5)
    assert torch.allclose(s.sqsum.float(), (x ** 2).sum(0), rtol=1e-4)
    top = x.abs().topk(16, dim=1).indices
    assert torch.equal(s.hits, torch.bincount(top.flatten(), minlength=64))
    # the planted channels are in nearly every token's top-16, a typical channel in a quarter
    assert s.persistence[5] > 0.9 and s.persistence[40] > 0.9
    assert s.persistence.median() < 0.5


def test_calibration_hooks_are_removed():
    model = TwoLayer()
    collect_stats(model, [torch.randint(0, 50, (1, 4))], progress=False)
    assert not model.fc1._forward_pre_hooks and not model.fc2._forward_pre_hooks


def test_a_pass_stops_after_the_last_block_it_needs_and_records_the_same():
    from tiny import batches, tiny_model

    from oscquant.calibration import last_block

    model = tiny_model("llama")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert last_block(model, names) is model.model.layers[0]
    assert last_block(model, names + ["model.layers.1.mlp.up_proj"]) is model.model.layers[1]
    assert last_block(model, names + ["lm_head"]) is None  # outside the blocks: the whole forward
    ran = []
    hooks = [m.register_forward_hook(lambda *a, n=n: ran.append(n))
             for n, m in (("block 1", model.model.layers[1]), ("lm_head", model.lm_head))]
    early = collect_stats(model, batches(), names, progress=False)
    assert ran == [] and not model.model.layers[0]._forward_hooks  # stopped after block 0; its hook removed
    whole = collect_stats(model, batches(), names + ["lm_head"], progress=False)
    assert ran.count("lm_head") == len(batches())
    for n in names:
        for field in ("absmax", "abssum", "sqsum", "hits"):
            assert torch.equal(getattr(early[n], field), getattr(whole[n], field)), (n, field)
    for h in hooks:
        h.remove()


def test_empty_calibration_set_raises():
    with pytest.raises(ValueError, match="calibration set is empty"):
        collect_stats(TwoLayer(), [], progress=False)
    with pytest.raises(ValueError, match="calibration set is empty"):
        collect_stats(TwoLayer(), [torch.zeros(1, 0, dtype=torch.long)], progress=False)


def test_nan_in_calibration_activations_raises_with_layer_name():
    model = TwoLayer()
    with torch.no_grad():
        model.emb.weight[3, 0] = float("inf")
    with pytest.raises(ValueError, match="entering fc1 contain NaN or Inf"):
        collect_stats(model, [torch.tensor([[1, 3, 4]])], progress=False)


@pytest.mark.parametrize("group", [None, 16, 32])
def test_planted_outlier_channels_are_found(group):
    planted = (7, 50, 51, 130, 200)
    x = planted_activations(planted=planted)
    idx = select_outlier_channels(stats_of(x), 16, group)
    assert idx.numel() == 16 and torch.equal(idx, idx.sort().values)
    assert set(planted) <= set(idx.tolist())


def test_groupwise_score_ignores_uniformly_large_groups():
    planted = list(range(96, 112)) + list(range(130, 146))  # each one in a block of otherwise small channels
    planted = planted[::2]
    x = planted_activations(planted=planted)
    x[:, 32:64] *= 60  # a whole MX block is large: its shared scale absorbs it
    assert select_outlier_channels(stats_of(x), 16, 32).tolist() == sorted(planted)
    # a per-row (int4) grouping sees that block as large relative to the row instead
    assert set(select_outlier_channels(stats_of(x), 16, None).tolist()) <= set(range(32, 64))


def test_outlier_scores_are_relative_to_group_median():
    m = torch.tensor([1.0, 1.0, 1.0, 8.0, 10.0, 10.0, 10.0, 10.0])
    s = outlier_scores(m, 4)
    assert torch.allclose(s, torch.tensor([1, 1, 1, 8, 1, 1, 1, 1.0]))


def test_k_rules():
    assert LayerScheme("mxfp4", outlier_ratio=0.06).outliers_for(576) == 32
    assert LayerScheme("mxfp4", outlier_ratio=0.06).outliers_for(1536) == 80
    with pytest.raises(ValueError, match="multiple of 16"):
        LayerScheme("mxfp4", 20)
    with pytest.raises(ValueError, match="only 64 input channels"):
        LayerScheme("mxfp4", 64).outliers_for(64)
    with pytest.raises(ValueError, match="cannot pick"):
        select_outlier_channels(stats_of(torch.randn(4, 32)), 48, 32)
    with pytest.raises(ValueError, match="unknown number format"):
        LayerScheme("mxfp3")


def test_config_rules_first_match_wins_and_skip():
    cfg = OSCConfig.osc("mxfp4", 32)
    assert cfg.scheme_for("model.layers.0.mlp.down_proj").format == "fp8"
    assert cfg.scheme_for("model.layers.0.mlp.up_proj") == LayerScheme("mxfp4", 32)
    assert cfg.scheme_for("lm_head") is None
    assert OSCConfig.rtn().scheme_for("x.down_proj") == LayerScheme("mxfp4", 0)
    assert OSCConfig.w8a8().scheme_for("x.q_proj").format == "fp8"
    cfg2 = OSCConfig(rules=[(r"q_proj", LayerScheme("none")), (r"proj", LayerScheme("int4", 16, group_size=32))])
    assert cfg2.scheme_for("a.q_proj") is None and cfg2.scheme_for("a.k_proj").format == "int4"
    assert OSCConfig.from_dict(cfg2.to_dict()) == cfg2


def test_quantize_weighs_the_weights_scale_search_by_each_channels_mean_square():
    """convert.quantize hands each layer its calibration mean squares (sqsum / tokens) as the scale search's
    importance, with or without outlier channels (RTN given calibration text); without calibration the search
    weighs every column alike."""
    import copy

    from oscquant import formats, quantize
    from tiny import batches, tiny_model

    model = tiny_model("llama")
    stats = collect_stats(model, batches(), progress=False)
    osc, rtn, blind = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    quantize(osc, OSCConfig.osc("mxfp4", 16, fallback=None), batches(), stats=stats, progress=False)
    quantize(rtn, OSCConfig.rtn("mxfp4"), batches(), progress=False)
    quantize(blind, OSCConfig.rtn("mxfp4"), progress=False)
    name = "model.layers.0.mlp.gate_proj"
    s, layer, w = stats[name], osc.get_submodule(name), model.get_submodule(name).weight.detach().float()
    assert torch.allclose(s.mean_square, (s.sqsum / s.tokens).float())
    want = formats.quantize(layer.zero_outliers(w), "mxfp4", search=True, importance=s.mean_square)
    assert torch.equal(layer.qweight, want.codes) and torch.equal(layer.wscale, want.scales)
    assert not torch.equal(layer.qweight, formats.quantize(layer.zero_outliers(w), "mxfp4", search=True).codes)
    weighted = formats.quantize(w, "mxfp4", search=True, importance=s.mean_square)
    plain = formats.quantize(w, "mxfp4", search=True)
    assert torch.equal(rtn.get_submodule(name).qweight, weighted.codes)
    assert torch.equal(blind.get_submodule(name).qweight, plain.codes) and not torch.equal(plain.codes, weighted.codes)
