import json

import pytest
import torch
from tiny import batches, tiny_model

import oscquant.checkpoint as ckpt
from oscquant import OSCConfig, load_quantized, quantize, save_quantized
from oscquant.checkpoint import CheckpointError


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    quantize(model, OSCConfig.osc("mxfp4", 16), batches(), progress=False)
    return model, save_quantized(model, None, tmp_path / "ck", source={"kind": "test"})


def test_checkpoint_records_the_plan(saved):
    model, path = saved
    meta = json.loads((path / ckpt.CONFIG_NAME).read_text())
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["scheme"]["format"] == "mxfp4" and layer["k"] == 16
    assert layer["outlier_idx"] == model.model.layers[0].self_attn.q_proj.outlier_idx.tolist()
    assert meta["layers"]["model.layers.0.mlp.down_proj"]["scheme"]["format"] == "fp8"
    assert {"oscquant", "torch", "transformers"} <= set(meta["versions"])
    assert meta["source"] == {"kind": "test"}
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # tied embeddings
    loaded, _ = load_quantized(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.osc_config == model.osc_config


def test_failed_save_leaves_the_old_checkpoint_whole(saved, monkeypatch):
    model, path = saved
    before = (path / ckpt.WEIGHTS_NAME).read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, None, path)
    assert (path / ckpt.WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ck"], "no temporary directory may be left behind"
    load_quantized(path)


def test_corrupted_checkpoint_is_refused(saved):
    _, path = saved
    w = path / ckpt.WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_quantized(path)


def test_truncated_checkpoint_is_refused(saved):
    _, path = saved
    w = path / ckpt.WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_quantized(path)


def test_damaged_json_and_missing_files(saved):
    _, path = saved
    (path / ckpt.CONFIG_NAME).write_text('{"format_version": 1, "lay')
    with pytest.raises(CheckpointError, match="corrupted"):
        load_quantized(path)
    (path / ckpt.CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match="not an oscquant checkpoint"):
        load_quantized(path)


def test_mismatched_checkpoint_is_refused(saved):
    _, path = saved
    meta_path = path / ckpt.CONFIG_NAME
    meta = json.loads(meta_path.read_text())
    # the model config says a different width than the tensors have
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit its own model config"):
        load_quantized(path)
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    # the layer list names a layer the model lacks
    meta["layers"]["model.layers.7.mlp.up_proj"] = meta["layers"]["model.layers.0.mlp.up_proj"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not have"):
        load_quantized(path)
    del meta["layers"]["model.layers.7.mlp.up_proj"]
    # outlier lists in the json and the tensors disagree
    meta["layers"]["model.layers.0.mlp.up_proj"]["outlier_idx"][0] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="differ"):
        load_quantized(path)
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 99"):
        load_quantized(path)


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_model("llama"), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bf16_model_roundtrip(tmp_path):
    model = tiny_model("qwen3").to(torch.bfloat16)
    quantize(model, OSCConfig.osc("nvfp4", 16), batches(), progress=False)
    ids = batches(1, seed=4)[0]
    with torch.no_grad():
        out = model(ids).logits
    save_quantized(model, None, tmp_path / "ck")
    loaded, _ = load_quantized(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
