"""lm-eval's HFLM, as its docs show for a transformers model (`HFLM(pretrained=model)`), with optlite in its place:
log-likelihoods, rolling log-likelihoods and a small local multiple-choice task, compared with transformers' OPT."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import optlite

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

REQUESTS = [("Hello, my dog", " is cute"), ("A photo of", " a cat"), ("This is", " a test"), ("I like", " you.")]
QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "answer": 0},
    {"question": "A cat is an", "choices": [" animal", " planet"], "answer": 0},
    {"question": "Two plus two is", "choices": [" three", " four", " five"], "answer": 1},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def lms(hf_checkpoint, one_thread):
    ref = transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    ours = optlite.OPTForCausalLM.from_pretrained(hf_checkpoint)
    # No tokenizer given: HFLM loads transformers' tokenizer from `model.name_or_path`, the checkpoint's folder.
    return HFLM(pretrained=ref, batch_size=2), HFLM(pretrained=ours, batch_size=2)


def test_loglikelihoods_match_transformers(lms):
    ref, ours = lms
    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    expected, got = ref.loglikelihood(requests), ours.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in expected]  # greedy flags
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], rel=1e-5)
    rolling = [Instance("loglikelihood_rolling", {}, ("Hello, my dog is cute. A photo of a cat.",), 0)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(ref.loglikelihood_rolling(rolling), rel=1e-5)


def test_local_multiple_choice_task_scores_like_transformers(lms, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tiny_mc.yaml").write_text(TASK.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # only ours: indexing all takes a minute
    ref_out, ours_out = [simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tasks, log_samples=True)
                         for lm in lms]
    assert ours_out["results"]["tiny_mc"] == ref_out["results"]["tiny_mc"]
    ref_scores = [s["resps"] for s in ref_out["samples"]["tiny_mc"]]
    our_scores = [s["resps"] for s in ours_out["samples"]["tiny_mc"]]
    for a, b in zip(our_scores, ref_scores, strict=True):
        assert [r[0][0] for r in a] == pytest.approx([r[0][0] for r in b], rel=1e-5)


def test_generate_until_matches_transformers(lms):
    ref, ours = lms
    requests = [Instance("generate_until", {}, (prompt, {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False}),
                         i) for i, (prompt, _) in enumerate(REQUESTS)]
    expected = ref.generate_until(requests)
    assert any(expected), "the tiny model should generate some text before a stop string"
    assert ours.generate_until(requests) == expected
