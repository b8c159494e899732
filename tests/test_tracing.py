"""torch.compile (fullgraph, with and without a mask, dynamic shapes) and torch.export of all four classes with a
dynamic sequence length; outputs equal eager optlite and transformers' OPT on the same weights."""

from __future__ import annotations

import pytest
import torch
from tiny import CLASSES, batch, make_pair, record
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils import _pytree as pytree

import optlite
from optlite.outputs import CausalLMOutputWithPast

pytestmark = pytest.mark.usefixtures("one_thread")

MAIN = {"OPTModel": "last_hidden_state", "OPTForCausalLM": "logits", "OPTForSequenceClassification": "logits",
        "OPTForQuestionAnswering": "start_logits"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compilations, and the per-function cache limit is never reached across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def pair():
    return make_pair("OPTForCausalLM", "pre_ln")


def _counting(backend: str = "aot_eager") -> CompileCounterWithBackend:
    # aot_eager traces exactly as inductor does (dynamo, then AOT autograd) without inductor's minutes of C++ build.
    return CompileCounterWithBackend(backend)


@torch.no_grad()
def test_compile_fullgraph_with_and_without_a_mask(pair):
    ref, ours = pair
    ids, mask = batch("left")
    counter = _counting()
    compiled = torch.compile(ours, fullgraph=True, backend=counter)
    for name, kwargs in [("padded", {"attention_mask": mask}), ("no mask", {})]:
        got = compiled(ids, **kwargs).logits
        assert torch.equal(got, ours(ids, **kwargs).logits), name
        assert record(f"compiled logits ({name})", got, ref(ids, **kwargs).logits, relative=True) < 1e-5
    assert counter.frame_count == 2  # one graph each, no break


@torch.no_grad()
def test_compile_fullgraph_with_labels_gives_the_loss(pair):
    ref, ours = pair
    ids, mask = batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    compiled = torch.compile(ours, fullgraph=True, backend=_counting())
    got = compiled(ids, attention_mask=mask, labels=labels).loss
    # compiled, the loss is F.cross_entropy's; eager, optlite's blockwise one: equal to fp32 rounding
    assert record("compiled loss vs eager", got, ours(ids, attention_mask=mask, labels=labels).loss,
                  relative=True) < 1e-6
    assert record("compiled loss", got, ref(ids, attention_mask=mask, labels=labels).loss, relative=True) < 1e-5


@torch.no_grad()
def test_compile_dynamic_serves_every_length_from_one_graph(pair):
    ref, ours = pair
    ids, mask = batch("left")
    counter = _counting()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend=counter)
    settled = None
    for n, length in enumerate((7, 5, 3, 6, 4)):
        i, m = ids[:, -length:].contiguous(), mask[:, -length:].contiguous()
        got = compiled(i, attention_mask=m).logits
        assert record("compiled logits (dynamic)", got, ref(i, attention_mask=m).logits, relative=True) < 1e-5
        if n == 1:
            settled = counter.frame_count  # torch compiles this module (and transformers' OPT) twice to settle
    assert counter.frame_count == settled <= 3


@torch.no_grad()
def test_compiled_decode_step_with_a_growing_cache_does_not_recompile(pair):
    """The generation pattern: a prefill, then one token at a time with the cache passed in and returned."""
    ref, ours = pair
    ids, mask = batch("left")
    counter = _counting()
    step = torch.compile(ours, fullgraph=True, dynamic=True, backend=counter)
    past = ours(ids, attention_mask=mask, use_cache=True).past_key_values
    ref_past = ref(ids, attention_mask=mask, use_cache=True).past_key_values
    nxt = torch.tensor([[5], [6], [7]])
    settled = None
    for n in range(5):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        out = step(nxt, attention_mask=mask, past_key_values=past, use_cache=True)
        theirs = ref(nxt, attention_mask=mask, past_key_values=ref_past, use_cache=True)
        assert record("compiled decode logits", out.logits, theirs.logits, relative=True) < 1e-5
        past, ref_past = out.past_key_values, theirs.past_key_values
        if n == 1:
            settled = counter.frame_count
    assert counter.frame_count == settled <= 3  # later steps reuse the graph however long the cache grows


def _export(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.export.ExportedProgram:
    seq = torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
    return torch.export.export(model, (ids,), kwargs={"attention_mask": mask},
                               dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})


@pytest.mark.parametrize("cls_name", CLASSES)
@torch.no_grad()
def test_export_with_a_dynamic_sequence_length(cls_name):
    ref, ours = make_pair(cls_name, "post_ln_proj")
    ids, mask = batch("left")
    program = _export(ours, ids, mask).module()
    for length in (7, 4):  # the traced length and another one
        i, m = ids[:, -length:].contiguous(), mask[:, -length:].contiguous()
        got, eager, theirs = program(i, attention_mask=m), ours(i, attention_mask=m), ref(i, attention_mask=m)
        assert type(got) is type(eager)
        got_leaves, spec = pytree.tree_flatten(got)
        eager_leaves, eager_spec = pytree.tree_flatten(eager)
        assert spec == eager_spec  # the same fields, the cache included (OPTModel and the heads return it)
        for a, b in zip(got_leaves, eager_leaves, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        key = MAIN[cls_name]
        assert record(f"exported {cls_name}.{key}", got[key], theirs[key], relative=True) < 1e-5


@torch.no_grad()
def test_export_returns_the_cache_which_continues_decoding(pair):
    ref, ours = pair
    ids, mask = batch("left")
    seq = torch.export.Dim("seq", min=2, max=ours.config.max_position_embeddings)
    program = torch.export.export(ours, (ids,), kwargs={"attention_mask": mask, "use_cache": True},
                                  dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq},
                                                  "use_cache": None}).module()
    past = program(ids, attention_mask=mask, use_cache=True).past_key_values
    assert isinstance(past, optlite.DynamicCache) and past.get_seq_length() == 7
    ref_past = ref(ids, attention_mask=mask, use_cache=True).past_key_values
    for layer in range(len(past)):
        assert record("exported cache keys", past[layer][0], ref_past.layers[layer].keys, relative=True) < 1e-5
    nxt, mask = torch.tensor([[5], [6], [7]]), torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    got = ours(nxt, attention_mask=mask, past_key_values=past).logits
    theirs = ref(nxt, attention_mask=mask, past_key_values=ref_past).logits
    assert record("logits after the exported prefill", got, theirs, relative=True) < 1e-5


def test_outputs_and_caches_flatten_to_their_tensors_and_back():
    cfg = optlite.OPTConfig.from_preset("opt-tiny")
    model = optlite.OPTForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(torch.tensor([[2, 5, 6]]), use_cache=True)
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 1 + 2 * cfg.num_hidden_layers  # logits, then each layer's keys and values
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is CausalLMOutputWithPast
    assert back.logits is out.logits and back.past_key_values[1][1] is out.past_key_values[1][1]
    static = optlite.StaticCache(cfg, batch_size=1, max_cache_len=8)
    with torch.no_grad():
        model(torch.tensor([[2, 5]]), past_key_values=static)
    leaves, spec = pytree.tree_flatten(static)
    copy = pytree.tree_unflatten(leaves, spec)
    assert copy.get_seq_length() == 2 and copy.max_cache_len == 8 and copy[0][0].shape[-2] == 2
