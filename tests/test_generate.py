"""oscquant.generate: greedy decoding from a static cache, with the decode step replayed from a CUDA graph on a GPU."""

import copy

import pytest
import torch

from oscquant.bench_model import build
from oscquant.config import OSCConfig
from oscquant.convert import quantize
from oscquant.gated import fuse_gated_mlps
from oscquant.head_norms import fuse_head_norms
from oscquant.generate import generate
from oscquant.norms import fuse_norms
from oscquant.siblings import fuse_siblings

CUDA = torch.cuda.is_available()
DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny(device="cpu", dtype=torch.float32, osc=False):
    model = build(2, 128, DIMS, device, dtype)
    if osc:
        g = torch.Generator().manual_seed(3)
        quantize(model, OSCConfig.osc("mxfp4", 16), [torch.randint(0, 128, (1, 32), generator=g).to(device)
                                                        for _ in range(2)], progress=False)
        fuse_siblings(model)
        # as the CLI runs models: the norms, the MLPs' activations and the q/k norms in the kernels (norms.py,
        # gated.py, head_norms.py)
        assert len(fuse_norms(model)) == 4 and len(fuse_gated_mlps(model)) == 2 and len(fuse_head_norms(model)) == 2
    return model


def hf_greedy(model, ids, n, eos=None):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("osc", [False, True])
def test_static_cache_steps_give_model_generates_tokens(osc):
    model = tiny(osc=osc)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = hf_greedy(model, ids, 20)
    out = generate(model, ids, 20, eos_token_id=None)
    assert out.shape == (1, 29) and torch.equal(out, ref)
    assert torch.equal(generate(model, ids, 1, eos_token_id=None), ref[:, :10])


def test_generation_stops_after_the_end_of_sequence_token():
    model = tiny(osc=True)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    free = hf_greedy(model, ids, 20)
    eos = int(free[0, 14])  # a token the model emits: generation must end there, as model.generate does
    out = generate(model, ids, 20, eos_token_id=[eos], check_every=4)
    assert torch.equal(out, hf_greedy(model, ids, 20, eos)) and int(out[0, -1]) == eos
    assert out.shape[1] <= 15


def test_bad_generate_calls_raise():
    model = tiny()
    with pytest.raises(ValueError, match="one prompt"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 4, graph=True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_give_the_eager_steps_tokens(dtype):
    """On the GPU, through the OSC kernels with stacked siblings: the replayed graph gives exactly the tokens of the
    same steps run eagerly, and (in float32, where attention kernels agree closely) model.generate's."""
    model = tiny("cuda", dtype, osc=True)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0)).cuda()
    graphed = generate(model, ids, 24, eos_token_id=None)
    eager = generate(model, ids, 24, eos_token_id=None, graph=False)
    assert torch.equal(graphed, eager)
    if dtype == torch.float32:
        assert torch.equal(graphed, hf_greedy(model, ids, 24))
        # torch.compile fuses the norms and rotary around the custom op: in float32 the same tokens again
        assert torch.equal(generate(model, ids, 24, eos_token_id=None, compile=True), graphed)
    bf16 = copy.deepcopy(tiny("cuda", dtype))
    assert torch.equal(generate(bf16, ids, 24, eos_token_id=None), generate(bf16, ids, 24, eos_token_id=None,
                                                                             graph=False))


def test_compiled_decode_step_gives_model_generates_tokens():
    """The decode step through torch.compile (on the CPU the OSC reference path, with graph breaks at its input
    checks) still gives model.generate's tokens, up to a near tie: compiled code rounds differently, so where the
    two best logits of model.generate's step lie within 2e-3 of each other it may take the runner-up, and from
    there on the sequences part."""
    model = tiny(osc=True)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    got = generate(model, ids, 12, eos_token_id=None, compile=True)
    want = hf_greedy(model, ids, 12)
    assert got.shape == want.shape and torch.equal(got[:, :9], ids)
    differ = (got != want)[0].nonzero()
    if differ.numel():
        t = differ[0].item()
        with torch.no_grad():
            top = model(want[:, :t]).logits[0, -1].topk(2)
        assert top.values[0] - top.values[1] < 2e-3, f"token {t} differs where the logits are {top}"
        assert got[0, t] == top.indices[1]


def test_sliding_window_caches_are_not_graphed():
    """Gemma 3's sliding-window layers track their fill on the host, so a captured decode step would replay one state:
    generate says so and runs those steps eagerly (the same tokens as model.generate past the window)."""
    from tiny import tiny_model
    from transformers import StaticCache

    from oscquant.generate import _why_no_graph

    gemma, llama = tiny_model("gemma3_text"), tiny_model("llama")
    assert "StaticSlidingWindowLayer" in _why_no_graph(StaticCache(config=gemma.config, max_cache_len=40))
    assert _why_no_graph(StaticCache(config=llama.config, max_cache_len=40)) is None
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(gemma, ids, 24, eos_token_id=None), hf_greedy(gemma, ids, 24))  # 36 > window 16
