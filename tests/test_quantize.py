"""The opt-in int8 CPU mode: int8 projections against the fp32 reference, loading without an fp32 copy, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peak_memory import load_peak
from tiny import batch, make_pair

import optlite
from optlite.cpu_linear import project_stacked
from optlite.quantize import Int8Embedding, Int8Linear, model_nbytes, quantize_

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
    ids = torch.tensor([[2, 7, 1, 50271]])
    want = model.get_input_embeddings()(ids).detach()
    quantize_(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert relative_error(model.lm_head.weight, before) < 0.01
    table = model.model.decoder.embed_tokens
    assert isinstance(table, Int8Embedding) and table.table.dtype == torch.int8
    assert relative_error(table.weight, before) < 0.01
    got = table(ids)
    assert got.dtype == torch.float32 and relative_error(got, want) < 0.01


def test_int8_fc1_runs_its_relu_in_the_product_unless_hooked(monkeypatch):
    torch.manual_seed(0)
    model = quantize_(optlite.OPTForCausalLM(optlite.OPTConfig.from_preset("opt-tiny")).eval())
    layers = model.model.decoder.layers
    x = torch.randn(2, 5, layers[0].fc1.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layers[0].fc1.forward_relu(x), F.relu(layers[0].fc1(x)), rtol=1e-6, atol=0)
    fused = []
    original = Int8Linear.forward_relu
    monkeypatch.setattr(Int8Linear, "forward_relu", lambda self, x: fused.append(self) or original(self, x))
    ids = torch.tensor([[2, 7, 1, 300, 41, 9]])
    with torch.no_grad():
        plain = model(ids).logits
        assert fused == [layer.fc1 for layer in layers]  # every fc1, once
        seen = []
        layers[0].fc1.register_forward_hook(lambda m, i, o: seen.append(o))
        fused.clear()
        hooked = model(ids).logits
    assert fused == [layer.fc1 for layer in layers[1:]]  # the hooked one runs as module(x), then F.relu
    assert len(seen) == 1 and (seen[0] < 0).any()  # the hook sees fc1's output before the ReLU
    torch.testing.assert_close(hooked, plain, rtol=1e-6, atol=1e-6)


def int8_calls(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """How many times one forward ran each fbgemm int8 product."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(ids)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("quantized::linear")}


@pytest.mark.parametrize("shape", ["pre_ln", "no_bias_no_affine"])
def test_int8_qkv_run_as_one_product_with_the_numbers_of_three(shape):
    _, model = make_pair("OPTForCausalLM", shape, vocab_size=512, hidden_size=128, ffn_dim=256)
    attention = model.model.decoder.layers[0].self_attn
    apart = [Int8Linear.from_linear(getattr(attention, n)) for n in ("q_proj", "k_proj", "v_proj")]
    quantize_(model)
    qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
    assert all(isinstance(m, Int8Linear) and m.packed is qkv[0].packed for m in qkv)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        together = project_stacked(qkv, x)
        for layer, alone, out in zip(qkv, apart, together, strict=True):
            # rows quantized alone, one input scale for one input: the same integers and scales as three products
            assert torch.equal(out, alone(x)) and torch.equal(layer(x), alone(x))
            assert torch.equal(layer.weight, alone.weight)
            assert torch.equal(layer.state_dict()["weight"], alone.state_dict()["weight"])
    layers = len(model.model.decoder.layers)
    ids = torch.tensor([[2, 7, 1, 300, 41, 9]])
    # per layer q/k/v as one product, out_proj and fc2, then the head; fc1 with its ReLU
    assert int8_calls(model, ids) == {"quantized::linear_dynamic": 3 * layers + 1,
                                      "quantized::linear_relu_dynamic": layers}
    with torch.no_grad():
        plain = model(ids).logits
        seen = []
        attention.k_proj.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
        hooked = model(ids).logits
        # hooked, each of the three runs alone and the hook sees k_proj's own output
        assert len(seen) == 1 and seen[0][1].shape == (1, 6, 128) and torch.equal(seen[0][1], apart[1](seen[0][0]))
    assert torch.equal(hooked, plain)
    assert int8_calls(model, ids)["quantized::linear_dynamic"] == 3 * layers + 3


def test_int8_input_range_follows_the_cpu(monkeypatch):
    linear = torch.nn.Linear(64, 32)
    for vnni in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda vnni=vnni: vnni)
        # 8-bit inputs only where int32 accumulation (VNNI) rules out fbgemm's int16 overflow
        assert Int8Linear.from_linear(linear).reduce_range is not vnni
        assert quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)))[0].reduce_range is not vnni


@pytest.mark.skipif(not torch.cpu._is_vnni_supported(), reason="8-bit inputs need AVX512-VNNI")
def test_full_range_inputs_halve_the_error_on_vnni():
    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 512)
    x = torch.randn(64, 768)
    with torch.no_grad():
        want = F.linear(x, linear.weight, linear.bias)
        err = {rr: relative_error(Int8Linear.from_linear(linear, reduce_range=rr)(x), want) for rr in (True, False)}
    # measured 0.019 (7-bit inputs) and 0.010 (8-bit)
    assert err[False] < 0.015 and err[True] < 0.03 and err[False] < 0.75 * err[True]


def test_int8_model_memory():
    # the tied opt-125m layout: the vocabulary table is 30% of the weights
    model = optlite.OPTForCausalLM(optlite.OPTConfig.from_preset("opt-125m", num_hidden_layers=2)).eval()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert model_nbytes(model) == fp32
    int8 = model_nbytes(quantize_(model))
    # 0.70x: the int8 table (1 byte a weight), fbgemm's two int8 copies of every projection and of the head (2), the
    # fp32 positions; an fp32 table next to the int8 head would make it 1.22x
    assert int8 < 0.72 * fp32, f"{int8 / fp32:.2f}x the fp32 weights"


def test_int8_model_saves_its_dequantized_weights(tmp_path):
    import transformers

    ref, _ = make_pair("OPTForCausalLM", "pre_ln", vocab_size=512, hidden_size=128, ffn_dim=256)
    ref.save_pretrained(tmp_path / "float")
    q = optlite.OPTForCausalLM.from_pretrained(tmp_path / "float", quantize="int8")
    assert set(q.state_dict()) >= {k for k in ref.state_dict() if k != "lm_head.weight"}
    q.save_pretrained(tmp_path / "int8")
    back = transformers.OPTForCausalLM.from_pretrained(tmp_path / "int8").eval()
    for name in ("fc1", "self_attn.q_proj", "self_attn.v_proj"):  # v_proj: the last rows of a shared product
        assert torch.equal(back.model.decoder.layers[1].get_submodule(name).weight,
                           q.model.decoder.layers[1].get_submodule(name).weight)
        assert torch.equal(back.model.decoder.layers[1].get_submodule(name).bias,
                           q.model.decoder.layers[1].get_submodule(name).bias)
    ids, mask = batch("left", vocab=512)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits[mask.bool()]
        assert relative_error(back(ids, attention_mask=mask).logits[mask.bool()], want) < 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int4"), "quantize='int4': expected one of 'int8'"),
    (dict(quantize="int8", device="cuda"), "runs on the CPU"),
    (dict(quantize="int8", device_map="auto"), "runs on the CPU"),
    (dict(quantize="int8", dtype=torch.float16), "leave dtype unset"),
    (dict(quantize="int8", torch_dtype="bfloat16"), "leave dtype unset"),
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
