"""generate()'s arguments beyond the basic searches, each against transformers' generate on the same tiny weights:
token control, sampling filters, score processing, stopping criteria, extra outputs, and the input forms
(inputs_embeds, past_key_values, logits_to_keep, use_cache=False). Tokens must be identical, scores equal within
fp32 rounding (relative)."""

import functools
import json

import pytest
import torch
import transformers
from conftest import SHARED_TOKENIZER
from tiny import batch, make_pair, record

PAD = 1
pytestmark = [pytest.mark.filterwarnings("ignore:Using the model-agnostic default:UserWarning"),
              pytest.mark.usefixtures("one_thread")]


@functools.cache
def pair(shape="pre_ln", attn="sdpa"):
    return make_pair("OPTForCausalLM", shape, attn_implementation=attn)


def prompts(kind):
    ids, mask = batch("left")
    return (ids[:1], None) if kind == "single" else (ids, mask)


@functools.cache
def greedy_tokens(kind):
    """The first new tokens of row 0 with plain greedy decoding: the arguments below are built to change them."""
    ids, mask = prompts(kind)
    return pair()[1].generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)[0, 7:].tolist()


MODES = {
    "greedy": dict(),
    "sample": dict(do_sample=True, top_k=20),
    "beam": dict(num_beams=3, num_return_sequences=2),
    "beam_sample": dict(num_beams=2, do_sample=True),
}


def run_both(kind, mode, shape="pre_ln", attn="sdpa", **kw):
    """The same call on both models, with the same seed; returns (reference, ours) dict outputs."""
    ref, ours = pair(shape, attn)
    ids, mask = prompts(kind)
    common = {"max_new_tokens": 6, "return_dict_in_generate": True, "output_scores": True, **MODES[mode], **kw}
    torch.manual_seed(5)
    a = ref.generate(ids, attention_mask=mask, **common)
    torch.manual_seed(5)
    b = ours.generate(ids, attention_mask=mask, **common)
    return a, b


def assert_same(a, b, name):
    assert a.sequences.shape == b.sequences.shape and torch.equal(a.sequences, b.sequences), \
        f"tokens differ\n{a.sequences}\n{b.sequences}"
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores, strict=True):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), f"{name}: different tokens allowed"
        finite = torch.isfinite(x)
        assert record(f"generate scores ({name})", y[finite], x[finite], relative=True) < 1e-5
    if getattr(a, "sequences_scores", None) is not None:
        assert record("generate sequences_scores", b.sequences_scores, a.sequences_scores, relative=True) < 1e-5


def token_control(g):
    """Settings built from the greedy tokens `g`, so each one changes what is generated."""
    return {
        "bad_words_ids": dict(bad_words_ids=[[g[0]], [g[1], g[2]], [40, 41, 42]]),
        "sequence_bias": dict(sequence_bias=[[[g[0]], -4.0], [[g[1], g[2]], 3.0], [[5], 2.5]]),
        "suppress_tokens": dict(suppress_tokens=[g[0], g[3]]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[g[0]]),
        "forced_eos_token_id": dict(forced_eos_token_id=7, eos_token_id=7),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 1.6), eos_token_id=g[4]),
        "remove_invalid_values": dict(remove_invalid_values=True, bad_words_ids=[[g[0]]]),
        "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.3),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["single", "batch"])
@pytest.mark.parametrize("name", list(token_control([0] * 6)))
def test_token_control_matches_transformers(name, kind, mode):
    g = greedy_tokens(kind)
    a, b = run_both(kind, mode, **token_control(g)[name])
    assert_same(a, b, name)
    if mode == "greedy" and name not in ("forced_eos_token_id", "renormalize_logits",
                                         "exponential_decay_length_penalty"):
        assert b.sequences[0, 7:].tolist() != g[:b.sequences.shape[1] - 7], f"{name} changed nothing"


FILTERS = [dict(min_p=0.15), dict(typical_p=0.6), dict(epsilon_cutoff=0.03), dict(eta_cutoff=0.05),
           dict(min_p=0.05, temperature=0.7, top_p=0.9, renormalize_logits=True)]


@pytest.mark.parametrize("mode", ["sample", "beam_sample"])
@pytest.mark.parametrize("kind", ["single", "batch"])
@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: ",".join(kw))
def test_sampling_filters_match_transformers(kw, kind, mode):
    a, b = run_both(kind, mode, **kw)
    assert_same(a, b, ",".join(kw))
    assert any(not torch.isfinite(s).all() for s in b.scores), "the filter removed nothing"


def test_forced_bos_and_begin_suppress_on_a_one_token_prompt():
    ref, ours = pair()
    ids = torch.tensor([[2]])
    for kw in (dict(forced_bos_token_id=9), dict(forced_bos_token_id=9, begin_suppress_tokens=[5, 6])):
        a = ref.generate(ids, max_new_tokens=4, **kw)
        b = ours.generate(ids, max_new_tokens=4, **kw)
        assert torch.equal(a, b) and b[0, 1] == 9


class StopOn(transformers.StoppingCriteria):
    """A criterion as tools write it (lm-eval's generate_until passes such a list)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["single", "batch"])
def test_stopping_criteria_match_transformers(kind, mode):
    g = greedy_tokens(kind)
    criteria = transformers.StoppingCriteriaList([StopOn(g[3])])
    a, b = run_both(kind, mode, stopping_criteria=criteria, max_new_tokens=10)
    assert_same(a, b, "stopping_criteria")
    if mode == "greedy" and kind == "single":
        assert b.sequences.shape[1] == 7 + 4 and b.sequences[0, -1] == g[3]
    plain = pair()[1].generate(*prompts(kind), max_new_tokens=10, stopping_criteria=[lambda ids, s: ids[:, -1] == g[3]])
    if mode == "greedy":
        assert torch.equal(plain, b.sequences)


def test_max_time_stops_after_the_first_token():
    ref, ours = pair()
    ids, mask = prompts("batch")
    a = ref.generate(ids, attention_mask=mask, max_new_tokens=10, max_time=1e-9)
    b = ours.generate(ids, attention_mask=mask, max_new_tokens=10, max_time=1e-9)
    assert torch.equal(a, b) and b.shape[1] == 8


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("the real OPT tokenizer files (../shared/opt_tokenizer) are absent")
    from optlite import OPTTokenizer

    folder = tmp_path_factory.mktemp("tok")
    for f in SHARED_TOKENIZER.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 50272}))
    return transformers.AutoTokenizer.from_pretrained(folder), OPTTokenizer.from_pretrained(SHARED_TOKENIZER)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_stop_strings_match_transformers(tokenizers, mode):
    ref_tok, our_tok = tokenizers
    ref, ours = pair()
    ids, mask = prompts("batch")
    g = greedy_tokens("batch")
    text = our_tok.decode([g[2]]) + our_tok.decode([g[3]])  # spans two tokens
    for stops in ([text[1:-1]], [our_tok.decode([g[4]])[-1:], "zzz"]):
        kw = dict(max_new_tokens=10, stop_strings=stops, **MODES[mode])
        torch.manual_seed(3)
        a = ref.generate(ids, attention_mask=mask, tokenizer=ref_tok, **kw)
        torch.manual_seed(3)
        b = ours.generate(ids, attention_mask=mask, tokenizer=our_tok, **kw)
        assert torch.equal(a, b), f"{stops}\n{a}\n{b}"
        if mode == "greedy":
            assert (b[:, -1] == PAD).any(), "the stop string should end a row early"


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_attentions_and_hidden_states_match_transformers(mode):
    a, b = run_both("batch", mode, attn="eager", output_attentions=True, output_hidden_states=True, output_logits=True)
    assert_same(a, b, "outputs")
    assert len(a.attentions) == len(b.attentions) == len(a.scores)
    for name in ("attentions", "hidden_states"):
        for step_a, step_b in zip(getattr(a, name), getattr(b, name), strict=True):
            assert len(step_a) == len(step_b)
            for x, y in zip(step_a, step_b, strict=True):
                assert x.shape == y.shape, name
                assert record(f"generate {name}", y, x, relative=True) < 1e-5
    assert list(b.keys()) == list(a.keys())


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
@pytest.mark.parametrize("kind", ["single", "batch"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_inputs_embeds_match_transformers(with_ids, kind, mode):
    ref, ours = pair("post_ln_proj")
    ids, mask = prompts(kind)
    embeds = ref.get_input_embeddings()(ids)
    common = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, **MODES[mode])
    extra = dict(input_ids=ids) if with_ids else {}
    torch.manual_seed(2)
    a = ref.generate(**extra, **common)
    torch.manual_seed(2)
    b = ours.generate(**extra, **common)
    assert torch.equal(a, b), f"\n{a}\n{b}"
    assert b.shape[1] == (7 if with_ids else 0) + 6 or mode == "beam"
    if mode == "greedy":  # the same tokens as from the ids themselves
        assert torch.equal(b[:, -6:], ours.generate(ids, attention_mask=mask, max_new_tokens=6)[:, -6:])


@pytest.mark.parametrize("kind", ["single", "batch"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_continuing_from_past_key_values(kind, cache):
    ref, ours = pair()
    ids, mask = prompts(kind)
    kw = dict(eos_token_id=None, return_dict_in_generate=True)
    first = ours.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation=cache, **kw)
    mask2 = torch.cat([mask, torch.ones(ids.shape[0], 4, dtype=mask.dtype)], 1) if mask is not None else None
    again = ours.generate(first.sequences, attention_mask=mask2, past_key_values=first.past_key_values,
                          max_new_tokens=5, **kw)
    ref_first = ref.generate(ids, attention_mask=mask, max_new_tokens=4, **kw)
    ref_again = ref.generate(ref_first.sequences, attention_mask=mask2, past_key_values=ref_first.past_key_values,
                             max_new_tokens=5, **kw)
    assert torch.equal(again.sequences, ref_again.sequences)
    straight = ours.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    assert torch.equal(again.sequences, straight)
    legacy = tuple((k.clone(), v.clone()) for k, v in first.past_key_values)  # a tuple of (key, value) pairs
    beams = ours.generate(first.sequences, attention_mask=mask2, past_key_values=legacy, max_new_tokens=3,
                          num_beams=2, eos_token_id=None)
    assert torch.equal(beams, ours.generate(first.sequences, attention_mask=mask2, max_new_tokens=3, num_beams=2,
                                            eos_token_id=None))


def test_logits_to_keep_in_forward_and_generate():
    ref, ours = pair()
    ids, mask = prompts("batch")
    for keep in (1, 3, 0, torch.tensor([0, 4, 6])):
        a = ref(ids, attention_mask=mask, logits_to_keep=keep).logits
        b = ours(ids, attention_mask=mask, logits_to_keep=keep).logits
        assert a.shape == b.shape and record("forward logits (logits_to_keep)", b, a, relative=True) < 1e-5
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=5, logits_to_keep=1), plain)
    assert torch.equal(ref.generate(ids, attention_mask=mask, max_new_tokens=5, logits_to_keep=1), plain)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_use_cache_false_matches_transformers(mode):
    a, b = run_both("batch", mode, use_cache=False, output_logits=True)
    assert_same(a, b, "use_cache=False")


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_right_padding_numbered_as_transformers(mode):
    ref, ours = pair()
    ids, mask = batch("right")
    kw = dict(max_new_tokens=5, return_dict_in_generate=True, output_scores=True, **MODES[mode])
    a = ref.generate(ids, attention_mask=mask, **kw)
    with pytest.warns(UserWarning, match="right-padding was detected"):
        b = ours.generate(ids, attention_mask=mask, **kw)
    assert_same(a, b, "right padding")


def test_a_prompt_filling_every_position_gets_one_new_token():
    ref, ours = pair()
    ids = torch.randint(3, 99, (1, 40), generator=torch.Generator().manual_seed(0))  # max_position_embeddings=40
    assert torch.equal(ours.generate(ids, max_new_tokens=1), ref.generate(ids, max_new_tokens=1))
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        ours.generate(ids, max_new_tokens=2)


def test_a_transformers_generation_config_with_the_new_fields():
    ref, ours = pair()
    ids, mask = prompts("batch")
    g = greedy_tokens("batch")
    cfg = transformers.GenerationConfig(max_new_tokens=5, bad_words_ids=[[g[0]]], suppress_tokens=[g[1]],
                                        renormalize_logits=True, pad_token_id=1, eos_token_id=2)
    assert torch.equal(ours.generate(ids, attention_mask=mask, generation_config=cfg),
                       ref.generate(ids, attention_mask=mask, generation_config=cfg))
    as_dict = {"max_new_tokens": 5, "bad_words_ids": [[g[0]]], "suppress_tokens": [g[1]]}  # generation_config.json
    assert torch.equal(ours.generate(ids, attention_mask=mask, generation_config=as_dict),
                       ours.generate(ids, attention_mask=mask, generation_config=cfg))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any compute
# ---------------------------------------------------------------------------------------------------------------------

BAD = [
    (dict(stop_strings=["stop"]), "tokenizer"),
    (dict(bad_words_ids=[5, 6]), "bad_words_ids"),
    (dict(bad_words_ids=[[5], [-1]]), "bad_words_ids"),
    (dict(bad_words_ids=[[500]]), "bad_words_ids holds ids"),
    (dict(sequence_bias=[[5, 1.0]]), "sequence_bias"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(typical_p=2.0), "typical_p"),
    (dict(epsilon_cutoff=-0.1), "epsilon_cutoff"),
    (dict(suppress_tokens=[1.5]), "suppress_tokens"),
    (dict(forced_eos_token_id=[200]), "forced_eos_token_id"),
    (dict(exponential_decay_length_penalty=3), "exponential_decay_length_penalty"),
    (dict(max_time=-1), "max_time"),
    (dict(inputs_embeds=torch.zeros(1, 7, 5)), r"inputs_embeds must be a float \(batch, prompt_length, 32\)"),
    (dict(logits_to_keep=-2), "logits_to_keep"),
    (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
    (dict(dola_layers="high"), "DoLa"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0), "group beam search"),
    (dict(force_words_ids=[[5]]), "constrained beam search"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_before_any_compute(kw, match):
    _, ours = pair()
    ids, _ = prompts("single")
    ours.forward = lambda *a, **k: pytest.fail("the model ran before the arguments were checked")
    try:
        with pytest.raises(ValueError, match=match):
            ours.generate(ids, **kw)
    finally:
        del ours.forward


def test_past_key_values_longer_than_the_prompt_is_refused():
    _, ours = pair()
    ids, _ = prompts("single")
    out = ours.generate(ids, max_new_tokens=3, eos_token_id=None, return_dict_in_generate=True,
                        cache_implementation="dynamic")
    with pytest.raises(ValueError, match="past_key_values holds 9 tokens but input_ids / attention_mask cover only 7"):
        ours.generate(ids, past_key_values=out.past_key_values, max_new_tokens=2)


def test_unknown_keyword_names_it_and_lists_the_accepted_ones():
    _, ours = pair()
    ids, _ = prompts("single")
    with pytest.raises(TypeError, match=r"'stop_string' \(did you mean 'stop_strings'\?\).*Known settings: .*"
                                        r"bad_words_ids.*plus .*stopping_criteria, tokenizer, inputs_embeds"):
        ours.generate(ids, stop_string="x")
