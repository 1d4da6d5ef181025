import pytest
import torch

from oscquant import formats as F


def rand(rows, k, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    if outliers:
        x[:, 3] *= 50
    return x


def test_pack_roundtrip_is_bit_exact():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (37, 64), generator=g, dtype=torch.uint8)
    packed = F.pack_nibbles(codes)
    assert packed.shape == (37, 32) and packed.dtype == torch.uint8
    assert torch.equal(F.unpack_nibbles(packed), codes)
    # and every byte value survives unpack -> pack
    allbytes = torch.arange(256, dtype=torch.uint8).reshape(1, -1)
    assert torch.equal(F.pack_nibbles(F.unpack_nibbles(allbytes)), allbytes)
    # low nibble holds the even element
    assert F.pack_nibbles(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="odd"):
        F.pack_nibbles(torch.zeros(1, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        F.pack_nibbles(torch.full((1, 2), 16, dtype=torch.uint8))


def test_e2m1_grid_values_encode_exactly_and_ties_go_to_even():
    vals = F.E2M1_VALUES
    both = torch.cat([vals, -vals[1:]])
    assert torch.equal(F.e2m1_decode(F.e2m1_encode(both)), both)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # the neighbour with an even code
    assert torch.equal(F.e2m1_decode(F.e2m1_encode(mids)), expect)
    assert F.e2m1_decode(F.e2m1_encode(torch.tensor([100.0, -7.0]))).tolist() == [6.0, -6.0]
    # never a negative zero code
    assert F.e2m1_encode(torch.tensor([-0.1])).item() == 0


def test_e2m1_rounds_to_nearest():
    v = torch.linspace(-6, 6, 2001)
    got = F.e2m1_decode(F.e2m1_encode(v))
    grid = torch.cat([F.E2M1_VALUES, -F.E2M1_VALUES])
    best = (v[:, None] - grid[None]).abs().min(1).values
    assert torch.allclose((got - v).abs(), best, atol=1e-6)


@pytest.mark.parametrize("fmt,kw", [("mxfp4", {}), ("nvfp4", {}), ("int4", {}), ("int4", {"group_size": 32}),
                                    ("fp8", {})])
def test_quantize_roundtrip_error_and_idempotence(fmt, kw):
    x = rand(8, 96, outliers=False)
    q = F.quantize(x, fmt, **kw)
    y = F.dequantize(q)
    assert y.shape == x.shape and y.dtype == torch.float32
    rel = ((y - x).norm() / x.norm()).item()
    bound = {"fp8": 0.05, "int4": 0.2, "mxfp4": 0.2, "nvfp4": 0.15}[fmt]
    assert rel < bound, rel
    # dequantized values lie on the grid: quantizing them again changes nothing
    assert torch.equal(F.dequantize(F.quantize(y, fmt, **kw)), y)


def test_mxfp4_scales_are_powers_of_two_and_blocks_independent():
    x = rand(4, 64)
    q = F.quantize_mxfp4(x)
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (4, 2)
    y = F.dequantize(q)
    # the outlier in channel 3 only affects the first 32-column block
    x2 = x.clone()
    x2[:, 3] = 0
    y2 = F.dequantize(F.quantize_mxfp4(x2))
    assert torch.equal(y[:, 32:], y2[:, 32:])
    assert not torch.equal(y[:, 4:32], y2[:, 4:32])
    # the block maximum is never clipped
    blocks = x.reshape(4, 2, 32).abs().amax(-1)
    scale = torch.exp2(q.scales.float() - 127)
    assert (blocks / scale <= 6).all() and (blocks / scale > 3).all()


def test_mxfp4_weight_scale_search_takes_the_better_of_two_scales():
    """search (weights): each block's scale is the max rule's or the one below it, whichever leaves the smaller
    squared error, so no block gets worse and the clip of the lower scale is taken only where it pays."""
    # a block where the lower scale wins: 6.1 -> 6 either way, 1.5 exact only at scale 1 (0.75 -> 1 at scale 2)
    blk = torch.tensor([6.1] + [1.5] * 31)
    plain, searched = F.quantize_mxfp4(blk[None]), F.quantize_mxfp4(blk[None], search=True)
    assert plain.scales.tolist() == [[128]] and searched.scales.tolist() == [[127]]
    assert torch.equal(F.dequantize(searched), torch.tensor([[6.0] + [1.5] * 31]))
    x = rand(64, 256) * torch.logspace(-3, 3, 256)  # blocks of every magnitude
    p, q = F.dequantize(F.quantize_mxfp4(x)), F.dequantize(F.quantize_mxfp4(x, search=True))
    per_block = lambda y: (y - x).square().reshape(64, 8, 32).sum(-1)  # noqa: E731
    assert (per_block(q) <= per_block(p)).all() and per_block(q).sum() < 0.97 * per_block(p).sum()
    d = F.quantize_mxfp4(x, search=True).scales.int() - F.quantize_mxfp4(x).scales.int()
    assert set(d.unique().tolist()) == {-1, 0}  # the max rule's scale, or the one below it
    with pytest.raises(ValueError, match="weights only, not fp8"):
        F.quantize(x, "fp8", search=True)


@pytest.mark.parametrize("group", [None, 32])
def test_int4_weight_scale_search_clips_where_it_pays(group):
    """search (weights): each row's or group's scale is amax / 7 times the clip of INT4_CLIPS with the least squared
    error, so no row or group gets worse, the total drops, and a group of zeros keeps scale 1."""
    x = rand(16, 128) * torch.logspace(-1, 1, 128)
    x[3, :32] = 0
    p, q = F.quantize_int4(x, group), F.quantize_int4(x, group, search=True)
    g = group or 128
    per = lambda t: (F.dequantize(t) - x).square().reshape(16, -1, g).sum(-1)  # noqa: E731
    assert (per(q) <= per(p)).all() and per(q).sum() < 0.9 * per(p).sum()
    amax = x.reshape(16, -1, g).abs().amax(-1)
    clip = q.scales.reshape(amax.shape) * 7 / torch.where(amax > 0, amax, 7.0)
    assert all(min(abs(c - v) for v in F.INT4_CLIPS) < 1e-5 for c in clip.flatten().tolist())
    assert (clip < 0.999).any() and (F.element_values(q).abs() <= 8).all()
    if group:
        assert q.scales[3, 0] == 1 and (F.element_values(q)[3, :32] == 0).all()


def test_nvfp4_weight_scale_search_keeps_e4m3_scales_and_lowers_the_error():
    """search (weights): each 16-column block's E4M3 scale is amax / 6 times one of INT4_CLIPS, rounded to E4M3,
    whichever leaves the least squared error; no block gets worse, the global scale stays the max rule's."""
    x = rand(32, 256) * torch.logspace(-2, 2, 256)
    p, q = F.quantize_nvfp4(x), F.quantize_nvfp4(x, search=True)
    assert q.scales.dtype == torch.float8_e4m3fn and torch.equal(q.global_scale, p.global_scale)
    per = lambda t: (F.dequantize(t) - x).square().reshape(32, 16, 16).sum(-1)  # noqa: E731
    assert (per(q) <= per(p)).all() and per(q).sum() < 0.97 * per(p).sum()
    assert (q.scales.float() <= p.scales.float()).all() and (q.scales.float() < p.scales.float()).any()


@pytest.mark.parametrize("fmt,group", [("mxfp4", None), ("nvfp4", None), ("int4", None), ("int4", 32)])
def test_scale_search_weighs_each_columns_error_by_its_importance(fmt, group):
    """importance (a channel's mean square activation): the search minimizes sum_j h_j (w_j - q_j)^2 instead of the
    plain sum, so the weighted error can only drop against the unweighted search's choice, block by block; the
    unweighted search is importance = 1; a bad importance raises."""
    x = rand(32, 128) * torch.logspace(-1, 1, 128)
    h = torch.rand(128, generator=torch.Generator().manual_seed(3)) ** 6 * 1e3  # a few loud channels
    plain, weighted = F.quantize(x, fmt, group, search=True), F.quantize(x, fmt, group, search=True, importance=h)
    block = F.block_size(fmt, group) or 128
    per = lambda t: ((F.dequantize(t) - x).square() * h).reshape(32, -1, block).sum(-1)  # noqa: E731
    assert (per(weighted) <= per(plain) * (1 + 1e-6)).all() and per(weighted).sum() < 0.99 * per(plain).sum()
    ones = F.quantize(x, fmt, group, search=True, importance=torch.ones(128))
    assert torch.equal(ones.codes, plain.codes) and torch.equal(ones.scales.float(), plain.scales.float())
    with pytest.raises(ValueError, match="one weight per column"):
        F.quantize(x, fmt, group, search=True, importance=torch.ones(64))
    with pytest.raises(ValueError, match="non-negative"):
        F.quantize(x, fmt, group, search=True, importance=-h)
    with pytest.raises(ValueError, match="pass search=True"):
        F.quantize(x, fmt, group, importance=h)


def test_nvfp4_global_scale_per_tensor_and_per_row():
    x = rand(4, 32)
    qt = F.quantize_nvfp4(x)
    qr = F.quantize_nvfp4(x, per_row_global=True)
    assert qt.global_scale.shape == (1, 1) and qr.global_scale.shape == (4, 1)
    assert qt.scales.dtype == torch.float8_e4m3fn and qt.scales.shape == (4, 2)
    for q in (qt, qr):
        assert ((F.dequantize(q) - x).norm() / x.norm()) < 0.15


def test_int4_codes_are_symmetric_range():
    x = rand(3, 32)
    q = F.quantize_int4(x)
    vals = F.element_values(q)
    assert vals.min() >= -8 and vals.max() <= 7
    assert (vals.abs().amax(1) == 7).all()  # the row max maps to +-7
    assert q.scales.shape == (3, 1)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of mxfp4's block of 32"):
        F.quantize(torch.randn(2, 48), "mxfp4")
    with pytest.raises(ValueError, match="multiple of nvfp4's block of 16"):
        F.quantize(torch.randn(2, 40), "nvfp4")
    with pytest.raises(ValueError, match="multiple of int4's block of 32"):
        F.quantize(torch.randn(2, 48), "int4", group_size=32)
    with pytest.raises(ValueError, match="unknown number format"):
        F.quantize(torch.randn(2, 32), "fp3")
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.quantize(torch.tensor([[1.0, float("nan")] * 16]), "mxfp4")
    with pytest.raises(ValueError, match="2-D"):
        F.quantize(torch.randn(32), "fp8")
    with pytest.raises(ValueError, match="group_size applies to int4"):
        F.quantize(torch.randn(2, 32), "mxfp4", group_size=32)


def test_zero_rows_quantize_to_zero():
    for fmt in F.FORMATS:
        assert torch.equal(F.fake_quantize(torch.zeros(2, 32), fmt), torch.zeros(2, 32))


def test_bits_per_element():
    assert F.bits_per_element("mxfp4") == 4.25
    assert F.bits_per_element("nvfp4") == 4.5
    assert F.bits_per_element("int4", 128) == 4.25


def test_e2m1_round_is_encode_then_decode():
    """The arithmetic rounding (GPTQ's, the scale search's) lands where the codes do: every multiple of 1/4096 in
    [-16, 16], each grid midpoint and its float32 neighbours, tiny and huge values; zero keeps no sign."""
    steps = torch.arange(-2 ** 16, 2 ** 16 + 1, dtype=torch.float32) / 4096
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 2.0, 4.0, 6.0])
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(9.0))])
    v = torch.cat([steps, near, -near, torch.tensor([1e30, -1e30, 1e-30, -1e-30, 0.0, -0.0])])
    want = F.e2m1_decode(F.e2m1_encode(v))
    got = F.e2m1_round(v)
    assert torch.equal(got, want) and not torch.signbit(got[got == 0]).any()
