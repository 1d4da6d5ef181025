"""MoE experts through the grouped kernels (kernels/moe.py) against each expert's own reference layer.

Without CUDA the kernels run in Triton's CPU interpreter on tiny shapes (OSCQUANT_BACKEND=triton lets them take CPU
inputs); with CUDA on larger ones, plus a decode step captured in a CUDA graph.
"""

import copy
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and Triton not in interpreter mode (conftest.py sets it)", allow_module_level=True)
from oscquant.config import LayerScheme, OSCConfig  # noqa: E402
from oscquant.convert import ExpertLinears, quantize  # noqa: E402
from oscquant.kernels import moe, ops  # noqa: E402
from oscquant.linear import OSCLinear, reference_forward  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
K_IN, N = (2080, 1000) if CUDA else (160, 40)  # not powers of two
# "int4-g32": INT4 with a scale per 32 columns
FORMATS = [("mxfp4", 32), ("mxfp4", 0), ("nvfp4", 16), ("int4", 16), ("int4-g32", 16), ("fp8", 16), ("fp8", 0)]


def scheme(fmt, k):
    name, _, group = fmt.partition("-g")
    return LayerScheme(name, k, group_size=int(group) if group else None)


@pytest.fixture(autouse=True)
def kernels_on_cpu(monkeypatch):
    if not CUDA:  # the kernels take CPU inputs only when asked to (in the interpreter)
        monkeypatch.setenv("OSCQUANT_BACKEND", "triton")


def expert_layers(fmt, k, experts=3, k_in=K_IN, n=N):
    """E layers of one projection, each with its own weights and its own outlier channels."""
    layers = []
    for e in range(experts):
        g = torch.Generator().manual_seed(10 + e)
        lin = nn.Linear(k_in, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k_in, generator=g) * 0.02)
        idx = torch.randperm(k_in, generator=g)[:k]
        layers.append(OSCLinear.from_linear(lin, scheme(fmt, k), idx).to(DEV))
    return layers


def pairs_and_input(tokens, experts, per_token, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, K_IN, generator=g)
    x[:, :8] *= 40  # planted outliers (some of them in each expert's separated channels)
    choice = torch.stack([torch.randperm(experts, generator=g)[:per_token] for _ in range(tokens)])
    rows = torch.arange(tokens).repeat_interleave(per_token)
    return x.to(torch.bfloat16).to(DEV), rows.int().to(DEV), choice.reshape(-1).int().to(DEV)


def routed(tokens, experts, per_token, tile_m, seed=0):
    """x, a router's choice of per_token of E experts for each token, and moe.route's plan for it."""
    x, _, choice = pairs_and_input(tokens, experts, per_token, seed)
    return x, moe.route(choice.view(tokens, per_token), experts, tile_m)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt,k", FORMATS)
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("tile_m", [1, 4, 16, 64])
def test_grouped_linear_matches_each_experts_reference(fmt, k, split_k, tile_m):
    """Every (token, expert) pair of the grouped GEMM against its expert's float32 reference: one pair a program,
    and tiles of pairs sorted by expert (tile_m 4: some experts' pairs take two tiles; 16 and 64, the latter on
    128-row weight tiles: one tile each)."""
    layers = expert_layers(fmt, k)
    x, routing = routed(7, len(layers), 2, tile_m)
    stacked = moe.stack_experts(layers)
    p = routing.experts.numel()
    cfg = moe.grouped_config(p, N, stacked.weights.k_main, stacked.weights.fmt, tile_m, group=stacked.weights.group)
    assert cfg.bm == tile_m and cfg.fold == (fmt == "mxfp4" and tile_m > 1)
    cfg = ops.GemmConfig(**{**cfg.__dict__, "split_k": split_k})
    out = torch.full((p, N), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned
    y = moe.grouped_linear(x, routing.tokens, routing, stacked, cfg, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    for i in range(p):  # every pair against its own expert's float32 reference on the CPU
        e, t = int(routing.experts[i]), int(routing.tokens[i])
        ref = reference_forward(copy.deepcopy(layers[e]).cpu(), x[t][None].cpu().float())
        assert rel_err(y[i].cpu(), ref[0]) <= 1e-2, (i, e)
    if split_k > 1:  # the split-K workspace is left zeroed for the next layer
        ws, cnt = ops._SPLIT_WORKSPACE[y.device]
        assert not ws.any() and not cnt.any()


@pytest.mark.parametrize("fmt,k", FORMATS)
def test_long_prompt_path_expands_the_experts_and_matches_each_experts_reference(fmt, k, monkeypatch):
    """The long-prompt config: every expert's weights expanded to e4m3 (4-bit ones by the folded GEMM's byte tables),
    then the plain FP8 GEMM over the tile table, weight tiles varying fastest. 40 tokens, 2 of 3 experts each: an
    expert's pairs take several tiles of 16, and the table's unused slots must store nothing (y poisoned)."""
    layers = expert_layers(fmt, k)
    x, routing = routed(40, len(layers), 2, 16)
    stacked = moe.stack_experts(layers)
    p = routing.experts.numel()
    assert (routing.tiles[:, 1] == 0).any()  # unused slots in this table
    cfg = ops.GemmConfig(16, 32, 1, True, 4, 2, expand=fmt != "fp8")
    if fmt == "int4-g32":  # group scales go on partial products: no e4m3 form of the weights either
        monkeypatch.setattr(moe, "EXPAND_PAIRS", 16)
        assert not moe.grouped_config(1 << 20, N, stacked.weights.k_main, "int4", 16, group=32).expand
        with pytest.raises(ValueError, match="group scales .* take the transposed GEMM"):
            moe.grouped_linear(x, routing.tokens, routing, stacked, cfg)
        return
    if fmt == "nvfp4":  # no e4m3 form of its weights: it keeps the transposed GEMM on FP16 operands
        monkeypatch.setattr(moe, "EXPAND_PAIRS", 16)
        assert not moe.grouped_config(1 << 20, N, stacked.weights.k_main, fmt, 16).expand
        assert moe.grouped_config(1 << 20, N, stacked.weights.k_main, "int4", 16).expand
        with pytest.raises(ValueError, match="NVFP4 activations quantize to FP16"):
            moe.grouped_linear(x, routing.tokens, routing, stacked, cfg)
        return
    out = torch.full((p, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = moe.grouped_linear(x, routing.tokens, routing, stacked, cfg, out=out)
    assert torch.isfinite(y).all()
    for i in range(p):
        e, t = int(routing.experts[i]), int(routing.tokens[i])
        ref = reference_forward(copy.deepcopy(layers[e]).cpu(), x[t][None].cpu().float())
        assert rel_err(y[i].cpu(), ref[0]) <= 1e-2, (i, e)
    if fmt == "mxfp4":  # the same weights as the folded grouped GEMM: the two paths agree to FP32 rounding
        fold = moe.grouped_config(p, N, stacked.weights.k_main, fmt, 16)
        assert fold.fold
        assert rel_err(moe.grouped_linear(x, routing.tokens, routing, stacked, fold).cpu(), y.cpu()) <= 2e-3


@pytest.mark.parametrize("tokens,experts,per_token,tile_m", [(7, 3, 2, 4), (5, 8, 2, 16), (40, 6, 3, 16), (3, 4, 2, 1)])
def test_route_tiles_cover_every_pair_once_by_its_expert(tokens, experts, per_token, tile_m):
    """moe.route's plan: sorted pairs keep each (token, expert) of the router, every pair lies in exactly one tile of
    at most tile_m pairs, a tile's pairs all go to the tile's expert, and the unused slots of the table hold none."""
    choice = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(t))[:per_token]
                          for t in range(tokens)])
    choice[: tokens // 2, 0] = 0  # a crowded expert: several tiles of its own where tile_m is small
    r = moe.route(choice.to(DEV), experts, tile_m)
    p = tokens * per_token
    order = torch.arange(p) if r.order is None else r.order.cpu()
    assert torch.equal(r.experts.cpu().long(), choice.reshape(-1)[order])
    assert torch.equal(r.tokens.cpu().long(), order // per_token)
    tiles = r.tiles.cpu()
    assert tiles.shape[0] == -(-p // tile_m) + min(experts, p) or tile_m == 1
    seen = torch.zeros(p, dtype=torch.int32)
    for first, rows, e in tiles.tolist():
        assert 0 <= rows <= tile_m
        seen[first:first + rows] += 1
        assert (r.experts.cpu()[first:first + rows] == e).all()
    assert (seen == 1).all()


def test_tile_rule_follows_the_measured_configs(monkeypatch):
    """tile_rows and grouped_config as measured (docs/bench/h200_moe_tiles_2026-12-06.md, Qwen3-30B-A3B: 128 experts,
    8 a token): one pair a program below one pair an expert, then twice an expert's average pairs, 16 to 128, on
    64-row weight tiles up to 32 pairs and 128-row ones (8 warps) from 64; the benchmarks' switch turns tiles off."""
    assert [moe.tile_rows(p, 128) for p in (8, 127, 128, 2048, 16384, 65536)] == [1, 1, 16, 32, 128, 128]
    cfgs = {m: moe.grouped_config(p, 1536, 2048, "mxfp4", m) for p, m in ((2048, 32), (16384, 128))}
    assert (cfgs[32].bn, cfgs[32].warps, cfgs[128].bn, cfgs[128].warps) == (64, 4, 128, 8)
    assert all(c.fold and c.op_f8 and c.split_k == 1 for c in cfgs.values())
    assert moe.grouped_config(8, 1536, 2048, "mxfp4").bm == 1
    assert not any(moe.grouped_config(p, 1536, 2048, "mxfp4", m).expand for p, m in ((16384, 128), (65536, 128)))
    # FP8 experts in tiles from 2048 pairs: the plain FP8 GEMM on the tile table (docs/bench/h100_moe_plain_2026-12-07.md),
    # 128 weight rows on 4 warps, 256 on 8 for tiles of 128 pairs; the transposed GEMM below 2048 pairs and decoding
    fp8 = {p: moe.grouped_config(p, 2048, 768, "fp8", moe.tile_rows(p, 128), experts=128) for p in (1024, 2048, 4096, 65536)}
    assert fp8[1024].swap and not any(fp8[p].swap or fp8[p].expand or fp8[p].fold for p in (2048, 4096, 65536))
    assert [(fp8[p].bm, fp8[p].bn, fp8[p].warps) for p in (2048, 4096, 65536)] == [(32, 128, 4), (64, 128, 4),
                                                                                   (128, 256, 8)]
    assert moe.grouped_config(4096, 2048, 768, "fp8").swap  # one pair a program stays transposed
    monkeypatch.setattr(moe, "EXPAND_PAIRS", 16384)  # the 4-bit long-prompt path, where it is switched on
    long = moe.grouped_config(16384, 1536, 2048, "mxfp4", 128, experts=128)
    assert long.expand and long.pdl and not long.swap and (long.bm, long.bn, long.warps) == (128, 256, 8)
    # Qwen3-235B-A22B's gate_up: 1.6 GB of e4m3 experts would not fit the workspace; its FP8 experts need none
    assert moe.grouped_config(16384, 3072, 4096, "mxfp4", 128, experts=128).fold
    assert not moe.grouped_config(16384, 4096, 1536, "fp8", 128, experts=128).swap
    assert not moe.grouped_config(16384, 2048, 768, "fp8", 128).expand  # e4m3 weights need no expansion
    assert moe.grouped_config(16383, 1536, 2048, "mxfp4", 128).fold
    monkeypatch.setattr(moe, "PAIR_TILES", False)
    assert moe.tile_rows(65536, 128) == 1


def test_stacking_makes_each_experts_own_weights_views():
    layers = expert_layers("mxfp4", 16)
    stacked = moe.stack_experts(layers)
    own = ops.layer_weights(layers[1])  # what the expert's own layer (a long prompt) runs on
    assert own.codes.data_ptr() == stacked.weights.codes[1].data_ptr() and own.frag is None
    if CUDA:  # the stack is the GPU's one copy of the codes: the experts' canonical ones wait in host memory
        assert all(m.qweight.device.type == "cpu" and m.compute_device.type == "cuda" for m in layers)
    x, _, _ = pairs_and_input(2, 3, 1)
    ref = reference_forward(copy.deepcopy(layers[1]).cpu(), x.cpu().float())
    assert rel_err(layers[1](x).cpu(), ref) <= 1e-2


def test_bad_grouped_inputs_raise():
    layers = expert_layers("mxfp4", 16)
    with pytest.raises(ValueError, match="experts' layers differ"):
        moe.stack_experts(layers[:2] + expert_layers("mxfp4", 32, experts=1))
    with pytest.raises(ValueError, match="OSC layer"):
        moe.stack_experts([])
    stacked = moe.stack_experts(layers)
    x, routing = routed(2, 3, 2, 4)
    rows = routing.tokens
    with pytest.raises(ValueError, match="int32"):
        moe.grouped_linear(x, rows.long(), routing, stacked)
    with pytest.raises(ValueError, match="routing's shape"):
        moe.grouped_linear(x, rows[:3], routing, stacked)
    for bad in (ops.GemmConfig(16, 32, 1, True, 2, 3, swap=True, wgmma=True),  # no grouped wgmma GEMM
                ops.GemmConfig(16, 32, 1, True, 4, 3),  # the plain GEMM unpacks no 4-bit experts
                ops.GemmConfig(16, 32, 2, True, 4, 3, expand=True),  # nor splits K over them
                ops.GemmConfig(16, 32, 1, True, 2, 3, swap=True, expand=True)):  # the transposed one unpacks itself
        with pytest.raises(ValueError, match=r"stacked \(grouped\) weights take the transposed GEMM, or the plain"):
            moe.grouped_linear(x, rows, routing, stacked, bad)
    with pytest.raises(ValueError, match="up to 4 pairs, more than the config's 1"):
        moe.grouped_linear(x, rows, routing, stacked, moe.grouped_config(4, N, stacked.weights.k_main, "mxfp4"))
    a = torch.zeros(4, stacked.weights.k_main, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match=r"tile table \[tiles, 3\]"):
        ops.osc_gemm(a, a[:, 0].float(), stacked.weights, a[:, :16].bfloat16(), torch.bfloat16,
                     moe.grouped_config(4, N, stacked.weights.k_main, "mxfp4"), groups=routing.experts)


def tiny_moe(fallback="fp8"):
    from tiny import batches, tiny_model

    model = tiny_model("qwen3_moe").to(DEV, torch.bfloat16 if CUDA else torch.float32)
    quantize(model, OSCConfig.osc("mxfp4", 16, fallback=fallback), [b.to(DEV) for b in batches()], progress=False)
    return model


@pytest.mark.parametrize("fallback", ["fp8", "none"])
def test_moe_block_decodes_through_the_grouped_kernels(fallback, monkeypatch):
    """A step of a quantized Qwen3-MoE block runs its experts as grouped launches (the stacks are built) and matches
    the experts run one by one on the reference path; past moe.MAX_PAIRS pairs it runs the experts' own layers."""
    model = tiny_moe(fallback)
    block = model.model.layers[0].mlp
    experts = block.experts
    assert isinstance(experts, ExpertLinears)
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(1, 3, 64, generator=g) * 2).to(DEV, next(model.parameters()).dtype)
    own_calls = []  # calls of the experts' own layers: none while the grouped kernels run
    for e in experts:
        e.gate_up_proj.register_forward_hook(lambda *_: own_calls.append(1))
    with torch.no_grad():
        fast = block(h)
        assert {name for name, _ in experts._stacks} == {"gate_up_proj", "down_proj"} and not own_calls
        monkeypatch.setenv("OSCQUANT_BACKEND", "reference")
        ref = block(h)
    assert torch.isfinite(fast).all() and rel_err(fast, ref) <= 2e-2
    monkeypatch.setenv("OSCQUANT_BACKEND", "triton" if not CUDA else "auto")
    monkeypatch.setattr(moe, "MAX_PAIRS", 4)
    own_calls.clear()
    with torch.no_grad():  # 3 tokens, 2 experts each: past MAX_PAIRS pairs, the experts' own layers (on views)
        assert rel_err(block(h), ref) <= 2e-2
    assert own_calls


def test_experts_quantized_unalike_run_one_by_one():
    """Per-layer choices (policy="auto") can give the experts of a projection different outlier counts: one stack
    cannot hold them, so the experts run through their own layers, and say why (no error)."""
    model = tiny_moe()
    experts = model.model.layers[0].mlp.experts
    first = experts[0].gate_up_proj
    lin = nn.Linear(first.in_features, first.out_features, bias=False)
    experts[0].gate_up_proj = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 32), torch.arange(32)).to(DEV)
    experts._clear()
    h = torch.randn(1, 2, 64).to(DEV, next(model.parameters()).dtype)
    with torch.no_grad():
        assert torch.isfinite(model.model.layers[0].mlp(h)).all()
    assert not experts._stacks and "differ" in next(iter(experts.kernel_checks.values()))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_moe_decode_step_replays_from_a_cuda_graph():
    """generate captures a quantized Qwen3-MoE decode step in a CUDA graph (no host sync left in the experts) and
    gives the eager steps' tokens."""
    from oscquant.generate import generate

    model = tiny_moe()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    assert torch.equal(generate(model, ids, 16, eos_token_id=None), generate(model, ids, 16, eos_token_id=None,
                                                                               graph=False))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_moe_prompt_in_pair_tiles_replays_from_a_cuda_graph(monkeypatch):
    """A prompt's experts (40 tokens, 2 of 4 experts each: tiles of 64 pairs) captured in a CUDA graph: the routing is
    sorted and tiled on the device, so a replay on a new prompt gives that prompt's eager output, and both match the
    reference path."""
    from oscquant.generate import capture_graph

    block = tiny_moe().model.layers[0].mlp
    g = torch.Generator().manual_seed(8)
    h1, h2 = ((torch.randn(1, 40, 64, generator=g) * 2).to(DEV, torch.bfloat16) for _ in range(2))
    assert moe.tile_rows(80, 4) == 64
    static = h1.clone()
    with torch.no_grad():
        replay, out = capture_graph(lambda: block(static))
        static.copy_(h2)
        replay()
        eager = block(h2)
        monkeypatch.setenv("OSCQUANT_BACKEND", "reference")
        ref = block(h2)
    assert torch.equal(out, eager) and rel_err(eager, ref) <= 2e-2


def test_compiled_moe_decode_step_keeps_the_experts_one_opaque_op():
    """Under torch.compile the grouped experts are the custom op ``oscquant::osc_grouped_linear`` (one graph, no
    break), and the compiled decode steps give the uncompiled ones' tokens."""
    import torch._dynamo
    from transformers import StaticCache

    from oscquant.generate import decode_step, generate

    model = tiny_moe()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    plain = generate(model, ids, 6, eos_token_id=None, graph=False)
    assert torch.equal(generate(model, ids, 6, eos_token_id=None, graph=False, compile=True), plain)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(9, device=DEV), use_cache=True)
        ex = torch._dynamo.explain(decode_step)(model, cache, ids[:, :1], torch.tensor([9], device=DEV))
    assert ex.graph_break_count == 0
    assert any("osc_grouped_linear" in str(g.graph) for g in ex.graphs)


def test_a_saved_and_loaded_moe_model_runs_the_same_grouped_step(tmp_path):
    """The stacks are built from the loaded layers (not from anything the first model left behind): the same output."""
    from oscquant import load_quantized, save_quantized

    model = tiny_moe()
    h = (torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(6)) * 2).to(DEV, next(model.parameters()).dtype)
    with torch.no_grad():
        before = model.model.layers[1].mlp(h)
    save_quantized(model, None, tmp_path / "ck")
    loaded, _ = load_quantized(tmp_path / "ck", device=DEV)
    experts = loaded.model.layers[1].mlp.experts
    with torch.no_grad():
        after = loaded.model.layers[1].mlp(h)
    assert experts._stacks and torch.equal(after, before)


def test_moe_model_bench_rows_and_missing_graph_columns():
    """`oscquant bench model --moe`'s harness on a tiny Qwen3-MoE on the CPU: BF16 (float32), experts one by one and
    grouped, with the same weights (so no logit changes between the two OSC rows); a row without a CUDA-graph time
    prints "-" instead of a ratio."""
    from oscquant.bench_model import ModelRow, bench_model, markdown

    dims = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, decoder_sparse_step=1)
    rows, errs = bench_model(2, 16, reps=2, device="cpu", dims=dims, vocab=128, outliers=16, moe=True)
    assert [r.variant for r in rows] == ["float", "OSC, experts one by one", "OSC, experts grouped, a pair a program",
                                         "OSC, experts grouped", "OSC, experts grouped, expanded"]
    assert errs["OSC, experts grouped vs OSC, experts one by one"] < 1e-5
    assert errs["OSC, experts grouped, expanded vs OSC, experts one by one"] < 1e-5
    assert errs["OSC, experts grouped, a pair a program vs OSC, experts one by one"] < 1e-5
    md = markdown([ModelRow("BF16", 1.0, 1.0, 0.5, 0.5), ModelRow("OSC, experts one by one", 2.0, 2.0)], 16)
    assert "| OSC, experts one by one | 2.000 | 0.50 | - | - | 2.000 | 0.50 | - | - |" in md


@pytest.mark.parametrize("fmt,mode", [("mxfp4", "f16"), ("mxfp4", "f8"), ("nvfp4", "f16"), ("int4", "f16"),
                                      ("int4-g32", "f16"), ("fp8", "f8")])
@pytest.mark.parametrize("rows_per_program", [1, 4])
def test_grouped_split_quantize_is_each_experts_own_split_bit_for_bit(fmt, mode, rows_per_program):
    """Row p of the grouped split-quantize (1 or 4 rows a program; 7 pairs, so the last program is partly masked) is
    exactly what the plain split-quantize gives for token rows[p] with expert experts[p]'s outlier channels."""
    from oscquant.kernels.triton_osc import MODE_F8, MODE_F16

    m = MODE_F8 if mode == "f8" else MODE_F16
    w = moe.stack_experts(expert_layers(fmt, 16)).weights
    x, rows, experts = pairs_and_input(4, 3, 2)
    rows, experts = rows[:7], experts[:7]
    xo, a, sa = ops.split_quantize(x, w.keep, w.outlier_idx, w.fmt, m, w.k_main, rows=rows_per_program, src=rows,
                                   grp=experts, group=w.group)
    for p in range(7):
        e, t = int(experts[p]), int(rows[p])
        xo1, a1, sa1 = ops.split_quantize(x[t:t + 1], w.keep[e], w.outlier_idx[e], w.fmt, m, w.k_main, group=w.group)
        assert torch.equal(xo[p:p + 1], xo1) and torch.equal(sa[p:p + 1], sa1)
        assert torch.equal(a[p:p + 1].view(torch.uint8), a1.view(torch.uint8))
