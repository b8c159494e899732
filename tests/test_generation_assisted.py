"""Assisted decoding: a draft model or prompt lookup must not change greedy tokens, and speculative sampling must
keep the model's distribution."""

import functools
from collections.abc import Callable

import pytest
import torch
import transformers
from tiny import batch, make_pair

from optlite.assisted import accept, lookup_draft
from optlite.search import Search

pytestmark = [pytest.mark.filterwarnings("ignore:Using the model-agnostic default:UserWarning"),
              pytest.mark.usefixtures("one_thread")]


@functools.cache
def models():
    ref, target = make_pair("OPTForCausalLM", "pre_ln")
    _, draft = make_pair("OPTForCausalLM", "pre_ln", seed=1, num_hidden_layers=1)  # another model, same vocabulary
    return ref, target, draft


def prompt(row=0):
    ids, mask = batch("left")
    return ids[row:row + 1, mask[row].bool()]


class StopOn(transformers.StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("row", [0, 2])
@pytest.mark.parametrize("drafter", ["assistant", "itself", "lookup"])
@pytest.mark.parametrize("kw", [dict(eos_token_id=None), dict(repetition_penalty=1.3, eos_token_id=None),
                                dict(eos="mid"), dict(stop="mid"), dict(num_assistant_tokens=3,
                                                                        num_assistant_tokens_schedule="heuristic")],
                         ids=["plain", "penalty", "eos", "criterion", "heuristic"])
def test_assisted_greedy_gives_exactly_plain_greedy(row, drafter, kw):
    ref, target, draft = models()
    ids = prompt(row)
    kw = dict(kw)
    plain = target.generate(ids, max_new_tokens=16, eos_token_id=None)
    mid = plain[0, ids.shape[1] + 6].item()  # a token of the plain output: as eos or stop token it ends mid-way
    if kw.pop("eos", None):
        kw["eos_token_id"] = mid
    if kw.pop("stop", None):
        kw.update(stopping_criteria=transformers.StoppingCriteriaList([StopOn(mid)]), eos_token_id=None)
    expected = target.generate(ids, max_new_tokens=16, **kw)
    extra = dict(prompt_lookup_num_tokens=3) if drafter == "lookup" else \
        dict(assistant_model=draft if drafter == "assistant" else target)
    out = target.generate(ids, max_new_tokens=16, **kw, **extra)
    assert torch.equal(out, expected), f"\n{out}\n{expected}"
    assert torch.equal(expected, ref.generate(ids, max_new_tokens=16, **kw))  # and transformers' tokens
    if "eos_token_id" in kw and kw["eos_token_id"] == mid or "stopping_criteria" in kw:
        assert out.shape[1] < ids.shape[1] + 16


def test_assisted_greedy_matches_transformers_assisted_generation():
    ref, target, draft = models()
    ref_draft = transformers.OPTForCausalLM(transformers.OPTConfig(**{**draft.config.to_dict()}))
    ref_draft.load_state_dict(draft.state_dict())
    ids = prompt(1)
    a = ref.generate(ids, max_new_tokens=12, assistant_model=ref_draft.eval())
    assert torch.equal(target.generate(ids, max_new_tokens=12, assistant_model=draft), a)
    a = ref.generate(ids, max_new_tokens=12, prompt_lookup_num_tokens=2)
    assert torch.equal(target.generate(ids, max_new_tokens=12, prompt_lookup_num_tokens=2), a)


def test_speculative_acceptance_keeps_the_target_distribution():
    """Drafts drawn from q, accepted by the rule: the first token must follow p, not q."""
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.tensor([2.0, 0.5, 0.0, -1.0, 1.0]), torch.tensor([0.0, 2.0, 1.0, 0.5, -1.0])
    scores = torch.stack([p_logits, p_logits])  # (k + 1, V) with k = 1
    search = Search(cfg=type("Cfg", (), {"do_sample": True})(), max_len=10, generator=g)
    counts = torch.zeros(5)
    trials = 20000
    for _ in range(trials):
        draft = torch.multinomial(q_logits.softmax(-1), 1, generator=g)
        counts[accept(draft, q_logits[None], scores, search)[0]] += 1
    total_variation = 0.5 * (counts / trials - p_logits.softmax(-1)).abs().sum()
    assert total_variation < 0.02, (counts / trials, p_logits.softmax(-1))
    assert 0.5 * (p_logits.softmax(-1) - q_logits.softmax(-1)).abs().sum() > 0.3  # q is far from p


def test_assisted_sampling_is_reproducible_and_stays_in_the_allowed_set():
    _, target, draft = models()
    ids = prompt(0)
    kw = dict(do_sample=True, top_k=4, max_new_tokens=12, eos_token_id=None, assistant_model=draft,
              return_dict_in_generate=True, output_scores=True)
    a = target.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    b = target.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape[1] == ids.shape[1] + 12
    for step, scores in enumerate(a.scores):
        assert torch.isfinite(scores).sum() == 4
        assert torch.isfinite(scores[0, a.sequences[0, ids.shape[1] + step]])


def test_prompt_lookup_and_cache_crop():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6]])
    assert lookup_draft(ids, 3, 2, 20).tolist() == [7, 8, 5]  # "5 6" was followed by 7 8 5
    assert lookup_draft(torch.tensor([[1, 2, 3]]), 3, 2, 20).tolist() == []
    _, target, _ = models()
    out = target(prompt(0), use_cache=True)
    out.past_key_values.crop(3)
    assert out.past_key_values.get_seq_length() == 3


@pytest.mark.parametrize("kw,match", [
    (dict(num_beams=2, assistant_model="draft"), "num_beams=2"),
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens"),
    (dict(prompt_lookup_num_tokens=2, assistant_model="draft"), "not both"),
    (dict(assistant_model="other_vocab"), "vocabulary of 120 tokens but the model has 99"),
    (dict(assistant_model="draft", batch=True), "one prompt"),
    (dict(prompt_lookup_num_tokens=3, use_cache=False), "use_cache=True"),
])
def test_assisted_bad_input_is_refused_before_any_compute(kw, match):
    _, target, draft = models()
    kw = dict(kw)
    if kw.get("assistant_model") == "draft":
        kw["assistant_model"] = draft
    elif kw.get("assistant_model") == "other_vocab":
        kw["assistant_model"] = make_pair("OPTForCausalLM", "pre_ln", vocab_size=120)[1]
    ids, mask = batch("left") if kw.pop("batch", False) else (prompt(0), None)
    target.forward = lambda *a, **k: pytest.fail("the model ran before the arguments were checked")
    try:
        with pytest.raises(ValueError, match=match):
            target.generate(ids, attention_mask=mask, max_new_tokens=4, **kw)
    finally:
        del target.forward


def forwards(model: torch.nn.Module) -> tuple[list[int], Callable[[], None]]:
    """A one-item list counting the calls of `model`'s forward, and the function that stops counting."""
    calls = [0]
    hook = model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls, hook.remove


@pytest.mark.parametrize("drafter,settings", [
    ("draft", {}),  # transformers' defaults: 20 tokens, constant, confidence threshold 0.4
    ("itself", dict(num_assistant_tokens=3, num_assistant_tokens_schedule="heuristic",
                    assistant_confidence_threshold=0.0)),
    ("itself", dict(num_assistant_tokens=5, assistant_confidence_threshold=0.0)),
], ids=["defaults", "heuristic", "constant-5"])
def test_draft_schedule_matches_transformers_round_for_round(drafter, settings, monkeypatch):
    """As many verifying forwards of the model and drafting forwards of the assistant as transformers (whose
    assistant's generation_config holds the schedule; its scikit-learn threshold adaptation is switched off)."""
    monkeypatch.setattr(transformers.generation.candidate_generator, "is_sklearn_available", lambda: False)
    ref, target, _ = models()
    if drafter == "draft":
        ref_draft, draft = make_pair("OPTForCausalLM", "pre_ln", seed=1, num_hidden_layers=1)
    else:
        ref_draft, draft = make_pair("OPTForCausalLM", "pre_ln")  # fresh copies: transformers writes into them
    ref_draft.generation_config.update(**settings)
    ids = prompt(1)
    counted = []
    for model, assistant, kw in ((ref, ref_draft, {}), (target, draft, settings)):
        (rounds, stop_rounds), (drafts, stop_drafts) = forwards(model), forwards(assistant)
        out = model.generate(ids, max_new_tokens=24, eos_token_id=None, assistant_model=assistant, **kw)
        stop_rounds(), stop_drafts()
        counted.append((out, rounds[0], drafts[0]))
    (ref_out, ref_rounds, ref_drafts), (out, rounds, drafts) = counted
    assert torch.equal(out, ref_out)
    assert (rounds - 1, drafts) == (ref_rounds, ref_drafts)  # optlite caches the prompt in one forward first
    assert ref_rounds < 24 or drafter == "draft"  # drafts were accepted: fewer rounds than tokens
