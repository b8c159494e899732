"""accelerate's offloading and dispatch, as its docs show for a transformers model, with optlite in its place,
followed by generate: token for token what transformers' OPT generates on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from accelerate import cpu_offload, disk_offload, init_empty_weights, load_checkpoint_and_dispatch

import optlite

IDS = torch.tensor([[2, 31414, 6, 127, 2335, 16], [1, 1, 2, 250, 1345, 9]])
MASK = (IDS != 1).long()


def greedy(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False)


@pytest.fixture(scope="module")
def expected(hf_checkpoint, one_thread) -> torch.Tensor:
    return greedy(transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval())


def dispatched(folder) -> optlite.OPTForCausalLM:
    with init_empty_weights():
        model = optlite.OPTForCausalLM(optlite.OPTConfig.from_pretrained(folder))
    model.tie_weights()  # init_empty_weights re-creates each parameter it registers: tie again, as its docs say
    return load_checkpoint_and_dispatch(model, str(folder), device_map="auto",
                                        no_split_module_classes=["OPTDecoderLayer"]).eval()


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "load_checkpoint_and_dispatch"])
def test_offloaded_and_dispatched_models_generate_like_transformers(hf_checkpoint, expected, how, tmp_path):
    if how == "load_checkpoint_and_dispatch":
        model = dispatched(hf_checkpoint)
    else:
        model = optlite.OPTForCausalLM.from_pretrained(hf_checkpoint)
        model = (cpu_offload(model, execution_device="cpu") if how == "cpu_offload"
                 else disk_offload(model, str(tmp_path), execution_device="cpu"))
        assert model.model.decoder.embed_tokens.weight.is_meta  # the weights really left the module
    assert model.device == torch.device("cpu")  # the hooks' execution device, never meta
    assert torch.equal(greedy(model), expected)
    with torch.no_grad():
        ref = transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, ref(IDS, attention_mask=MASK).logits)
