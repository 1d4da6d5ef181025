import json
import re
from dataclasses import replace

import pytest
from tiny import tiny_model, tiny_tokenizer

from oscquant import cli
from oscquant.data import split_text

TEXT = " ".join(
    f"In the year {1800 + i} the Congress met and spoke of trade, war, peace, the people and their states."
    for i in range(400)
)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer(TEXT)
    model = tiny_model("llama")
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_quantize_eval_generate_info(local_model, capsys):
    root = local_model
    ck = root / "ck"
    code, out, err = run(capsys, "quantize", root / "model", "--calib", root / "text.txt", "--out", ck,
                         "--outliers", "16", "--calib-samples", "4", "--seq-len", "32", "--device", "cpu")
    assert code == 0, err
    assert "quantized 14 layers" in out and (ck / "osc_config.json").is_file()
    meta = json.loads((ck / "osc_config.json").read_text())
    assert meta["calibration"]["part"] == "calib" and meta["source"]["kind"] == "pretrained"

    code, out, err = run(capsys, "eval", ck, "--text", root / "text.txt", "--seq-len", "32", "--device", "cpu")
    assert code == 0, err
    ppl = float(re.search(r"^perplexity: ([0-9.]+)$", out, re.M).group(1))
    _, out, _ = run(capsys, "eval", root / "model", "--text", root / "text.txt", "--seq-len", "32", "--device", "cpu")
    ppl_float = float(re.search(r"^perplexity: ([0-9.]+)$", out, re.M).group(1))
    assert ppl != ppl_float and 0.5 < ppl / ppl_float < 2, (ppl, ppl_float)
    code, out, _ = run(capsys, "eval", ck, "--text", root / "text.txt", "--seq-len", "32", "--json", "--device", "cpu")
    rec = json.loads(out)
    assert rec["perplexity"] == pytest.approx(ppl, rel=1e-4) and rec["part"] == "heldout"
    # eval runs the sibling projections stacked (siblings.py): the perplexity of the layers run one by one
    from oscquant import load_quantized, perplexity
    from oscquant.data import read_text, split_text
    model, tok = load_quantized(ck)
    apart = perplexity(model, tok, split_text(read_text(str(root / "text.txt")), "heldout"), 32, progress=False)
    assert apart.perplexity == pytest.approx(rec["perplexity"], rel=1e-5)
    # the held-out part is the tail of the file, which calibration never reads
    assert rec["tokens"] < 0.2 * len(TEXT)

    code, out, err = run(capsys, "generate", ck, "--prompt", "In the year", "--max-new-tokens", "5", "--device", "cpu")
    assert code == 0, err
    assert "5 tokens in" in err and "on cpu" in err
    code, out, _ = run(capsys, "info", ck)
    assert "model.layers.0.self_attn.q_proj: mxfp4 k=16" in out

    # --no-scale-search: the MXFP4 weights keep the max rule's block scales, and the checkpoint says so
    import torch

    plain = root / "ck_plain"
    code, out, err = run(capsys, "quantize", root / "model", "--calib", root / "text.txt", "--out", plain,
                         "--outliers", "16", "--calib-samples", "4", "--seq-len", "32", "--device", "cpu",
                         "--no-scale-search")
    assert code == 0, err
    assert json.loads((plain / "osc_config.json").read_text())["osc_config"]["default"]["scale_search"] is False
    assert meta["osc_config"]["default"]["scale_search"] is None  # the default: searched, for mxfp4
    searched, plain_model = load_quantized(ck)[0], load_quantized(plain)[0]
    q, p = (m.get_submodule("model.layers.0.self_attn.q_proj") for m in (searched, plain_model))
    assert torch.equal(q.outlier_idx, p.outlier_idx) and not torch.equal(q.wscale, p.wscale)
    assert (p.wscale.int() - q.wscale.int()).unique().tolist() == [0, 1]  # the searched scales: the same or one lower

    # --gptq: the same outlier channels, the 4-bit weights rounded by GPTQ, and the checkpoint says so
    rounded = root / "ck_gptq"
    code, out, err = run(capsys, "quantize", root / "model", "--calib", root / "text.txt", "--out", rounded,
                         "--outliers", "16", "--calib-samples", "4", "--seq-len", "32", "--device", "cpu", "--gptq")
    assert code == 0, err
    assert json.loads((rounded / "osc_config.json").read_text())["osc_config"]["gptq"] is True
    g = load_quantized(rounded)[0].get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(q.outlier_idx, g.outlier_idx) and not torch.equal(q.qweight, g.qweight)


def test_a_checkpoint_loads_in_another_dtype(local_model, capsys):
    """A checkpoint quantized in float32 loads in BF16 (as --device cuda runs it): the model's own float tensors
    change dtype, the OSC layers' encoded weights do not, and the logits stay close."""
    import torch

    from oscquant import OSCLinear, load_quantized

    root = local_model
    ck = root / "ck_dtype"
    code, _, err = run(capsys, "quantize", root / "model", "--calib", root / "text.txt", "--out", ck, "--outliers",
                       "16", "--calib-samples", "2", "--seq-len", "32", "--device", "cpu")
    assert code == 0, err
    f32, tok = load_quantized(ck)
    bf16, _ = load_quantized(ck, dtype=torch.bfloat16)
    assert f32.get_input_embeddings().weight.dtype == torch.float32
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    layers = [(n, m) for n, m in f32.named_modules() if isinstance(m, OSCLinear)]
    for name, m in layers:
        other = bf16.get_submodule(name)
        for buf in ("qweight", "wscale", "w_outlier", "outlier_idx"):
            assert torch.equal(getattr(m, buf), getattr(other, buf)), (name, buf)
    ids = tok("In the year 1801 the Congress", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = f32(ids).logits, bf16(ids).logits.float()
    assert ((a - b).norm() / a.norm()).item() < 5e-2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("cmd", ["quantize", "eval", "generate"])
def test_device_cuda_without_a_gpu_says_so(local_model, capsys, cmd):
    root = local_model
    args = {"quantize": ["--calib", root / "text.txt", "--out", root / "never"], "eval": ["--text", root / "text.txt"],
            "generate": ["--prompt", "In the year"]}[cmd]
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        run(capsys, cmd, root / "model", *args, "--device", "cuda")
    assert not (root / "never").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_quantize_eval_generate_on_the_gpu(local_model, capsys):
    """The same commands with --device cuda: calibration and quantization on the GPU in BF16, evaluation and generation
    through the kernels (generation from a CUDA graph); the perplexity close to the CPU run's."""
    root = local_model
    ck = root / "ck_gpu"
    code, out, err = run(capsys, "quantize", root / "model", "--calib", root / "text.txt", "--out", ck,
                         "--outliers", "16", "--calib-samples", "4", "--seq-len", "32", "--device", "cuda")
    assert code == 0, err
    assert json.loads((ck / "osc_config.json").read_text())["dtype"] == "bfloat16"
    ppl = {}
    for device in ("cuda", "cpu"):
        code, out, err = run(capsys, "eval", ck, "--text", root / "text.txt", "--seq-len", "32", "--json",
                             "--device", device)
        assert code == 0, err
        ppl[device] = json.loads(out)["perplexity"]
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) < 0.05, ppl
    code, out, err = run(capsys, "generate", ck, "--prompt", "In the year", "--max-new-tokens", "8", "--device", "cuda")
    assert code == 0 and "on cuda" in err, err


@pytest.mark.parametrize("args,message", [
    (["--outliers", "20"], "multiple of 16"),
    (["--outliers", "128"], "only 64 input channels"),
    (["--format", "int4", "--group-size", "48"], "not a multiple of int4's block of 48"),
])
def test_bad_options_give_clear_errors(local_model, capsys, args, message):
    code, _, err = run(capsys, "quantize", local_model / "model", "--calib", local_model / "text.txt",
                       "--out", local_model / "bad", "--calib-samples", "2", "--seq-len", "32", *args)
    assert code == 2 and message in err
    assert not (local_model / "bad").exists()


def test_demo_takes_int4_group_sizes_and_refuses_them_elsewhere(capsys):
    """demo --format int4 --group-size G quantizes every 4-bit row with groups of G (checked before the model loads);
    a group size with another format is a clear error."""
    from oscquant.compare import demo_configs

    cfgs = demo_configs("int4", 0.06, 128)
    names = list(cfgs)
    assert names[1] == "RTN W4A4 int4 g128, no outliers" and names[3] == "OSC W4A4 int4 g128 + FP8 down_proj"
    assert all(c.default.group_size == 128 for c in cfgs.values() if c is not None)
    assert all(c.default.group_size is None for c in demo_configs("int4").values() if c is not None)
    code, _, err = run(capsys, "demo", "--format", "mxfp4", "--group-size", "128")
    assert code == 2 and "group_size applies to int4 only" in err


def test_compare_refuses_a_group_size_the_model_cannot_take_before_calibrating(monkeypatch):
    """A group wider than a layer's input (the tiny model's 64 channels; SmolLM2's 576 with groups of 128) is named
    before the calibration run that every row shares, not after it."""
    from oscquant import compare
    from oscquant.compare import demo_configs

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before checking the configs")

    monkeypatch.setattr(compare, "collect_stats", no_calibration)
    text = "The state of the union is strong. " * 200
    with pytest.raises(ValueError, match="not a multiple of int4's block of 128 columns"):
        compare.compare(tiny_model("llama"), tiny_tokenizer(text), demo_configs("int4", 0.06, 128), text)


def test_missing_text_and_model(local_model, capsys):
    code, _, err = run(capsys, "eval", local_model / "model", "--text", local_model / "nope.txt")
    assert code == 2 and "not found" in err
    code, _, err = run(capsys, "eval", local_model / "text.txt", "--text", local_model / "text.txt")
    assert code == 2 and "not a .gguf" in err


def test_split_never_overlaps():
    text = "line\n" * 1000
    a, b = split_text(text, "calib"), split_text(text, "heldout")
    assert a + b == text and len(b) < 0.11 * len(text)


@pytest.mark.parametrize("what", ["gemm", "sweep", "small"])
def test_bench_without_a_gpu_says_so(capsys, what):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, out, err = run(capsys, "bench", what, "--m", "1", "--k", "64")
    assert code != 0 and f"oscquant bench {what} needs a CUDA GPU" in err


def test_bench_tables_and_targets_from_rows():
    from oscquant.bench import Row, markdown, targets

    def row(m, osc, b2b_osc=None):
        return Row("8B o", 4096, 4096, m, 64, 20.0, None, 18.0, osc - 3, osc, 21.0, 1.0, 1.0, 50.0, 60.0,
                   18.0 / osc, 20.0 / osc, *((14.0, 15.0, b2b_osc) if b2b_osc else ()))
    rows = [row(1, 10.0, 7.5), row(16, 20.0, 10.0), row(4096, 100.0)]
    rows[2] = replace(rows[2], path="wgmma 64×64 /2")  # the OSC GEMM's config, where the run recorded it
    md = markdown(rows)
    assert md.count("\n| 8B o 4096×4096 |") == 5  # three rows, then two back-to-back rows
    assert "| 8B o 4096×4096 | 1 | 64 | n/a | 20.0 |" in md and "| 8B o 4096×4096 | 4096 | 64 | wgmma 64×64 /2 | 20.0 |" in md
    assert "| 7.5 | 2.00 | 1.87 |" in md  # FP8 15 / OSC 7.5, BF16 14 / 7.5
    t = targets(rows)
    assert "M <= 16, OSC+split >= 1.8x best W8A8: 1/2 rows" in t[0]
    assert t[-1].startswith("M <= 16 back to back, OSC+split >= 1.8x cuBLAS FP8: 1/2")
    # with the GEMM alone back to back and the copy floor: two more columns and target lines
    rows[0] = replace(rows[0], b2b_gemm_us=6.0, b2b_gemm_roofline_pct=85.0, copy_us=4.0, copy_roofline_pct=40.0)
    md = markdown(rows)
    assert "| 7.5 | 2.00 | 1.87 | 6.0 | 85 | 4.0 (40) |" in md and "| 10.0 | 1.50 | 1.40 | n/a | n/a | n/a |" in md
    t = targets(rows)
    assert t[-3] == "M <= 16 back to back, GEMM >= 80% of its HBM roofline: 1/1 (range 85% to 85%)"
    assert t[-2] == "M <= 16, a plain copy of the GEMM's bytes, timed flushed as the GEMM: 40% to 40% of the same roofline"
    # the 1.8x target's ceiling: the best W8A8 (FP8 18 µs) over the copy's 4 µs
    assert t[-1] == "M <= 16, that copy alone >= 1.8x best W8A8 (the target's ceiling here): 1/1 (range 4.50x to 4.50x)"
    # x's own cast to e4m3 beside the large-M rows: W8A8 paying for its activation, and what 0.9x leaves the GEMM
    assert not any("cast" in line for line in t)  # runs saved before the cast was timed
    rows[2] = replace(rows[2], cast_us=2.0)  # (2 + FP8 18) / OSC 100; 0.9x FP8 = 20 µs, 18 of them for the GEMM
    t = targets(rows)
    assert "M >= 4096, OSC+split >= 0.9x (x cast to e4m3 + cuBLAS FP8), W8A8 paying for its activation: 0/1 (worst 0.20x)" in t
    need = 2 * 4096 ** 3 / 18e-6 / 1e12
    assert (f"M >= 4096, GEMM TFLOP/s that 0.9x cuBLAS FP8 needs with split-quantize as fast as that cast: {need:.0f} to "
            f"{need:.0f}; 1/1 rows above cuBLAS FP8's 1463 at 8192^3") in t
    rows[2] = replace(rows[2], cast_us=25.0)  # the cast alone over 0.9x FP8's time: no GEMM could make it
    assert "needs with split-quantize as fast as that cast: inf to inf; 1/1 rows above" in targets(rows)[5]



def test_bench_diff_against_an_earlier_run(tmp_path, capsys):
    """`oscquant bench diff`: old time / new time by M for OSC and cuBLAS, and the rows whose OSC + split got slower
    with their GEMM alone and split-quantize's share, so that a change hurting one path shows beside the baselines."""
    from oscquant.bench import Row, save

    def row(m, osc, gemm, fp8=18.0):
        return Row("8B o", 4096, 4096, m, 128, 20.0, None, fp8, gemm, osc, 21.0, 1.0, 1.0, 50.0, 60.0, fp8 / osc,
                   20.0 / osc)
    base = [row(1, 10.0, 8.0), row(256, 30.0, 28.0), row(1024, 50.0, 44.0), row(4096, 100.0, 90.0)]
    new = [row(1, 10.0, 8.0, fp8=16.0), row(256, 36.0, 28.0), row(1024, 50.0, 44.0), row(16384, 500.0, 450.0)]
    save(base, str(tmp_path / "base.json"))
    save(new, str(tmp_path / "new.json"))
    code, out, err = run(capsys, "bench", "diff", "--json", tmp_path / "new.json", "--base", tmp_path / "base.json")
    assert code == 0, err
    assert "| 1 | 1.00 (1.00-1.00) | 1.00 (1.00-1.00) | 1.12 (1.12-1.12) |" in out  # cuBLAS FP8 18 -> 16 µs
    assert "| 256 | 0.83 (0.83-0.83) | 1.00 (1.00-1.00) |" in out and "| 16384 |" not in out  # rows of both runs only
    assert "took longer than 1/0.97 of the earlier run: 1 of 3" in out
    assert "| 8B o 4096×4096 | 256 | 128 | 30.0 → 36.0 | 0.83 | 28.0 → 28.0 | 1.00 | 2.0 → 8.0 | n/a |" in out
    new[1] = replace(new[1], path="wgmma 64×128")  # the GEMM's config changed: the row says so
    save(new, str(tmp_path / "new.json"))
    code, out, err = run(capsys, "bench", "diff", "--json", tmp_path / "new.json", "--base", tmp_path / "base.json")
    assert code == 0 and "| 2.0 → 8.0 | n/a → wgmma 64×128 |" in out
    code, _, err = run(capsys, "bench", "diff", "--json", tmp_path / "new.json")
    assert code == 2 and "needs --json" in err and "--base" in err
    save([row(8, 10.0, 8.0)], str(tmp_path / "other.json"))
    code, _, err = run(capsys, "bench", "diff", "--json", tmp_path / "other.json", "--base", tmp_path / "base.json")
    assert code == 2 and "share no row" in err

def test_formats_table_and_figure_side_by_side(tmp_path):
    """scripts/formats_bench.sh's table and figure: each format's OSC + split beside the first run's, as speed over
    it and over BF16; a row one run lacks shows as n/a."""
    from oscquant.bench import Row, formats_table, plot_formats

    def row(m, osc, shape="8B o"):
        return Row(shape, 4096, 4096, m, 128, 20.0, None, 16.0, osc - 3, osc, 21.0, 1.0, 1.0, 50.0, 60.0, 16.0 / osc,
                   20.0 / osc)
    runs = {"mxfp4": [row(1, 10.0), row(4096, 25.0)], "nvfp4": [row(1, 20.0)]}
    md = formats_table(runs).splitlines()
    assert md[0] == ("| shape | M | k | BF16 µs | FP8 µs | mxfp4 µs | nvfp4 µs | nvfp4 × mxfp4 | mxfp4 × BF16 "
                     "| nvfp4 × BF16 |")
    assert md[2] == "| 8B o | 1 | 128 | 20.0 | 16.0 | 10.0 | 20.0 | 0.50 | 2.00 | 1.00 |"
    assert md[3] == "| 8B o | 4096 | 128 | 20.0 | 16.0 | 25.0 | n/a | n/a | 0.80 | n/a |"
    fig = plot_formats({**runs, "int4": [row(1, 8.0), row(1, 8.0, "8B qkv")]}, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["8B o"]  # the first run's shapes
    lines = {line.get_label(): list(line.get_ydata()) for line in panels[0].get_lines()}
    assert lines["mxfp4"] == [2.0, 0.8] and lines["nvfp4"] == [1.0] and lines["int4"] == [2.5]
    assert lines["cuBLAS FP8 W8A8"] == [1.25, 1.25]


def test_bench_plot_from_saved_rows(tmp_path, capsys):
    """`oscquant bench plot` draws a saved GPU run anywhere: one panel a shape, OSC's speed against BF16."""
    from oscquant.bench import Row, load, plot, save

    def row(shape, m, osc, k_out=128):
        return Row(shape, 4096, 4096, m, k_out, 20.0, None if m <= 16 else 19.0, 18.0, osc - 3, osc, 21.0, 1.0, 1.0,
                   50.0, 60.0, 18.0 / osc, 20.0 / osc)
    rows = [row(s, m, osc) for s in ("8B o", "8B qkv") for m, osc in ((1, 10.0), (256, 40.0), (4096, 25.0))]
    rows.append(row("8B o", 1, 12.0, k_out=64))  # other k: not drawn
    save(rows, str(tmp_path / "rows.json"))
    code, out, err = run(capsys, "bench", "plot", "--json", tmp_path / "rows.json", "--png", tmp_path / "b.png")
    assert code == 0 and (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot(load(str(tmp_path / "rows.json")), str(tmp_path / "c.png"))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["8B o 4096×4096", "8B qkv 4096×4096"]
    osc = next(line for line in panels[0].get_lines() if line.get_label() == "OSC + split (W4A4)")
    assert list(osc.get_xdata()) == [1, 256, 4096] and list(osc.get_ydata()) == [2.0, 0.5, 0.8]  # BF16 20 / OSC
    (tmp_path / "bad.json").write_text('{"rows": 1}')
    code, out, err = run(capsys, "bench", "plot", "--json", tmp_path / "bad.json", "--png", tmp_path / "d.png")
    assert code == 2 and "holds no benchmark rows" in err and not (tmp_path / "d.png").exists()
    code, out, err = run(capsys, "bench", "plot", "--png", tmp_path / "d.png")
    assert code == 2 and "needs --json" in err
