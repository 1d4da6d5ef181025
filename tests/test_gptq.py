"""GPTQ (oscquant/gptq.py): against rounding to nearest on the layer's output error, the format's own layout, the
Hessians' pass, the model conversion, and bad inputs."""

import copy

import pytest
import torch

from oscquant import formats as F
from oscquant import gptq
from oscquant.config import OSCConfig

CASES = [("mxfp4", None), ("nvfp4", None), ("int4", None), ("int4", 32), ("int4", 256)]


def correlated(tokens=2048, k=256, seed=0):
    """Activations whose channels are correlated and unequal in size, as a layer's inputs are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    return torch.randn(tokens, k, generator=g) @ mix * (torch.rand(k, generator=g) * 3)


def output_error(w, q, x):
    return ((w - F.dequantize(q)) @ x.T).norm().item()


@pytest.mark.parametrize("fmt,group", CASES)
def test_gptq_lowers_the_layers_output_error_and_keeps_the_formats_layout(fmt, group):
    x = correlated()
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    h = x.T @ x
    nearest = F.quantize(w, fmt, group, search=True, importance=torch.diag(h))
    q = gptq.quantize_weight(w, h, fmt, group)
    assert output_error(w, q, x) < 0.85 * output_error(w, nearest, x)
    assert q.fmt == fmt and q.group_size == nearest.group_size and q.shape == nearest.shape
    assert q.codes.shape == nearest.codes.shape and q.codes.dtype == torch.uint8
    assert q.scales.shape == nearest.scales.shape and q.scales.dtype == nearest.scales.dtype
    if fmt == "nvfp4":  # the per-tensor scale stays the max rule's
        assert torch.equal(q.global_scale, F.quantize_nvfp4(w).global_scale)
    if fmt == "int4":
        assert (F.element_values(q).abs() <= 8).all()


def test_gptq_without_search_on_uncorrelated_inputs_is_rounding_to_nearest():
    """With H = identity no column's error can be pushed anywhere useful: GPTQ is round to nearest, code for code."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    q = gptq.quantize_weight(w, torch.eye(128), "mxfp4", search=False, damp=0.0)
    assert torch.equal(q.codes, F.quantize(w, "mxfp4").codes) and torch.equal(q.scales, F.quantize(w, "mxfp4").scales)


def test_channels_that_never_fired_get_zero_weights():
    x = correlated(k=128)
    x[:, [3, 90]] = 0
    q = gptq.quantize_weight(torch.randn(16, 128), x.T @ x, "mxfp4")
    assert (F.dequantize(q)[:, [3, 90]] == 0).all() and (F.dequantize(q) != 0).any()


def test_bad_inputs_raise():
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match="not fp8"):
        gptq.quantize_weight(w, h, "fp8")
    with pytest.raises(ValueError, match=r"must be \[64, 64\]"):
        gptq.quantize_weight(w, torch.eye(32), "mxfp4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq.quantize_weight(w, h * float("nan"), "mxfp4")
    with pytest.raises(ValueError, match="no calibration token"):
        gptq.quantize_weight(w, torch.zeros(64, 64), "mxfp4")
    with pytest.raises(ValueError, match="multiple of 32"):
        gptq.quantize_weight(torch.randn(8, 48), torch.eye(48), "mxfp4")
    with pytest.raises(ValueError, match="gptq_memory_gb"):
        OSCConfig(gptq=True, gptq_memory_gb=0)


def _hessians(*args, **kwargs):
    """gptq.layer_hessians' passes as one dict, name -> H."""
    return {n: h for measured in gptq.layer_hessians(*args, **kwargs) for n, h in measured}


@pytest.mark.parametrize("fmt,group", CASES)
def test_weights_rounded_together_come_out_as_each_alone(fmt, group):
    """Two siblings handed one Hessian round as one unit, stacked beside a third weight with its own: every weight's
    codes and scales are those it gets rounded alone (bit for bit on the CPU)."""
    g = torch.Generator().manual_seed(3)
    x1, x2 = correlated(k=256, seed=4), correlated(k=256, seed=5)
    x1[:, 7] = 0  # a channel that never fired: its column is zeroed first (and NVFP4's tensor scale taken after)
    h1, h2 = x1.T @ x1, x2.T @ x2
    a, b, c = (torch.randn(r, 256, generator=g) for r in (16, 8, 24))
    a[:, 7] = 50.0
    together = gptq.quantize_weights([a, c, b], [h1, h2, h1], fmt, group)
    for q, w, h in zip(together, (a, c, b), (h1, h2, h1)):
        alone = gptq.quantize_weight(w, h, fmt, group)
        assert q.shape == alone.shape and torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
        if fmt == "nvfp4":
            assert torch.equal(q.global_scale, alone.global_scale)
    with pytest.raises(ValueError, match="rows"):  # units of unequal rows cannot stack
        gptq.quantize_weights([a, c], [h1, h2], fmt, group)
    with pytest.raises(ValueError, match="one Hessian per weight"):
        gptq.quantize_weights([a, c], [h1], fmt, group)
    with pytest.raises(ValueError, match="one column count"):
        gptq.quantize_weights([a, c[:, :128]], [h1, h2[:128, :128]], fmt, group)


def test_quantize_layers_batches_by_shape_and_memory(monkeypatch):
    """Two decoder blocks' q/k/v (siblings sharing their block's H) and o: one column loop for both q/k/v units,
    one for both o's; with too little memory for two, one each. Every weight as quantize_weight rounds it."""
    g = torch.Generator().manual_seed(6)
    jobs = {}
    for blk in range(2):
        x = correlated(k=128, seed=10 + blk)
        h = x.T @ x
        for name, rows in (("q", 32), ("k", 16), ("v", 16)):
            jobs[f"{blk}.{name}"] = (torch.randn(rows, 128, generator=g), h, "mxfp4", None, True)
        xo = correlated(k=128, seed=20 + blk)
        jobs[f"{blk}.o"] = (torch.randn(32, 128, generator=g), xo.T @ xo, "mxfp4", None, True)
    calls = []
    real = gptq.quantize_weights
    monkeypatch.setattr(gptq, "quantize_weights", lambda ws, *a, **kw: calls.append(len(ws)) or real(ws, *a, **kw))
    out = gptq.quantize_layers(jobs, progress=False)
    assert sorted(calls) == [2, 6]  # both o's; both blocks' q, k and v
    for name, (w, h, fmt, group, search) in jobs.items():
        assert torch.equal(out[name].codes, gptq.quantize_weight(w, h, fmt, group, search).codes), name
    calls.clear()
    gptq.quantize_layers(jobs, memory_gb=1e-9, progress=False)
    assert sorted(calls) == [1, 1, 3, 3]


def _rounded_as_alone(rounded, model, hessians):
    """Each layer named in ``hessians`` of the converted ``rounded`` holds the codes and scales GPTQ gives the float
    ``model``'s layer alone, on its own Hessian."""
    from oscquant.linear import OSCLinear

    for name, h in hessians.items():
        got = rounded.get_submodule(name)
        alone = OSCLinear.from_linear(model.get_submodule(name), got.scheme, got.outlier_idx, None, h)
        assert torch.equal(got.qweight, alone.qweight) and torch.equal(got.wscale, alone.wscale), name


def _inputs(model, names):
    """Each named module's inputs over the calibration batches, as [tokens, K]."""
    from oscquant.calibration import run_batches
    from tiny import batches

    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    run_batches(model, batches(), "", False)
    for hk in hooks:
        hk.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


def test_hessians_zero_the_outlier_channels_and_do_not_depend_on_the_memory_budget():
    from tiny import batches, tiny_model

    model = tiny_model("llama")
    names = {"model.layers.0.self_attn.q_proj": torch.tensor([5, 17]), "model.layers.1.mlp.down_proj": torch.tensor([]),
             "model.layers.1.mlp.up_proj": torch.tensor([40])}
    names = {n: i.long() for n, i in names.items()}
    one = _hessians(model, batches(), names, memory_gb=1.0, progress=False)
    per_layer = _hessians(model, batches(), names, memory_gb=1e-9, progress=False)  # 3 passes
    want = _inputs(model, names)
    for n, idx in names.items():
        x = want[n].index_fill(1, idx, 0.0)
        assert torch.allclose(one[n], x.T @ x, rtol=1e-4, atol=1e-3) and torch.equal(one[n], per_layer[n])
        assert (one[n][idx] == 0).all()


@pytest.mark.parametrize("k_input_scaled", [False, True])
def test_siblings_share_one_pass_and_a_sibling_handed_another_input_gets_its_own(monkeypatch, k_input_scaled):
    from oscquant.calibration import run_batches
    from tiny import batches, tiny_model

    model = tiny_model("llama")
    att, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    names = {att + "q_proj": torch.tensor([5, 17]), att + "k_proj": torch.tensor([40]), att + "v_proj": torch.tensor([]),
             mlp + "gate_proj": torch.tensor([3]), mlp + "up_proj": torch.tensor([])}
    names = {n: i.long() for n, i in names.items()}
    if k_input_scaled:  # k_proj reads 2 x, another tensor than q_proj's and v_proj's: their sum cannot serve it
        model.get_submodule(att + "k_proj").register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    passes = []
    monkeypatch.setattr(gptq, "run_batches", lambda *a, **kw: passes.append(1) or run_batches(*a, **kw))

    hidden = model.config.hidden_size
    got = _hessians(model, batches(), names, memory_gb=hidden ** 2 * 4 / 2 ** 30, progress=False)
    assert len(passes) == (2 + 3 if k_input_scaled else 2)  # one pass a shared sum; q, k, v apart after the check
    x = _inputs(model, names)
    for n, idx in names.items():
        xn = x[n].index_fill(1, idx, 0.0)
        assert torch.allclose(got[n], xn.T @ xn, rtol=1e-4, atol=1e-3), n
    keep = torch.ones(hidden, dtype=torch.bool)
    keep[[5, 17, 40]] = False  # zeroed in q's or k's
    q, k = (got[att + p][keep][:, keep] for p in ("q_proj", "k_proj"))
    assert torch.allclose(k, (4 if k_input_scaled else 1) * q, rtol=1e-4, atol=1e-3)


def test_quantize_with_gptq_rounds_the_4bit_layers_by_it_and_leaves_fp8_alone(tmp_path):
    from oscquant import quantize
    from oscquant.checkpoint import load_quantized, save_quantized
    from oscquant.linear import OSCLinear
    from tiny import batches, tiny_model

    model = tiny_model("qwen3")
    plain, rounded = copy.deepcopy(model), copy.deepcopy(model)
    quantize(plain, OSCConfig.osc("mxfp4", 16), batches(), progress=False)
    quantize(rounded, OSCConfig.osc("mxfp4", 16, gptq=True), batches(), progress=False)
    h = _hessians(model, batches(), {n: m.outlier_idx for n, m in plain.named_modules()
                                                     if isinstance(m, OSCLinear) and m.scheme.format == "mxfp4"},
                                 progress=False)
    better = 0
    for name, hn in h.items():
        w = plain.get_submodule(name).zero_outliers(model.get_submodule(name).weight.detach())
        err = {}
        for label, m in (("plain", plain), ("gptq", rounded)):
            d = w - F.dequantize(m.get_submodule(name).weight_qtensor())[:, :w.shape[1]]
            err[label] = torch.einsum("ij,jk,ik->", d, hn, d).item()  # ||(W - Q) X||^2 over the calibration tokens
        better += err["gptq"] < err["plain"]
        assert torch.equal(plain.get_submodule(name).outlier_idx, rounded.get_submodule(name).outlier_idx)
    assert better == len(h) == 12  # q, k, v, o, gate, up in both layers
    _rounded_as_alone(rounded, model, h)  # rounded in batches
    for name, m in plain.named_modules():
        if isinstance(m, OSCLinear) and m.scheme.format == "fp8":
            assert torch.equal(m.qweight, rounded.get_submodule(name).qweight)
    ids = batches(1)[0]
    with torch.no_grad():
        ref = model(ids).logits
        assert ((rounded(ids).logits - ref).norm() < (plain(ids).logits - ref).norm())
    save_quantized(rounded, None, tmp_path / "q", source={"kind": "test"})
    assert load_quantized(tmp_path / "q")[0].osc_config.gptq is True


def test_gptq_needs_calibration_batches():
    from oscquant import quantize
    from tiny import tiny_model

    with pytest.raises(ValueError, match="GPTQ"):
        quantize(tiny_model("llama"), OSCConfig.rtn(gptq=True), progress=False)


def test_moe_experts_rounded_in_batches_come_out_as_each_alone():
    """A Qwen3-MoE model's experts (one shape, a Hessian each, from their routed tokens) share column loops with each
    other: every 4-bit layer's codes and scales are those GPTQ gives it alone on its own Hessian."""
    from oscquant import quantize
    from oscquant.convert import unfuse_experts
    from oscquant.linear import OSCLinear
    from tiny import batches, tiny_model

    model = tiny_model("qwen3_moe")
    rounded = copy.deepcopy(model)
    quantize(rounded, OSCConfig.osc("mxfp4", 16, gptq=True), batches(), progress=False)
    unfuse_experts(model)
    layers = {n: m for n, m in rounded.named_modules() if isinstance(m, OSCLinear) and m.scheme.format == "mxfp4"}
    h = _hessians(model, batches(), {n: m.outlier_idx for n, m in layers.items()}, progress=False)
    assert sum(".experts." in n for n in h) == 8 and all(hn is not None for hn in h.values())
    _rounded_as_alone(rounded, model, h)
