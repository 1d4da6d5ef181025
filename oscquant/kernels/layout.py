"""Kernel-side re-encoding of an OSC layer's weights (pure PyTorch, runs anywhere).

The checkpoint keeps the canonical encoding of formats.py. The GPU kernels read the
same bits in a different order, prepared once per layer and cached (as Marlin does):

codes   [N, Kk/2] uint8. K is cut into chunks of CHUNK = 64 columns; in each chunk,
        byte j holds column j in its low nibble and column 32 + j in its high nibble.
        Unpacking a [rows, 32]-byte tile then gives two [rows, 32] operand tiles, one whole
        MX block each, with no interleaving shuffle in registers and one scale per row.
rel_exp [N, Kk/32] int8 (MXFP4): each 32-column block's E8M0 exponent minus the row's
        largest, so <= 0, and >= LUT_REL_MIN: the rare blocks below 2**-11 of their row's
        largest are re-rounded onto that grid once, here, so that every kernel (the e4m3 byte
        tables of the fragment and folded GEMMs included) multiplies the same weights. The row's
        largest goes into the row scale.
        [N, Kk/16] fp16 (NVFP4): each 16-column block's factor, its e4m3 scale times 2**6 (exact; the FP16 unpack's
        e2m1 * 2**-14 times it is e2m1 * scale * 2**-8, exact in FP16 down to the smallest e4m3 scale).
        [N, Kk/G] fp32 (INT4 with a scale per G columns): the group scales themselves. The transposed GEMM
        multiplies each group's partial product by the weight's and the token's scale of that group; the prefill
        path folds them into FP16 weights, over the row scale (ops.decode_weights).
row_scale [N] fp32: 2**(max exponent - 127) for MXFP4, the per-tensor scale times 2**8 for NVFP4, the int4
        scale for INT4 (with group scales the largest of the row's, which only the prefill path uses), the e4m3 scale
        for FP8.

Kk is K rounded up to two CHUNKs (128), or to whole groups where an INT4 group is wider, with zero columns
(zero codes decode to 0); the outlier channels' columns hold zero codes too (linear.py).
An operand element is then value * 2**rel_exp, and y = acc * row_scale_x * row_scale_w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats

CHUNK = 64
HALF = CHUNK // 2
REL_EXP_MIN = -24  # below this a block is < 2**-24 of its row maximum: it decodes to zero
LUT_REL_MIN = -11  # the e4m3 byte tables (e2m1 * 2**(rel + 6)) hold blocks down to 2**-11 of the row's largest
FRAG_ROWS = 16  # weight rows per warp (one MMA tile)
FRAG_TILE_PAD = 8  # tiles padded to a multiple of this, the most warps a program takes


@dataclass
class KernelWeights:
    fmt: str  # mxfp4 | nvfp4 | int4 | fp8
    codes: torch.Tensor  # uint8 [N, Kk/2] (4-bit) or float8_e4m3fn [N, Kk] (fp8)
    rel_exp: torch.Tensor | None  # int8 [N, Kk/32] (mxfp4), block factors fp16 [N, Kk/16] (nvfp4) or group scales
    # fp32 [N, Kk/G] (int4 with group_size G)
    row_scale: torch.Tensor  # fp32 [N]
    k_main: int  # Kk
    w_outlier: torch.Tensor  # bf16 [N, k]
    outlier_idx: torch.Tensor  # int32 [k]
    keep: torch.Tensor  # uint8 [Kk]: 1 where x feeds the 4-bit path, 0 for outlier channels and padding
    bias: torch.Tensor | None
    frag: FragWeights | None = None  # mxfp4: the same weights for the decode fragment GEMM

    @property
    def group(self) -> int:
        """INT4's columns per scale (0: one scale per row, and every other format); Kk holds whole groups."""
        return self.k_main // self.rel_exp.shape[-1] if self.fmt == "int4" and self.rel_exp is not None else 0


def padded_width(k: int, group: int = 0) -> int:
    """K rounded up to whole chunk pairs (the transposed small-M GEMM steps two chunks at a time), and to whole
    groups of ``group`` columns (INT4 group scales; a power of two, so the larger of the two)."""
    step = max(2 * CHUNK, group)
    return -(-k // step) * step


def chunk_pack(codes: torch.Tensor) -> torch.Tensor:
    """Unpacked 4-bit codes [rows, Kk] (Kk % 64 == 0) -> chunk layout bytes [rows, Kk/2]."""
    rows, kk = codes.shape
    c = codes.reshape(rows, kk // CHUNK, 2, HALF)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(rows, kk // 2)


def chunk_unpack(packed: torch.Tensor) -> torch.Tensor:
    rows, half = packed.shape
    p = packed.reshape(rows, half // HALF, HALF)
    return torch.stack((p & 0xF, p >> 4), dim=2).reshape(rows, half * 2)


def _pad_cols(t: torch.Tensor, width: int, value=0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def split_exponents(e8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E8M0 bytes [rows, blocks] -> (relative exponents int8 <= 0, row scale fp32)."""
    e = e8m0.to(torch.int32) - 127
    top = e.amax(dim=1, keepdim=True)
    rel = (e - top).clamp(min=REL_EXP_MIN).to(torch.int8)
    return rel, torch.exp2(top.squeeze(1).float())


def reround_low_blocks(codes: torch.Tensor, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, Kk] uint8, rel [N, Kk/32]) with blocks below LUT_REL_MIN re-rounded onto the e2m1 grid
    at 2**LUT_REL_MIN (their values are under 2**-11 of the row's largest block scale and lose bits,
    as the e4m3 expansion of the prefill path rounds them below 2**-9); rel clamped to LUT_REL_MIN."""
    rel = rel.to(torch.int32)
    low = rel < LUT_REL_MIN
    if bool(low.any()):
        vals = formats.e2m1_decode(codes) * torch.exp2((rel - LUT_REL_MIN).float()).repeat_interleave(32, dim=1)
        codes = torch.where(low.repeat_interleave(32, dim=1), formats.e2m1_encode(vals).to(codes.dtype), codes)
        rel = rel.clamp(min=LUT_REL_MIN)
    return codes, rel.to(torch.int8)


def _largest_group_scale(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """INT4 groups: each row's largest scale among its groups with a nonzero code (1 for a row of zeros), what the
    prefill path's FP16 weights are relative to (ops.decode_weights); all-zero groups, such as the outlier channels'
    columns, keep scale 1 from formats.quantize_int4 and would otherwise set it. codes: unpacked [N, Kk]."""
    used = codes.reshape(scales.shape[0], -1, group).ne(0).any(-1)
    top = torch.where(used, scales, 0.0).amax(1)
    return torch.where(top > 0, top, 1.0).contiguous()


def group_kernel(group: int) -> bool:
    """Whether the kernels take INT4 groups of this many columns (0: per row): powers of two from 32, so that each
    32-column tile of the kernels lies in one group and each group in whole tiles."""
    return group == 0 or (group >= HALF and group & (group - 1) == 0)


def kernel_weights(layer, frag: bool = True) -> KernelWeights:
    """Re-encode an OSCLinear for the kernels (call once; the result is cached on the layer). ``frag``: also the
    fragment GEMM's layout (MXFP4), which the grouped MoE kernels do not use."""
    fmt = layer.scheme.format
    n = layer.out_features
    group = layer.scheme.group_size or 0
    kk = padded_width(layer.main_columns, group)
    dev = layer.compute_device
    qweight = layer.qweight.to(dev)  # parked in host memory (OSCLinear.park_codes) after an earlier build
    if fmt == "mxfp4":
        rel, row = split_exponents(layer.wscale)
        codes, rel = reround_low_blocks(_pad_cols(formats.unpack_nibbles(qweight), kk),
                                        _pad_cols(rel, kk // 32, REL_EXP_MIN))
        packed = chunk_pack(codes)
    elif fmt == "nvfp4":
        packed = chunk_pack(_pad_cols(formats.unpack_nibbles(qweight), kk))
        rel = (_pad_cols(layer.wscale.float(), kk // 16) * 64).to(torch.float16)  # padded blocks: factor 0
        row = (layer.wscale_global.float().reshape(1) * 256).expand(n)
    elif fmt == "int4" and group_kernel(group):
        codes = _pad_cols(formats.unpack_nibbles(qweight), kk)
        packed = chunk_pack(codes)
        if group:  # padded groups: scale 0 (their codes are 0 too)
            rel = _pad_cols(layer.wscale.float().reshape(n, -1), kk // group)
            row = _largest_group_scale(codes, rel, group)
        else:
            rel, row = None, layer.wscale.float().reshape(n)
    elif fmt == "fp8":
        # the canonical e4m3 bytes themselves where no padding is needed: one copy of them on the GPU
        packed = (qweight if kk == qweight.shape[1] else _pad_cols(qweight, kk)).view(torch.float8_e4m3fn)
        rel, row = None, layer.wscale.float().reshape(n)
    else:
        raise NotImplementedError(f"no kernel layout for {fmt} (group_size={layer.scheme.group_size})")
    kw = KernelWeights(
        fmt, packed.contiguous(), None if rel is None else rel.contiguous(), row.contiguous(), kk,
        layer.w_outlier.contiguous(), layer.outlier_idx.to(torch.int32),
        _pad_cols(layer.main_mask(dev)[None], kk)[0].contiguous(),
        None if layer.bias is None else layer.bias.float().contiguous(),
    )
    if fmt == "mxfp4" and frag:
        kw.frag = fragment_pack(kw)
    return kw


def reference_operand(kw: KernelWeights) -> torch.Tensor:
    """What the kernels decode the weights to, before the row scale and INT4's group scales (which the transposed GEMM
    puts on partial products and ops.decode_weights folds into FP16 weights for the prefill path): float32 [N, Kk]."""
    if kw.fmt == "fp8":
        return kw.codes.float()
    codes = chunk_unpack(kw.codes)
    if kw.fmt == "int4":
        c = codes.to(torch.int16)
        return torch.where(c >= 8, c - 16, c).float()
    vals = formats.e2m1_decode(codes)
    if kw.fmt == "nvfp4":
        return vals * kw.rel_exp.float().repeat_interleave(16, dim=1) * 2.0 ** -14  # factor s * 2**6
    return vals * torch.exp2(kw.rel_exp.float()).repeat_interleave(32, dim=1)


# ------------------------------------------------------------------ fragment layout (frag_gemm.py)
@dataclass
class FragWeights:
    """MXFP4 weights in the register order of the fragment GEMM (frag_gemm.py).

    words [steps, tiles, 32, 8] int32 (step-major, so that programs working on neighbouring tiles
    read neighbouring memory): for step s (columns 128s..128s+127), weight tile t (rows
    16t..16t+15) and lane l = 4g + q, the 8 words thread l needs: word 4h + b holds the codes of
    row 16t + g + 8h, columns 128s + 32q + 8b + (0..7); magnitude j in nibble j, the sign of column
    j < 4 in bit 3 of nibble 2j + 1 and of column 4 + j in bit 3 of nibble 2j (where the two
    sign ORs of the unpack want them). Each thread's 32 columns are one MX block per row.
    exps [steps, tiles, 32] int32: the two rows' block exponents e = rel + 6 in [-5, 6] (byte 0
    row g, byte 1 row g + 8, bytes 2-3 unused), the shift of the e4m3 lookup table.
    row_scale [N] fp32: the row's largest block scale times 2**-6.
    """

    words: torch.Tensor
    exps: torch.Tensor
    row_scale: torch.Tensor

    @property
    def steps(self) -> int:
        return self.words.shape[0]


_SIGN_BIT = (7, 15, 23, 31, 3, 11, 19, 27)  # where column j's sign goes in its word


def fragment_codes(kw: KernelWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, Kk] uint8, table shifts rel + 6 in [-5, 6] [N, Kk/32]); kernel_weights has re-rounded
    the blocks below LUT_REL_MIN already, this does it for hand-made weights too."""
    codes, rel = reround_low_blocks(chunk_unpack(kw.codes), kw.rel_exp)
    return codes, rel.to(torch.int32) + 6


def fragment_pack(kw: KernelWeights) -> FragWeights:
    """Re-encode MXFP4 kernel weights for the fragment GEMM (once per layer, cached)."""
    if kw.fmt != "mxfp4":
        raise ValueError(f"the fragment GEMM takes mxfp4 weights, got {kw.fmt}")
    codes, e = fragment_codes(kw)
    n, kk = codes.shape
    tiles = -(-n // (FRAG_ROWS * FRAG_TILE_PAD)) * FRAG_TILE_PAD
    steps = kk // 128
    codes = torch.nn.functional.pad(codes, (0, 0, 0, tiles * FRAG_ROWS - n))
    e = torch.nn.functional.pad(e, (0, 0, 0, tiles * FRAG_ROWS - n))
    # [tiles, h, g, steps, q, b, j] -> [steps, tiles, g, q, h, b, j]
    c = codes.reshape(tiles, 2, 8, steps, 4, 4, 8).permute(3, 0, 2, 4, 1, 5, 6).to(torch.int64)
    j = torch.arange(8, device=c.device)
    sign_at = torch.tensor(_SIGN_BIT, device=c.device)
    word = (((c & 7) << (4 * j)) | ((c >> 3) << sign_at)).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # the same 32 bits, signed
    ex = e.reshape(tiles, 2, 8, steps, 4).permute(3, 0, 2, 4, 1).to(torch.int32)  # [steps, tiles, g, q, h]
    ex = (ex[..., 0] & 0xFF) | ((ex[..., 1] & 0xFF) << 8)  # int32 as measured; int16 would hold both bytes
    return FragWeights(word.reshape(steps, tiles, 32, 8).contiguous(), ex.reshape(steps, tiles, 32).contiguous(),
                       (kw.row_scale * 2.0**-6).contiguous())


# the lookup tables of a row: bytes 0-3 / 4-7 = e4m3 of e2m1 magnitudes 0-3 / 4-7, plus e times the
# per-byte exponent step (magnitude 0 stays 0); frag_gemm.py's PTX builds them from these constants
FRAG_LUT = (0x3C383000, 0x4C484440, 0x08080800, 0x08080808)


def fragment_unpack(fw: FragWeights, n: int) -> torch.Tensor:
    """What the fragment GEMM's lookup unpack makes of the words, as e4m3 [n, Kk], following its
    integer recipe step by step (byte tables, prmt, sign ORs) on the CPU: tests check it bit-exact
    against the reference dequantization, and the GPU kernel against it."""
    w = fw.words.to(torch.int64) & 0xFFFFFFFF  # [steps, tiles, 32, 8]
    ex = fw.exps.to(torch.int64)
    e = torch.stack((((ex & 0xFF) ^ 0x80) - 0x80, (((ex >> 8) & 0xFF) ^ 0x80) - 0x80), dim=-1)  # [.., 32, 2]
    e = e.repeat_interleave(4, dim=-1)  # word 4h + b uses row h's exponent
    lut0 = (e * FRAG_LUT[2] + FRAG_LUT[0]) & 0xFFFFFFFF
    lut1 = (e * FRAG_LUT[3] + FRAG_LUT[1]) & 0xFFFFFFFF
    table = torch.stack([(lut0 >> (8 * i)) & 0xFF for i in range(4)] + [(lut1 >> (8 * i)) & 0xFF for i in range(4)], -1)
    mag = w & 0x77777777
    out = []
    for sel, sign in ((mag, w & 0x80808080), (mag >> 16, (w << 4) & 0x80808080)):
        for i in range(4):  # prmt: selector nibble i picks byte i of the 8-byte table
            byte = torch.gather(table, -1, ((sel >> (4 * i)) & 7)[..., None])[..., 0]
            out.append(byte | ((sign >> (8 * i)) & 0x80))
    b = torch.stack(out, -1)  # [steps, tiles, 32, 8 words, 8 columns]
    steps, tiles = b.shape[:2]
    # back from [steps, tiles, g, q, h, b, j] to rows and columns
    b = b.reshape(steps, tiles, 8, 4, 2, 4, 8).permute(1, 4, 2, 0, 3, 5, 6).reshape(tiles * 16, steps * 128)
    return b[:n].to(torch.uint8).view(torch.float8_e4m3fn)
