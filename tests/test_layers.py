"""The decoder layers as research code uses them: transformers' signatures, a catcher on layers[0], layer-by-layer
runs with `attention_mask=`, plain nn.Linear projections, forward hooks in forward() and generate(); and the
attention_mask checks."""

from __future__ import annotations

import inspect

import pytest
import torch
from tiny import SHAPES, batch, make_pair, record
from torch import nn

import optlite

pytestmark = pytest.mark.usefixtures("one_thread")


def hidden(out: tuple | torch.Tensor) -> torch.Tensor:
    """A layer's hidden states: optlite returns (hidden, ...) as transformers 4.x did; transformers 5.x the tensor."""
    return out if isinstance(out, torch.Tensor) else out[0]


class Catcher(nn.Module):
    """Stands in for layers[0]: stores what the decoder passes, then stops the forward (the GPTQ recipe)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.inputs, self.kwargs = layer, [], []

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        self.inputs.append(hidden_states)
        self.kwargs.append(kwargs)
        raise ValueError("caught")


def test_layer_and_attention_signatures_are_transformers():
    from transformers.models.opt import modeling_opt

    for ours, theirs, n in [(optlite.modeling.OPTDecoderLayer, modeling_opt.OPTDecoderLayer, 5),
                            (optlite.modeling.OPTAttention, modeling_opt.OPTAttention, 3)]:
        names = list(inspect.signature(ours.forward).parameters)
        assert names[:n + 1] == list(inspect.signature(theirs.forward).parameters)[:n + 1]
        assert "output_attentions" in names and "kwargs" in names


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
def test_a_layer_alone_is_causal_and_returns_its_hidden_state_first(shape):
    ref, ours = make_pair("OPTModel", shape)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(ours.decoder.layers, ref.decoder.layers, strict=True):
            out = a(x)
            assert isinstance(out, tuple) and len(out) == 1
            causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]  # what transformers needs to be told
            assert record("layer alone", out[0], hidden(b(x, attention_mask=causal)), relative=True) < 1e-5
            h, weights = a(x, output_attentions=True)
            # The eager path sums in another order than SDPA's kernel: equal within fp32 rounding of values near 10.
            assert record("layer alone, eager vs SDPA", h, out[0], relative=True) < 1e-5
            assert weights.shape == (2, 4, 6, 6)
            assert torch.all(weights.triu(1) == 0)  # nothing attends to a later token


def _catch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Catcher:
    layers = model.model.decoder.layers
    catcher = Catcher(layers[0])
    layers[0] = catcher
    try:
        with pytest.raises(ValueError, match="caught"):  # the catcher's own exception, unchanged
            model(ids, attention_mask=mask)
    finally:
        layers[0] = catcher.layer
    return catcher


def _layer_by_layer(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits computed one layer at a time from what the catcher stored, as quantization scripts run them."""
    catcher = _catch(model, ids, mask)
    x, attention_mask = catcher.inputs[0], catcher.kwargs[0]["attention_mask"]
    decoder = model.model.decoder
    for layer in decoder.layers:
        x = hidden(layer(x, attention_mask=attention_mask))
    if decoder.final_layer_norm is not None:
        x = decoder.final_layer_norm(x)
    if decoder.project_out is not None:
        x = decoder.project_out(x)
    return model.lm_head(x)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@torch.no_grad()
def test_layer_by_layer_from_a_catcher_equals_the_full_forward(shape, padding):
    ref, ours = make_pair("OPTForCausalLM", shape)
    ids, mask = batch(padding)
    full = ours(ids, attention_mask=mask).logits
    stepwise = _layer_by_layer(ours, ids, mask)
    theirs = _layer_by_layer(ref, ids, mask)
    keep = mask.bool()  # pad positions attend to nothing and hold no meaning in either library
    assert torch.equal(stepwise[keep], full[keep])
    assert record("layer-by-layer logits", stepwise[keep], theirs[keep], relative=True) < 1e-5


def test_every_projection_is_exactly_nn_linear():
    for shape in ("pre_ln", "post_ln_proj"):
        ref, ours = make_pair("OPTForCausalLM", shape)
        found = [n for n, m in ours.named_modules() if type(m) is nn.Linear]
        assert found == [n for n, m in ref.named_modules() if type(m) is nn.Linear]
        per_layer = 6  # q, k, v, out, fc1, fc2
        assert len(found) == per_layer * 3 + 1 + (2 if shape == "post_ln_proj" else 0)  # + lm_head, project_in/out


def _count_calls(model: nn.Module) -> tuple[list[int], list]:
    calls, handles = [0], []
    for m in model.modules():
        if type(m) is nn.Linear and m.out_features == 48:  # every fc1
            handles.append(m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)))
    return calls, handles


@torch.no_grad()
def test_forward_hooks_fire_in_forward_and_in_generate():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    for model in (ours, ref):
        calls, handles = _count_calls(model)
        model(ids, attention_mask=mask)
        assert calls[0] == 3  # one per layer
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=1)
        assert calls[0] == 3 + 3 * 5  # the prompt, then four single-token steps (the last token is not fed back)
        for h in handles:
            h.remove()


@torch.no_grad()
def test_a_steering_hook_changes_generate_as_in_transformers():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    steer = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(1))

    def add(module, args, output):
        return output + steer if isinstance(output, torch.Tensor) else (output[0] + steer, *output[1:])

    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    tokens = []
    for model in (ours, ref):
        handle = model.model.decoder.layers[1].register_forward_hook(add)
        tokens.append(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1))
        handle.remove()
    assert torch.equal(tokens[0], tokens[1])
    assert not torch.equal(tokens[0], plain)  # the hook did steer


def test_gradient_checkpointing_runs_the_layers_through_their_keywords():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    ours.train()
    ours.gradient_checkpointing_enable({"use_reentrant": True})
    loss = ours(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    ref.train()
    theirs = ref(ids, attention_mask=mask, labels=ids).loss
    theirs.backward()
    assert record("loss (checkpointed)", loss, theirs, relative=True) < 1e-5
    a, b = ours.model.decoder.layers[0].fc1.weight.grad, ref.model.decoder.layers[0].fc1.weight.grad
    assert record("grad (checkpointed)", a, b, relative=True) < 1e-5


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
@torch.no_grad()
def test_config_output_flags_apply_when_the_argument_is_none(flag):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    field = {"output_attentions": "attentions", "output_hidden_states": "hidden_states"}[flag]
    assert getattr(ours(ids, attention_mask=mask), field) is None
    setattr(ours.config, flag, True)
    assert len(getattr(ours(ids, attention_mask=mask), field)) == 3 + (flag == "output_hidden_states")
    assert getattr(ours(ids, attention_mask=mask, **{flag: False}), field) is None  # the argument still wins


@torch.no_grad()
def test_config_return_dict_false_gives_tuples():
    _, ours = make_pair("OPTForQuestionAnswering", "pre_ln")
    ids, mask = batch("none")
    ours.config.return_dict = False
    assert isinstance(ours(ids, attention_mask=mask), tuple)
    assert isinstance(ours.model(ids, attention_mask=mask), tuple)
    assert not isinstance(ours(ids, attention_mask=mask, return_dict=True), tuple)


@pytest.mark.parametrize("value", [0.5, 2, -1.0])
def test_a_non_binary_attention_mask_is_refused(value):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("none")
    mask = mask.to(torch.float32 if isinstance(value, float) else torch.long)
    mask[1, 3] = value
    with pytest.raises(ValueError, match=r"attention_mask must hold only 1 \(attend\) and 0"):
        ours(ids, attention_mask=mask)


def test_binary_masks_of_any_dtype_give_the_same_logits():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    with torch.no_grad():
        logits = [ours(ids, attention_mask=mask.to(dtype)).logits for dtype in (torch.long, torch.float32, torch.bool)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_an_all_zero_mask_row_warns_and_names_the_row():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("none")
    mask[2] = 0
    with pytest.warns(UserWarning, match=r"attention_mask rows \[2\] are all zeros"):
        ours(ids, attention_mask=mask)
