"""The OSC linear layer: a 4-bit main path plus a BF16 branch for the outlier channels.

    y = dequant(Q(x with the outlier channels zeroed)) @ dequant(Wq)^T  +  bf16(x[:, outliers]) @ W_o^T  (+ bias)

Buffers (all saved in checkpoints):
  outlier_idx  int64 [k]        the input channels kept in 16 bits, sorted
  w_outlier    bf16 [out, k]    their weight columns
  qweight      uint8            main-path weight codes (two 4-bit codes per byte, or e4m3 bytes)
  wscale       per-format       main-path weight scales
  wscale_global fp32 [1, 1]     NVFP4's per-tensor scale (1.0 for other formats)
  bias         optional

The main path keeps all K channels in their own order with the outlier channels set to
zero, in the weights (their codes are 0) and in each activation before it is quantized,
so a channel's scaling block is the same 32 (or 16, or group) neighbours that the
outlier selection looked at, and a kernel reads x with plain contiguous loads instead of
gathering K - k channels. The price is k zero columns of 4-bit codes (k/K of the codes).
``forward`` asks :mod:`oscquant.backends` which implementation runs; the
PyTorch reference here is the CPU path and the yardstick for every kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from . import formats, gptq
from .config import LayerScheme
from .formats import QTensor


def padded_main_columns(fmt: str, main: int, group_size: int | None) -> int:
    block = formats.block_size(fmt, group_size) or 1
    return -(-main // block) * block


class OSCLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: LayerScheme, k: int,
                 bias: bool = False, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        fmt, g = scheme.format, scheme.group_size
        formats.check_columns(fmt, in_features, g, what="in_features")
        if not 0 <= k < in_features:
            raise ValueError(f"k={k} outlier channels do not fit a layer with {in_features} inputs")
        self.in_features, self.out_features, self.scheme, self.k = in_features, out_features, scheme, k
        kp = padded_main_columns(fmt, in_features, g)
        self.main_columns = kp
        n = out_features
        self.register_buffer("outlier_idx", torch.zeros(k, dtype=torch.long))
        self.register_buffer("w_outlier", torch.zeros(n, k, dtype=torch.bfloat16))
        self.register_buffer("qweight", torch.zeros(n, kp if fmt == "fp8" else kp // 2, dtype=torch.uint8))
        block = formats.block_size(fmt, g)
        nblocks = kp // block if block else 1
        scale_dtype = {"mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn}.get(fmt, torch.float32)
        scale_shape = (n, nblocks) if fmt in ("mxfp4", "nvfp4") or g else (n,)
        self.register_buffer("wscale", torch.zeros(scale_shape, dtype=scale_dtype))
        self.register_buffer("wscale_global", torch.ones(1, 1))
        self.register_buffer("bias", torch.zeros(n, dtype=bias_dtype) if bias else None)
        self._cache: dict = {}
        self.input_norm = None  # norms.NormInLayers: the RMSNorm before this layer, which it runs (fuse_norms)
        self.input_gate = None  # gated.GateInLayer: its input is act(gate) * up of a gated MLP (fuse_gated_mlps)
        self.output_norm = None  # head_norms.HeadNormsAfter: q/k head RMSNorms it runs on its output (fuse_head_norms)

    # ------------------------------------------------------------------ build
    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: LayerScheme, outlier_idx: torch.Tensor,
                    importance: torch.Tensor | None = None, hessian: torch.Tensor | None = None) -> "OSCLinear":
        """``importance`` [in_features]: the mean square of each input channel over calibration, which weighs the
        weights' scale search (formats.quantize) where the scheme searches; ignored where it does not.
        ``hessian`` [in_features]²: the main path's input Hessian (outlier channels zeroed); given, a 4-bit layer's
        weights are rounded by GPTQ (gptq.py) instead of to nearest."""
        layer = cls.unrounded(linear, scheme, outlier_idx)
        main = layer.main_weight(linear)
        if hessian is not None and scheme.format in formats.FP4_FORMATS:
            q = gptq.quantize_weight(main, layer.main_hessian(hessian), scheme.format, scheme.group_size,
                                     scheme.searches_scales)
        else:
            search = scheme.searches_scales
            h = layer._pad(torch.as_tensor(importance).float()) if search and importance is not None else None
            q = formats.quantize(main, scheme.format, scheme.group_size, search=search, importance=h)
        return layer.set_main(q)

    @classmethod
    @torch.no_grad()
    def unrounded(cls, linear: nn.Linear, scheme: LayerScheme, outlier_idx: torch.Tensor) -> "OSCLinear":
        """The layer of ``linear`` with its outlier columns and bias in place, its 4-bit weights still to be set
        (:meth:`set_main`, from :meth:`main_weight` rounded: what from_linear does, and GPTQ for many layers at
        once)."""
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError("the layer's weight holds NaN or Inf; the model file is damaged")
        idx = torch.as_tensor(outlier_idx, dtype=torch.long).sort().values.cpu()
        k = idx.numel()
        if k and (idx[0] < 0 or idx[-1] >= linear.in_features or idx.unique().numel() != k):
            raise ValueError("outlier channel indices must be distinct and within the layer's inputs")
        layer = cls(linear.in_features, linear.out_features, scheme, k, linear.bias is not None,
                    linear.bias.dtype if linear.bias is not None else torch.float32)
        layer.outlier_idx.copy_(idx)
        layer.w_outlier.copy_(w[:, idx].to(torch.bfloat16))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer.to(w.device)

    def main_weight(self, linear: nn.Linear) -> torch.Tensor:
        """``linear``'s weight as the 4-bit path takes it: float32, outlier columns zero, padded to main_columns."""
        return self._pad(self.zero_outliers(linear.weight.detach()))

    def main_hessian(self, hessian: torch.Tensor) -> torch.Tensor:
        """An input Hessian [in_features]² padded to main_columns: padding columns meet no input, zero rows."""
        extra = self.main_columns - self.in_features
        h = hessian.to(self.compute_device).float()
        return nn.functional.pad(h, (0, extra, 0, extra)) if extra else h

    @torch.no_grad()
    def set_main(self, q: QTensor) -> "OSCLinear":
        """Take ``q`` (the main weight rounded to the scheme's format) as the layer's 4-bit weights."""
        self.qweight.copy_(q.codes)
        self.wscale.copy_(q.scales.reshape(self.wscale.shape))
        if q.global_scale is not None:
            self.wscale_global.copy_(q.global_scale.reshape(1, 1))
        return self

    # ------------------------------------------------------------------ helpers
    def zero_outliers(self, t: torch.Tensor) -> torch.Tensor:
        """A float32 copy of ``t`` [..., in_features] with the outlier channels set to zero: the
        main path's input (activations) or weight columns."""
        return t.float().index_fill(-1, self.outlier_idx.to(t.device), 0.0)

    def main_mask(self, device=None) -> torch.Tensor:
        """uint8 [main_columns]: 1 for a channel of the 4-bit path, 0 for an outlier or padding."""
        keep = torch.zeros(self.main_columns, dtype=torch.uint8, device=self.outlier_idx.device)
        keep[:self.in_features] = 1
        keep[self.outlier_idx] = 0
        return keep.to(device or self.outlier_idx.device)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.main_columns - x.shape[-1]
        return nn.functional.pad(x, (0, extra)) if extra else x

    @property
    def compute_device(self) -> torch.device:
        """Where the layer runs: its BF16 columns' device. The canonical codes may be parked in host memory."""
        return self.w_outlier.device

    def park_codes(self) -> None:
        """Move the canonical codes (qweight) to host memory. Once the GPU kernels hold their own re-encoding of
        them (kernels/layout.py), they are read only to save the model or to build the reference path's weights:
        kept on the GPU too, they would cost as much memory again as the kernels' copy. model.to() brings them
        back with the other buffers, and the kernels park them again when they next rebuild their copy."""
        if self.qweight.device.type != "cpu":
            self._buffers["qweight"] = self.qweight.cpu()

    def weight_qtensor(self) -> QTensor:
        s = self.scheme
        codes = self.qweight.to(self.wscale.device)  # parked in host memory once the kernels have their layout
        return QTensor(s.format, codes, self.wscale, (self.out_features, self.main_columns),
                       formats.block_size(s.format, s.group_size),
                       self.wscale_global if s.format == "nvfp4" else None)

    def cached(self, key: str, make):
        """Derived tensors (dequantized weights, index lists), rebuilt after .to() or loading."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _apply(self, fn, *args, **kwargs):
        # model.to(dtype) may move these buffers but must not re-round what they encode
        self._cache = {}
        fixed = {n: self._buffers.pop(n) for n in ("w_outlier", "wscale", "wscale_global")}
        super()._apply(fn, *args, **kwargs)
        for n, t in fixed.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def bits_per_weight(self) -> float:
        """Storage bits per original weight element: codes, scales and the BF16 columns."""
        bits = 8 * (self.qweight.numel() + self.wscale.numel() * self.wscale.element_size())
        bits += 16 * self.w_outlier.numel()
        return bits / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, format={self.scheme.format}, "
                f"k={self.k}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .backends import linear_forward  # the one place a backend is chosen

        return linear_forward(self, x)


def quantize_activation(layer: OSCLinear, x: torch.Tensor) -> QTensor:
    """Per-token quantization of the main path's input (x [tokens, in_features], outlier
    channels zeroed here), as the kernels' split step does it."""
    s = layer.scheme
    return formats.quantize(layer._pad(layer.zero_outliers(x)), s.format, s.group_size, per_row_global=True)


def reference_forward(layer: OSCLinear, x: torch.Tensor) -> torch.Tensor:
    """The OSC math in plain PyTorch, float32 accumulation."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    dev = x.device
    w_main = layer.cached(("w_main", dev), lambda: formats.dequantize(layer.weight_qtensor()).to(dev))
    y = formats.dequantize(quantize_activation(layer, x2)) @ w_main.T
    if layer.k:
        w_o = layer.cached(("w_o", dev), lambda: layer.w_outlier.float())
        x_o = x2[:, layer.outlier_idx].to(torch.bfloat16).float()  # the BF16 sub-tensor
        y = y + x_o @ w_o.T
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*lead, layer.out_features)
