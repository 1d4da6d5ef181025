"""Sibling projections (q/k/v, gate/up) run as one stacked OSC layer: the same outputs, fewer launches."""

import copy

import pytest
import torch
from tiny import CONFIGS, batches, tiny_model

from oscquant import OSCConfig, OSCLinear, fuse_siblings, quantize, save_quantized
from oscquant.config import LayerScheme
from oscquant.siblings import Sibling, Stacked, stack, why_not_stackable


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_fused_siblings_give_the_same_logits(arch):
    model = tiny_model(arch)
    quantize(model, OSCConfig.osc("mxfp4", 16), batches(), progress=False)
    ids = batches(1, 20, seed=9)[0]
    with torch.no_grad():
        ref = model(ids).logits
    fused = copy.deepcopy(model)
    groups = fuse_siblings(fused)
    layers = model.config.num_hidden_layers
    # q/k/v in every block; gate/up in every dense MLP (the MoE experts' gate_up_proj is one layer already)
    assert sum(g.endswith("q_proj+k_proj+v_proj") for g in groups) == layers
    assert sum(g.endswith("gate_proj+up_proj") for g in groups) == (0 if arch == "qwen3_moe" else layers)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Sibling) and isinstance(attn.q_k_v_stacked, Stacked)
    assert attn.q_k_v_stacked.layer.out_features == sum(getattr(model.model.layers[0].self_attn, n).out_features
                                                         for n in ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():
        out = fused(ids).logits
        again = fused(ids[:, :7]).logits  # a new input runs the stacked layers again
        want = model(ids[:, :7]).logits
    assert rel_err(out, ref) < 1e-5 and rel_err(again, want) < 1e-5
    assert attn.q_k_v_stacked._y is None, "nothing is held between forwards"
    assert fuse_siblings(fused) == [], "fusing twice finds nothing left to fuse"


IDX, OTHER = list(range(0, 64, 4)), list(range(0, 60, 4)) + [61]  # 16 outlier channels, one of them moved


def _layer(n, idx, fmt="mxfp4", bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, 64, generator=g))
    return OSCLinear.from_linear(lin, LayerScheme(fmt, len(idx)), torch.tensor(idx))


@pytest.mark.parametrize("fmt", ["mxfp4", "int4", "fp8", "nvfp4"])
def test_a_stacked_layer_is_its_layers_side_by_side(fmt):
    layers = [_layer(n, IDX, fmt, bias=True, seed=s) for s, n in enumerate((48, 16, 16))]
    if fmt == "nvfp4":  # each layer has its own per-tensor scale: not stackable, and said so
        assert "per-tensor" in why_not_stackable(layers)
        return
    x = torch.randn(5, 64)
    x[:, 4] *= 30
    y = stack(layers)(x)
    assert torch.allclose(y, torch.cat([m(x) for m in layers], dim=-1), rtol=1e-5, atol=1e-5)


def test_siblings_that_differ_stay_apart_and_an_input_changed_in_place_is_run_again():
    assert "outlier channels" in why_not_stackable([_layer(16, IDX), _layer(16, OTHER)])
    assert "schemes" in why_not_stackable([_layer(16, IDX), _layer(16, IDX, "int4")])
    assert "bias" in why_not_stackable([_layer(16, IDX, bias=True), _layer(16, IDX)])
    with pytest.raises(ValueError, match="cannot run as one: different outlier channels"):
        stack([_layer(16, IDX), _layer(16, OTHER)])
    parent = torch.nn.Module()
    parent.gate_proj, parent.up_proj = _layer(32, IDX, seed=1), _layer(32, IDX, seed=2)
    gate, up = copy.deepcopy(parent.gate_proj), copy.deepcopy(parent.up_proj)
    assert fuse_siblings(parent) == [": gate_proj+up_proj"]
    x = torch.randn(4, 64)
    assert torch.allclose(parent.gate_proj(x), gate(x), atol=1e-5)
    x.mul_(2)  # the same tensor, changed: up_proj must not take columns of the output for the old values
    assert torch.allclose(parent.up_proj(x), up(x), atol=1e-5)
    assert not torch.allclose(parent.up_proj(x / 2), up(x), atol=1e-3)


def test_a_fused_model_is_not_saved(tmp_path):
    model = tiny_model("qwen3")
    quantize(model, OSCConfig.osc("mxfp4", 16), batches(), progress=False)
    fuse_siblings(model)
    with pytest.raises(ValueError, match="save it before fuse_siblings"):
        save_quantized(model, None, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 8, 300])  # the fragment / transposed / prefill kernels on the stacked widths
def test_fused_siblings_through_the_kernels(m, monkeypatch):
    """On the GPU the stacked layers run the Triton kernels at their own widths: one split-quantize a group."""
    from oscquant.kernels import ops

    model = tiny_model("qwen3").to("cuda", torch.bfloat16)
    quantize(model, OSCConfig.osc("mxfp4", 16), [b.cuda() for b in batches()], progress=False)
    ids = batches(1, m, seed=5)[0].cuda()
    fused = copy.deepcopy(model)
    fuse_siblings(fused)
    calls = []
    split = ops.split_quantize
    monkeypatch.setattr(ops, "split_quantize", lambda *a, **k: calls.append(1) or split(*a, **k))
    with torch.no_grad():
        apart = model(ids).logits.float()
        n_apart = len(calls)
        together = fused(ids).logits.float()
    # per block: q, k, v, o, gate, up, down one by one; q+k+v, o, gate+up, down stacked
    assert (n_apart, len(calls) - n_apart) == (7 * 2, 4 * 2)
    assert torch.isfinite(together).all() and rel_err(together, apart) <= 2e-2


def test_model_bench_runs_the_three_models_and_compares_their_logits(monkeypatch):
    """`oscquant bench model`'s harness, on a tiny Qwen3 on the CPU: BF16 (here float32), OSC with siblings apart and
    stacked, with its norms fused, and with everything fused; stacking and fusing change no logit, quantizing changes
    some."""
    from oscquant.bench_model import bench_model, markdown

    dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    rows, errs = bench_model(layers=2, prefill=16, reps=2, device="cpu", dims=dims, vocab=128, outliers=16)
    assert [r.variant for r in rows] == ["float", "OSC, siblings apart", "OSC, siblings stacked",
                                         "OSC, stacked, norms fused", "OSC, stacked, all fused (+ MLP activations, q/k norms)"]
    assert all(r.prefill_ms > 0 and r.decode_ms > 0 for r in rows)
    apart = errs["OSC, siblings apart vs float"]
    assert 1e-4 < apart < 0.5 and abs(errs["OSC, siblings stacked vs float"] - apart) < 1e-5, errs
    assert errs["OSC, siblings stacked vs OSC, siblings apart"] < 1e-5, errs
    assert errs["OSC, stacked, norms fused vs OSC, siblings stacked"] == 0, errs
    assert errs["OSC, stacked, all fused (+ MLP activations, q/k norms) vs OSC, stacked, norms fused"] == 0, errs
    md = markdown(rows, 16)
    assert md.count("\n| OSC") == 4 and "prefill of 16 tokens, ms a layer" in md
    # another 4-bit format: INT4 with a scale per 32 columns, its layers so quantized
    from oscquant import convert

    schemes = []
    quantize = convert.quantize
    monkeypatch.setattr(convert, "quantize",
                        lambda model, cfg, *a, **k: schemes.append(cfg.default) or quantize(model, cfg, *a, **k))
    rows, errs = bench_model(layers=1, prefill=8, reps=1, device="cpu", dims=dims, vocab=128, outliers=16,
                             fmt="int4", group_size=32)
    assert [(s.format, s.group_size) for s in schemes] == [("int4", 32)]
    assert len(rows) == 5 and 1e-4 < errs["OSC, siblings apart vs float"] < 0.5, errs


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_model_bench_needs_a_gpu(capsys):
    from oscquant.cli import main

    assert main(["bench", "model", "--layers", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
