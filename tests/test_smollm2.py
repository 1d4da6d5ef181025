"""Acceptance on the real model: SmolLM2-135M-Instruct on held-out State of the Union text."""

import pytest

from oscquant.compare import compare
from oscquant.config import OSCConfig
from oscquant.data import read_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows():
    models = pytest.importorskip("oscquant.models")
    try:
        model, tok, _ = models.load_model("smollm2")
    except RuntimeError as e:  # the README's setup installs it; say so rather than pass quietly
        pytest.fail(f"{e}")
    configs = {
        "float": None,
        "rtn": OSCConfig.rtn("mxfp4"),
        "osc+fp8": OSCConfig.osc("mxfp4", outlier_ratio=0.06, fallback="fp8"),
    }
    return {r.name: r for r in compare(model, tok, configs, read_text("sotu"), calib_samples=16,
                                       eval_windows=16, progress=False)}


def test_osc_with_fp8_down_proj_stays_within_25_percent_of_float(rows):
    osc = rows["osc+fp8"]
    assert osc.bf16_share <= 0.06
    assert osc.fp8_layers == 30  # every down_proj, nothing else
    assert osc.tokens >= 8000
    assert osc.perplexity <= 1.25 * rows["float"].perplexity, (osc.perplexity, rows["float"].perplexity)


def test_plain_rtn_is_at_least_twice_as_bad_as_osc(rows):
    assert rows["rtn"].perplexity >= 2 * rows["osc+fp8"].perplexity, (rows["rtn"].perplexity,
                                                                       rows["osc+fp8"].perplexity)
