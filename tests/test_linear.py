import pytest
import torch
from torch import nn

from oscquant import backends
from oscquant.config import LayerScheme
from oscquant.formats import fake_quantize
from oscquant.linear import OSCLinear


def make(k_in=128, n=48, bias=True, seed=0, planted=(3, 64, 65, 100)):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k_in, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k_in, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(2, 11, k_in, generator=g)
    x[..., list(planted)] *= 60
    return lin, x


def explicit(lin: nn.Linear, x: torch.Tensor, scheme: LayerScheme, idx: list[int]) -> torch.Tensor:
    """The OSC math written out with nothing from OSCLinear: the main path is every channel in
    its own order, the outlier channels zeroed in x and W."""
    k_in = lin.in_features
    x2 = x.reshape(-1, k_in)
    xm = x2.clone()
    wm = lin.weight.detach().clone()
    xm[:, idx] = 0
    wm[:, idx] = 0
    kw = {"group_size": scheme.group_size} if scheme.group_size else {}
    w_kw = dict(kw, search=True) if scheme.searches_scales else kw  # MXFP4 weights: block scales by squared error
    y = fake_quantize(xm, scheme.format, per_row_global=True, **kw) @ fake_quantize(wm, scheme.format, **w_kw).T
    if idx:
        xo = x2[:, idx].to(torch.bfloat16).float()
        wo = lin.weight[:, idx].detach().to(torch.bfloat16).float()
        y = y + xo @ wo.T
    if lin.bias is not None:
        y = y + lin.bias.detach()
    return y.reshape(*x.shape[:-1], -1)


SCHEMES = [LayerScheme("mxfp4", 16), LayerScheme("mxfp4", 32), LayerScheme("nvfp4", 16), LayerScheme("int4", 16),
           LayerScheme("int4", 16, group_size=32), LayerScheme("fp8"), LayerScheme("mxfp4", 0), LayerScheme("fp8", 16)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.format}-k{s.outliers}-g{s.group_size}")
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_explicit_math(scheme, bias):
    lin, x = make(bias=bias)
    k = scheme.outliers
    idx = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(1))[:k].tolist())
    layer = OSCLinear.from_linear(lin, scheme, torch.tensor(idx))
    y = layer(x)
    ref = explicit(lin, x, scheme, idx)
    assert y.shape == (2, 11, 48) and y.dtype == x.dtype
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4), (y - ref).abs().max()


def test_mxfp4_weights_search_their_block_scales_unless_told_not_to():
    """MXFP4 weights take each block's scale by squared error by default (LayerScheme.scale_search), which lowers
    the layer's weight error; scale_search=False keeps the max rule; INT4 and NVFP4 search too, FP8 refuses it;
    calibration's mean squares (importance) weigh the search, padded and without the outlier channels' say."""
    from oscquant import formats
    from oscquant.config import OSCConfig

    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    nn.init.normal_(lin.weight)  # bell-shaped, as trained weights are (uniform ones gain little)
    idx = torch.tensor([3, 70, 100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212])
    w = lin.weight.detach().clone()
    w[:, idx] = 0
    err = {}
    for flag in (None, False):
        layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16, scale_search=flag), idx)
        q = formats.quantize(w, "mxfp4", search=flag is None)
        assert torch.equal(layer.qweight, q.codes) and torch.equal(layer.wscale.flatten(), q.scales.flatten())
        err[flag] = (formats.dequantize(layer.weight_qtensor()) - w).norm().item()
    assert err[None] < 0.99 * err[False]
    h = torch.rand(256) ** 4
    layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16), idx, importance=h)
    assert torch.equal(layer.qweight, formats.quantize(w, "mxfp4", search=True, importance=h).codes)
    assert not torch.equal(layer.qweight, formats.quantize(w, "mxfp4", search=True).codes)
    plain = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16, scale_search=False), idx, importance=h)
    assert torch.equal(plain.qweight, formats.quantize(w, "mxfp4").codes)  # no search: importance has no say
    with pytest.raises(ValueError, match="4-bit weights"):
        LayerScheme("fp8", scale_search=True)
    assert LayerScheme("nvfp4").searches_scales and LayerScheme("mxfp4").searches_scales
    assert LayerScheme("int4", group_size=32).searches_scales and not LayerScheme("int4", scale_search=False).searches_scales
    cfg = OSCConfig.osc("mxfp4", 16, scale_search=False)
    assert OSCConfig.from_dict(cfg.to_dict()).default.scale_search is False  # saved with the checkpoint's config


def test_buffers_have_the_documented_layout():
    lin, _ = make()
    layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16), torch.tensor(list(range(16))))
    # the main path spans all 128 channels = 4 MX blocks; the 16 outlier columns hold zero codes
    assert layer.qweight.shape == (48, 64) and layer.qweight.dtype == torch.uint8
    assert (layer.qweight[:, :8] == 0).all() and (layer.qweight[:, 8:] != 0).any()
    assert layer.wscale.shape == (48, 4) and layer.wscale.dtype == torch.uint8
    assert layer.w_outlier.shape == (48, 16) and layer.w_outlier.dtype == torch.bfloat16
    assert torch.equal(layer.w_outlier, lin.weight[:, :16].to(torch.bfloat16))
    assert layer.outlier_idx.tolist() == list(range(16))
    # moving the model to another dtype keeps the encoded buffers as they are
    layer.to(torch.float16)
    assert layer.w_outlier.dtype == torch.bfloat16 and layer.wscale.dtype == torch.uint8
    assert layer.bias.dtype == torch.float16


def test_separating_planted_outliers_cuts_the_error():
    lin, x = make(planted=tuple(range(0, 128, 8)))  # 16 outlier channels, one in every half block
    stats_idx = x.reshape(-1, 128).abs().amax(0).topk(16).indices
    exact = lin(x)
    err = {}
    for k in (0, 16):
        layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", k), stats_idx[:k])
        err[k] = ((layer(x) - exact).norm() / exact.norm()).item()
    assert err[16] < err[0] / 3, err


def test_bad_shapes_raise():
    lin = nn.Linear(40, 8)
    with pytest.raises(ValueError, match="in_features=40 is not a multiple of mxfp4's block of 32"):
        OSCLinear.from_linear(lin, LayerScheme("mxfp4"), torch.zeros(0, dtype=torch.long))
    lin, x = make()
    layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16), torch.arange(16))
    with pytest.raises(ValueError, match="input has 64 features"):
        layer(torch.randn(3, 64))
    with pytest.raises(ValueError, match="distinct"):
        OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16), torch.tensor([1] * 16))
    with pytest.raises(ValueError, match="do not fit"):
        OSCLinear(32, 8, LayerScheme("mxfp4"), 32)


def test_backend_choice(monkeypatch):
    lin, x = make()
    layer = OSCLinear.from_linear(lin, LayerScheme("mxfp4", 16), torch.arange(16))
    assert backends.choose(layer, x) == "reference"
    monkeypatch.setenv("OSCQUANT_BACKEND", "nonexistent")
    with pytest.raises(RuntimeError, match="cannot run this layer"):
        layer(x)
    calls = []
    monkeypatch.setenv("OSCQUANT_BACKEND", "auto")
    monkeypatch.setitem(backends._KERNELS, "fake", (lambda l, x: True, lambda l, x: calls.append(1) or x))
    layer(x)
    assert calls == [1]
    monkeypatch.setenv("OSCQUANT_BACKEND", "reference")
    assert torch.allclose(layer(x), explicit(lin, x, LayerScheme("mxfp4", 16), list(range(16))), atol=1e-4)
