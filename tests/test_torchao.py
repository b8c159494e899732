"""torchao int8 weight-only quantization, as its docs show for a transformers model: quantize_ then forward and
generate, against transformers' OPT quantized the same way."""

from __future__ import annotations

import pytest
import torch
from tiny import batch, make_pair, record
from torch import nn
from torchao import quantization

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
@torch.no_grad()
def test_int8_weight_only_forward_and_generate_equal_transformers(shape):
    ref, ours = make_pair("OPTForCausalLM", shape)
    ids, mask = batch("left")
    plain = ours(ids, attention_mask=mask).logits
    for model in (ours, ref):
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    weights = [type(m.weight).__name__ for m in ours.modules() if type(m) is nn.Linear]
    assert weights and all(name == "Int8Tensor" for name in weights)  # every projection and the LM head
    logits = ours(ids, attention_mask=mask).logits
    assert not torch.equal(logits, plain)
    assert record("int8 logits", logits, ref(ids, attention_mask=mask).logits, relative=True) < 1e-5
    tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(tokens, theirs)
