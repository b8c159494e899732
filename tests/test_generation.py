"""Generation: each processor, sampler and beam-search piece alone, then whole `generate` calls against transformers'
`generate` on the same tiny random weights (tokens must be identical), then the checks on bad input."""

import functools
import json
import warnings

import pytest
import torch
import transformers
from tiny import batch, make_pair, record
from transformers.generation import logits_process as tlp

from optlite import GenerationConfig
from optlite.generation import (
    DEFAULTS,
    apply_temperature,
    beam_search_done,
    can_still_improve,
    gather_beams,
    generate,
    greedy_token,
    length_normalized,
    no_repeat_ngram,
    repetition_penalty,
    resolve_config,
    sample_token,
    suppress_eos,
    top_continuations,
    top_k_filter,
    top_p_filter,
)
from optlite.logits_processors import suppress

SHAPES = ["pre_ln", "post_ln_proj"]
PAD = 1
pytestmark = [pytest.mark.filterwarnings("ignore:Using the model-agnostic default:UserWarning"),
              pytest.mark.usefixtures("one_thread")]


@functools.cache
def pair(shape):
    return make_pair("OPTForCausalLM", shape)


def prompts(kind):
    """(input_ids, attention_mask): one 7-token prompt, or tiny.batch's 3 left-padded rows."""
    ids, mask = batch("left")
    return (ids[:1], None) if kind == "single" else (ids, mask)


def generate_both(shape, ids, mask, **kw):
    ref, ours = pair(shape)
    return ref.generate(ids, attention_mask=mask, **kw), ours.generate(ids, attention_mask=mask, **kw)


def eos_mid_way(sequences, prompt_len, row=0, step=3):
    """A token the reference emits first at `step` of `row` (or near): as eos it ends that row mid-way."""
    new = sequences[row, prompt_len:].tolist()
    firsts = [(k, t) for k, t in enumerate(new) if t not in new[:k] and t != PAD and k > 0]
    return min(firsts, key=lambda kt: (kt[0] < step, abs(kt[0] - step)))[1]  # at `step`, else the nearest after


def assert_same_tokens(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}\n{a}\n{b}"
    assert torch.equal(a, b), f"tokens differ\n{a}\n{b}"


# ---------------------------------------------------------------------------------------------------------------------
# Processors alone, against transformers' processor of the same name
# ---------------------------------------------------------------------------------------------------------------------


def random_scores(rows=4, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3, torch.randint(0, vocab, (rows, 9), generator=g)


@pytest.mark.parametrize("ignore", [False, True])
def test_repetition_penalty_matches_transformers(ignore):
    scores, ids = random_scores()
    ignore_before = torch.tensor([0, 2, 4, 9]) if ignore else None
    ref = tlp.RepetitionPenaltyLogitsProcessor(1.7, prompt_ignore_length=ignore_before)(ids, scores.clone())
    assert torch.equal(repetition_penalty(scores, ids, 1.7, ignore_before), ref)


def test_repetition_penalty_touches_only_seen_tokens():
    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = repetition_penalty(scores, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert scores.tolist() == [[2.0, -2.0, 1.0, -1.0]]  # not in place


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(n):
    scores, _ = random_scores()
    ids = torch.tensor([[1, 2, 1, 2, 1], [3, 3, 3, 3, 3], [1, 2, 3, 4, 5], [5, 1, 2, 5, 1]])
    assert torch.equal(no_repeat_ngram(scores, ids, n), tlp.NoRepeatNGramLogitsProcessor(n)(ids, scores))


def test_no_repeat_ngram_bans_the_completing_token():
    out = no_repeat_ngram(torch.zeros(1, 6), torch.tensor([[4, 5, 1, 4]]), 2)  # "4 5" seen, last token 4
    assert torch.isinf(out).nonzero().tolist() == [[0, 5]]
    assert torch.equal(no_repeat_ngram(torch.zeros(1, 6), torch.tensor([[4]]), 2), torch.zeros(1, 6))


def test_suppressed_ids_outside_the_vocabulary_change_nothing():
    scores, ids = random_scores()
    vocab = scores.shape[-1]
    eos = torch.tensor([3, vocab, -1, 7, 3, vocab + 40])  # out of range, negative and repeated ids
    ref = tlp.MinLengthLogitsProcessor(20, eos)(ids, scores)
    got = suppress_eos(scores, ids.shape[1], 20, eos)
    assert torch.equal(got, ref)
    assert torch.isinf(got).sum() == 2 * scores.shape[0] and torch.isinf(got[:, [3, 7]]).all()
    ref = tlp.SuppressTokensLogitsProcessor([5, vocab + 2, 0])(ids, scores)
    assert torch.equal(suppress(scores, torch.tensor([5, vocab + 2, 0])), ref)


def test_suppress_eos_matches_min_length_processors():
    scores, ids = random_scores()
    eos = torch.tensor([3, 7])
    for min_length in (5, 9, 10, 12):
        ref = tlp.MinLengthLogitsProcessor(min_length, eos)(ids, scores)
        assert torch.equal(suppress_eos(scores, ids.shape[1], min_length, eos), ref)
    ref = tlp.MinNewTokensLengthLogitsProcessor(6, 4, eos)(ids, scores)  # prompt 6 + 4 new > 9 tokens so far
    assert torch.equal(suppress_eos(scores, ids.shape[1], 10, eos), ref)
    assert torch.isinf(suppress_eos(scores, 9, 10, eos)[:, [3, 7]]).all()


@pytest.mark.parametrize("keep", [1, 3])
def test_warpers_match_transformers(keep):
    scores, ids = random_scores()
    assert torch.equal(apply_temperature(scores, 0.7), tlp.TemperatureLogitsWarper(0.7)(ids, scores))
    for k in (1, 2, 5, 100):
        assert torch.equal(top_k_filter(scores, k, keep), tlp.TopKLogitsWarper(k, min_tokens_to_keep=keep)(ids, scores))
    for p in (0.05, 0.5, 0.9, 1.0):
        assert torch.equal(top_p_filter(scores, p, keep), tlp.TopPLogitsWarper(p, min_tokens_to_keep=keep)(ids, scores))


def test_top_k_and_top_p_keep_the_expected_sets():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    kept = lambda s: torch.isfinite(s[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k_filter(probs.log(), 2)) == [1, 3]
    assert kept(top_p_filter(probs.log(), 0.7)) == [1, 3]  # 0.4 + 0.3 reaches 0.7
    assert kept(top_p_filter(probs.log(), 0.71)) == [1, 3, 4]
    assert kept(top_p_filter(probs.log(), 0.01)) == [1]  # the best token always stays


# ---------------------------------------------------------------------------------------------------------------------
# Samplers and beam-search pieces
# ---------------------------------------------------------------------------------------------------------------------


def test_samplers():
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, -1.0, 2.0]])
    assert greedy_token(scores).tolist() == [1, 0]
    filtered = top_k_filter(torch.randn(8, 50, generator=torch.Generator().manual_seed(1)), 3)
    allowed = torch.isfinite(filtered)
    draws = torch.stack([sample_token(filtered, torch.Generator().manual_seed(s)) for s in range(50)])  # (50, 8)
    assert allowed.gather(1, draws.T).all(), "sampled a token outside the top-k set"
    a = sample_token(filtered, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_token(filtered, torch.Generator().manual_seed(7)))


def test_beam_pieces():
    t = torch.arange(2 * 3 * 4).view(2, 3, 4)
    assert torch.equal(gather_beams(t, torch.tensor([[2, 0], [1, 1]])), torch.stack([t[0, [2, 0]], t[1, [1, 1]]]))
    log_probs = torch.full((1, 2, 5), -10.0)
    log_probs[0, 1, 3], log_probs[0, 0, 4], log_probs[0, 1, 0] = -1.0, -2.0, -3.0
    scores, beams, tokens = top_continuations(log_probs, 3, do_sample=False)
    assert beams.tolist() == [[1, 0, 1]] and tokens.tolist() == [[3, 4, 0]] and scores.tolist() == [[-1, -2, -3]]
    assert length_normalized(torch.tensor([-6.0]), 3, 1.0).item() == -2.0
    assert length_normalized(torch.tensor([-6.0]), 4, 0.5).item() == -3.0
    assert length_normalized(torch.tensor([-6.0]), 4, 0.0).item() == -6.0


def test_early_stop_heuristics():
    running, finished = torch.tensor([[-8.0, -9.0]]), torch.tensor([[-1.0, -1.5]])
    all_done = torch.tensor([[True, True]])
    ok = torch.ones(1, 1, dtype=torch.bool)
    # False: the best running beam at the current length (-8/4) cannot beat the worst finished one (-1.5).
    assert not can_still_improve(ok, running, finished, all_done, 9, 20, 5, False, 1.0).item()
    # "never" with a positive length penalty: it might at max length (-8/15 > -1.5).
    assert can_still_improve(ok, running, finished, all_done, 9, 20, 5, "never", 1.0).item()
    # Until num_beams beams are finished, the worst finished score counts as -1e9: improvement is possible.
    assert can_still_improve(ok, running, finished, torch.tensor([[True, False]]), 9, 20, 5, False, 1.0).item()
    no_stop = torch.zeros(1, 4, dtype=torch.bool)
    assert beam_search_done(ok, all_done, no_stop, True)  # early_stopping=True: num_beams finished is enough
    assert not beam_search_done(ok, all_done, no_stop, False)
    assert beam_search_done(~ok, all_done, no_stop, False)
    assert beam_search_done(ok, all_done & False, torch.ones(1, 4, dtype=torch.bool), "never")


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_are_transformers_defaults():
    reference = transformers.GenerationConfig._get_default_generation_params()
    for name, value in DEFAULTS.items():
        assert reference.get(name, False) == value, name  # output_logits is not listed there: None, i.e. off
    cfg = resolve_config(pair("pre_ln")[1])
    assert (cfg.max_length, cfg.max_new_tokens, cfg.top_k, cfg.do_sample) == (None, None, 50, False)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 2, 1)  # from the model config


def test_settings_priority_and_generation_config_file(tmp_path):
    _, ours = pair("pre_ln")
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"max_new_tokens": 5, "top_k": 7, "eos_token_id": [2, 9], "transformers_version": "4.27.0"}))
    file_cfg = GenerationConfig.from_pretrained(tmp_path)
    assert file_cfg.extra == {"transformers_version": "4.27.0"}
    saved = GenerationConfig.from_pretrained(file_cfg.save_pretrained(tmp_path / "copy"))
    assert saved == file_cfg
    ours.generation_config = file_cfg
    try:
        cfg = resolve_config(ours)
        assert (cfg.max_new_tokens, cfg.top_k, cfg.eos_token_id, cfg.pad_token_id) == (5, 7, [2, 9], 1)
        cfg = resolve_config(ours, GenerationConfig(top_k=3), top_p=0.5)
        assert (cfg.top_k, cfg.top_p, cfg.max_new_tokens) == (3, 0.5, 5)
        cfg = resolve_config(ours, max_length=12)  # an explicit length wins over the file's as a pair
        assert (cfg.max_length, cfg.max_new_tokens) == (12, None)
        ids, _ = prompts("single")
        assert ours.generate(ids, eos_token_id=None, pad_token_id=1).shape[1] == 7 + 5
        ours.generation_config = transformers.GenerationConfig(max_new_tokens=3)  # a transformers object works too
        assert ours.generate(ids).shape[1] <= 7 + 3
    finally:
        del ours.generation_config


# ---------------------------------------------------------------------------------------------------------------------
# Whole generate calls: the same tokens as transformers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["single", "batch"])
def test_greedy_matches_transformers_and_pads_finished_rows(shape, kind):
    ids, mask = prompts(kind)
    a, b = generate_both(shape, ids, mask, max_new_tokens=10)
    assert_same_tokens(a, b)
    eos = eos_mid_way(a, ids.shape[1])
    a, b = generate_both(shape, ids, mask, max_new_tokens=10, eos_token_id=eos)
    assert_same_tokens(a, b)
    ended = (b[:, ids.shape[1]:] == eos).int().argmax(1)
    assert b[0, ids.shape[1] + ended[0]] == eos and ended[0] >= 3
    if kind == "batch":
        assert (b[0, ids.shape[1] + ended[0] + 1:] == PAD).all() and b.shape[1] > ids.shape[1] + ended[0] + 1, \
            "the test should see a finished row padded while others go on"


@pytest.mark.parametrize("shape", SHAPES)
def test_each_row_of_a_left_padded_batch_gets_its_own_tokens(shape):
    _, ours = pair(shape)
    ids, mask = prompts("batch")
    solo_first = ours.generate(ids[:1], max_new_tokens=10)
    eos = eos_mid_way(solo_first, ids.shape[1], step=4)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    ended_early = False
    for row in range(ids.shape[0]):
        prompt = ids[row:row + 1, mask[row].bool()]
        alone = ours.generate(prompt, max_new_tokens=10, eos_token_id=eos)[0, prompt.shape[1]:]
        new = out[row, ids.shape[1]:]
        assert torch.equal(new[:len(alone)], alone)
        assert (new[len(alone):] == PAD).all()
        ended_early = ended_early or len(alone) < 10
    assert ended_early, "the test should see a row end early"


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_scores_match_transformers(shape):
    ids, mask = prompts("batch")
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True,
              repetition_penalty=1.2)
    a, b = generate_both(shape, ids, mask, **kw)
    assert_same_tokens(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) == 6 and len(b.logits) == 6
    for x, y in zip(a.scores, b.scores, strict=True):
        assert record("generate scores (greedy)", x, y) < 1e-5
    for x, y in zip(a.logits, b.logits, strict=True):
        assert record("generate logits (greedy)", x, y) < 1e-5
    plain = pair(shape)[1].generate(ids, attention_mask=mask, max_new_tokens=6, repetition_penalty=1.2)
    assert torch.equal(plain, b.sequences)


BEAM_CASES = [
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    dict(num_beams=4, num_return_sequences=4, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=3, num_return_sequences=3, length_penalty=-1.0, early_stopping=False),
    dict(num_beams=3, length_penalty=0.0, early_stopping="never"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["single", "batch"])
@pytest.mark.parametrize("case", range(len(BEAM_CASES)))
def test_beam_search_matches_transformers(shape, kind, case):
    ids, mask = prompts(kind)
    greedy = pair(shape)[1].generate(ids, attention_mask=mask, max_new_tokens=8)
    eos = eos_mid_way(greedy, ids.shape[1], step=2)  # reachable, so beams really finish early
    kw = dict(BEAM_CASES[case], max_new_tokens=8, eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
    a, b = generate_both(shape, ids, mask, **kw)
    assert_same_tokens(a.sequences, b.sequences)
    assert torch.equal(a.beam_indices, b.beam_indices)
    assert record("beam sequences_scores", a.sequences_scores, b.sequences_scores, relative=True) < 1e-5
    for x, y in zip(a.scores, b.scores, strict=True):
        assert record("beam scores", x, y, relative=True) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1, repetition_penalty=1.3),
    dict(no_repeat_ngram_size=3, num_beams=3, num_return_sequences=2),
    dict(repetition_penalty=1.4, num_beams=2, length_penalty=0.8),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_penalties_match_transformers(shape, kw):
    for kind in ("single", "batch"):
        ids, mask = prompts(kind)
        assert_same_tokens(*generate_both(shape, ids, mask, max_new_tokens=10, **kw))


@pytest.mark.parametrize("shape", SHAPES)
def test_min_new_tokens_matches_transformers(shape):
    ids, mask = prompts("batch")
    first = pair(shape)[1].generate(ids, attention_mask=mask, max_new_tokens=2)[0, -2].item()
    a, b = generate_both(shape, ids, mask, max_new_tokens=8, min_new_tokens=4, eos_token_id=first)
    assert_same_tokens(a, b)
    assert not (b[:, ids.shape[1]:ids.shape[1] + 4] == first).any()


def test_defaults_match_transformers_when_nothing_is_passed():
    for shape in SHAPES:
        ids, mask = prompts("batch")
        a, b = generate_both(shape, ids, mask)
        assert_same_tokens(a, b)
        assert b.shape[1] <= ids.shape[1] + 20
    long_ids = torch.randint(3, 99, (1, 30), generator=torch.Generator().manual_seed(3))
    a, b = generate_both("pre_ln", long_ids, None, eos_token_id=None)
    assert_same_tokens(a, b)
    assert b.shape[1] == 40  # 20 new tokens would pass max_position_embeddings=40: cut there, as transformers


def test_eos_as_a_list_and_return_dict():
    ids, mask = prompts("batch")
    greedy = pair("pre_ln")[1].generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = [eos_mid_way(greedy, 7, row=0), eos_mid_way(greedy, 7, row=2)]
    a, b = generate_both("pre_ln", ids, mask, max_new_tokens=10, eos_token_id=eos, return_dict_in_generate=True)
    assert_same_tokens(a.sequences, b.sequences)
    assert b.scores is None and b.past_key_values is not None


@pytest.mark.parametrize("shape", SHAPES)
def test_sampling_matches_transformers_on_the_same_seed(shape):
    ids, mask = prompts("batch")
    for kw in (dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8, num_return_sequences=2),
               dict(num_beams=2, top_k=10)):
        ref, ours = pair(shape)
        torch.manual_seed(11)
        a = ref.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8, **kw)
        torch.manual_seed(11)
        b = ours.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8, **kw)
        assert_same_tokens(a, b)


def test_sampling_with_a_generator_is_reproducible_and_stays_in_the_allowed_set():
    _, ours = pair("pre_ln")
    ids, mask = prompts("batch")
    kw = dict(do_sample=True, max_new_tokens=12, eos_token_id=None)
    a = ours.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(5), **kw)
    torch.manual_seed(0)  # the global generator is not used
    b = ours.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)
    c = ours.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(a, c)
    for extra in (dict(top_k=3, temperature=1.5), dict(top_p=0.6, top_k=0), dict(top_p=0.3, temperature=0.5)):
        out = ours.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(1), output_scores=True,
                            output_logits=True, return_dict_in_generate=True, **kw, **extra)
        tokens = out.sequences[:, ids.shape[1]:]
        for step, (scores, logits) in enumerate(zip(out.scores, out.logits, strict=True)):
            allowed = torch.isfinite(scores)
            if "top_k" in extra and extra["top_k"]:
                expected = torch.isfinite(top_k_filter(logits, extra["top_k"]))
                assert torch.equal(allowed, expected)
            if "top_p" in extra:
                t = extra.get("temperature", 1.0)
                assert torch.equal(allowed, torch.isfinite(top_p_filter(logits / t, extra["top_p"])))
            assert allowed.gather(1, tokens[:, step:step + 1]).all(), "sampled a token outside the allowed set"


def test_one_forward_per_new_token_and_cache_free_decoding_agrees():
    _, ours = pair("pre_ln")
    ids, mask = prompts("batch")
    calls = []
    forward = ours.forward

    def counting(*args, **kwargs):
        calls.append((args[0].shape, kwargs))
        return forward(*args, **kwargs)

    ours.forward = counting
    try:
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    finally:
        del ours.forward
    assert out.shape == (3, 16) and len(calls) == 9
    assert calls[0][0] == (3, 7) and calls[0][1]["logits_to_keep"] == 1
    for shape, kwargs in calls[1:]:
        assert shape == (3, 1) and kwargs["position_ids"].shape == (3, 1)
    assert torch.equal(out, ours.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None,
                                          use_cache=False))
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **beams),
                       ours.generate(ids, attention_mask=mask, use_cache=False, **beams))


def test_missing_mask_is_inferred_from_padding_with_a_warning():
    ids, mask = prompts("batch")
    ref, ours = pair("pre_ln")
    with pytest.warns(UserWarning, match="no attention_mask"):
        b = ours.generate(ids, max_new_tokens=6)
    assert_same_tokens(ref.generate(ids, max_new_tokens=6), b)
    assert torch.equal(b, ours.generate(ids, attention_mask=mask, max_new_tokens=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.generate(ids[:1], max_new_tokens=2)  # nothing padded: no warning
    with pytest.warns(UserWarning, match="right-padding was detected"):
        ours.generate(torch.tensor([[5, 6, 7], [5, 1, 1]]), attention_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]),
                      max_new_tokens=2)


def test_zero_new_tokens_and_no_prompt():
    _, ours = pair("pre_ln")
    ids, _ = prompts("single")
    assert torch.equal(ours.generate(ids, max_new_tokens=0), ids)
    out = ours.generate(max_new_tokens=3, eos_token_id=None)  # starts from bos, as transformers
    assert out.shape == (1, 4) and out[0, 0] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any compute
# ---------------------------------------------------------------------------------------------------------------------

BAD = [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=40), "max_position_embeddings"),
    (dict(max_length=50), "max_position_embeddings"),
    (dict(max_length=5), "max_length"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(eos_token_id="2"), "eos_token_id"),
    (dict(cache_implementation="paged"), "cache_implementation"),
    (dict(num_beams=2, streamer=object()), "streamer"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[name for _, name in BAD])
def test_bad_settings_raise_before_any_compute(kw, name):
    _, ours = pair("pre_ln")
    ids, _ = prompts("single")
    ours.forward = lambda *a, **k: pytest.fail("the model ran before the settings were checked")
    try:
        with pytest.raises(ValueError, match=name):
            ours.generate(ids, **kw)
    finally:
        del ours.forward


def test_unknown_or_misspelled_arguments_raise_type_error():
    _, ours = pair("pre_ln")
    ids, _ = prompts("single")
    with pytest.raises(TypeError, match=r"'foo', 'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        ours.generate(ids, max_new_token=5, foo=1)
    with pytest.raises(ValueError, match="input_ids"):
        generate(ours, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(ids, attention_mask=torch.ones(1, 3))
    # temperature 0 with greedy decoding is harmless: it is ignored, as in transformers
    assert ours.generate(ids, temperature=0.0, max_new_tokens=2).shape == (1, 9)


def test_custom_logits_processors_and_generation_config_argument():
    _, ours = pair("pre_ln")
    ids, mask = prompts("batch")
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    banned = plain[0, 7].item()
    ban = lambda input_ids, scores: scores.index_fill(1, torch.tensor([banned]), -float("inf"))  # noqa: E731
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, logits_processor=[ban])
    assert not (out[:, 7:] == banned).any()
    no_repeat = tlp.NoRepeatNGramLogitsProcessor(2)  # a transformers processor plugs in as is
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=6, logits_processor=[no_repeat])
    assert torch.equal(a, ours.generate(ids, attention_mask=mask, max_new_tokens=6, no_repeat_ngram_size=2))
    cfg = {"max_new_tokens": 3}  # a plain dict works as generation_config
    assert ours.generate(ids, attention_mask=mask, generation_config=cfg).shape == (3, 10)
