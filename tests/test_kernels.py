"""Triton kernels against the PyTorch reference.

Without CUDA the kernels run in Triton's CPU interpreter on tiny shapes; with CUDA the
same checks run compiled, on larger shapes, plus CUDA-graph and torch.compile capture.
"""

import copy
import dataclasses
import os

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and Triton not in interpreter mode (conftest.py sets it)", allow_module_level=True)
from oscquant import formats as F  # noqa: E402
from oscquant.config import LayerScheme  # noqa: E402
from oscquant.kernels import ops  # noqa: E402
from oscquant.kernels import layout  # noqa: E402
from oscquant.kernels.layout import (LUT_REL_MIN, chunk_pack, chunk_unpack, fragment_codes, fragment_pack,  # noqa: E402
                                     fragment_unpack, reference_operand)
from oscquant.kernels.triton_osc import MODE_F8, MODE_F16, MODE_PACKED  # noqa: E402
from oscquant.linear import OSCLinear, reference_forward  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# (M, K, N): M = 1, 7, 16, 33, ...; K and N not powers of two wherever the format allows
SHAPES = ([(1, 4160, 1000), (7, 4160, 1000), (16, 2080, 3000), (33, 4160, 1000), (128, 2080, 1000),
           (1000, 4160, 3000)] if CUDA else [(1, 160, 40), (7, 416, 72), (33, 160, 40)])
FORMATS = [("mxfp4", 32), ("mxfp4", 0), ("nvfp4", 32), ("int4", 16), ("fp8", 0), ("fp8", 16)]


ALL_CODES = torch.arange(16, dtype=torch.uint8)[::2] | (torch.arange(16, dtype=torch.uint8)[1::2] << 4)  # 8 bytes


def make_layer(k_in, n, fmt, k, seed=0, bias=True, group=None):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k_in, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k_in, generator=g) * 0.02)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    idx = torch.randperm(k_in, generator=g)[:k]
    return OSCLinear.from_linear(lin, LayerScheme(fmt, k, group_size=group), idx).to(DEV), idx


def activations(m, k_in, idx, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k_in, generator=g)
    x[:, idx] *= 40  # planted outliers in the separated channels
    return x.to(torch.bfloat16).to(DEV)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
@pytest.mark.parametrize("m,k_in,n", SHAPES[:2])
def test_split_quantize_packed_is_bit_exact(fmt, m, k_in, n):
    layer, idx = make_layer(k_in, n, fmt, 32)
    kw = ops.layer_weights(layer)
    x = activations(m, k_in, idx)
    poison = (torch.full((m, 32), float("nan"), dtype=torch.bfloat16, device=DEV),
              torch.full((m, kw.k_main // 2), 0xAB, dtype=torch.uint8, device=DEV),
              torch.full((m, kw.k_main // (16 if fmt == "nvfp4" else 32)), 0xAB, dtype=torch.uint8, device=DEV),
              torch.full((m,), float("nan"), device=DEV))
    xo, q, s = ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, MODE_PACKED, kw.k_main, out=poison)
    main = nn.functional.pad(layer.zero_outliers(x), (0, kw.k_main - k_in))  # the 4-bit path's input
    ref = F.quantize(main.cpu(), fmt, per_row_global=True)
    assert torch.equal(xo.cpu(), x[:, kw.outlier_idx.long()].cpu())
    assert torch.equal(q.cpu(), ref.codes)
    if fmt == "nvfp4":  # e4m3 block scales and one FP32 scale per token
        s, g = s
        assert torch.equal(g.cpu(), ref.global_scale.reshape(-1))
        s, ref_s = s.view(torch.uint8), ref.scales.view(torch.uint8)
    else:
        ref_s = ref.scales
    assert torch.equal(s.cpu().reshape(ref_s.shape).to(ref_s.dtype), ref_s)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "fp8"])
@pytest.mark.parametrize("mode", [MODE_F16, MODE_F8])
@pytest.mark.parametrize("rows", [1, 4])  # rows per program; 7 rows leave the last program short
def test_split_quantize_operands_equal_the_dequantized_values(fmt, mode, rows):
    m, k_in, n = SHAPES[1]
    layer, idx = make_layer(k_in, n, fmt, 16)
    kw = ops.layer_weights(layer)
    x = activations(m, k_in, idx)
    if fmt == "nvfp4" and mode == MODE_F8:
        with pytest.raises(ValueError, match="NVFP4 activations quantize to FP16 operands"):
            ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows)
        return
    xo, a, rs = ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows)
    assert torch.equal(xo.cpu(), x[:, kw.outlier_idx.long()].cpu())
    main = nn.functional.pad(layer.zero_outliers(x), (0, kw.k_main - k_in))  # the 4-bit path's input
    if fmt == "nvfp4":  # operand = e2m1 value * e4m3 block scale (exact in FP16), the row scale the global one
        ref = F.quantize(main.cpu(), fmt, per_row_global=True)
        assert torch.equal(rs.cpu(), ref.global_scale.reshape(-1))
        assert torch.equal(a.float().cpu(), F.element_values(ref) * ref.scales.float().repeat_interleave(16, 1))
        return
    deq = F.fake_quantize(main.cpu(), fmt, per_row_global=True)
    got = a.float().cpu() * rs.cpu()[:, None]
    assert torch.equal(got, deq), (got - deq).abs().max()


@pytest.mark.parametrize("fmt,mode", [("mxfp4", MODE_PACKED), ("mxfp4", MODE_F16), ("mxfp4", MODE_F8),
                                      ("nvfp4", MODE_F16), ("int4", MODE_F8), ("fp8", MODE_F8)])
@pytest.mark.parametrize("kind", [1, 2])
@pytest.mark.parametrize("rows", [1, 4])
def test_split_quantize_runs_the_rmsnorm_before_it(fmt, mode, kind, rows):
    """With the RMSNorm of the layer's input fused (norms.py), split-quantize of x gives what it gives for the
    norm's output as torch computes it (norms.rms_norm, both roundings): bit for bit in the interpreter, and on the
    GPU up to rows whose sum of squares, added in another order, rounds another way."""
    from oscquant.norms import rms_norm

    m, k_in, n = SHAPES[1]
    layer, idx = make_layer(k_in, n, fmt, 16)
    kw = ops.layer_weights(layer)
    x = activations(m, k_in, idx) * 3
    w = (torch.rand(k_in, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEV)
    norm = ops.KernelNorm(w, 1e-6, kind)
    got = ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows, norm=norm)
    want = ops.split_quantize(rms_norm(x, w, 1e-6, kind), kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows)
    unfused = ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows)
    for g, t, u in zip(got, want, unfused):
        g, t, u = (v[1] if isinstance(v, tuple) else v for v in (g, t, u))  # nvfp4 packed: the per-token scales
        g, t, u = (v.view(torch.uint8) if v.element_size() == 1 else v for v in (g, t, u))
        assert not torch.equal(t, u)  # the norm changes every output
        differ = g.ne(t).float().mean().item()
        assert differ == 0 if not CUDA else differ <= 1e-2
    with pytest.raises(ValueError, match="one per input channel"):
        ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, norm=ops.KernelNorm(w[:-1], 1e-6, kind))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
@pytest.mark.parametrize("m", [1, 5])
def test_head_norm_kernel_is_the_models_q_and_k_norms(arch, m):
    """head_norm_ on a stacked q/k/v output [M, (Hq + 2 Hkv) * D] gives q_norm and k_norm of the model's own modules
    (Qwen3's rounding, kind 1; Gemma 3's factors 1 + weight, kind 2) on the q and k heads, and leaves v as it was: bit
    for bit in the interpreter, and on the GPU up to heads whose sum of squares rounds another way."""
    from tiny import tiny_model

    from oscquant.norms import norm_formula

    attn = tiny_model(arch).model.layers[0].self_attn.to(DEV, torch.bfloat16)
    d, hq, hk = attn.head_dim, attn.config.num_attention_heads, attn.config.num_key_value_heads
    g = torch.Generator().manual_seed(m)
    with torch.no_grad():  # factors away from 1 (and from 0 for Gemma's 1 + weight), so that a wrong one shows
        attn.q_norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
        attn.k_norm.weight.copy_(torch.rand(d, generator=g) - 0.5)
    kind, add_one, eps = norm_formula(attn.q_norm)
    y = (torch.randn(m, (hq + 2 * hk) * d, generator=g) * 3).to(DEV, torch.bfloat16)
    w = torch.stack([attn.q_norm.weight, attn.k_norm.weight]).float()
    got = ops.head_norm_(y.clone(), ops.KernelHeadNorm((w + 1 if add_one else w).contiguous(), eps, kind, hq, hk))
    with torch.no_grad():
        q = attn.q_norm(y[:, :hq * d].unflatten(-1, (hq, d))).flatten(-2)
        k = attn.k_norm(y[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))).flatten(-2)
    want = torch.cat([q, k, y[:, (hq + hk) * d:]], 1)
    assert kind == (1 if arch == "qwen3" else 2) and not torch.equal(want, y)
    differ = got.ne(want).float().mean().item()
    assert differ == 0 if not CUDA else differ <= 1e-2
    assert torch.equal(got[:, (hq + hk) * d:], y[:, (hq + hk) * d:])  # v untouched
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        ops.head_norm_(y.clone(), ops.KernelHeadNorm(w[:, :d - 2].contiguous(), eps, kind, hq, hk))


@pytest.mark.parametrize("fmt,mode", [("mxfp4", MODE_PACKED), ("mxfp4", MODE_F16), ("mxfp4", MODE_F8),
                                      ("int4", MODE_F16), ("fp8", MODE_F8)])
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("rows", [1, 4])
def test_split_quantize_computes_a_gated_mlps_input(fmt, mode, act, rows):
    """From gate and up side by side (gated.py), split-quantize gives what it gives for act(gate) * up as torch
    computes it in BF16 (SiLU; GELU's tanh form): up to values whose activation, from another exp or tanh, rounds to
    the neighbouring BF16 number (GELU far below zero, where its value is tiny, differs most: torch's 1 + tanh loses
    its digits there, the kernel's 1 / (1 + exp) does not)."""
    m, k_in, n = SHAPES[1]
    layer, idx = make_layer(k_in, n, fmt, 16)
    kw = ops.layer_weights(layer)
    gate_up = torch.cat([activations(m, k_in, idx, seed=2) * 0.2, activations(m, k_in, idx, seed=3)], 1)
    gate, up = gate_up.chunk(2, 1)
    h = (nn.functional.silu(gate) if act == 1 else nn.functional.gelu(gate, approximate="tanh")) * up
    got = ops.split_quantize(gate_up, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows, act=act)
    want = ops.split_quantize(h, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows)
    ungated = ops.split_quantize(gate, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, rows=rows)
    assert torch.allclose(got[0].float(), want[0].float(), rtol=2**-7, atol=1e-3 * want[0].float().abs().max().item())
    for i, (g, t, u) in enumerate(zip(got, want, ungated)):
        g, t, u = (v.view(torch.uint8) if v.element_size() == 1 else v for v in (g, t, u))
        assert not torch.equal(t, u)  # the activation and the product change every output
        if i or act == 1:  # (GELU's x_o: the allclose above)
            assert g.ne(t).float().mean().item() <= 2e-2
    with pytest.raises(ValueError, match="gate and up side by side"):
        ops.split_quantize(gate_up[:, 1:], kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, act=act)
    with pytest.raises(ValueError, match="act 1"):
        ops.split_quantize(gate_up, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main, act=3)


@pytest.mark.parametrize("fmt,k", [("mxfp4", 32), ("nvfp4", 32), ("int4", 16), ("fp8", 0)])
@pytest.mark.parametrize("op_f8", [False, True])
def test_weight_unpacking_is_bit_exact(fmt, k, op_f8):
    _, k_in, n = SHAPES[1]
    layer, _ = make_layer(k_in, n, fmt, k)
    kw = ops.layer_weights(layer)
    if fmt == "nvfp4" and op_f8:
        with pytest.raises(ValueError, match="NVFP4 weights decode to FP16"):
            ops.decode_weights(kw, op_f8)
        return
    got = ops.decode_weights(kw, op_f8).float().cpu()
    want = reference_operand(kw).cpu() * (2 if op_f8 and fmt == "mxfp4" else 1)
    assert torch.equal(got, want)
    # and with the row scales it is the reference dequantization of the stored weights (NVFP4: to FP32 rounding,
    # the reference multiplying the block scale by the global one first)
    deq = F.dequantize(layer.weight_qtensor()).cpu()
    scale = kw.row_scale.cpu()[:, None] / (2 if op_f8 and fmt == "mxfp4" else 1)
    if fmt == "nvfp4":
        assert torch.allclose((got * scale)[:, :deq.shape[1]], deq, rtol=2 ** -22, atol=0)
    else:
        assert torch.equal((got * scale)[:, :deq.shape[1]], deq)


def test_e4m3_unpack_is_bit_exact():
    """The e4m3 variant's unpack (bits moved, no arithmetic) gives every e2m1 value times 2**-6 exactly."""
    _, k_in, n = SHAPES[1]
    layer, _ = make_layer(k_in, n, "mxfp4", 32)
    kw = ops.layer_weights(layer)
    kw.codes[:, :16] = torch.arange(16, dtype=torch.uint8, device=kw.codes.device) * 0x11  # all 16 codes, both nibbles
    got = ops.decode_weights(kw, False, raw_e4m3=True)
    assert got.dtype == torch.float8_e4m3fn
    want = F.e2m1_decode(chunk_unpack(kw.codes.cpu())) * 2.0 ** -6
    assert torch.equal(got.float().cpu(), want)
    assert set(got[:, :16].float().cpu().unique().tolist()) >= {0.5 / 64, 6 / 64, -6 / 64}  # subnormal and extremes
    with pytest.raises(ValueError, match="MXFP4 unpack"):
        ops.decode_weights(ops.layer_weights(make_layer(k_in, n, "int4", 16)[0]), False, raw_e4m3=True)


def test_lut_unpack_is_bit_exact():
    """The folded GEMM's byte-table unpack gives every e2m1 value times 2**(rel + 6) as e4m3 exactly: all
    16 codes in both nibbles, block exponents across the whole range kernel_weights leaves (0 down to
    LUT_REL_MIN). The PTX on the GPU, its Triton replay in the interpreter."""
    _, k_in, n = SHAPES[1]
    layer, _ = make_layer(k_in, n, "mxfp4", 32)
    kw = copy.copy(ops.layer_weights(layer))
    kw.codes = kw.codes.clone()
    kw.codes[:, :16] = torch.arange(16, dtype=torch.uint8, device=kw.codes.device) * 0x11  # all 16 codes, both nibbles
    g = torch.Generator().manual_seed(5)
    kw.rel_exp = torch.randint(LUT_REL_MIN, 1, kw.rel_exp.shape, generator=g, dtype=torch.int8).to(kw.codes.device)
    kw.rel_exp[::2, :2], kw.rel_exp[1::2, :2] = 0, LUT_REL_MIN  # the table's two ends, on the all-codes columns
    got = ops.decode_weights(kw, False, lut=True)
    assert got.dtype == torch.float8_e4m3fn
    want = reference_operand(kw).cpu() * 64
    assert torch.equal(got.float().cpu(), want)
    assert set(got[:, :16].float().abs().cpu().unique().tolist()) >= {0.0, 2.0 ** -6, 6 * 2.0 ** 6}
    with pytest.raises(ValueError, match="MXFP4 unpacks"):
        ops.decode_weights(ops.layer_weights(make_layer(k_in, n, "int4", 16)[0]), False, lut=True)


def test_kernel_layout_rerounds_blocks_below_the_tables():
    """Blocks under 2**-11 of their row's largest are re-rounded once, in the chunk layout: every kernel
    then multiplies the same weights, within half a step at 2**-11 of the stored ones."""
    layer, _ = make_layer(416, 72, "mxfp4", 16, bias=False)
    layer.wscale[:, 1] = layer.wscale[:, 0] - 14  # block 1 of every row 2**-14 below block 0
    layer.wscale[:, 0] = layer.wscale.max()  # ... and block 0 the row's largest
    kw = layout.kernel_weights(layer)
    assert int(kw.rel_exp.min()) == LUT_REL_MIN
    got = reference_operand(kw) * kw.row_scale[:, None]
    deq = F.dequantize(layer.weight_qtensor())
    rel = (layer.wscale.int() - layer.wscale.int().amax(1, keepdim=True)).repeat_interleave(32, 1)[:, :deq.shape[1]]
    low = rel < LUT_REL_MIN
    assert low.any() and torch.equal(got[:, :deq.shape[1]][~low], deq[~low])
    # those values are at most 3 * 2**-11 of the row scale, where the e2m1 grid's steps are 0.5 and 1 (times 2**-11)
    half_step = (kw.row_scale[:, None] * 2.0 ** (LUT_REL_MIN - 1)).expand_as(deq)
    assert ((got[:, :deq.shape[1]] - deq).abs()[low] <= half_step[low]).all()


def test_chunk_layout_roundtrip():
    codes = torch.randint(0, 16, (5, 256), dtype=torch.uint8)
    packed = chunk_pack(codes)
    assert torch.equal(chunk_unpack(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 32] << 4)


def test_fragment_layout_unpacks_bit_exact():
    """The fragment GEMM's integer unpack recipe (byte tables from the block exponent, prmt, sign
    ORs), run on the CPU over its word layout, gives every weight as e4m3 exactly: all 16 codes,
    block exponents across the table's range, rows and columns past the tile and step edges.
    Blocks below the table's range come back re-rounded, within half their smallest step."""
    g = torch.Generator().manual_seed(3)
    layer, _ = make_layer(416, 72, "mxfp4", 16, bias=False)
    kw = copy.copy(ops.layer_weights(layer))
    n = kw.row_scale.numel()
    kw.codes = kw.codes.cpu().clone()
    kw.codes[:, :8] = ALL_CODES
    kw.rel_exp = torch.randint(LUT_REL_MIN - 3, 1, kw.rel_exp.shape, generator=g, dtype=torch.int8)
    kw.rel_exp[::2, 0], kw.rel_exp[1::2, 0] = 0, LUT_REL_MIN  # the table's two ends
    kw.row_scale = kw.row_scale.cpu()
    fw = fragment_pack(kw)
    assert fw.words.shape == (kw.k_main // 128, 8, 32, 8) and fw.exps.dtype == torch.int32  # 72 rows -> 8 tiles
    got = fragment_unpack(fw, n).float()
    vals = F.e2m1_decode(chunk_unpack(kw.codes)) * torch.exp2(kw.rel_exp.float() + 6).repeat_interleave(32, 1)
    inside = (kw.rel_exp >= LUT_REL_MIN).repeat_interleave(32, 1)
    assert torch.equal(got[inside], vals[inside])
    assert (got[~inside] - vals[~inside]).abs().max() <= 2.0 ** (LUT_REL_MIN + 6 - 2)
    assert set(got[:, :16].abs().unique().tolist()) >= {0.0, 6 * 2.0 ** 6, 2.0 ** -6}
    codes, e = fragment_codes(kw)
    assert int(e.min()) >= -5 and int(e.max()) <= 6  # what the e4m3 table can shift to
    assert torch.equal(fw.row_scale, kw.row_scale / 64)


@pytest.mark.skipif(not CUDA, reason="the fragment GEMM is inline PTX (no interpreter)")
@pytest.mark.parametrize("m,k_in,n", [s for s in SHAPES if s[0] <= 16])
@pytest.mark.parametrize("k", [32, 16, 0])
@pytest.mark.parametrize("warps,split_k", [(4, 1), (2, 3), (8, 8), (1, 2)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_fragment_gemm_matches_reference(m, k_in, n, k, warps, split_k, prefetch):
    layer, idx = make_layer(k_in, n, "mxfp4", k, seed=k)
    x = activations(m, k_in, idx, seed=m)
    kw = ops.layer_weights(layer)
    cfg = ops.frag_config(m, n, kw.k_main, warps=warps, split_k=split_k, prefetch=prefetch)
    assert cfg.frag and cfg.bm == (8 if m <= 8 else 16)
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=out)
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())
    assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-2
    if split_k > 1:
        ws, cnt = ops._SPLIT_WORKSPACE[y.device]
        assert not ws.any() and not cnt.any()
        again = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=torch.full_like(out, float("nan")))
        assert rel_err(again.cpu(), ref) <= 1e-2


@pytest.mark.skipif(not CUDA, reason="the fragment GEMM is inline PTX (no interpreter)")
def test_fragment_gemm_unpack_is_bit_exact_on_the_gpu():
    """One-hot activation rows pick single weight columns: y[m, n] = w[n, col_m] * row scale, exact
    in BF16 (a few significant bits times a power of two), so every column position of a step
    (lane, word, nibble) is checked against the CPU recipe, and that against the reference."""
    _, k_in, n = SHAPES[1]
    layer, _ = make_layer(k_in, n, "mxfp4", 0, bias=False)
    kw = ops.layer_weights(layer)
    kw.codes[:, :8] = ALL_CODES.to(DEV)
    kw.frag = fragment_pack(kw)
    want = fragment_unpack(copy.copy(kw.frag), n).float().cpu() * kw.frag.row_scale.cpu()[:, None]
    cfg = ops.frag_config(16, n, kw.k_main, split_k=1)
    cols = torch.cat((torch.arange(128), kw.k_main - 128 + torch.arange(128)))
    xo = torch.zeros(16, 0, dtype=torch.bfloat16, device=DEV)
    for i in range(0, cols.numel(), 16):
        c = cols[i:i + 16]
        a = torch.zeros(16, kw.k_main, dtype=torch.float16, device=DEV)
        a[torch.arange(16), c.to(DEV)] = 1.0
        y = ops.osc_gemm(a, torch.ones(16, device=DEV), kw, xo, torch.bfloat16, cfg,
                         out=torch.full((16, n), float("nan"), dtype=torch.bfloat16, device=DEV))
        assert torch.equal(y.float().cpu().T, want[:, c]), f"columns {c.tolist()}"


@pytest.mark.skipif(not CUDA, reason="the wgmma GEMM is Gluon for sm_90 (no interpreter)")
@pytest.mark.parametrize("m,k_in,n", SHAPES + [(300, 2080, 520), (257, 4160, 1000)])
@pytest.mark.parametrize("k", [32, 16, 0])
@pytest.mark.parametrize("bn,warps,bt,split_k,stages,reg_a", [
    (128, 8, 128, 1, 4, False), (64, 4, 64, 3, 2, False), (128, 8, 16, 2, 3, False), (64, 4, 256, 1, 3, False),
    (64, 4, 32, 2, 4, False), (128, 8, 256, 1, 3, False),
    # the unpacked weights as wgmma's register operand
    (64, 4, 128, 1, 4, True), (64, 4, 16, 3, 2, True), (128, 8, 64, 2, 3, True), (128, 8, 256, 1, 3, True)])
def test_wgmma_gemm_matches_reference(m, k_in, n, k, bn, warps, bt, split_k, stages, reg_a):
    layer, idx = make_layer(k_in, n, "mxfp4", k, seed=k)
    x = activations(m, k_in, idx, seed=m)
    kw = ops.layer_weights(layer)
    cfg = ops.wgmma_config(m, n, kw.k_main, bn=bn, bt=bt, warps=warps, split_k=split_k, stages=stages, reg_a=reg_a)
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", cfg.mode, kw.k_main)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=out)
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())
    assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-2
    # the same products as the folded Triton GEMM (byte tables, FP32 accumulation; only the order differs)
    fold = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, ops.GemmConfig(64, 64, 1, True, 4, 3, swap=True, fold=True))
    assert rel_err(y.float().cpu(), fold.float().cpu()) <= 2e-3
    if split_k > 1:
        ws, cnt = ops._SPLIT_WORKSPACE[y.device]
        assert not ws.any() and not cnt.any()


# INT4 with group scales: (group, (M, K, N)), K a multiple of the group, padded to 128 columns or to whole groups
GROUP_CASES = [(g, shape) for g, shapes in {
    32: [(1, 4160, 1000), (16, 2080, 3000), (300, 4160, 1000)] if CUDA else [(1, 160, 40), (70, 416, 72)],
    64: [(7, 4160, 1000), (64, 4096, 2000)] if CUDA else [(7, 384, 40)],
    128: [(1, 4096, 1000), (33, 2048, 3000), (1000, 4096, 1000)] if CUDA else [(1, 384, 40), (70, 768, 72)],
    256: [(16, 4352, 1000), (257, 2304, 1000)] if CUDA else [(33, 768, 40)]}.items() for shape in shapes]

# the wgmma GEMM on FP16 operands: NVFP4 at the kernel shapes, INT4 with group scales at K a multiple of the group
WGMMA_F16_CASES = [("nvfp4", None, shape) for shape in SHAPES + [(300, 2080, 520), (257, 4160, 1000)]] + [
    ("int4", g, shape) for g, shape in GROUP_CASES if g in (32, 128)]


@pytest.mark.skipif(not CUDA, reason="the wgmma GEMM is Gluon for sm_90 (no interpreter)")
@pytest.mark.parametrize("fmt,group,shape", WGMMA_F16_CASES,
                         ids=[f"{f}{g or ''}-{m}x{k}x{n}" for f, g, (m, k, n) in WGMMA_F16_CASES])
@pytest.mark.parametrize("k", [32, 0])
@pytest.mark.parametrize("bn,warps,bt,split_k,stages", [
    (64, 4, 128, 1, 4), (64, 4, 16, 3, 2), (128, 8, 64, 2, 3), (128, 8, 128, 2, 3), (128, 8, 32, 1, 4)])
def test_wgmma_gemm_f16_matches_reference_and_the_fp16_expansion(fmt, group, shape, k, bn, warps, bt, split_k, stages):
    """NVFP4, and INT4 with group scales, on FP16 wgmma (codes unpacked to FP16 times their block or group factors in
    registers): the reference path, and the same FP16 products as the expansion path's GEMM on the weights decoded to
    FP16 (INT4: up to a last-bit difference of the factors' rounding)."""
    m, k_in, n = shape
    layer, idx = make_layer(k_in, n, fmt, k, seed=k, group=group)
    x = activations(m, k_in, idx, seed=m)
    kw = ops.layer_weights(layer)
    cfg = ops.wgmma_config(m, n, kw.k_main, bn=bn, bt=bt, warps=warps, split_k=split_k, stages=stages, f16=True)
    xo, a, sa = ops.split_for(x, kw, cfg)
    assert a.dtype == torch.float16 and cfg.reg_a and sa.shape == (m,)  # INT4: the group scales folded in
    y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg,
                     out=torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV))
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())
    assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-2
    expanded = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, ops.GemmConfig(64, 64, 1, False, 4, 2, bk=64, expand=True))
    assert rel_err(y.float().cpu(), expanded.float().cpu()) <= 2e-3
    if split_k > 1:
        ws, cnt = ops._SPLIT_WORKSPACE[y.device]
        assert not ws.any() and not cnt.any()


@pytest.mark.skipif(not CUDA, reason="the wgmma GEMM is Gluon for sm_90 (no interpreter)")
def test_wgmma_gemm_rejects_what_it_cannot_take():
    layer, idx = make_layer(256, 128, "nvfp4", 16)
    kw = ops.layer_weights(layer)
    x = activations(64, 256, idx)
    cfg = ops.wgmma_config(64, 128, kw.k_main, bn=64, f16=True)
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "nvfp4", cfg.mode, kw.k_main)
    for bad in (dict(reg_a=False), dict(bm=256)):
        with pytest.raises(ValueError, match="register operand only"):
            ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, dataclasses.replace(cfg, **bad))
    with pytest.raises(ValueError, match="MODE_F16"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, kw, xo, torch.bfloat16, cfg)
    int4, _ = make_layer(256, 128, "int4", 16)
    with pytest.raises(ValueError, match="takes MXFP4 weights"):
        ops.osc_gemm(a, sa, ops.layer_weights(int4), xo, torch.bfloat16, cfg)


CONFIGS = [ops.GemmConfig(16, 64, 1, False, 4, 2), ops.GemmConfig(16, 32, 2, False, 4, 2, bk=256),
           ops.GemmConfig(64, 64, 1, True, 4, 2), ops.GemmConfig(64, 64, 1, True, 4, 2, expand=True),
           ops.GemmConfig(64, 64, 1, False, 4, 2, bk=64, expand=True),
           ops.GemmConfig(16, 64, 1, False, 4, 3, swap=True), ops.GemmConfig(64, 32, 3, False, 2, 2, swap=True),
           ops.GemmConfig(8, 32, 1, True, 2, 4, swap=True), ops.GemmConfig(1, 32, 2, True, 2, 4, swap=True),
           ops.GemmConfig(16, 64, 1, True, 4, 4, swap=True), ops.GemmConfig(8, 32, 4, False, 2, 4, swap=True),
           ops.GemmConfig(64, 64, 1, True, 4, 3, swap=True, fold=True),
           ops.GemmConfig(16, 32, 2, True, 2, 3, swap=True, fold=True),
           ops.GemmConfig(16, 64, 2, True, 4, 4, swap=True, fold=True)]


@pytest.mark.parametrize("fmt,k", FORMATS)
@pytest.mark.parametrize("m,k_in,n", SHAPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["f16", "f16-splitk", "f8", "f8-expanded", "f16-expanded", "swap",
                                          "swap-splitk-m64", "swap-f8-m8", "swap-f8-m1-splitk", "swap-f8-m16",
                                          "swap-m8-splitk",
                                          "swap-f8-fold-m64", "swap-f8-fold-m16-splitk",
                                          "swap-f8-fold-wgmma-m16-splitk"])
def test_gemm_matches_reference(fmt, k, m, k_in, n, cfg):
    """Transposed configs whose token tile (bm) is smaller than M run several token tiles."""
    if cfg.swap and fmt == "fp8" and (cfg.fold or not cfg.op_f8):
        with pytest.raises(ValueError, match="FP8-fallback weights with e4m3 operands only"):
            ops.osc_gemm(torch.zeros(m, 128, dtype=torch.float16, device=DEV), None,
                         ops.layer_weights(make_layer(k_in, n, fmt, k)[0]), torch.zeros(m, 0, device=DEV),
                         torch.bfloat16, cfg)
        return
    if fmt == "nvfp4" and (cfg.op_f8 or cfg.fold):
        with pytest.raises(ValueError, match="NVFP4 weights multiply FP16 operands"):
            ops.osc_gemm(torch.zeros(m, 128, dtype=torch.float8_e4m3fn, device=DEV), None,
                         ops.layer_weights(make_layer(k_in, n, fmt, k)[0]), torch.zeros(m, 0, device=DEV),
                         torch.bfloat16, cfg)
        return
    layer, idx = make_layer(k_in, n, fmt, k)
    x = activations(m, k_in, idx, seed=m)
    kw = ops.layer_weights(layer)
    mode = MODE_F8 if cfg.op_f8 else MODE_F16
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, fmt, mode, kw.k_main)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: unwritten fails
    y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=out)
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())  # on the CPU, float32
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) <= 1e-2
    if cfg.split_k > 1:  # the last program of each tile left the shared workspace and counters zeroed
        ws, cnt = ops._SPLIT_WORKSPACE[y.device]
        assert not ws.any() and not cnt.any()
        again = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=torch.full_like(out, float("nan")))
        assert rel_err(again.cpu(), ref) <= 1e-2  # a workspace left dirty would add the first call's sums


F16_CUBLAS_CASES = [("nvfp4", 32, None, True), ("nvfp4", 0, None, False), ("int4", 16, 32, True), ("int4", 16, 128, True)]


@pytest.mark.parametrize("fmt,k,group,bias", F16_CUBLAS_CASES, ids=["nvfp4", "nvfp4-k0-nobias", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("m,k_in,n", [(65, 4224, 1000), (300, 2048, 3000)] if CUDA else [(70, 384, 40), (7, 256, 72)])
def test_fp16_cublas_path_matches_the_reference_and_our_fp16_gemm(fmt, k, group, bias, m, k_in, n):
    """NVFP4 and INT4 with group scales on many tokens (Hopper): the weights expanded to FP16, cuBLAS's FP16 GEMM
    into FP32 (on the CPU an FP32 matmul), then epilogue_kernel (scales, BF16 branch, bias) — against the reference
    and against our plain GEMM on the same expanded weights (the same products, summed in another order)."""
    layer, idx = make_layer(k_in, n, fmt, k, bias=bias, group=group)
    kw = ops.layer_weights(layer)
    x = activations(m, k_in, idx, seed=m)
    cfg = ops.CUBLAS_F16_CONFIG
    xo, a, sa = ops.split_for(x, kw, cfg)
    assert a.dtype == torch.float16 and sa.shape == (m,)  # INT4: the group scales folded into the operands
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: unwritten fails
    y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=out)
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-2
    ours = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, ops.GemmConfig(64, 64, 1, False, 4, 2, bk=64, expand=True))
    assert rel_err(y.cpu(), ours.cpu()) <= 4e-3
    assert rel_err(ops.osc_linear_2d(x, kw, cfg).cpu(), ref) <= 1e-2  # split_for and the GEMM as the layer runs them
    # each part of the epilogue shows: the branch, the row scales, the token scales
    if k:
        no_branch = ops.osc_gemm(a, sa, kw, xo[:, :0], torch.bfloat16, cfg)
        assert rel_err(no_branch.cpu(), ref) > 1e-2
    if not group:  # (INT4's expanded weights are over the row scales, so that scaling them cancels out)
        kw2 = dataclasses.replace(kw, row_scale=kw.row_scale * torch.linspace(0.5, 2, n, device=DEV))
        assert rel_err(ops.osc_gemm(a, sa, kw2, xo, torch.bfloat16, cfg).cpu(), ref) > 1e-2
    sa2 = sa * torch.linspace(0.5, 2, m, device=DEV)
    assert rel_err(ops.osc_gemm(a, sa2, kw, xo, torch.bfloat16, cfg).cpu(), ref) > 1e-2
    with pytest.raises(ValueError, match="torch.float16 operands with one scale per token"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, kw, xo, torch.bfloat16, cfg)


@pytest.mark.parametrize("group,shape", GROUP_CASES, ids=[f"g{g}-{m}x{k}x{n}" for g, (m, k, n) in GROUP_CASES])
def test_int4_group_scales_split_and_gemm_match_the_reference(group, shape):
    """INT4 with a scale per group of columns: split-quantize's codes and scales bit-exact, its operands times their
    group's scale equal to the reference values, and both GEMM paths against the float32 reference, by the layer's
    own config and by explicit ones: the transposed GEMM (each group's partial products times its two scales; FP16
    and e4m3 operands, split-K, token tiles smaller than M) and the prefill path (group scales folded into FP16
    weights and activations, one rounding each, then the plain GEMM)."""
    m, k_in, n = shape
    layer, idx = make_layer(k_in, n, "int4", 16, group=group)
    kw = ops.layer_weights(layer)
    assert kw.group == group and kw.k_main % max(128, group) == 0 and kw.rel_exp.shape == (n, kw.k_main // group)
    x = activations(m, k_in, idx, seed=m)
    main = nn.functional.pad(layer.zero_outliers(x), (0, kw.k_main - k_in)).cpu()
    ref_q = F.quantize(main, "int4", group)
    xo, q, s = ops.split_quantize(x, kw.keep, kw.outlier_idx, "int4", MODE_PACKED, kw.k_main, group=group)
    assert torch.equal(q.cpu(), ref_q.codes) and torch.equal(s.cpu(), ref_q.scales)
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "int4", MODE_F16, kw.k_main, group=group)
    assert torch.equal(a.float().cpu() * sa.cpu().repeat_interleave(group, 1), F.dequantize(ref_q))
    # the prefill path's operands: value times group scale over the token's (and the row's) largest, one FP16 rounding
    xo, a, top = ops.split_quantize(x, kw.keep, kw.outlier_idx, "int4", MODE_F16, kw.k_main, group=group,
                                    fold_groups=True)
    used = main.reshape(m, -1, group).abs().amax(-1) > 0  # all-zero groups (scale 1) do not set the largest
    assert top.shape == (m,) and torch.equal(top.cpu(), ref_q.scales.where(used, 0).amax(1))
    assert torch.allclose(a.float().cpu() * top.cpu()[:, None], F.dequantize(ref_q), rtol=2 ** -11, atol=0)
    w_deq = F.dequantize(layer.weight_qtensor()).cpu()
    got = ops.decode_weights(kw, False).float().cpu() * kw.row_scale.cpu()[:, None]
    assert torch.allclose(got[:, :w_deq.shape[1]], w_deq, rtol=2 ** -11, atol=0)
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())
    cfgs = [ops.layer_config(x, kw), ops.GemmConfig(16, 32, 2, False, 2, 3, swap=True),
            ops.GemmConfig(8, 64, 1, True, 4, 3, swap=True), ops.GemmConfig(64, 64, 1, False, 4, 2, bk=64, expand=True)]
    assert not cfgs[0].fold and (cfgs[0].swap if m <= 64 else (cfgs[0].expand or cfgs[0].cublas) and not cfgs[0].op_f8)
    for cfg in cfgs:
        xo, a, sa = ops.split_for(x, kw, cfg)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: unwritten fails
        y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=out)
        assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-2, cfg
    # the layer end to end picks the kernels, and wrong group scales would show: one group's scale doubled
    assert rel_err(ops.osc_linear_2d(x, kw).cpu(), ref) <= 1e-2
    kw.rel_exp[:, 0] *= 2
    assert rel_err(ops.osc_linear_2d(x, kw).cpu(), ref) > 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA (cuBLAS)")
@pytest.mark.parametrize("k", [0, 16])
@pytest.mark.parametrize("m,k_in,n", [(65, 4160, 1008), (300, 2080, 4096), (512, 4160, 4096)])
def test_cublas_fallback_gemm_matches_reference(k, m, k_in, n):
    """FP8-fallback weights through cuBLAS's row-wise FP8 GEMM, the BF16 branch added in place (gemm_config's choice at
    65-512 tokens on Hopper where N >= 4096)."""
    layer, idx = make_layer(k_in, n, "fp8", k)
    x = activations(m, k_in, idx, seed=m)
    kw = ops.layer_weights(layer)
    cfg = ops.CUBLAS_CONFIG
    assert ops.layer_config(x, kw).cublas == (n >= 4096 and ops.wgmma_runs(x))
    xo, a, sa = ops.split_quantize(x, kw.keep, kw.outlier_idx, "fp8", MODE_F8, kw.k_main)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)  # poisoned: unwritten fails
    y = ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, cfg, out=out)
    ref = reference_forward(copy.deepcopy(layer).cpu(), x.cpu().double().float())
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all() and rel_err(y.cpu(), ref) <= 1e-2
    assert rel_err(ops.osc_linear_2d(x, kw).cpu(), ref) <= 1e-2  # the layer's own route, whichever it is


def test_default_configs_and_the_layer_backend(monkeypatch):
    m, k_in, n = SHAPES[1]
    layer, idx = make_layer(k_in, n, "mxfp4", 32)
    x = activations(m, k_in, idx)
    if not CUDA:  # on the CPU the kernels run only when asked for by name
        from oscquant import backends

        assert backends.choose(layer, x.cpu()) == "reference"
        monkeypatch.setenv("OSCQUANT_BACKEND", "triton")
    from oscquant import backends

    assert backends.choose(layer, x) == "triton"
    y = layer(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, reference_forward(layer, x.float())) <= 1e-2
    # formats without a kernel go to the reference, saying why (INT4 groups narrower than the kernels' 32 columns)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(k_in, n)
    nv = OSCLinear.from_linear(lin, LayerScheme("int4", 16, group_size=16), torch.randperm(k_in, generator=g)[:16])
    nv = nv.to(DEV)
    assert "no kernel" in ops.supported(nv, x)
    if CUDA:
        assert backends.choose(nv, x) == "reference"
    else:
        with pytest.raises(RuntimeError, match="cannot run this layer"):
            backends.choose(nv, x)


def test_bad_inputs_raise():
    m, k_in, n = SHAPES[0]
    layer, _ = make_layer(k_in, n, "mxfp4", 32)
    kw = ops.layer_weights(layer)
    with pytest.raises(ValueError, match="2-D input"):
        ops.split_quantize(torch.zeros(k_in, device=DEV), kw.keep, kw.outlier_idx, "mxfp4", MODE_F16, kw.k_main)
    with pytest.raises(ValueError, match="power of two"):
        ops.split_quantize(torch.zeros(3, k_in, device=DEV), kw.keep, kw.outlier_idx, "mxfp4", MODE_F16, kw.k_main,
                           rows=3)
    assert "not on a CUDA device" in (ops.supported(layer, torch.zeros(2, k_in)) or "not on a CUDA device")
    xo, a, sa = ops.split_quantize(torch.ones(1, k_in, device=DEV), kw.keep, kw.outlier_idx, "mxfp4", MODE_F16,
                                   kw.k_main)
    with pytest.raises(ValueError, match="e4m3fn activation operands.*MODE_F8"):  # operands of the wrong mode
        ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, ops.GemmConfig(1, 32, 1, True, 2, 4, swap=True))
    frag = ops.frag_config(1, n, kw.k_main)
    int4 = ops.layer_weights(make_layer(k_in, n, "int4", 16)[0])
    with pytest.raises(ValueError, match="float16 activation operands.*MODE_F16"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, kw, xo, torch.bfloat16, frag)
    with pytest.raises(ValueError, match="pads the tokens to 8 or 16"):  # the kernel has one or two token groups
        ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, dataclasses.replace(frag, bm=32))
    wg = ops.wgmma_config(1, n, kw.k_main)
    with pytest.raises(ValueError, match="float8_e4m3fn activation operands.*MODE_F8"):
        ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, wg)
    with pytest.raises(ValueError, match="takes MXFP4 weights"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, int4, xo, torch.bfloat16, wg)
    with pytest.raises(ValueError, match="64 weight rows a warpgroup"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, kw, xo, torch.bfloat16, dataclasses.replace(wg, bn=96))
    with pytest.raises(ValueError, match="the warps dividing the layer's"):  # 3 warps, tiles padded to 8
        ops.osc_gemm(a, sa, kw, xo, torch.bfloat16, dataclasses.replace(frag, warps=3))
    with pytest.raises(ValueError, match="fragment layout and M <= 8"):
        ops.osc_gemm(torch.zeros(9, kw.k_main, dtype=torch.float16, device=DEV), sa, kw, xo, torch.bfloat16, frag)
    with pytest.raises(ValueError, match="got int4 \\(without fragment layout\\)"):
        ops.osc_gemm(a, sa, int4, xo, torch.bfloat16, frag)
    cub = ops.CUBLAS_CONFIG
    with pytest.raises(ValueError, match="takes FP8 \\(e4m3\\) weights, or NVFP4 .* got mxfp4 without group"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, kw, xo, torch.bfloat16, cub)
    fp8 = ops.layer_weights(make_layer(k_in, 40, "fp8", 0)[0])
    with pytest.raises(ValueError, match="float8_e4m3fn activation operands.*MODE_F8"):
        ops.osc_gemm(a, sa, fp8, xo, torch.bfloat16, cub)
    with pytest.raises(ValueError, match="N a multiple of 16, got 40"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, fp8, xo, torch.bfloat16, cub)
    nv = ops.layer_weights(make_layer(k_in, n, "nvfp4", 32)[0])  # NVFP4: FP16 operands only
    with pytest.raises(ValueError, match="NVFP4 activations quantize to FP16 operands"):
        ops.split_quantize(torch.ones(1, k_in, device=DEV), nv.keep, nv.outlier_idx, "nvfp4", MODE_F8, nv.k_main)
    with pytest.raises(ValueError, match="NVFP4 weights multiply FP16 operands"):
        ops.osc_gemm(a.to(torch.float8_e4m3fn), sa, nv, xo, torch.bfloat16, ops.fold_config(32, n, nv.k_main))
    with pytest.raises(ValueError, match="group scales take int4"):  # MXFP4's blocks are the format's own
        ops.split_quantize(torch.ones(1, k_in, device=DEV), kw.keep, kw.outlier_idx, "mxfp4", MODE_F16, kw.k_main,
                           group=32)
    g32 = ops.layer_weights(make_layer(k_in, n, "int4", 16, group=32)[0])
    assert g32.group == 32
    with pytest.raises(ValueError, match="group scales take int4 and a power of two"):
        ops.split_quantize(torch.ones(1, k_in, device=DEV), g32.keep, g32.outlier_idx, "int4", MODE_F16, g32.k_main,
                           group=48)
    xo, a, sa = ops.split_quantize(torch.ones(1, k_in, device=DEV), g32.keep, g32.outlier_idx, "int4", MODE_F16,
                                   g32.k_main)  # per-token scales, not the layer's groups
    with pytest.raises(ValueError, match="token scales of each group"):
        ops.osc_gemm(a, sa, g32, xo, torch.bfloat16, ops.gemm_config(1, n, g32.k_main, "int4", group=32, wgmma=False))
    for cfg in (ops.GemmConfig(64, 64, 1, True, 4, 2, expand=True), ops.GemmConfig(16, 64, 1, False, 4, 2),
                ops.fold_config(32, n, g32.k_main)):  # every path but the transposed GEMM and the FP16 expansion
        with pytest.raises(ValueError, match="group scales .* take the transposed GEMM"):
            ops.osc_gemm(a, sa, g32, xo, torch.bfloat16, cfg)
    xo, a, sa = ops.split_quantize(torch.ones(1, k_in, device=DEV), g32.keep, g32.outlier_idx, "int4", MODE_F16,
                                   g32.k_main, group=32)  # the transposed GEMM's operands, not the expansion's
    with pytest.raises(ValueError, match="fold_groups=True"):
        ops.osc_gemm(a, sa, g32, xo, torch.bfloat16, ops.GemmConfig(64, 64, 1, False, 4, 2, bk=64, expand=True))
    with pytest.raises(ValueError, match="fold_groups folds INT4 group scales into FP16 operands"):
        ops.split_quantize(torch.ones(1, k_in, device=DEV), g32.keep, g32.outlier_idx, "int4", MODE_F8, g32.k_main,
                           group=32, fold_groups=True)
    with pytest.raises(ValueError, match="decode to FP16"):
        ops.decode_weights(g32, True)


def test_decode_and_prefill_regimes_are_chosen_in_one_place():
    frag = [ops.gemm_config(m, 4096, 4096) for m in (1, 8, 9)]  # MXFP4 decode: the fragment GEMM up to 8 tokens
    assert frag[0].frag and frag[1].frag and frag[0].bm == 8 and not frag[2].frag
    assert ops.frag_config(16, 4096, 4096).bm == 16  # two token groups, for callers that ask
    # the epilogue's L2 prefetch except on the long layers (kernel_ab.py on the H200)
    assert [ops.frag_config(1, n, k).prefetch for n, k in ((4096, 4096), (5120, 2048), (24576, 4096), (4096, 12288))] \
        == [True, True, False, False]
    assert ops.gemm_config(1, 5120, 2048).frag and not ops.gemm_config(8, 5120, 2048).frag  # the measured exception
    assert ops.gemm_config(1, 4096, 4096).split_k > ops.gemm_config(1, 24576, 4096).split_k  # fewer tiles, more splits
    assert not ops.gemm_config(17, 4096, 4096).frag and not ops.gemm_config(1, 4096, 4096, "int4").frag
    for fmt in ("mxfp4", "int4"):  # few tokens: the transposed GEMM on 4-bit weights
        assert ops.gemm_config(1, 4096, 4096, fmt, frag=False).swap and ops.gemm_config(64, 4096, 4096, fmt).swap
        assert not ops.gemm_config(65, 6144, 4096, fmt, wgmma=False).swap
        assert ops.gemm_config(65, 6144, 4096, fmt, wgmma=False).op_f8
    # INT4 with group scales up to 64 tokens (without the wgmma GEMM, which takes some of these on Hopper: below): the
    # transposed GEMM (its partial products take the scales), the per-row INT4 tiles up to 16 tokens, 64 x 64 tiles on
    # 8 warps for groups of 32 (four partial products live at once)
    grouped = {(m, g): ops.gemm_config(m, 4096, 4096, "int4", group=g, wgmma=False) for m in (1, 16, 64, 4096)
               for g in (32, 128)}
    assert all(c.swap and not (c.expand or c.fold or c.frag or c.wgmma or c.cublas)
               for (m, g), c in grouped.items() if m <= 64)
    assert grouped[1, 128] == ops.gemm_config(1, 4096, 4096, "int4") == grouped[1, 32]
    assert [(grouped[64, g].bm, grouped[64, g].bn, grouped[64, g].warps) for g in (32, 128)] \
        == [(64, 64, 8), (64, 64, 4)]
    # ... and above 64 tokens the prefill path: FP16 weights and activations with the group scales folded in
    # (on Hopper up to 512 tokens, 256 where N >= 16384, cuBLAS's FP16 GEMM, elsewhere ours, 64 columns a step)
    assert all(ops.gemm_config(m, n, 4096, "int4", group=g, wgmma=False) == ops.CUBLAS_F16_CONFIG for g in (32, 128)
               for m, n in ((65, 4096), (512, 4096), (256, 24576)))
    plain = [ops.gemm_config(m, n, 4096, "int4", group=g, cublas=c, wgmma=False) for g in (32, 128)
             for m, n, c in ((4096, 4096, True), (513, 4096, True), (257, 24576, True), (65, 4096, False))]
    assert all(c.expand and not c.op_f8 and c.bk == 64 for c in plain)
    # without the wgmma GEMM: 17-64 tokens, and up to 128 (K >= N) or 256 (N >= 16384 or K >= 3N): e4m3 with the
    # block factors folded in
    mid = [ops.gemm_config(m, n, k, wgmma=False) for m, n, k in ((17, 4096, 4096), (64, 5120, 2048), (128, 4096, 4096),
                                                                  (256, 4096, 12288), (256, 24576, 4096))]
    assert all(c.fold and c.swap and c.op_f8 for c in mid)
    assert [c.split_k for c in mid] == [4, 1, 1, 4, 1]  # toward 256 programs where few tiles share a long K
    assert [c.bm for c in mid] == [64, 64, 64, 128, 128]  # 128 x 128 tiles for the long layers past 64 tokens
    few = [ops.gemm_config(m, n, k) for m, n, k in ((9, 4096, 4096), (16, 2048, 4096), (16, 6144, 4096))]
    assert few[0].fold and few[0].bm == 16 and few[1].split_k == 8 and not few[2].fold  # 9-16 tokens where K >= N
    assert all(ops.gemm_config(m, n, k, wgmma=False).expand for m, n, k in ((128, 6144, 4096), (256, 4096, 4096),
                                                                            (512, 24576, 4096)))
    # 64 x 128 tiles up to 256 tokens, 128 x 256 above; half as many weight rows where those would fill half the SMs
    # or fewer
    assert [(c.bm, c.bn) for c in (ops.gemm_config(m, n, 4096) for m, n in (
        (256, 2048), (256, 4096), (512, 4096), (512, 6144), (1024, 4096)))] \
        == [(64, 64), (64, 128), (128, 128), (128, 256), (128, 256)]
    # MXFP4 on Hopper: the wgmma GEMM where it measured faster (ops._wgmma_wins)
    cases = ((16, 24576, 4096), (16, 4096, 4096), (64, 4096, 4096), (64, 2048, 4096), (256, 6144, 4096),
             (256, 4096, 4096), (1024, 24576, 4096), (1024, 6144, 4096), (4096, 24576, 4096), (1024, 2048, 4096),
             (256, 2048, 4096), (1024, 2048, 2048))
    wg = [ops.gemm_config(m, n, k) for m, n, k in cases]
    assert [c.wgmma for c in wg] == [True, False, True, False, True, False, True, False, False, True, False, False]
    assert all(c.mode == MODE_F8 and c.bn == 16 * c.warps for c in wg if c.wgmma)
    # 64-row tiles take the unpacked weights from registers, the widest layers' 128 x 256 tiles from shared memory
    assert [c.reg_a for c in wg if c.wgmma] == [True, True, True, False, True]
    # every GEMM that waits for split-quantize is launched overlapped with it: from its start, but from when its stores
    # are issued where its rows are long (K > 4096: its registers leave no room beside it), but for the wgmma GEMM
    # above 64 tokens
    shapes = [(m, n, k, "mxfp4", False) for m, n, k in ((17, 4096, 4096), (256, 4096, 12288), (2048, 4096, 4096))] \
        + [(m, n, k, "mxfp4", True) for m, n, k in cases] \
        + [(1, 4096, 4096, "mxfp4", True), (16, 4096, 4096, "int4", True), (16, 4096, 12288, "mxfp4", True),
           (64, 4096, 12288, "int4", True), (128, 4096, 4096, "mxfp4", True)]
    overlapped = [ops.gemm_config(m, n, k, fmt, wgmma=w) for m, n, k, fmt, w in shapes]
    assert all(c.pdl for c in overlapped)
    late = [c.path in ("t", "fold", "wgmma") and k > 4096 and not (c.wgmma and m > 64)
            for c, (m, _, k, _, _) in zip(overlapped, shapes)]
    assert [c.pdl_late for c in overlapped] == late and sum(late) == 3
    assert overlapped[-1].fold and not overlapped[-1].pdl_late  # the folded GEMM at 128 tokens, K = 4096: early
    assert (wg[6].bm, wg[6].bn, wg[2].bm, wg[2].bn, wg[0].bm) == (256, 128, 64, 64, 16)
    # the path's name in the benchmark tables
    assert [ops.gemm_config(m, 4096, 4096, wgmma=w).path for m, w in ((1, True), (64, True), (64, False), (4096, True))] \
        == ["frag", "wgmma", "fold", "expand"] and ops.gemm_config(16, 4096, 4096, "int4").path == "t"
    # ... with its tile (weight rows × tokens) and split-K
    assert ops.frag_config(1, 4096, 4096, warps=2, split_k=4).label == "frag 32×8 /4"
    assert ops.wgmma_config(256, 4096, 4096, bn=64, split_k=1).label == "wgmma 64×128" and ops.CUBLAS_CONFIG.label == "cublas"
    assert not ops.gemm_config(64, 4096, 4096, "int4").wgmma and not ops.gemm_config(64, 4096, 4096, wgmma=False).wgmma
    assert not ops.gemm_config(64, 4096, 4096, "int4").fold  # MXFP4 only: int4 keeps the FP16 transposed GEMM
    assert ops.gemm_config(1, 4096, 4096, frag=False).split_k > 1  # 128 weight tiles alone cannot fill 132 SMs
    wide = ops.gemm_config(1, 24576, 4096, frag=False)  # the widest layers: e4m3 operands, A padded to M only
    assert wide.op_f8 and wide.bm == 1 and ops.gemm_config(16, 24576, 4096, frag=False).bm == 16
    assert ops.gemm_config(8, 4096, 12288, frag=False).bm == 16 and not ops.gemm_config(8, 4096, 12288, frag=False).op_f8
    assert not ops.gemm_config(1, 4096, 4096, "fp8").swap  # FP8 weights: the plain GEMM
    # ... but cuBLAS's FP8 GEMM at 65-512 tokens where N >= 4096 (a multiple of 16), where it measured faster
    cub = [ops.gemm_config(m, n, 4096, "fp8") for m, n in ((65, 4096), (512, 24576), (64, 4096), (513, 4096),
                                                            (256, 2048), (256, 4104))]
    assert [c.cublas for c in cub] == [True, True, False, False, False, False] and cub[0].path == "cublas"
    assert not ops.gemm_config(256, 4096, 4096, "fp8", cublas=False).cublas
    assert not any(ops.gemm_config(256, 4096, 4096, fmt).cublas for fmt in ("mxfp4", "int4"))
    assert ops.gemm_config(4096, 4096, 4096).expand and not ops.gemm_config(4096, 4096, 4096).swap
    # NVFP4: FP16 operands at every M (no e4m3 form): the transposed GEMM up to 64 tokens, then the weights expanded
    # to FP16 and the plain GEMM, 64 columns a step
    # to FP16 and, on Hopper up to 512 tokens (256 where N >= 16384), cuBLAS's FP16 GEMM, else our plain GEMM
    for cublas in (True, False):
        nv = [ops.gemm_config(m, n, 4096, "nvfp4", cublas=cublas, wgmma=False) for m in (1, 16, 64, 65, 256, 257, 4096)
              for n in (4096, 24576)]
        assert not any(c.op_f8 or c.fold or c.frag or c.wgmma for c in nv)
        f16 = "cublas" if cublas else "expand"
        assert [c.path for c in nv] == ["t"] * 6 + [f16] * 5 + ["expand"] * 3
        assert all(c.bk == 64 for c in nv if c.expand)
    # ... and on Hopper the wgmma GEMM on FP16 operands where it measured faster: up to 64 tokens (INT4 with group
    # scales up to 16 only on the long layers, N >= 16384 or K >= 3N), 65-128 where N and K are both >= 4096,
    # 129-256 on the long layers; 128 weight rows a tile up to 16 tokens but on the widest layers, and above 128
    cases = [(1, 4096, 4096), (16, 24576, 4096), (16, 5120, 2048), (17, 5120, 2048), (64, 2048, 4096),
             (65, 4096, 4096), (128, 5120, 2048), (129, 4096, 4096), (256, 24576, 4096), (256, 4096, 12288),
             (257, 24576, 4096)]
    for fmt, group, wins in (("nvfp4", None, [True] * 6 + [False, False, True, True, False]),
                             ("int4", 128, [False, True, False] + [True] * 3 + [False, False, True, True, False])):
        cfgs = [ops.gemm_config(m, n, k, fmt, cublas=True, wgmma=True, group=group or 0) for m, n, k in cases]
        assert [c.wgmma for c in cfgs] == wins
        assert all(c.reg_a and not c.op_f8 and c.mode == MODE_F16 and c.bm <= 128
                   for c in cfgs if c.wgmma)
        assert [c.bn for c in cfgs if c.wgmma] == [128 if (m <= 16 and n < 16384) or m > 128 else 64
                                                   for c, (m, n, _) in zip(cfgs, cases) if c.wgmma]
        assert [c.path for c in cfgs[6:8] + cfgs[10:]] == ["cublas", "cublas", "expand"]
    assert ops.gemm_config(1, 4096, 4096, "int4", wgmma=True, group=128).path == "t"


def test_fp8_kernel_codes_are_the_canonical_bytes_where_no_padding_is_needed():
    """FP8 layers keep one copy of their e4m3 bytes: the kernels read the checkpoint's own tensor where K is a
    multiple of the kernels' 128 columns, and a padded copy only where it is not."""
    for k_in, shared in ((256, True), (160, False)):
        layer, idx = make_layer(k_in, 40, "fp8", 16)
        kw = layout.kernel_weights(layer)
        assert (kw.codes.untyped_storage().data_ptr() == layer.qweight.untyped_storage().data_ptr()) == shared
        assert torch.equal(kw.codes[:, :layer.main_columns].view(torch.uint8), layer.qweight)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4", "fp8"])
def test_the_gpu_holds_one_copy_of_the_codes(fmt):
    """Once the kernels have their own layout of a 4-bit layer's codes on the GPU, the canonical codes move to host
    memory (OSCLinear.park_codes): outputs, the reference path, saving, stacking siblings and model.to() still work
    from there. FP8 codes are the kernels' own (no padding at K = 4096) and stay."""
    from oscquant import siblings

    layer, idx = make_layer(4096, 1000, fmt, 64)
    other, _ = make_layer(4096, 600, fmt, 64)
    other.outlier_idx.copy_(layer.outlier_idx)
    x = activations(7, 4096, idx)
    ref = reference_forward(layer, x)
    codes_bytes = layer.qweight.numel()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    kw = ops.layer_weights(layer)
    assert layer.qweight.device.type == ("cuda" if fmt == "fp8" else "cpu")
    assert layer.compute_device.type == "cuda" and kw.codes.is_cuda
    if fmt != "fp8":  # the canonical codes left the GPU: it holds the kernels' layout in their place
        layouts = (kw.codes, kw.rel_exp) + ((kw.frag.words, kw.frag.exps) if kw.frag else ())
        kernel_bytes = sum(t.numel() * t.element_size() for t in layouts if t is not None)
        assert torch.cuda.memory_allocated() - before <= kernel_bytes - codes_bytes // 2
    assert rel_err(y, ref) <= 1e-2
    layer._cache.pop(("w_main", layer.compute_device), None)
    assert torch.equal(reference_forward(layer, x), ref)  # rebuilt from the parked codes
    fresh = copy.deepcopy(layer).to(DEV)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    other(x)  # parks its codes too
    both = siblings.stack([layer, other])
    assert rel_err(both(x), torch.cat([layer(x), other(x)], dim=-1)) <= 1e-3
    layer.to(DEV)  # the codes come back with the other buffers; the next kernel build parks them again
    assert layer.qweight.is_cuda and torch.equal(layer(x), y)
    assert layer.qweight.device.type == ("cuda" if fmt == "fp8" else "cpu")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_and_torch_compile_capture():
    layer, idx = make_layer(4160, 1000, "mxfp4", 64)
    x = activations(16, 4160, idx)
    ref = layer(x)
    g = torch.cuda.CUDAGraph()
    static_x = x.clone()
    layer(static_x)  # warm up (compiles the kernels) outside the capture
    with torch.cuda.graph(g):
        static_y = layer(static_x)
    static_x.copy_(x)
    g.replay()
    assert torch.equal(static_y, ref)
    compiled = torch.compile(lambda t: layer(t), fullgraph=False)
    assert rel_err(compiled(x), ref) <= 1e-3


def test_kernels_compile_for_hopper_without_spills():
    """Compiles for sm_90 with Triton's own ptxas, no GPU needed: the PTX paths (inline asm,
    wgmma) that the interpreter cannot run at least build, and none spills registers.
    A separate process, since this one may hold Triton in interpreter mode."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "oscquant.kernels.aot"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("gemm") == 31 and r.stdout.count("frag gemm") == 2 and "split" in r.stdout
    # INT4 with group scales: the transposed GEMM's tiles, split-quantize for it and for the FP16 expansion, the latter
    assert r.stdout.count("int4 groups of") == 10
    # kernels/moe.py: split-quantize, 4-bit and FP8 weights one pair a program, both in tiles of pairs (INT4 with
    # group scales too), and the plain FP8 GEMM on e4m3 experts in tiles of 64 and 128 pairs
    assert r.stdout.count("grouped MoE experts") == 9 and r.stdout.count("-pair tiles") == 6
    # the Gluon TMA + wgmma GEMM: MXFP4 on e4m3 (through shared memory, or from registers), NVFP4 and INT4 with
    # group scales on FP16
    assert r.stdout.count("folded") == 4 and r.stdout.count("wgmma gemm") == 5
    # ptxas keeps the wgmma GEMM's wgmmas in flight (it serializes them where other instructions write a wgmma's
    # register operands meanwhile: aot.wgmma_serialized)
    blocks = r.stdout.split("\nwgmma gemm")[1:]
    assert len(blocks) == 5 and all("\n  wgmma: not serialized" in b.split("\ngemm")[0] for b in blocks)
    # split-quantize, the fragment GEMM and the wgmma GEMM launch overlapped (overlap.py): no memory access
    # before their wait but the wgmma GEMM's first code tiles (TMA)
    assert r.stdout.count("PDL order: ok") == 31
    assert r.stdout.count("after the RMSNorm it runs") == 2  # norms.py: both roundings, 4 rows of 4096 a program
    assert r.stdout.count("of a gated MLP's") == 2  # gated.py: SiLU and GELU, 8B down's 12288 channels a row


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_split_quantize_launched_overlapped_asks_for_the_largest_shared_memory_carveout():
    """Launched so that the GEMM after it may start early, split-quantize's compiled kernel must carry the driver
    preference for the largest shared-memory carve-out (overlap.py), read back from the driver."""
    import ctypes

    from oscquant.kernels import triton_osc

    layer, idx = make_layer(1024, 64, "mxfp4", 16)
    kw = ops.layer_weights(layer)
    x = activations(3, 1024, idx)
    ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main, pdl=True)  # a GEMM starts beside it
    # the prefill path's weight expansion beside it needs no shared memory: its own kernel, the driver's carve-out
    ops.split_quantize(x, kw.keep, kw.outlier_idx, "mxfp4", MODE_F8, kw.k_main, pdl=True, shared_beside=False)
    cuda, value = ctypes.CDLL("libcuda.so.1"), ctypes.c_int(-2)
    kernels = [k for cache in triton_osc.split_quantize_kernel.device_caches.values() for k in cache[0].values()]
    at = (triton_osc.split_quantize_kernel.arg_names.index("SHARED_BESIDE"),)
    prefs = {True: set(), False: set()}
    for k in kernels:  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
        assert cuda.cuFuncGetAttribute(ctypes.byref(value), 9, ctypes.c_void_p(k.function)) == 0
        prefs[bool(k.src.constants.get(at, False))].add(value.value)
    assert prefs[True] == {100} and 100 not in prefs[False], prefs


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 8, 16, 128, 2048])
@pytest.mark.parametrize("late", [False, True])
def test_overlapped_launches_read_what_the_kernel_before_wrote(m, late, monkeypatch):
    """Two layers in a row inside a CUDA graph, the first fed by a torch kernel: with programmatic
    dependent launch the GEMM (the fragment GEMM at M <= 8, the folded transposed GEMM at 16, the wgmma GEMM
    at 128), or the weight expansion before the FP8 GEMM (2048), starts while split-quantize runs, from its
    start or (late) from when its stores are issued, so reading their operands too early, or the FP8 GEMM
    starting before split-quantize ends, would show as stale or mixed activations. Every config is launched
    overlapped here, whatever gemm_config ships. Replayed with new inputs, the results must equal the
    launches without overlap bit for bit, and the reference."""
    n_a, n_b = (1024, 3000) if m == 128 else (2016, 1000)
    a, idx = make_layer(4160, n_a, "mxfp4", 32)
    b, _ = make_layer(n_a, n_b, "mxfp4", 16, seed=2)
    shipped = ops.gemm_config
    monkeypatch.setattr(ops, "gemm_config", lambda *args, **kw: dataclasses.replace(shipped(*args, **kw), pdl=True,
                                                                                       pdl_late=late))
    cfgs = [ops.gemm_config(m, lay.out_features, ops.layer_weights(lay).k_main) for lay in (a, b)]
    # the second layer (K = 2016) at 8 tokens takes the transposed GEMM (the fragment GEMM wants K > 2048 there)
    assert [c.path for c in cfgs] == {1: ["frag"] * 2, 8: ["frag", "t"], 16: ["fold"] * 2, 128: ["wgmma"] * 2,
                                      2048: ["expand"] * 2}[m]
    x = activations(m, 4160, idx)

    def chain(t, scale):
        mid = a(t * scale)
        return mid, b(mid)

    results = {}
    for pdl in (False, True):
        monkeypatch.setattr(ops, "PDL", pdl)
        static_x, scale = x.clone(), torch.ones((), device=DEV, dtype=torch.bfloat16)
        chain(static_x, scale)  # compiles outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = chain(static_x, scale)
        outs = []
        for i in range(3):
            static_x.copy_(activations(m, 4160, idx, seed=10 + i))
            scale.fill_(0.5 + i)
            g.replay()
            outs.append([t.clone() for t in static_out])
        results[pdl] = outs
    with torch.no_grad():
        for i, (off, on) in enumerate(zip(results[False], results[True])):
            assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
            assert rel_err(on[0], reference_forward(a, activations(m, 4160, idx, seed=10 + i) * (0.5 + i))) <= 1e-2
            assert rel_err(on[1], reference_forward(b, on[0])) <= 1e-2


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_a_model_whose_norms_and_mlp_activations_run_in_split_quantize_computes_what_it_did(arch, monkeypatch):
    """fuse_norms, fuse_gated_mlps and fuse_head_norms on a tiny model, on the kernels (the interpreter on the CPU):
    the logits are those of the model before, whose norms and activations ran as modules (bit for bit in the
    interpreter, whose sums run in one order), with Qwen3's norm rounding (kind 1) and SiLU, Gemma's (kind 2, factors
    1 + weight) and GELU."""
    from tiny import batches, tiny_model

    from oscquant import OSCConfig, fuse_gated_mlps, fuse_head_norms, fuse_norms, fuse_siblings, quantize

    model = tiny_model(arch).to(DEV, torch.bfloat16)
    quantize(model, OSCConfig.osc("mxfp4", 16), [b.to(DEV) for b in batches()], progress=False)
    fuse_siblings(model)
    fused = copy.deepcopy(model)
    assert len(fuse_norms(fused)) == 2 * model.config.num_hidden_layers
    assert len(fuse_gated_mlps(fused)) == model.config.num_hidden_layers
    assert len(fuse_head_norms(fused)) == model.config.num_hidden_layers
    layers = [m for m in fused.modules() if isinstance(m, OSCLinear)]
    assert {m.output_norm.kind for m in layers if m.output_norm is not None} == {1 if arch == "qwen3" else 2}
    assert {m.input_norm.kind for m in layers if m.input_norm is not None} == {1 if arch == "qwen3" else 2}
    assert {m.input_gate.kind for m in layers if m.input_gate is not None} == {1 if arch == "qwen3" else 2}
    ids = batches(1, 12, seed=7)[0].to(DEV)
    monkeypatch.setenv("OSCQUANT_BACKEND", "triton")  # the interpreter on the CPU
    with torch.no_grad():
        before, after = model(ids).logits.float(), fused(ids).logits.float()
    assert torch.isfinite(after).all()
    assert torch.equal(after, before) if not CUDA else rel_err(after, before) <= 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("fmt,group", [("mxfp4", None), ("int4", 32)])
def test_whole_model_on_gpu_matches_the_reference(arch, fmt, group, monkeypatch):
    from tiny import batches, tiny_model

    from oscquant import OSCConfig, quantize

    model = tiny_model(arch).to(DEV, torch.bfloat16)
    quantize(model, OSCConfig.osc(fmt, 16, group_size=group), [b.to(DEV) for b in batches()], progress=False)
    ids = batches(2, 40, seed=7)[0].to(DEV)
    with torch.no_grad():
        fast = model(ids).logits.float()
        monkeypatch.setenv("OSCQUANT_BACKEND", "reference")
        ref = model(ids).logits.float()
    assert torch.isfinite(fast).all() and rel_err(fast, ref) <= 2e-2
