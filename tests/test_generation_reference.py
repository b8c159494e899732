"""The fast decoding path (preallocated cache, one token per step, processors as functions) checked against a
deliberately plain decoder: no cache, the whole sequence through the model at every step, processing written out
in the most obvious way."""

import functools

import pytest
import torch
from tiny import batch, make_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def model(shape):
    return make_pair("OPTForCausalLM", shape)[1]


def plain_decode(model, ids, mask, new_tokens, eos=None, pad=1, temperature=1.0, top_k=0, repetition_penalty=1.0,
                 generator=None):
    """Greedy decoding (or sampling with a generator), the slow and obvious way."""
    ids, mask = ids.clone(), mask.clone()
    done = [False] * ids.shape[0]
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits[:, -1].float()
        tokens = []
        for row in range(ids.shape[0]):
            scores = logits[row].clone()
            if repetition_penalty != 1.0:
                seen = {int(t) for t, m in zip(ids[row], mask[row], strict=True) if m}
                for t in seen:
                    scores[t] = scores[t] * repetition_penalty if scores[t] < 0 else scores[t] / repetition_penalty
            if generator is None:
                tokens.append(int(scores.argmax()))
                continue
            scores = scores / temperature
            if top_k:
                kth = scores.sort(descending=True).values[top_k - 1]
                scores[scores < kth] = -float("inf")
            tokens.append(scores)
        if generator is not None:  # one draw for the whole batch, as a batched sampler makes it
            tokens = torch.multinomial(torch.stack(tokens).softmax(-1), 1, generator=generator).squeeze(1).tolist()
        tokens = [pad if done[r] else t for r, t in enumerate(tokens)]
        done = [d or (eos is not None and t == eos) for d, t in zip(done, tokens, strict=True)]
        ids = torch.cat([ids, torch.tensor(tokens)[:, None]], 1)
        mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], 1)
        if all(done):
            break
    return ids


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("kw", [dict(), dict(repetition_penalty=1.4), dict(eos=True)], ids=["plain", "penalty", "eos"])
def test_fast_greedy_equals_the_plain_decoder(shape, cache, kw):
    m = model(shape)
    ids, mask = batch("left")
    kw = dict(kw)
    eos = None
    if kw.pop("eos", False):
        eos = int(plain_decode(m, ids, mask, 5)[0, -2])  # row 0's 4th new token: ends that row early
    expected = plain_decode(m, ids, mask, 12, eos=eos, **kw)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, cache_implementation=cache, **kw)
    assert torch.equal(out, expected), f"\n{out}\n{expected}"


def test_fast_sampling_equals_the_plain_decoder():
    m = model("pre_ln")
    ids, mask = batch("left")
    expected = plain_decode(m, ids, mask, 10, temperature=0.8, top_k=6, generator=torch.Generator().manual_seed(4))
    out = m.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, do_sample=True, temperature=0.8,
                     top_k=6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, expected)
