"""The KV cache: incremental decoding equals a full forward, legacy tuples, shapes as in transformers."""

import pytest
import torch
from tiny import batch, make_pair, record

from optlite import DynamicCache, StaticCache


def decode_step_by_step(model, ids, mask, prompt_len, past=None, as_legacy=False):
    """Run the prompt, then one token at a time with a mask covering past + new; return logits per position."""
    out = model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], past_key_values=past, use_cache=True)
    logits = [out.logits]
    past = out.past_key_values
    for t in range(prompt_len, ids.shape[1]):
        if as_legacy:
            past = tuple((k.clone(), v.clone()) for k, v in past)
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, dim=1), past


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj", "no_bias_no_affine"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_incremental_equals_full_forward(shape, padding):
    ref, ours = make_pair("OPTForCausalLM", shape)
    ids, mask = batch(padding)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        step, cache = decode_step_by_step(ours, ids, mask, prompt_len=5)
        ref_step, ref_cache = decode_step_by_step(ref, ids, mask, prompt_len=5)
    real = mask.bool()  # pad positions are not compared: their rows attend to nothing
    assert record("cache: incremental vs full", full[real], step[real], relative=True) < 1e-5
    assert record("cache: incremental vs reference incremental", ref_step, step, relative=True) < 1e-5
    assert isinstance(cache, DynamicCache) and len(cache) == ours.config.num_hidden_layers
    for layer, (k, v) in enumerate(cache):
        assert k.shape == ref_cache.layers[layer].keys.shape == (3, 4, 7, 8)
        assert record("cache: keys", ref_cache.layers[layer].keys, k) < 1e-5
        assert record("cache: values", ref_cache.layers[layer].values, v) < 1e-5


def test_legacy_tuple_cache_is_accepted():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    with torch.no_grad():
        with_object, _ = decode_step_by_step(ours, ids, mask, prompt_len=4)
        with_tuples, _ = decode_step_by_step(ours, ids, mask, prompt_len=4, as_legacy=True)
    torch.testing.assert_close(with_object, with_tuples, rtol=0, atol=0)


def test_several_new_tokens_on_top_of_a_cache():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        first = ours(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        rest = ours(ids[:, 4:], attention_mask=mask, past_key_values=first.past_key_values).logits
    assert record("cache: chunked vs full", full[:, 4:], rest, relative=True) < 1e-5


def test_use_cache_defaults_on_in_eval_and_off_in_training():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, _ = batch("none")
    assert ours(ids).past_key_values is not None
    ours.train()
    assert ours(ids).past_key_values is None
    assert ours(ids, use_cache=True).past_key_values is not None
    ours.config.use_cache = False
    ours.eval()
    assert ours(ids).past_key_values is None


def test_reorder_cache_selects_rows():
    cache = DynamicCache()
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 8)
    cache.update(k, k + 10, 0)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache[0][0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache[0][1][:, 0, 0, 0].tolist() == [12.0, 12.0, 10.0]


def test_malformed_legacy_cache_is_refused():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, _ = batch("none")
    k = torch.zeros(3, 4, 2, 8)
    with pytest.raises(ValueError, match=r"past_key_values\[0\] must be a \(key, value\) pair"):
        ours(ids, past_key_values=((k, k, k),) * 3)
    with pytest.raises(ValueError, match=r"past_key_values\[1\] key and value"):
        ours(ids, past_key_values=((k, k), (k, k[:, :, :1]), (k, k)))


@pytest.mark.parametrize("padding", ["none", "left"])
def test_static_cache_gives_the_dynamic_cache_logits(padding):
    _, ours = make_pair("OPTForCausalLM", "post_ln_proj")
    ids, mask = batch(padding)
    with torch.no_grad():
        dynamic, _ = decode_step_by_step(ours, ids, mask, prompt_len=3)
        static, cache = decode_step_by_step(ours, ids, mask, prompt_len=3, past=StaticCache(ours.config, 3, 10))
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)
    assert cache.get_seq_length() == 7 and cache.keys[0].shape == (3, 4, 10, 8)
    assert [k.shape[-2] for k, _ in cache] == [7, 7, 7]


def test_static_cache_refuses_overflow_and_oversize():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=40"):
        StaticCache(ours.config, 1, 41)
    cache = StaticCache(ours.config, 1, 4)
    with pytest.raises(ValueError, match="StaticCache holds 4 tokens; 5 were asked for"):
        ours(torch.ones(1, 5, dtype=torch.long), past_key_values=cache)
