"""RMSNorms run inside the OSC layers after them (norms.py), on the PyTorch path: what is fused, what is not, and that
the model computes the same logits."""

import copy
import warnings

import pytest
import torch
from torch import nn
from tiny import batches, quantized, tiny_model

from oscquant import OSCConfig, OSCLinear, fuse_norms, save_quantized
from oscquant.norms import NormInLayers, norm_formula, rms_norm


@pytest.mark.parametrize("arch,mlp_norm", [("llama", "post_attention_layernorm"), ("qwen3", "post_attention_layernorm"),
                                           ("gemma3_text", "pre_feedforward_layernorm"), ("qwen3_moe", None)])
@pytest.mark.parametrize("siblings", [True, False])
def test_fused_norms_give_the_same_logits(arch, mlp_norm, siblings):
    model = quantized(arch, siblings)
    ids = batches(1, 12, seed=5)[0]
    with torch.no_grad():
        before = model(ids).logits
    fused = fuse_norms(model)
    layer = "model.layers.0"
    mlp = [] if mlp_norm is None else [f"{layer}.{mlp_norm} -> {layer}.mlp.gate_proj, {layer}.mlp.up_proj"]
    assert fused[:len(mlp) + 1] == [f"{layer}.input_layernorm -> {layer}.self_attn.q_proj, {layer}.self_attn.k_proj, "
                                    f"{layer}.self_attn.v_proj"] + mlp
    # Qwen3-MoE: the router (a plain nn.Linear) reads the MLP's norm too, so that one stays a module
    assert len(fused) == (2 if mlp_norm else 1) * model.config.num_hidden_layers
    attn = model.model.layers[0].self_attn
    q = attn.q_k_v_stacked.layer if siblings else attn.q_proj
    assert isinstance(model.model.layers[0].input_layernorm, NormInLayers)
    assert q.input_norm is model.model.layers[0].input_layernorm
    assert q.input_norm.kind == (2 if arch == "gemma3_text" else 1) and q.input_norm.add_one == (arch == "gemma3_text")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert fuse_norms(model) == [], "fusing twice finds nothing left to fuse"


def test_norm_formula_knows_llama_and_gemma_and_nothing_else():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama, gemma = LlamaRMSNorm(64, eps=1e-5), Gemma3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        llama.weight.uniform_(0.5, 1.5)
        gemma.weight.uniform_(-0.5, 0.5)
    assert norm_formula(llama.to(torch.bfloat16)) == (1, False, 1e-5)
    assert norm_formula(gemma.to(torch.bfloat16)) == (2, True, 1e-6)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, gemma.weight.float() + 1, 1e-6, 2), gemma(x))
    assert norm_formula(nn.LayerNorm(64)) is None  # subtracts the mean
    assert norm_formula(nn.Linear(64, 64)) is None


class Parallel(nn.Module):
    """A block whose norm output feeds two OSC layers and, outside any module, the residual stream as well."""

    def __init__(self, leak: bool, b_reads_x: bool = False):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.config = type("C", (), {"vocab_size": 32})()
        self.embed, self.norm, self.leak, self.b_reads_x = nn.Embedding(32, 64), LlamaRMSNorm(64), leak, b_reads_x
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, ids, use_cache=False):
        x = self.embed(ids)
        h = self.norm(x)
        extra = self.b(x) if self.b_reads_x else 0
        return self.a(h) + self.b(h) + (h if self.leak else x) + extra


def test_a_norm_whose_reader_reads_other_inputs_too_is_left_alone():
    torch.manual_seed(0)
    model = Parallel(leak=False, b_reads_x=True)
    for name in ("a", "b"):
        setattr(model, name, OSCLinear.from_linear(getattr(model, name), OSCConfig.osc("mxfp4", 16).default,
                                                   torch.arange(16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seen from the hooks, before any fusing to undo
        assert fuse_norms(model) == []
    assert model.b.input_norm is None and not isinstance(model.norm, NormInLayers)


@pytest.mark.parametrize("leak", [False, True])
def test_a_norm_read_outside_any_module_is_left_alone(leak):
    torch.manual_seed(0)
    model = Parallel(leak)
    for name in ("a", "b"):
        setattr(model, name, OSCLinear.from_linear(getattr(model, name), OSCConfig.osc("mxfp4", 16).default,
                                                   torch.arange(16)))
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        before = model(ids)
    if leak:
        with pytest.warns(UserWarning, match="left unfused"):
            assert fuse_norms(model) == []
        assert not isinstance(model.norm, NormInLayers) and model.a.input_norm is None
    else:
        assert fuse_norms(model) == ["norm -> a, b"]
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_a_model_with_fused_norms_is_not_saved(tmp_path):
    model = quantized("llama", siblings=False)
    fuse_norms(model)
    with pytest.raises(ValueError, match="save it before fuse_norms"):
        save_quantized(model, None, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_fused_norms_move_with_the_model():
    model = quantized("qwen3")
    fuse_norms(model)
    moved = copy.deepcopy(model).to(torch.bfloat16)
    stand_in = moved.model.layers[0].input_layernorm
    assert stand_in.norm.weight.dtype == torch.bfloat16
    assert moved.model.layers[0].self_attn.q_k_v_stacked.layer.input_norm is stand_in  # deepcopy keeps the link
    ids = batches(1, 8, seed=3)[0]
    with torch.no_grad():
        assert torch.isfinite(moved(ids).logits).all()


def test_a_model_that_does_not_run_on_the_probe_keeps_its_norms():
    model = quantized("llama", siblings=False)
    with pytest.warns(UserWarning, match="left unfused"):
        assert fuse_norms(model, probe=torch.zeros(1, 4)) == []  # float ids: the embedding refuses them
    assert not any(isinstance(m, NormInLayers) for m in model.modules())
    assert fuse_norms(tiny_model("llama")) == []  # nothing quantized: no OSC layer to run a norm
