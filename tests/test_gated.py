"""A gated MLP's act(gate) * up run inside down_proj (gated.py), on the PyTorch path: what is fused, what is not,
and that the model computes the same logits."""

import pytest
import torch
from torch import nn
from tiny import batches, quantized

from oscquant import fuse_gated_mlps, fuse_norms, save_quantized
from oscquant.gated import GatedMLP, activation_kind


@pytest.mark.parametrize("arch,kind", [("llama", 1), ("qwen3", 1), ("gemma3_text", 2)])
@pytest.mark.parametrize("norms_first", [True, False])
def test_fused_mlps_give_the_same_logits(arch, kind, norms_first):
    model = quantized(arch)
    ids = batches(1, 12, seed=5)[0]
    with torch.no_grad():
        before = model(ids).logits
    if norms_first:
        fuse_norms(model)
    assert fuse_gated_mlps(model) == [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)]
    if not norms_first:  # the norm before the MLP is then read by the stacked gate/up layer alone, and fuses as well
        assert len(fuse_norms(model)) == 2 * model.config.num_hidden_layers
    block = model.model.layers[0]
    assert isinstance(block.mlp, GatedMLP) and block.mlp.mlp.down_proj.input_gate.kind == kind
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert fuse_gated_mlps(model) == [], "fusing twice finds nothing left to fuse"


def test_mlps_need_their_gate_and_up_stacked_and_moe_experts_are_not_mlps():
    assert fuse_gated_mlps(quantized("llama", siblings=False)) == []
    assert fuse_gated_mlps(quantized("qwen3_moe")) == []


def test_activation_kind_knows_silu_and_gelu_tanh_only():
    from transformers.activations import ACT2FN

    assert activation_kind(ACT2FN["silu"]) == 1 and activation_kind(nn.SiLU()) == 1
    assert activation_kind(ACT2FN["gelu_pytorch_tanh"]) == 2
    assert activation_kind(nn.GELU()) is None and activation_kind(nn.ReLU()) is None


def test_an_mlp_of_another_form_is_left_alone():
    """An MLP whose modules look gated but whose forward multiplies the other way round: the check on the reference
    path sees its logits change, and every fusion is undone."""
    model = quantized("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.up_proj(x)) * mlp.gate_proj(x))
    ids = batches(1, 12, seed=5)[0]
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="left unfused"):
        assert fuse_gated_mlps(model) == []
    assert not any(isinstance(m, GatedMLP) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_a_model_with_fused_mlps_is_not_saved(tmp_path):
    """(Fused MLPs need stacked siblings, which save_quantized refuses already.)"""
    model = quantized("qwen3")
    fuse_gated_mlps(model)
    with pytest.raises(ValueError, match="save it before fuse_siblings"):
        save_quantized(model, None, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
