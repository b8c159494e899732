"""Parity of every class and forward path with transformers' OPT on tiny random models."""

import pytest
import torch
from tiny import CLASSES, SHAPES, batch, make_pair, record

ATOL = 1e-5


def outputs_of(model, cls_name, ids, mask, **kw):
    extra = {}
    if cls_name == "OPTForCausalLM":
        extra["labels"] = ids.masked_fill(mask == 0, -100)
    elif cls_name == "OPTForSequenceClassification":
        extra["labels"] = torch.tensor([0, 1, 1])
    elif cls_name == "OPTForQuestionAnswering":
        extra["start_positions"], extra["end_positions"] = torch.tensor([1, 3, 9]), torch.tensor([2, 5, 0])
    return model(ids, attention_mask=mask, **extra, **kw)


def main_tensors(out, cls_name):
    if cls_name == "OPTModel":
        return {"last_hidden_state": out.last_hidden_state}
    if cls_name == "OPTForQuestionAnswering":
        return {"start_logits": out.start_logits, "end_logits": out.end_logits, "loss": out.loss}
    return {"logits": out.logits, "loss": out.loss}


def assert_close(name, a, b, atol=ATOL):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = record(name, a, b, relative=True)  # logits and losses run to tens: fp32 rounding grows with them
    assert diff <= atol, f"{name}: max |diff| / max(|ref|, 1) {diff:.3e} > {atol}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_forward_parity(shape, cls_name, padding):
    ref, ours = make_pair(cls_name, shape)
    ids, mask = batch(padding)
    with torch.no_grad():
        a = outputs_of(ref, cls_name, ids, mask, output_hidden_states=True)
        b = outputs_of(ours, cls_name, ids, mask, output_hidden_states=True)
    for key, value in main_tensors(a, cls_name).items():
        assert_close(f"{cls_name}.{key}", value, main_tensors(b, cls_name)[key])
    assert len(a.hidden_states) == len(b.hidden_states) == ref.config.num_hidden_layers + 1
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        assert_close(f"hidden_states[{i}]", x, y)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding", ["none", "left"])
def test_attention_maps_match_eager_reference(shape, padding):
    ref, ours = make_pair("OPTForCausalLM", shape, attn_implementation="eager")
    ids, mask = batch(padding)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert_close("logits (eager path)", a.logits, b.logits)
    assert len(a.attentions) == len(b.attentions) == ref.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions, strict=True):
        assert_close("attentions", x, y)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert_close("hidden_states (eager path)", x, y)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls_name", CLASSES[1:])
def test_gradients_match_in_train_mode(shape, cls_name):
    ref, ours = make_pair(cls_name, shape)
    ref.train()
    ours.train()
    ids, mask = batch("left")
    outputs_of(ref, cls_name, ids, mask).loss.backward()
    outputs_of(ours, cls_name, ids, mask).loss.backward()
    ours_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert ours_params[name].grad is not None, name
        assert_close("grad " + name.split(".")[-2] + "." + name.split(".")[-1], p.grad, ours_params[name].grad,
                     atol=1e-4)


def test_loss_ignores_minus_100_like_reference():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, _ = batch("none")
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        assert_close("loss", ref(ids, labels=labels).loss, ours(ids, labels=labels).loss)


@pytest.mark.parametrize("labels,num_labels", [
    (torch.tensor([0.5, -1.0, 2.0]), 1),  # regression
    (torch.tensor([0, 2, 1]), 3),  # single label
    (torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), 3),  # multi label
])
def test_sequence_classification_losses(labels, num_labels):
    ref, ours = make_pair("OPTForSequenceClassification", "pre_ln", num_labels=num_labels)
    ids, mask = batch("right")
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    assert ref.config.problem_type == ours.config.problem_type
    assert_close("seqcls loss", a.loss, b.loss)
    assert_close("seqcls logits", a.logits, b.logits)


def test_sequence_classification_with_inputs_embeds_pools_last_position():
    ref, ours = make_pair("OPTForSequenceClassification", "post_ln_proj")
    ids, _ = batch("none")
    embeds = ours.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        assert_close("seqcls logits (embeds)", ref(inputs_embeds=embeds).logits, ours(inputs_embeds=embeds).logits)


def test_question_answering_positions_out_of_range_are_ignored():
    ref, ours = make_pair("OPTForQuestionAnswering", "pre_ln")
    ids, mask = batch("none")
    start, end = torch.tensor([[50], [2], [-3]]), torch.tensor([[60], [4], [1]])
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, start_positions=start, end_positions=end)
        b = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert_close("qa loss", a.loss, b.loss)


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
def test_inputs_embeds_and_position_ids_match(shape):
    ref, ours = make_pair("OPTForCausalLM", shape)
    ids, mask = batch("none")
    embeds = ours.get_input_embeddings()(ids).detach()
    positions = torch.arange(7).flip(0).expand(3, 7)  # any positions, not just the default ones
    with torch.no_grad():
        assert_close("logits (inputs_embeds)", ref(inputs_embeds=embeds).logits, ours(inputs_embeds=embeds).logits)
        assert_close("logits (position_ids)", ref(ids, position_ids=positions).logits,
                     ours(ids, position_ids=positions).logits)


def test_return_dict_false_gives_transformers_tuple():
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, _ = batch("none")
    with torch.no_grad():
        a = ref(ids, labels=ids, use_cache=True, return_dict=False)
        b = ours(ids, labels=ids, use_cache=True, return_dict=False)
    assert isinstance(b, tuple) and len(a) == len(b) == 3  # loss, logits, past_key_values
    assert_close("tuple loss", a[0], b[0])
    assert_close("tuple logits", a[1], b[1])


def test_state_dict_keys_equal_reference_for_every_class_and_shape():
    for shape in SHAPES:
        for cls_name in CLASSES:
            ref, ours = make_pair(cls_name, shape)
            assert list(ours.state_dict()) == list(ref.state_dict()), (shape, cls_name)
            assert ours.num_parameters() == ref.num_parameters()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_half_precision_left_padded_batch_is_finite(dtype, output_attentions):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ours.to(dtype)
    ids, mask = batch("left")
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, output_attentions=output_attentions, output_hidden_states=True)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(h).all() for h in out.hidden_states)


def devices():
    yield pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
    mps = getattr(torch.backends, "mps", None)
    yield pytest.param("mps", marks=pytest.mark.skipif(not (mps and mps.is_available()), reason="no MPS device"))


@pytest.mark.parametrize("device", list(devices()))
@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_forward_parity_on_accelerator(device, shape, cls_name):
    ref, ours = make_pair(cls_name, shape)
    ref.to(device)
    ours.to(device)
    ids, mask = (t.to(device) for t in batch("left"))
    with torch.no_grad():
        a = outputs_of(ref, cls_name, ids, mask)
        b = outputs_of(ours, cls_name, ids, mask)
    for key, value in main_tensors(a, cls_name).items():
        assert_close(f"{device} {cls_name}.{key}", value, main_tensors(b, cls_name)[key], atol=1e-4)


def test_labels_outside_the_vocabulary_are_named_before_the_loss():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, _ = batch("none")
    labels = ids.clone()
    labels[1, 4] = ours.config.vocab_size
    with pytest.raises(ValueError, match=rf"labels must be token ids in \[0, vocab_size={ours.config.vocab_size}\) "
                                         rf"or -100 \(ignored\); got {ours.config.vocab_size} at index \(1, 4\)"):
        ours(ids, labels=labels)
    labels[1, 4] = -5
    with pytest.raises(ValueError, match="got -5 at index"):
        ours(ids, labels=labels)
    _, clf = make_pair("OPTForSequenceClassification", "pre_ln")
    with pytest.raises(ValueError, match=rf"class ids in \[0, num_labels={clf.config.num_labels}\)"):
        clf(ids, labels=torch.full((ids.shape[0],), clf.config.num_labels))
