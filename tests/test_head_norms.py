"""q_norm and k_norm run on the stacked q/k/v output (head_norms.py), on the PyTorch path: what is fused, what is not,
and that the model computes the same logits."""

import pytest
import torch
from tiny import batches, quantized

from oscquant import fuse_gated_mlps, fuse_head_norms, fuse_norms, save_quantized
from oscquant.head_norms import NormRunBefore


@pytest.mark.parametrize("arch,kind", [("qwen3", 1), ("qwen3_moe", 1), ("gemma3_text", 2)])
def test_fused_head_norms_give_the_same_logits(arch, kind):
    model = quantized(arch)
    ids = batches(1, 12, seed=5)[0]
    with torch.no_grad():
        before = model(ids).logits
    fuse_norms(model)
    fuse_gated_mlps(model)
    layers = model.config.num_hidden_layers
    assert fuse_head_norms(model) == [f"model.layers.{i}.self_attn" for i in range(layers)]
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_norm, NormRunBefore) and isinstance(attn.k_norm, NormRunBefore)
    heads = attn.q_proj.stacked.layer.output_norm
    cfg = model.config
    assert (heads.kind, heads.q_heads, heads.k_heads, heads.head_dim) == (kind, cfg.num_attention_heads,
                                                                          cfg.num_key_value_heads, cfg.head_dim)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert fuse_head_norms(model) == [], "fusing twice finds nothing left to fuse"
    heads.kernel_norm(torch.device("cpu"))
    assert heads._kernel
    model.to(torch.bfloat16)  # the kernel's factors are built again from the moved weights
    assert heads._kernel == {}


def test_head_norms_need_q_and_k_stacked_and_models_without_them_are_left_alone():
    assert fuse_head_norms(quantized("qwen3", siblings=False)) == []
    assert fuse_head_norms(quantized("llama")) == []  # Llama has no q/k norms


def test_a_norm_read_elsewhere_is_left_alone():
    """An attention whose k_norm also reads another tensor (v_proj's output): the check on the reference path sees the
    logits change with k_norm passing its input on, and every fusion is undone."""
    model = quantized("qwen3")
    attn = model.model.layers[0].self_attn
    forward, d = attn.forward, model.config.head_dim

    def another_reader(hidden_states, *args, **kwargs):
        out = forward(hidden_states, *args, **kwargs)
        extra = attn.k_norm(attn.v_proj(hidden_states).unflatten(-1, (-1, d))).flatten(-2)
        return (out[0] + extra.mean(-1, keepdim=True), *out[1:])

    attn.forward = another_reader
    ids = batches(1, 12, seed=5)[0]
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(UserWarning, match="left unfused"):
        assert fuse_head_norms(model) == []
    assert not any(isinstance(m, NormRunBefore) for m in model.modules())
    assert all(m.output_norm is None for m in model.modules() if hasattr(m, "output_norm"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_a_model_with_fused_head_norms_is_not_saved(tmp_path):
    model = quantized("qwen3")
    assert fuse_head_norms(model)
    with pytest.raises(ValueError, match="save it before fuse_siblings"):
        save_quantized(model, None, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
