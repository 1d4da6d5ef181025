"""Zero-shot accuracy through lm-eval (EleutherAI's evaluation harness), the metric the OSC paper reports.

Any lm-eval task works where its dataset can be downloaded (arc_easy, piqa, hellaswag, winogrande, ...). Without the
Hugging Face Hub there is ``sotu_next``, built here from held-out text (by default the last 10 % of the State of the
Union corpus, which ``quantize`` never calibrates on): each item is two sentences of context and four candidate
next sentences, the true one and three others from the same held-out text of about its length; the model picks the
candidate it gives the highest log-likelihood (acc), or the highest per byte (acc_norm). lm-eval reads it as a local
task (a YAML file and a JSON-lines file in a temporary directory).
"""

from __future__ import annotations

import json
import math
import random
import re
import tempfile
from pathlib import Path

LOCAL_TASK = "sotu_next"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def sentences(text: str) -> list[list[str]]:
    """The text's paragraphs (blank-line separated) as lists of sentences, whitespace collapsed."""
    return [[s for s in _SENTENCE_END.split(" ".join(p.split())) if s]
            for p in re.split(r"\n\s*\n", text) if p.strip()]


def sotu_next_items(text: str, count: int = 200, seed: int = 0) -> list[dict]:
    """``count`` items {context, choices, label}: two sentences, then the next sentence of the same paragraph among
    three distractors, drawn from the whole text (never the context or the answer), whose lengths are closest to it
    (so that length alone does not give the answer away). Deterministic for a text and seed."""
    paragraphs = sentences(text)
    pool = [s for p in paragraphs for s in p if 40 <= len(s) <= 300]
    spots = [(p, i) for p in paragraphs for i in range(2, len(p)) if 40 <= len(p[i]) <= 300]
    if len(spots) < count or len(pool) < 50:
        raise ValueError(f"the text has {len(spots)} usable sentences after two others in a paragraph; {count} items "
                         "need more text (or ask for fewer items)")
    rng = random.Random(seed)
    items = []
    for p, i in rng.sample(spots, count):
        target = p[i]
        sample = [s for s in rng.sample(pool, 50) if s not in p[i - 2:i + 1]]
        wrong = sorted(sample, key=lambda s: abs(len(s) - len(target)))[:3]
        choices = [target] + wrong
        rng.shuffle(choices)
        items.append({"context": " ".join(p[i - 2:i]), "choices": choices, "label": choices.index(target)})
    return items


def write_local_task(directory: Path, text: str, count: int = 200, seed: int = 0) -> Path:
    """The ``sotu_next`` task (YAML and JSON lines) written into ``directory``, for lm-eval's ``include_path``."""
    data = directory / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in sotu_next_items(text, count, seed)), encoding="utf-8")
    (directory / f"{LOCAL_TASK}.yaml").write_text(_TASK_YAML.format(name=LOCAL_TASK, data=json.dumps(str(data))),
                                                  encoding="utf-8")
    return directory


def accuracy(model, tokenizer, tasks: list[str], text: str | None = None, limit: int | None = None,
             batch_size: int = 8, items: int = 200, seed: int = 0) -> dict[str, dict]:
    """{task: {"acc", "acc_norm" (where the task has it), "samples"}} from lm-eval, run on this model object (an
    OSC-quantized one included). ``text``: the held-out text that ``sotu_next`` is built from (default: the held-out
    part of the State of the Union corpus); ``limit``: at most this many items a task."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError(f"accuracy needs lm-eval ({err}); install it with: pip install 'oscquant[eval]'") from err
    if not tasks:
        raise ValueError("no tasks given; name lm-eval tasks, e.g. sotu_next or arc_easy,piqa")
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; lm-eval needs one to score text")
    with tempfile.TemporaryDirectory() as tmp:
        include = None
        if LOCAL_TASK in tasks:
            if text is None:
                from .data import read_text, split_text
                text = split_text(read_text("sotu"), "heldout")
            include = str(write_local_task(Path(tmp), text, items, seed))
        manager = TaskManager(include_path=include)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"lm-eval has no task {', '.join(unknown)}; use {LOCAL_TASK} (offline) or an lm-eval "
                             "task name such as arc_easy, piqa, hellaswag, winogrande")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=True)
    for task, samples in out["samples"].items():  # NaN log-likelihoods would still pick an answer: refuse them
        if any(not math.isfinite(ll) for s in samples for ll, _ in s["filtered_resps"]):
            raise FloatingPointError(f"the model gave NaN/Inf log-likelihoods on {task}; the quantized model is broken")
    results = {}
    for task in tasks:
        r = out["results"][task]
        results[task] = {"acc": r["acc,none"], "samples": len(out["samples"][task])}
        if "acc_norm,none" in r:
            results[task]["acc_norm"] = r["acc_norm,none"]
    return results
