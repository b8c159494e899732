"""Sliding-window perplexity against transformers' loss and a token-by-token computation."""

import math

import pytest
import torch
from tiny import make_pair

from optlite import perplexity


@pytest.fixture(scope="module")
def pair():
    return make_pair("OPTForCausalLM", "pre_ln")  # max_position_embeddings=40


def test_one_window_equals_exp_of_the_reference_loss(pair):
    ref, ours = pair
    ids = torch.randint(3, 99, (30,), generator=torch.Generator().manual_seed(0))
    expected = math.exp(ref(ids[None], labels=ids[None]).loss.item())
    for stride in (5, 29):  # with max_length >= len, any stride gives every token its full context
        got = perplexity(ours, ids, max_length=40, stride=stride)
        assert abs(got - expected) / expected < 1e-5


def test_long_text_scores_each_token_once_with_the_windowed_context(pair):
    ref, ours = pair
    ids = torch.randint(3, 99, (75,), generator=torch.Generator().manual_seed(1))
    max_length, stride = 16, 6
    # Independent computation: token t is scored in the chunk that ends at end(t), with context back to
    # end(t) - max_length, one reference forward per token.
    nll = 0.0
    for t in range(1, 75):
        end = min(1 + ((t - 1) // stride + 1) * stride, 75)
        start = max(0, end - max_length)
        logits = ref(ids[None, start:t]).logits[0, -1]
        nll -= torch.log_softmax(logits, -1)[ids[t]].item()
    expected = math.exp(nll / 74)
    got = perplexity(ours, ids, max_length=max_length, stride=stride)
    assert abs(got - expected) / expected < 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_length=16, stride=16), "stride must be in"),
    (dict(max_length=41, stride=4), "exceeds the model's max_position_embeddings=40"),
])
def test_bad_arguments(pair, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(pair[1], torch.arange(3, 50), **kwargs)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(pair[1], [5])
