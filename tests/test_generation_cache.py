"""generate() on the static cache (the default), the dynamic cache, and torch.compile."""

import shutil

import pytest
import torch
from tiny import make_pair

from optlite import DynamicCache, StaticCache


@pytest.fixture(scope="module")
def model():
    return make_pair("OPTForCausalLM", "post_ln_proj")[1]


def left_padded():
    ids = torch.tensor([[1, 1, 5, 17, 33, 8], [4, 9, 61, 12, 70, 3]])
    return ids, (ids != 1).long()


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, num_return_sequences=2), dict(repetition_penalty=1.3)])
def test_static_and_dynamic_caches_give_the_same_tokens(model, kw):
    ids, mask = left_padded()
    common = dict(max_new_tokens=12, eos_token_id=None, **kw)
    default = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **common)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **common)
    dynamic = model.generate(ids, attention_mask=mask, cache_implementation="dynamic", **common)
    assert isinstance(default.past_key_values, StaticCache)
    assert torch.equal(default.sequences, static) and torch.equal(static, dynamic)


def test_static_cache_is_sized_for_prompt_plus_new_tokens(model):
    ids, mask = left_padded()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, return_dict_in_generate=True)
    assert out.past_key_values.keys[0].shape[2] == 6 + 5 - 1  # the last new token is never fed back
    dyn = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None,
                         cache_implementation="dynamic", return_dict_in_generate=True)
    assert isinstance(dyn.past_key_values, DynamicCache)


def test_compiled_decode_gives_the_same_tokens_without_recompiling_per_token(model):
    import torch._dynamo

    torch._dynamo.reset()
    ids, mask = left_padded()
    eager = model.generate(ids[1:], max_new_tokens=10, eos_token_id=None)
    # aot_eager traces the step as inductor would, without the C++ build (minutes on a small CPU).
    compiled = model.generate(ids[1:], max_new_tokens=10, eos_token_id=None, compile={"backend": "aot_eager"})
    assert torch.equal(eager, compiled)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again = model.generate(ids[1:], max_new_tokens=14, eos_token_id=None, compile={"backend": "aot_eager"})
    assert torch.equal(again[:, :16], compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # reused: no new graph per length
    assert 1 <= graphs <= 3  # prefill stays eager: the decode step is one graph (plus guards on the first call)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
def test_compile_true_with_inductor_gives_the_same_tokens(model):
    """The default backend, with the C++ wrapper generate asks for on CPU: about 20 s of building on 2 cores."""
    ids, _ = left_padded()
    eager = model.generate(ids[1:], max_new_tokens=8, eos_token_id=None)
    assert torch.equal(model.generate(ids[1:], max_new_tokens=8, eos_token_id=None, compile=True), eager)


def test_compile_needs_the_cache(model):
    with pytest.raises(ValueError, match="compile=True needs use_cache=True"):
        model.generate(torch.tensor([[2, 5]]), max_new_tokens=2, use_cache=False, compile=True)


def test_checkpoint_generation_config_sets_the_defaults(tmp_path):
    import transformers

    from optlite import OPTForCausalLM

    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    ref.generation_config = transformers.GenerationConfig(max_new_tokens=3, no_repeat_ngram_size=2, eos_token_id=None,
                                                          pad_token_id=1)
    ref.save_pretrained(tmp_path / "ref")
    ours = OPTForCausalLM.from_pretrained(tmp_path / "ref")
    assert ours.generation_config.max_new_tokens == 3
    ids = torch.tensor([[2, 17, 33, 17]])
    expected = ref.generate(ids)
    assert expected.shape[1] == 4 + 3
    assert torch.equal(ours.generate(ids), expected)
    ours.save_pretrained(tmp_path / "ours")
    again = OPTForCausalLM.from_pretrained(tmp_path / "ours")
    assert again.generation_config.to_dict() == ours.generation_config.to_dict()
