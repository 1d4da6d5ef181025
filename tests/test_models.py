import copy

import pytest
import torch
from torch import nn
from tiny import CONFIGS, batches, tiny_model

from oscquant import OSCConfig, OSCLinear, load_quantized, quantize, save_quantized
from oscquant.convert import ExpertLinears, unfuse_experts


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_convert_quantize_save_load(arch, tmp_path):
    model = tiny_model(arch)
    ids = batches(1, 20, seed=9)[0]
    with torch.no_grad():
        ref = model(ids).logits
    emb_before = model.get_input_embeddings().weight.clone()
    plan = quantize(model, OSCConfig.osc("mxfp4", 16), batches(), progress=False)

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    osc = {n: m for n, m in model.named_modules() if isinstance(m, OSCLinear)}
    assert linears == ["lm_head"], "every linear but lm_head must be converted"
    assert set(osc) == set(plan)
    assert all(m.scheme.format == "fp8" for n, m in osc.items() if n.endswith("down_proj"))
    assert all(m.scheme.format == "mxfp4" and m.k == 16 for n, m in osc.items() if not n.endswith("down_proj"))
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    # the planted channels of the embedding reach the first q/k/v projections and get separated
    first = next(m for n, m in osc.items() if n.endswith("q_proj"))
    assert {5, 17, 40} <= set(first.outlier_idx.tolist())

    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.35

    save_quantized(model, None, tmp_path / "ck")
    loaded, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        again = loaded(ids).logits
    assert torch.equal(again, out), "a loaded checkpoint must give bit-identical outputs"


def test_qwen3_moe_experts_each_get_their_own_layer():
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        ref = model(batches(1, seed=3)[0]).logits
    fused = copy.deepcopy(model)
    assert unfuse_experts(model) == 2
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertLinears) and len(experts) == 4
    with torch.no_grad():  # unfusing alone changes nothing
        assert torch.allclose(model(batches(1, seed=3)[0]).logits, ref, atol=1e-5)
    quantize(fused, OSCConfig.osc("mxfp4", 16), batches(), progress=False)
    names = [n for n, m in fused.named_modules() if isinstance(m, OSCLinear)]
    assert "model.layers.1.mlp.experts.3.gate_up_proj" in names
    assert "model.layers.1.mlp.experts.3.down_proj" in names
    assert not any(n.endswith("mlp.gate") for n in names), "the router stays in float"


def test_osc_beats_rtn_on_planted_outliers():
    model = tiny_model("llama")
    ids = batches(2, 32, seed=5)
    with torch.no_grad():
        ref = torch.cat([model(i).logits for i in ids])
    errs = {}
    for name, cfg in {"rtn": OSCConfig.rtn(), "osc": OSCConfig.osc("mxfp4", 16, fallback=None)}.items():
        m = copy.deepcopy(model)
        quantize(m, cfg, batches(), progress=False)
        with torch.no_grad():
            errs[name] = rel_err(torch.cat([m(i).logits for i in ids]), ref)
    assert errs["osc"] < errs["rtn"], errs


def test_unsupported_model_and_config_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        quantize(gpt2, OSCConfig.rtn(), progress=False)
    with pytest.raises(ValueError, match="needs calibration_batches"):
        quantize(tiny_model("llama"), OSCConfig.osc("mxfp4", 16), progress=False)
    with pytest.raises(ValueError, match="only 64 input channels"):
        quantize(tiny_model("llama"), OSCConfig.osc("mxfp4", 64), batches(), progress=False)
    with pytest.raises(ValueError, match="selects no linear layer"):
        quantize(tiny_model("llama"), OSCConfig(skip=[".*"]), batches(), progress=False)
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize(tiny_model("llama"), OSCConfig.osc("mxfp4", 16), [], progress=False)
