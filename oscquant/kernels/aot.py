"""Compile the kernels for Hopper (sm_90) without a GPU: catches compile errors on CPU machines and
gives the PTX/SASS and register counts to read (``python -m oscquant.kernels.aot``)."""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_osc as K

HOPPER = GPUTarget("cuda", 90, 32)

GEMM_SIG = [("a_ptr", "*fp16"), ("sa_ptr", "*fp32"), ("b_ptr", "*u8"), ("be_ptr", "*i8"), ("sb_ptr", "*fp32"),
            ("xo_ptr", "*bf16"), ("wo_ptr", "*bf16"), ("bias_ptr", "*fp32"), ("y_ptr", "*bf16"), ("ws_ptr", "*fp32"), ("cnt_ptr", "*i32"), ("M", "i32"),
            ("N", "i32"), ("K_PAD", "i32"), ("K_OUT", "i32"), ("stride_am", "i32"), ("stride_bn", "i32"),
            ("stride_ym", "i32")]
SPLIT_SIG = [("x_ptr", "*bf16"), ("stride_xm", "i32"), ("keep_ptr", "*u8"), ("out_idx_ptr", "*i32"),
             ("xo_ptr", "*bf16"), ("q_ptr", "*fp16"), ("s_ptr", "*u8"), ("rs_ptr", "*fp32"), ("M", "i32"), ("K_IN", "i32"),
             ("K_OUT", "i32"), ("K_PAD", "i32")]
GEMM_T_SIG = [("a_ptr", "*fp16"), ("sa_ptr", "*fp32"), ("b_ptr", "*u8"), ("be_ptr", "*i8"), ("sb_ptr", "*fp32"),
              ("xo_ptr", "*bf16"), ("wo_ptr", "*bf16"), ("bias_ptr", "*fp32"), ("y_ptr", "*bf16"), ("ws_ptr", "*fp32"), ("cnt_ptr", "*i32"), ("M", "i32"),
              ("N", "i32"), ("K_PAD", "i32"), ("K_OUT", "i32"), ("stride_am", "i32"), ("stride_bn", "i32"),
              ("stride_be", "i32"), ("stride_ym", "i32")]
DECODE_SIG = [("b_ptr", "*u8"), ("be_ptr", "*i8"), ("out_ptr", "*fp8e4nv"), ("N", "i32"), ("K_PAD", "i32"),
              ("stride_bn", "i32")]


def compile_kernel(fn, sig: list, const: dict, warps: int = 4, stages: int = 3, types: dict | None = None,
                   source=ASTSource):
    given = {n: (types or {}).get(n, t) for n, t in sig}
    given.update({k: "constexpr" for k in const})
    # every parameter, in the kernel's own order (constexprs are matched to parameters by position)
    params = inspect.signature(fn.fn).parameters
    names = [n for n in params if n in given]
    left_out = [n for n, p in params.items() if n not in given and p.default is inspect.Parameter.empty]
    if left_out or len(names) != len(given):
        raise ValueError(f"{fn.__name__}: parameters without a type or value {left_out}, "
                         f"or not the kernel's {sorted(set(given) - set(params))}")
    s = {n: given[n] for n in names}
    # as Triton's JIT does for the real calls: pointers and strides divisible by 16
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig
               if t.startswith("*") or n.startswith("stride") or n in ("K_PAD", "K_OUT", "K_IN")}
    src = source(fn, s, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=aligned)
    return triton.compile(src, target=HOPPER, options={"num_warps": warps, "num_stages": stages})


GROUPED_SIG = [("grp_ptr", "*i32"), ("stride_ce", "i32"), ("stride_ee", "i32"), ("TILES", "i32")]


def gemm(fmt: int, op_f8: bool, bm: int, bn: int, bk: int = 128, split_k: int = 1, warps: int = 4, stages: int = 3,
         grouped: bool = False, fp16_weights: bool = False):
    """The plain GEMM; ``grouped``: on MoE experts' e4m3 weights (long prompts), by tiles of (token, expert) pairs;
    ``fp16_weights`` (FMT_FP8 with op_f8 False): on weights expanded to FP16 (NVFP4's prefill path)."""
    a = "*fp8e4nv" if op_f8 else "*fp16"
    b = "*fp16" if fp16_weights else "*fp8e4nv" if fmt == K.FMT_FP8 else "*u8"
    const = dict(FMT=fmt, OP_F8=op_f8, HAS_BIAS=True, BM=bm, BN=bn, BK=bk, BO=64, GROUP_M=8, SPLIT_K=split_k,
                 SB_SCALE=0.5 if op_f8 and fmt == K.FMT_MXFP4 else 1.0, INTERPRET=False)
    sig = GEMM_SIG + [s for s in GROUPED_SIG if s[0] != "stride_ee"] if grouped else GEMM_SIG
    return compile_kernel(K.osc_gemm_kernel, sig, dict(const, GROUPED=True) if grouped else const, warps, stages,
                          {"a_ptr": a, "b_ptr": b, "be_ptr": _block_scales(fmt)})


def _block_scales(fmt: int, group: int = 0) -> str:
    """The GEMMs' block-scale pointer: MXFP4's relative exponents, NVFP4's FP16 block factors, or INT4's FP32 group
    scales."""
    return "*fp32" if group else "*fp16" if fmt == K.FMT_NVFP4 else "*i8"


def gemm_t(fmt: int, mp: int, bn: int, split_k: int = 1, warps: int = 2, stages: int = 4, op_f8: bool = False,
           fold: bool = False, pdl: bool = True, grouped: bool = False, group: int = 0):
    """The transposed GEMM; ``grouped``: on stacked MoE expert weights, by tiles of (token, expert) pairs; ``group``:
    INT4 with a scale per ``group`` columns."""
    const = dict(FMT=fmt, HAS_BIAS=True, MP=mp, BN=bn, BO=64, SPLIT_K=split_k, OP_F8=op_f8 or fold, F8_FOLD=fold,
                 INTERPRET=False, PDL=pdl)
    # (GROUP comes after the grouped parameters: compile_kernel matches constexprs by position)
    const = dict(const, GROUPED=grouped) if grouped or group else const
    return compile_kernel(K.osc_gemm_t_kernel, GEMM_T_SIG + (GROUPED_SIG if grouped or group else []),
                          dict(const, GROUP=group) if group else const, warps, stages,
                          {"a_ptr": "*fp8e4nv" if op_f8 or fold else "*fp16",
                           "b_ptr": "*fp8e4nv" if fmt == K.FMT_FP8 else "*u8", "be_ptr": _block_scales(fmt, group)})


FRAG_SIG = [("a_ptr", "*fp16"), ("sa_ptr", "*fp32"), ("w_ptr", "*i32"), ("e_ptr", "*i32"), ("sw_ptr", "*fp32"),
             ("xo_ptr", "*bf16"), ("wo_ptr", "*bf16"), ("bias_ptr", "*fp32"), ("y_ptr", "*bf16"), ("ws_ptr", "*fp32"),
             ("cnt_ptr", "*i32"), ("M", "i32"), ("N", "i32"), ("STEPS", "i32"), ("TILES", "i32"), ("K_OUT", "i32"),
             ("stride_am", "i32"), ("stride_ym", "i32")]


def frag(nt: int, warps: int = 4, split_k: int = 1, pdl: bool = True, prefetch: bool = False):
    """The fragment GEMM (Gluon + inline PTX)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from .frag_gemm import osc_frag_gemm_kernel
    const = dict(NT=nt, WARPS=warps, SPLIT_K=split_k, HAS_BIAS=True, BRANCH=True, PREFETCH=prefetch, PROBE=0, PDL=pdl)
    return compile_kernel(osc_frag_gemm_kernel, FRAG_SIG, const, warps, 1, source=GluonASTSource)


def wgmma(bn: int = 128, bt: int = 128, split_k: int = 1, warps: int = 8, stages: int = 4, reg_a: bool = False,
          pdl: bool = True, f16: bool = False, group: int = 0):
    """The mid-size GEMM (Gluon: TMA ring, async wgmma on weights unpacked into shared memory or registers);
    ``f16``: NVFP4 on FP16 wgmma, or with ``group`` INT4 with a scale per ``group`` columns."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from .wgmma_gemm import act_boxes, descriptor_layouts, osc_wgmma_gemm_kernel
    a_l, c_l = descriptor_layouts(bn, bt, f16)
    act = f"{'fp16' if f16 else 'fp8e4nv'}[{bt}, {128 // act_boxes(f16)}]"
    sig = [("a_desc", f"tensordesc<{act},{a_l!r}>"), ("sa_ptr", "*fp32"),
           ("c_desc", f"tensordesc<u8[{bn}, 64],{c_l!r}>")] + GEMM_T_SIG[3:11] + [
        ("M", "i32"), ("N", "i32"), ("K_PAD", "i32"), ("K_OUT", "i32"), ("stride_be", "i32"), ("stride_ym", "i32")]
    const = dict(BN=bn, BT=bt, BO=64, SPLIT_K=split_k, HAS_BIAS=True, STAGES=stages, num_warps=warps, PROBE=0,
                 REG_A=reg_a, PDL=pdl, F16=f16, GROUP=group)
    return compile_kernel(osc_wgmma_gemm_kernel, sig, const, warps, 1, source=GluonASTSource,
                          types={"be_ptr": _block_scales(K.FMT_INT4 if group else K.FMT_NVFP4, group)} if f16 else None)


def split(fmt: int, mode: int, block: int = 4096, pdl: bool = True, late: bool = False, grouped: bool = False,
          group: int = 0, fold: bool = False, norm: int = 0, rows: int = 8, act: int = 0):
    q = {K.MODE_PACKED: "*u8", K.MODE_F16: "*fp16", K.MODE_F8: "*fp8e4nv"}[mode]
    const = dict(FMT=fmt, MODE=mode, BLOCK=block, BLOCK_O=128, ROWS=rows, INTERPRET=False, PDL=pdl, RELEASE_LATE=late)
    if norm or act:  # the RMSNorm before the layer run first (norms.py), or a gated MLP's act(gate) * up (gated.py)
        return compile_kernel(K.split_quantize_kernel, SPLIT_SIG + [("src_ptr", "*i32"), ("grp_ptr", "*i32"),
                              ("nw_ptr", "*fp32"), ("norm_eps", "fp32")],
                              dict(const, SHARED_BESIDE=pdl, GROUPED=False, GROUP=0, FOLD=False, NORM=norm, ACT=act),
                              8, 1, {"q_ptr": q})
    if group:  # INT4 with a scale per group columns, into s
        return compile_kernel(K.split_quantize_kernel, SPLIT_SIG + [("src_ptr", "*i32"), ("grp_ptr", "*i32")],
                              dict(const, SHARED_BESIDE=False, GROUPED=False, GROUP=group, FOLD=fold), 8, 1,
                              {"q_ptr": q, "s_ptr": "*fp32"})
    if grouped:  # MoE experts: each row its source row and its expert's outlier channels
        return compile_kernel(K.split_quantize_kernel, SPLIT_SIG + [("src_ptr", "*i32"), ("grp_ptr", "*i32")],
                              dict(const, SHARED_BESIDE=False, GROUPED=True), 8, 1, {"q_ptr": q})
    return compile_kernel(K.split_quantize_kernel, SPLIT_SIG, const, 8, 1, {"q_ptr": q})


def decode(fmt: int, op_f8: bool, pdl: bool = True, group: int = 0):
    """The weight expansion; ``group``: INT4 with a scale per ``group`` columns, folded into FP16 weights."""
    out = "*fp8e4nv" if op_f8 else "*fp16"
    const = dict(FMT=fmt, OP_F8=op_f8, BN=64, RAW_E4M3=False, LUT=False, INTERPRET=False, PDL=pdl)
    types = {"out_ptr": out, "be_ptr": _block_scales(fmt, group)}
    if group:
        return compile_kernel(K.decode_weights_kernel, DECODE_SIG + [("sb_ptr", "*fp32")], dict(const, GROUP=group), 4,
                              1, types)
    return compile_kernel(K.decode_weights_kernel, DECODE_SIG, const, 4, 1, types)


def _triton_tool(name: str) -> str:
    """The path of one of the CUDA tools that Triton ships (ptxas, cuobjdump, nvdisasm)."""
    import os

    return os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name)


def resources(c) -> str:
    """Registers, spills and shared memory of a compiled kernel, read by cuobjdump when it is installed."""
    import os
    import shutil
    import subprocess
    import tempfile

    tool = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    if not os.path.exists(tool):
        tool = None
    if tool is None:
        return f"{c.metadata.shared} B shared (no cuobjdump for registers)"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return " ".join(line.strip() for line in out.splitlines() if "REG" in line)


def sass(c) -> str:
    import os
    import subprocess
    import tempfile

    tool = _triton_tool("nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    try:
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def wgmma_serialized(c) -> str | None:
    """What ptxas says when it serializes a kernel's wgmmas (its C75xx "Potential Performance Loss" advisory, which
    Triton's build does not show), or None. It does that, for one, when instructions other than wgmmas write the
    register operands of a wgmma while wgmmas are in flight (wgmma_gemm._register_mmas)."""
    import os
    import subprocess
    import tempfile

    tool = _triton_tool("ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(c.asm["ptx"])
        r = subprocess.run([tool, "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.cubin")], capture_output=True,
                           text=True)
    said = [line.split("serialized", 1)[1].split(" in the function")[0].strip()
            for line in (r.stdout + r.stderr).splitlines() if "serialized" in line]
    return "serialized " + "; ".join(said) if said else None


def _opcode(line: str) -> str:
    """A PTX line's instruction, without its predicate ("" for labels, directives and braces)."""
    words = line.split("//")[0].split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


MEMORY_OPS = ("ld.global", "st.global", "atom.", "red.", "cp.async.ca", "cp.async.cg")


def pdl_order(c, weight_tma: int = 0, at_end: bool = False) -> str | None:
    """None if the PTX keeps programmatic dependent launch safe (overlap.py): one griddepcontrol.wait,
    and no global load, atomic or store before it, only L2 prefetches and exactly ``weight_tma`` TMA
    copies (the wgmma GEMM's first weight tiles, which no kernel writes); else what is wrong. ``at_end``
    (the weight expansion, which reads no output of the kernel before it): the wait comes after every
    global memory access, so the kernel completes only once the one before it has."""
    lines = c.asm["ptx"].splitlines()
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    if len(waits) != 1:
        return f"{len(waits)} griddepcontrol.wait"
    if at_end:
        late = [op for op in map(_opcode, lines[waits[0]:]) if op.startswith(MEMORY_OPS)]
        return f"after griddepcontrol.wait: {late[:3]}" if late else None
    ops = [_opcode(line) for line in lines[:waits[0]]]
    early = [op for op in ops if op.startswith(MEMORY_OPS)]
    if early:
        return f"before griddepcontrol.wait: {early[:3]}"
    tma = sum(op.startswith("cp.async.bulk.tensor") for op in ops)
    return None if tma == weight_tma else f"{tma} TMA copies before griddepcontrol.wait, expected {weight_tma}"


def epilogue():
    """The cuBLAS FP16 route's epilogue on its FP32 sums (NVFP4, INT4 with group scales, 65-512 tokens)."""
    sig = [("acc_ptr", "*fp32"), ("sa_ptr", "*fp32"), ("sb_ptr", "*fp32"), ("xo_ptr", "*bf16"), ("wo_ptr", "*bf16"),
           ("bias_ptr", "*fp32"), ("y_ptr", "*bf16"), ("M", "i32"), ("N", "i32"), ("K_OUT", "i32"), ("stride_ym", "i32")]
    return compile_kernel(K.epilogue_kernel, sig, dict(HAS_BIAS=True, BM=64, BN=64, BO=64, INTERPRET=False), 4, 1)


def head_norm(kind: int = 1, d: int = 128, heads: int = 40):
    """q_norm and k_norm on a stacked q/k/v output row (Qwen3-8B: 32 + 8 heads of 128)."""
    sig = [("y_ptr", "*bf16"), ("stride_ym", "i32"), ("f_ptr", "*fp32"), ("HQ", "i32"), ("HK", "i32"), ("eps", "fp32")]
    return compile_kernel(K.head_norm_kernel, sig, dict(D=d, BH=triton.next_power_of_2(heads), NORM=kind,
                                                        INTERPRET=False), 4, 1)


def main() -> int:
    """Prints each kernel's resources; exits 1 if one spills registers to the stack, if ptxas serializes the wgmma
    GEMM's wgmmas, or if one touches memory before its PDL wait."""
    failures = 0
    # (name, kernel[, TMA copies before the PDL wait: the wgmma GEMM's first stages - 1 code tiles])
    for name, c, *tma in [("frag gemm mxfp4 M<=8", frag(1, split_k=4, prefetch=True)), ("frag gemm mxfp4 M<=16", frag(2, warps=8)),
                    ("gemm-t mxfp4 M<=16", gemm_t(K.FMT_MXFP4, 16, 32, split_k=4, stages=6)),
                    ("gemm-t mxfp4 e4m3 M=1", gemm_t(K.FMT_MXFP4, 1, 32, split_k=2, op_f8=True)),
                    ("gemm-t mxfp4 M<=64", gemm_t(K.FMT_MXFP4, 64, 128, warps=4)),
                    ("gemm-t mxfp4 e4m3 folded 17-64 tokens", gemm_t(K.FMT_MXFP4, 64, 64, split_k=4, warps=4, stages=3, fold=True)),
                    ("gemm-t mxfp4 e4m3 folded 65-256 tokens", gemm_t(K.FMT_MXFP4, 128, 128, warps=8, stages=3, fold=True)),
                    ("gemm-t int4 M<=16", gemm_t(K.FMT_INT4, 16, 32)),
                    ("gemm-t nvfp4 M<=16", gemm_t(K.FMT_NVFP4, 16, 32, split_k=4, stages=6)),
                    ("gemm-t nvfp4 M<=64", gemm_t(K.FMT_NVFP4, 64, 64, split_k=4, warps=4)),
                    ("gemm-t int4 groups of 32 M<=16", gemm_t(K.FMT_INT4, 16, 32, split_k=4, stages=6, group=32)),
                    ("gemm-t int4 groups of 128 e4m3 M<=16",
                     gemm_t(K.FMT_INT4, 16, 32, split_k=2, op_f8=True, group=128)),
                    ("gemm-t int4 groups of 128 M<=64",
                     gemm_t(K.FMT_INT4, 64, 64, split_k=4, warps=4, stages=3, group=128)),
                    ("gemm-t int4 groups of 32 17-64 tokens", gemm_t(K.FMT_INT4, 64, 64, warps=8, stages=3, group=32)),
                    ("gemm-t int4 groups of 128 grouped MoE experts, 64-pair tiles",
                     gemm_t(K.FMT_INT4, 64, 128, warps=8, stages=3, pdl=False, grouped=True, group=128)),
                    ("gemm-t mxfp4 grouped MoE experts", gemm_t(K.FMT_MXFP4, 1, 32, stages=3, pdl=False, grouped=True)),
                    ("gemm-t fp8-weights grouped MoE experts", gemm_t(K.FMT_FP8, 1, 32, split_k=2, op_f8=True,
                                                                      pdl=False, grouped=True)),
                    ("gemm-t mxfp4 e4m3 folded grouped MoE experts, 16-pair tiles",
                     gemm_t(K.FMT_MXFP4, 16, 64, warps=4, fold=True, pdl=False, grouped=True)),
                    ("gemm-t mxfp4 e4m3 folded grouped MoE experts, 128-pair tiles",
                     gemm_t(K.FMT_MXFP4, 128, 128, warps=8, stages=3, fold=True, pdl=False, grouped=True)),
                    ("gemm-t fp8-weights grouped MoE experts, 64-pair tiles",
                     gemm_t(K.FMT_FP8, 64, 64, warps=4, op_f8=True, pdl=False, grouped=True)),
                    ("wgmma gemm mxfp4 16-256 tokens (register operand)", wgmma(64, 64, split_k=2, warps=4, stages=4, reg_a=True), 3),
                    ("wgmma gemm mxfp4 128x256 (widest layers)", wgmma(128, 256, warps=8, stages=3), 2),
                    ("wgmma gemm nvfp4 FP16, 64 x 128", wgmma(64, 128, warps=4, stages=4, reg_a=True, f16=True), 3),
                    ("wgmma gemm int4 groups of 128 FP16, 128 x 64",
                     wgmma(128, 64, warps=8, stages=4, reg_a=True, f16=True, group=128), 3),
                    ("wgmma gemm int4 groups of 32 FP16, 64 x 128",
                     wgmma(64, 128, warps=4, stages=4, reg_a=True, f16=True, group=32), 3),
                    ("gemm mxfp4 decode", gemm(K.FMT_MXFP4, False, 16, 64, warps=4, stages=4)),
                    ("gemm int4 decode", gemm(K.FMT_INT4, False, 16, 64, split_k=2)),
                    ("gemm nvfp4 prefill (weights expanded to FP16)",
                     gemm(K.FMT_FP8, False, 128, 256, bk=64, warps=8, stages=3, fp16_weights=True)),
                    ("gemm fp8-weights prefill", gemm(K.FMT_FP8, True, 128, 256, warps=8, stages=3)),
                    ("gemm fp8-weights grouped MoE experts, 64-pair tiles",
                     gemm(K.FMT_FP8, True, 64, 128, warps=4, stages=4, grouped=True)),
                    ("gemm fp8-weights grouped MoE experts, 128-pair tiles",
                     gemm(K.FMT_FP8, True, 128, 256, warps=8, stages=3, grouped=True)),
                    ("split mxfp4 f8", split(K.FMT_MXFP4, K.MODE_F8)),
                    ("split fp8 grouped MoE experts", split(K.FMT_FP8, K.MODE_F8, pdl=False, grouped=True)),
                    ("split mxfp4 f16, releasing the GEMM after its stores", split(K.FMT_MXFP4, K.MODE_F16, late=True)),
                    ("split nvfp4 f16", split(K.FMT_NVFP4, K.MODE_F16)),
                    # (4 rows of 4096 channels a program: split_quantize's most from 1024 tokens on)
                    ("split mxfp4 f16 after the RMSNorm it runs", split(K.FMT_MXFP4, K.MODE_F16, norm=1, rows=4)),
                    ("split mxfp4 f8 after the RMSNorm it runs, Gemma's rounding",
                     split(K.FMT_MXFP4, K.MODE_F8, norm=2, rows=4)),
                    # (a row of 12288 channels a program, 8B down's, from gate and up side by side)
                    ("split fp8 f8 of a gated MLP's SiLU(gate) * up",
                     split(K.FMT_FP8, K.MODE_F8, block=16384, rows=1, act=1, late=True)),
                    ("split mxfp4 f16 of a gated MLP's GELU(gate) * up",
                     split(K.FMT_MXFP4, K.MODE_F16, block=16384, rows=1, act=2, late=True)),
                    ("split int4 groups of 128 f16", split(K.FMT_INT4, K.MODE_F16, group=128)),
                    ("split int4 groups of 128 f16 for the FP16 expansion path",
                     split(K.FMT_INT4, K.MODE_F16, group=128, fold=True)),
                    ("decode mxfp4 f8", decode(K.FMT_MXFP4, True)),
                    ("decode nvfp4 f16", decode(K.FMT_NVFP4, False)),
                    ("decode int4 groups of 128 f16", decode(K.FMT_INT4, False, group=128)),
                    ("epilogue of cuBLAS's FP16 GEMM", epilogue()),
                    ("q/k head norms on the stacked q/k/v output", head_norm()),
                    ("q/k head norms, Gemma's rounding", head_norm(2, 256, 12))]:
        usage = resources(c)
        print(f"{name}: {usage}")
        failures += "STACK:" in usage and "STACK:0 " not in usage
        if "griddepcontrol" in c.asm["ptx"]:
            bad = pdl_order(c, weight_tma=tma[0] if tma else 0, at_end=name.startswith("decode"))
            print(f"  PDL order: {bad or 'ok'}")
            failures += bad is not None
        if "wgmma.mma_async" in c.asm["ptx"]:
            # the Gluon GEMM's steps are built to keep wgmmas in flight; Triton's own dots are only reported: ptxas
            # serializes the INT4-group transposed GEMM's (its BF16 branch's wgmmas accumulate onto what the group
            # flushes' FMAs wrote), and the branch on its own accumulator, which ptxas does not serialize, measured
            # 3-9 % slower (docs/kernels.md, INT4 with group scales)
            said = wgmma_serialized(c)
            print(f"  wgmma: {said or 'not serialized'}")
            failures += said is not None and name.startswith("wgmma gemm")
        if "--sass" in sys.argv:
            print(sass(c))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
