"""q/k/v kept as views of one buffer, run as one oneDNN product while decoding on the CPU: the same Parameters,
state_dict and saved files, the same outputs as three products, and three products again as soon as a weight is
replaced, hooked, trained or cast."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from test_cpu_linear import count_onednn
from tiny import batch, make_pair, record
from torch import nn

import optlite
from optlite.cpu_linear import onednn_enabled, project, project_stacked, share_storage, stacked

pytestmark = pytest.mark.skipif(not onednn_enabled(), reason="this torch build has no oneDNN linear kernel")


def qkv(attn: nn.Module) -> list[nn.Linear]:
    return [attn.q_proj, attn.k_proj, attn.v_proj]


def is_stacked(attn: nn.Module) -> bool:
    return stacked([m.weight for m in qkv(attn)]) is not None and (
        attn.q_proj.bias is None or stacked([m.bias for m in qkv(attn)]) is not None)


def three(bias: bool = True) -> tuple[list[nn.Linear], torch.Tensor]:
    torch.manual_seed(0)
    return [nn.Linear(16, 16, bias=bias) for _ in range(3)], torch.randn(2, 3, 16)


@pytest.mark.parametrize("bias", [True, False])
def test_stacked_product_equals_the_three_module_calls(monkeypatch, bias):
    linears, x = three(bias)
    with torch.no_grad():
        want = [m(x) for m in linears]
    params = [p for m in linears for p in m.parameters()]
    share_storage(linears)
    assert [p for m in linears for p in m.parameters()] == params  # the same Parameter objects
    with torch.no_grad(), count_onednn(monkeypatch) as calls:
        got = project_stacked(linears, x)
    assert calls[0] == 1
    for g, w in zip(got, want, strict=True):
        assert record("stacked q/k/v product", g, w, relative=True) < 1e-6


def test_model_builds_and_loads_its_qkv_stacked(tmp_path):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    assert all(is_stacked(layer.self_attn) for layer in ours.model.decoder.layers)  # built so; load_state_dict copies

    def stacked_layers(model):
        return [is_stacked(layer.self_attn) for layer in model.model.decoder.layers]

    ref.half().save_pretrained(tmp_path / "fp16")  # as the hub's OPT checkpoints are stored
    upcast = optlite.OPTForCausalLM.from_pretrained(tmp_path / "fp16")
    assert all(stacked_layers(upcast))
    ids, mask = batch("left")
    with torch.no_grad():
        want = ref.float()(ids, attention_mask=mask).logits
        assert record("stacked q/k/v after an upcast load", upcast(ids, attention_mask=mask).logits, want,
                      relative=True) < 1e-5
    ref.save_pretrained(tmp_path / "fp32")
    # fp32 as stored: the weights stay the file's own pages (zero copy), each projection on its own
    assert not any(stacked_layers(optlite.OPTForCausalLM.from_pretrained(tmp_path / "fp32")))
    # only the CPU's fp32 path reads them stacked
    assert not any(stacked_layers(optlite.OPTForCausalLM.from_pretrained(tmp_path / "fp16", dtype="bfloat16")))


def test_upcast_load_reads_qkv_into_their_buffers_without_a_second_copy(monkeypatch, tmp_path):
    from optlite import checkpoint

    ref, _ = make_pair("OPTForCausalLM", "post_ln_proj")
    ref.half().save_pretrained(tmp_path)
    buffers = {}
    real = checkpoint._qkv_buffers

    def spy(*args):
        into = real(*args)
        buffers.update({k: v.untyped_storage().data_ptr() for k, v in into.items()})
        return into

    monkeypatch.setattr(checkpoint, "_qkv_buffers", spy)
    loaded = optlite.OPTForCausalLM.from_pretrained(tmp_path)
    params = dict(loaded.named_parameters())
    layers = loaded.config.num_hidden_layers
    assert len(buffers) == 6 * layers  # q/k/v weights and biases of every layer
    assert all(params[k].untyped_storage().data_ptr() == ptr for k, ptr in buffers.items())
    assert all(is_stacked(layer.self_attn) for layer in loaded.model.decoder.layers)


def test_state_dict_and_files_are_unchanged(tmp_path):
    ref, ours = make_pair("OPTForCausalLM", "no_bias_no_affine")
    theirs = ref.state_dict()
    mine = ours.state_dict()
    assert list(mine) == [k for k in theirs if k in mine]
    for key, value in mine.items():
        assert value.shape == theirs[key].shape and torch.equal(value, theirs[key]), key
    # safetensors writes views of one buffer that do not overlap (Trainer saves a state_dict this way)
    safetensors.torch.save_file({k: v for k, v in mine.items() if k != "lm_head.weight"}, tmp_path / "sd.safetensors")
    back = safetensors.torch.load_file(tmp_path / "sd.safetensors")
    assert all(torch.equal(back[k], mine[k]) for k in back)
    ours.save_pretrained(tmp_path / "saved")
    again = optlite.OPTForCausalLM.from_pretrained(tmp_path / "saved")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in mine.items())
    torch.save(mine, tmp_path / "sd.pt")
    assert all(torch.equal(v, mine[k]) for k, v in torch.load(tmp_path / "sd.pt").items())


def replace_data(m: nn.Linear) -> None:
    m.weight.data = m.weight.detach().clone() * 2  # as GPTQ-style scripts write a layer back


@pytest.mark.parametrize("change", ["weight.data =", "forward hook on k_proj", "requires grad", "cast and back",
                                    "load_state_dict(assign=True)"])
def test_changed_qkv_run_as_three_products_with_the_current_weights(monkeypatch, change):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    attn = ours.model.decoder.layers[0].self_attn
    x = torch.randn(2, 3, ours.config.hidden_size)
    fired = []
    if change == "weight.data =":
        replace_data(attn.v_proj)
    elif change == "forward hook on k_proj":
        attn.k_proj.register_forward_hook(lambda mod, a, out: fired.append(out.shape))
    elif change == "cast and back":
        ours.to(torch.bfloat16).to(torch.float32)
    elif change == "load_state_dict(assign=True)":
        ours.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, assign=True)
    grad = change == "requires grad"
    x.requires_grad_(grad)
    with torch.set_grad_enabled(grad), count_onednn(monkeypatch) as calls:
        got = project_stacked(qkv(attn), x)
    assert calls[0] == (3 if change != "forward hook on k_proj" else 2)  # k_proj itself runs as the module
    with torch.no_grad():
        for g, m in zip(got, qkv(attn), strict=True):
            assert record(f"q/k/v after {change}", g.detach(), m(x), relative=True) < 1e-6
    if change == "forward hook on k_proj":
        assert fired == [torch.Size([2, 3, ours.config.hidden_size])] * 2  # in project_stacked, then above


def test_in_place_updates_and_optimizer_steps_keep_the_buffer_shared(monkeypatch):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    attn = ours.model.decoder.layers[1].self_attn
    opt = torch.optim.AdamW(ours.parameters(), lr=0.1, fused=True)
    ids, mask = batch("none")
    ours.train()
    ours(ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    ours.eval()
    with torch.no_grad():
        attn.q_proj.weight[0].zero_()  # a pruning mask written in place
    assert is_stacked(attn)
    x = torch.randn(1, 1, ours.config.hidden_size)
    # deepcopy clones each Parameter on its own (Parameter.__deepcopy__): the copy runs three products
    for model, products in ((ours, 1), (copy.deepcopy(ours), 3)):
        a = model.model.decoder.layers[1].self_attn
        assert is_stacked(a) == (products == 1)
        with torch.no_grad(), count_onednn(monkeypatch) as calls:
            got = project_stacked(qkv(a), x)
        assert calls[0] == products
        with torch.no_grad():
            for g, m in zip(got, qkv(a), strict=True):
                assert record("stacked q/k/v after a step", g, project(m, x), relative=True) < 1e-6


def test_share_storage_leaves_mismatched_or_meta_tensors_alone():
    with torch.device("meta"):
        meta = [nn.Linear(8, 8) for _ in range(3)]
    share_storage(meta)
    assert all(m.weight.is_meta for m in meta)
    mixed = [nn.Linear(8, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 8)]
    share_storage(mixed)
    assert stacked([m.weight for m in mixed]) is None
