"""Zero-shot accuracy through lm-eval: the offline sotu_next task, the real model above chance, bad input."""

import json
import re
import sys

import pytest
import torch

from oscquant import cli
from oscquant.accuracy import accuracy, sotu_next_items
from oscquant.data import read_text, split_text

HELDOUT = split_text(read_text("sotu"), "heldout")


def collapsed(text):
    return " ".join(text.split())


def test_sotu_next_items_ask_for_the_sentence_that_follows():
    items = sotu_next_items(HELDOUT, 60, seed=0)
    flat = collapsed(HELDOUT)
    assert len(items) == 60
    for item in items:
        choices, answer = item["choices"], item["choices"][item["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= item["label"] < 4
        assert f"{item['context']} {answer}" in flat  # the answer follows the context in the text
        assert all(c not in item["context"] for c in choices)
        # distractors of about the answer's length, so that length does not give it away
        assert max(abs(len(c) - len(answer)) for c in choices) < max(60, len(answer))
    labels = [item["label"] for item in items]
    assert len(set(labels)) == 4  # the answer's position is shuffled
    assert sotu_next_items(HELDOUT, 60, seed=0) == items and sotu_next_items(HELDOUT, 60, seed=1) != items
    calib = collapsed(split_text(read_text("sotu"), "calib"))
    assert sum(f"{i['context']} {i['choices'][i['label']]}" in calib for i in items) <= 2  # held-out text, not calib
    with pytest.raises(ValueError, match="need more text"):
        sotu_next_items(HELDOUT[:3000], 60)


@pytest.fixture(scope="module")
def smollm2():
    from oscquant.models import load_model

    model, tok, _ = load_model("smollm2")
    return model, tok


@pytest.mark.slow
def test_smollm2_picks_the_next_sentence_above_chance(smollm2):
    model, tok = smollm2
    r = accuracy(model, tok, ["sotu_next"], items=100)["sotu_next"]
    assert r["samples"] == 100
    assert r["acc"] > 0.35 and r["acc_norm"] > 0.35, r  # four choices: chance is 0.25


@pytest.mark.slow
def test_nan_log_likelihoods_raise(smollm2):
    model, tok = smollm2
    hook = model.model.layers[3].register_forward_hook(lambda m, i, o: (o[0] * float("nan"),) + tuple(o[1:])
                                                       if isinstance(o, tuple) else o * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="NaN/Inf log-likelihoods"):
            accuracy(model, tok, ["sotu_next"], items=60, limit=4)
    finally:
        hook.remove()


def test_bad_accuracy_calls_raise(monkeypatch):
    with pytest.raises(ValueError, match="no task no_such_task"):
        accuracy(torch.nn.Linear(2, 2), object(), ["no_such_task"])
    with pytest.raises(ValueError, match="no tasks given"):
        accuracy(torch.nn.Linear(2, 2), object(), [])
    with pytest.raises(ValueError, match="no tokenizer"):
        accuracy(torch.nn.Linear(2, 2), None, ["sotu_next"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'oscquant\[eval\]'"):
        accuracy(torch.nn.Linear(2, 2), object(), ["sotu_next"])


def test_cli_eval_reports_perplexity_and_accuracy(tmp_path, capsys):
    from tiny import tiny_model, tiny_tokenizer

    text = HELDOUT[:200_000]
    tok = tiny_tokenizer(text)
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))  # the tokenizer keeps every character of the text: more than 128 tokens
    model.config.bos_token_id = tok.bos_token_id
    model.config.max_position_embeddings = 2048  # nearly a token a character: items need more than 256
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(text)
    argv = ["eval", str(tmp_path / "model"), "--tasks", "sotu_next", "--items", "30", "--limit", "12", "--device", "cpu"]
    assert cli.main(argv + ["--text", str(tmp_path / "text.txt"), "--seq-len", "32", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["perplexity"] > 1 and rec["accuracy"]["sotu_next"]["samples"] == 12
    assert 0 <= rec["accuracy"]["sotu_next"]["acc"] <= 1
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "perplexity" not in out and re.search(r"^sotu_next: acc: [0-9.]+  acc_norm: [0-9.]+  \(12 items\)$", out, re.M)
    assert cli.main(["eval", str(tmp_path / "model")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
