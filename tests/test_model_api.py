"""The model API around the forward pass: init, gradient checkpointing, dropout, head_mask, embeddings,
outputs access, and clear errors for bad input."""

import pytest
import torch
from tiny import batch, config_kwargs, make_pair

import optlite
from optlite import OPTConfig, OPTForCausalLM, OPTForQuestionAnswering, OPTModel


def test_init_follows_reference_scheme():
    cfg = OPTConfig(**config_kwargs("post_ln_proj", vocab_size=2000, hidden_size=256, ffn_dim=512, init_std=0.05))
    torch.manual_seed(0)
    model = OPTForQuestionAnswering(cfg)
    emb = model.get_input_embeddings().weight
    assert emb[cfg.pad_token_id].abs().sum() == 0
    assert abs(emb.std().item() - 0.05) < 0.003
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.numel() > 10000:
            assert abs(p.std().item() - 0.05) < 0.005, name


def test_lm_head_is_tied_and_sized_by_word_embed_proj_dim():
    model = OPTForCausalLM(OPTConfig(**config_kwargs("post_ln_proj")))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.lm_head.weight.shape == (99, 16)
    untied = OPTForCausalLM(OPTConfig(**config_kwargs("pre_ln", tie_word_embeddings=False)))
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight


@pytest.mark.parametrize("shape", ["pre_ln", "post_ln_proj"])
def test_gradient_checkpointing_gives_the_same_gradients(shape):
    _, plain = make_pair("OPTForCausalLM", shape)
    _, ckpt = make_pair("OPTForCausalLM", shape)
    ckpt.gradient_checkpointing_enable()
    assert ckpt.is_gradient_checkpointing
    ids, mask = batch("left")
    for model in (plain, ckpt):
        model.train()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-6, msg=name)
    ckpt.gradient_checkpointing_disable()
    assert not ckpt.is_gradient_checkpointing


def test_dropout_is_active_only_in_training():
    _, model = make_pair("OPTForCausalLM", "pre_ln", dropout=0.3, attention_dropout=0.3)
    ids, _ = batch("none")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_attention_dropout_alone_changes_training_outputs():
    _, model = make_pair("OPTForCausalLM", "pre_ln", attention_dropout=0.5)
    model.train()
    ids, _ = batch("none")
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_layerdrop_one_skips_every_layer_in_training_only():
    _, model = make_pair("OPTModel", "pre_ln", layerdrop=1.0)
    ids, _ = batch("none")
    dec = model.decoder
    with torch.no_grad():
        skipped = dec.final_layer_norm(dec.embed_tokens(ids) + dec.embed_positions(torch.arange(7)[None]))
        model.train()
        torch.testing.assert_close(model(ids).last_hidden_state, skipped)
        model.eval()
        assert not torch.allclose(model(ids).last_hidden_state, skipped)


def test_head_mask_zeroes_a_head_like_removing_its_output_columns():
    _, model = make_pair("OPTModel", "pre_ln")
    ids, mask = batch("left")
    n_layers, n_heads, d = 3, 4, 8
    real = mask.bool()  # left-pad rows attend to nothing; eager and SDPA differ there, as in transformers
    with torch.no_grad():
        ones = model(ids, attention_mask=mask, head_mask=torch.ones(n_layers, n_heads)).last_hidden_state
        torch.testing.assert_close(ones[real], model(ids, attention_mask=mask).last_hidden_state[real])
        head_mask = torch.ones(n_layers, n_heads)
        head_mask[1, 2] = 0.0
        masked = model(ids, attention_mask=mask, head_mask=head_mask).last_hidden_state
        model.decoder.layers[1].self_attn.out_proj.weight[:, 2 * d:3 * d] = 0.0
        torch.testing.assert_close(masked[real], model(ids, attention_mask=mask).last_hidden_state[real])
    with pytest.raises(ValueError, match=r"head_mask must be \(4,\) or \(3, 4\)"):
        model(ids, head_mask=torch.ones(2, 4))


def test_resize_token_embeddings_keeps_rows_and_ties_head():
    _, model = make_pair("OPTForCausalLM", "post_ln_proj")
    old = model.get_input_embeddings().weight.detach().clone()
    new = model.resize_token_embeddings(110, pad_to_multiple_of=8)
    assert new.weight.shape == (112, 16) and model.config.vocab_size == 112
    assert torch.equal(new.weight[:99], old)
    torch.testing.assert_close(new.weight[105], old.mean(0))
    assert model.lm_head.weight is new.weight
    assert model(torch.tensor([[2, 111]])).logits.shape == (1, 2, 112)


def test_outputs_have_attribute_key_and_index_access():
    _, model = make_pair("OPTForCausalLM", "pre_ln")
    ids, _ = batch("none")
    out = model(ids, labels=ids, use_cache=False)
    assert out.keys() == ["loss", "logits"]
    assert out[0] is out.loss is out["loss"] and out[1] is out.logits
    assert "past_key_values" not in out and out.get("past_key_values") is None
    with pytest.raises(KeyError):
        out["attentions"]
    loss, logits = out.to_tuple()
    assert logits is out.logits


def test_num_parameters_counts_tied_weights_once():
    model = OPTForCausalLM(OPTConfig(**config_kwargs("pre_ln")))
    decoder_only = sum(p.numel() for p in model.model.parameters())
    assert model.num_parameters() == decoder_only
    embeddings = model.get_input_embeddings().weight.numel() + model.model.decoder.embed_positions.weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == decoder_only - embeddings


def test_builds_on_meta_without_memory():
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig.from_preset("opt-66b"))
    assert model.device.type == "meta"
    assert model.num_parameters() > 65_000_000_000


@pytest.fixture
def model():
    return OPTModel(OPTConfig(**config_kwargs("pre_ln"))).eval()


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m(), ValueError, "exactly one of input_ids and inputs_embeds"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, 32)), ValueError,
     "exactly one"),
    (lambda m: m(torch.ones(1, 41, dtype=torch.long)), ValueError, "41 tokens.*max_position_embeddings=40"),
    (lambda m: m(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)), ValueError,
     r"attention_mask must be .* \(2, 5\), got \(2, 4\)"),
    (lambda m: m(torch.tensor([[5, 99]])), ValueError, r"ids in \[5, 99\] but the vocabulary has 99 ids"),
    (lambda m: m(torch.tensor([[-1, 3]])), ValueError, "vocabulary"),
    (lambda m: m(torch.ones(1, 3)), TypeError, "input_ids must be an integer tensor"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 3, 16)), ValueError, r"inputs_embeds must be \(batch, seq, 32\)"),
    (lambda m: m(torch.ones(1, 2, dtype=torch.long), past_key_values=[(torch.zeros(1, 4, 1, 8),) * 2] * 2),
     ValueError, "holds 2 layers but the model has 3"),
])
def test_bad_input_is_refused_before_compute(model, call, error, match):
    with pytest.raises(error, match=match):
        call(model)


def test_cache_too_long_for_positions_is_refused(model):
    past = [(torch.zeros(1, 4, 39, 8),) * 2] * 3
    with pytest.raises(ValueError, match=r"41 tokens \(39 cached \+ 2 new\)"):
        model(torch.ones(1, 2, dtype=torch.long), past_key_values=past)


def test_public_names():
    for name in ["OPTConfig", "OPTModel", "OPTForCausalLM", "OPTForSequenceClassification",
                 "OPTForQuestionAnswering", "DynamicCache"]:
        assert hasattr(optlite, name)
    with pytest.raises(TypeError, match="needs an OPTConfig"):
        OPTModel({"hidden_size": 8})
