"""OPTTokenizer.pad and what transformers' data collators need, against transformers' tokenizer on the same files."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_TOKENIZER

from optlite import OPTTokenizer

pytestmark = pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason="../shared/opt_tokenizer is absent")

TEXTS = ["Hello, my dog is cute", "A photo", "This is a test of padding"]


@pytest.fixture(scope="module")
def pair():
    import transformers

    return transformers.GPT2Tokenizer.from_pretrained(SHARED_TOKENIZER), OPTTokenizer.from_pretrained(SHARED_TOKENIZER)


def _same(a, b) -> None:
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(return_tensors="pt"),
    dict(padding_side="left", return_tensors="pt"),
    dict(pad_to_multiple_of=8, return_tensors="pt"),
    dict(padding="max_length", max_length=12),
    dict(padding=False),
    dict(return_attention_mask=False, return_tensors="pt"),
])
def test_pad_a_list_of_examples_like_transformers(pair, kwargs):
    ref, ours = pair
    examples = [{"input_ids": ref(t)["input_ids"], "label": i} for i, t in enumerate(TEXTS)]
    _same(ref.pad(examples, **kwargs), ours.pad(examples, **kwargs))


def test_pad_a_dict_of_lists_and_one_example_like_transformers(pair):
    ref, ours = pair
    encoded = ref(TEXTS, return_special_tokens_mask=True)
    _same(ref.pad(dict(encoded), return_tensors="pt"), ours.pad(dict(encoded), return_tensors="pt"))
    one = {"input_ids": ref(TEXTS[0])["input_ids"]}
    _same(ref.pad(one, padding="max_length", max_length=10), ours.pad(one, padding="max_length", max_length=10))
    tensors = [{"input_ids": torch.tensor(ref(t)["input_ids"])} for t in TEXTS]
    _same(ref.pad(tensors, return_tensors="pt"), ours.pad(tensors, return_tensors="pt"))


def test_pad_refuses_input_without_ids(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="holding 'input_ids'"):
        ours.pad([{"text": "hi"}])
    with pytest.raises(ValueError, match="padding must be"):
        ours.pad([{"input_ids": [2]}], padding="shortest")


def test_special_tokens_mask_like_transformers(pair):
    ref, ours = pair
    ids = ref(TEXTS[0])["input_ids"] + [1, 1]
    assert ours.get_special_tokens_mask(ids, already_has_special_tokens=True) == ref.get_special_tokens_mask(
        ids, already_has_special_tokens=True)
    assert ours.name_or_path == ref.name_or_path == str(SHARED_TOKENIZER)


@pytest.mark.parametrize("collator", ["with_padding", "language_modeling"])
def test_data_collators_batch_like_with_transformers_tokenizer(pair, collator):
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    ref, ours = pair
    examples = [{"input_ids": ref(t)["input_ids"], "attention_mask": [1] * len(ref(t)["input_ids"])} for t in TEXTS]
    if collator == "with_padding":
        examples = [{**e, "label": i % 2} for i, e in enumerate(examples)]
        make = lambda tok: DataCollatorWithPadding(tok, pad_to_multiple_of=4)  # noqa: E731
    else:
        make = lambda tok: DataCollatorForLanguageModeling(tok, mlm=False)  # noqa: E731
    _same(make(ref)(examples), make(ours)(examples))
