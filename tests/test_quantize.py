"""The opt-in int8 CPU mode: int8 projections against the fp32 reference, loading without an fp32 copy, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peak_memory import load_peak
from tiny import batch, make_pair

import optlite
from optlite.quantize import Int8Linear, quantize_

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="no fbgemm kernels in this PyTorch build")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_linear_is_close_to_the_float_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(5, 7, 256)
    layer = Int8Linear.from_linear(linear)
    with torch.no_grad():
        want = F.linear(x, linear.weight, linear.bias)
        got = layer(x)
    assert got.shape == (5, 7, 96) and got.dtype == torch.float32
    assert relative_error(got, want) < 0.02  # 8-bit weights and 7-bit inputs: about 1% of the output's norm
    assert relative_error(layer.weight, linear.weight.detach()) < 0.01
    with pytest.raises(TypeError, match="float32"):
        layer(x.bfloat16())


def test_from_pretrained_int8_mode_tracks_the_fp32_model(tmp_path):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln", vocab_size=512, hidden_size=128, ffn_dim=256)
    ref.save_pretrained(tmp_path)
    q = optlite.OPTForCausalLM.from_pretrained(tmp_path, quantize="int8")
    assert not [n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.model.decoder.layers[0].fc1, Int8Linear)
    assert all(p.dtype == torch.float32 for p in q.parameters())
    ids, mask = batch("left", vocab=512)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = q(ids, attention_mask=mask).logits
    keep = mask.bool()  # pad positions carry no meaning
    assert relative_error(got[keep], want[keep]) < 0.1
    assert (got[keep].argmax(-1) == want[keep].argmax(-1)).float().mean() > 0.8
    calls = []
    q.model.decoder.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    out = q.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3)
    assert out.shape == (1, ids.shape[1] + 3) and len(calls) == 3  # the prompt, then one call per new token


def test_quantize_in_place_on_a_built_model():
    model = optlite.OPTForCausalLM(optlite.OPTConfig.from_preset("opt-tiny")).eval()
    before = model.lm_head.weight.detach().clone()
    quantize_(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert relative_error(model.lm_head.weight, before) < 0.01
    assert torch.equal(model.model.decoder.embed_tokens.weight, before)  # the lookup table stays float


def test_int8_model_saves_its_dequantized_weights(tmp_path):
    import transformers

    ref, _ = make_pair("OPTForCausalLM", "pre_ln", vocab_size=512, hidden_size=128, ffn_dim=256)
    ref.save_pretrained(tmp_path / "float")
    q = optlite.OPTForCausalLM.from_pretrained(tmp_path / "float", quantize="int8")
    assert set(q.state_dict()) >= {k for k in ref.state_dict() if k != "lm_head.weight"}
    q.save_pretrained(tmp_path / "int8")
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "int8").eval()
    fc1 = q.model.decoder.layers[1].fc1
    assert torch.equal(back.model.decoder.layers[1].fc1.weight, fc1.weight)
    ids, mask = batch("left", vocab=512)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits[mask.bool()]
        assert relative_error(back(ids, attention_mask=mask).logits[mask.bool()], want) < 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int4"), "quantize='int4': expected one of 'int8'"),
    (dict(quantize="int8", device="cuda"), "runs on the CPU"),
    (dict(quantize="int8", device_map="auto"), "runs on the CPU"),
])
def test_int8_mode_refuses_what_it_cannot_do(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):  # before any file is looked at: the folder is empty
        optlite.OPTForCausalLM.from_pretrained(tmp_path, **kwargs)


def test_int8_mode_loads_without_an_fp32_copy(tmp_path):
    # 206 MB of weights in fp32 (big enough that the allocator's and fbgemm's few fixed MB are noise); the mode
    # reads bf16 (103 MB) and quantizes one projection at a time (fbgemm keeps the int8 weight twice, its packed
    # layout and the plain one, so the model stays near 2 bytes a weight).
    ref, _ = make_pair("OPTForCausalLM", "pre_ln", vocab_size=1024, hidden_size=1024, ffn_dim=4096,
                       num_hidden_layers=4, max_position_embeddings=64)
    ref.half().save_pretrained(tmp_path)  # fp16, as the hub's checkpoints
    fp32_bytes = sum(p.numel() * 4 for p in ref.parameters())
    peak = load_peak(tmp_path, quantize="int8")
    assert peak < 0.9 * fp32_bytes, f"int8 load peaked at {peak / fp32_bytes:.2f}x the fp32 weights"
