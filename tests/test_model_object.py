"""The config's identity and the model object's transformers-style surface, checked against transformers' OPT."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers
from tiny import batch, make_pair

import optlite
from optlite import OPTConfig

CLASSES = ["OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering"]


# ---- config identity ----


def test_config_identity_matches_transformers(tmp_path):
    ref_model, ours = make_pair("OPTForCausalLM", "pre_ln")
    ref = ref_model.config
    cfg = ours.config
    assert cfg.model_type == ref.model_type == "opt"
    assert cfg.get_text_config() is cfg and cfg.get_text_config(decoder=True) is cfg
    assert cfg.use_return_dict is True and cfg.return_dict == ref.return_dict
    assert (cfg.output_attentions, cfg.output_hidden_states) == (ref.output_attentions, ref.output_hidden_states)
    assert cfg.is_encoder_decoder is ref.is_encoder_decoder is False
    assert json.loads(cfg.to_json_string()) == cfg.to_dict()
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["OPTForCausalLM"] and written["model_type"] == "opt"
    back = OPTConfig.from_pretrained(tmp_path)
    assert back.architectures == ["OPTForCausalLM"] and back.name_or_path == str(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["OPTForCausalLM"]


def test_name_or_path_is_where_the_model_came_from(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    ref.save_pretrained(tmp_path)
    model = optlite.OPTForCausalLM.from_pretrained(tmp_path)
    assert model.config.name_or_path == model.name_or_path == str(tmp_path)
    assert transformers.OPTForCausalLM.from_pretrained(tmp_path).config.name_or_path == str(tmp_path)
    given = OPTConfig.from_pretrained(tmp_path)
    given.name_or_path = ""
    assert optlite.OPTForCausalLM.from_pretrained(tmp_path, config=given).config.name_or_path == str(tmp_path)


def test_label_maps_follow_num_labels_set_after_construction_like_transformers(tmp_path):
    ours, ref = OPTConfig(), transformers.OPTConfig()
    for cfg in (ours, ref):
        cfg.num_labels = 3
    assert ours.num_labels == 3 and ours.id2label == ref.id2label and ours.label2id == ref.label2id
    for cfg in (ours, ref):
        cfg.id2label = {0: "neg", 1: "pos"}
    assert ours.num_labels == ref.num_labels == 2
    assert ours.label2id == {"neg": 0, "pos": 1}

    config = OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)
    config.num_labels = 3
    model = optlite.OPTForSequenceClassification(config)
    model.save_pretrained(tmp_path)
    reloaded = optlite.OPTForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.score.weight.shape == (3, 16) and torch.equal(reloaded.score.weight, model.score.weight)
    assert transformers.OPTForSequenceClassification.from_pretrained(tmp_path).config.num_labels == 3


# ---- loading extras ----


def test_subfolder_reads_config_and_weights_from_inside_the_checkpoint(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "post_ln_proj")
    ref.save_pretrained(tmp_path / "nested" / "model")
    ids, mask = batch("left")
    ours = optlite.OPTForCausalLM.from_pretrained(tmp_path, subfolder="nested/model")
    assert ours.config.word_embed_proj_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    assert OPTConfig.from_pretrained(tmp_path, subfolder="nested/model").do_layer_norm_before is False
    with pytest.raises(FileNotFoundError, match="config.json"):
        optlite.OPTForCausalLM.from_pretrained(tmp_path, subfolder="elsewhere")
    with pytest.raises(ValueError, match="subfolder must be a relative path"):
        OPTConfig.from_pretrained(tmp_path, subfolder="../outside")


def test_loading_info_has_transformers_types(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    ref.save_pretrained(tmp_path)
    _, theirs = transformers.OPTForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    _, ours = optlite.OPTForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert type(ours[key]) is type(theirs[key]), key
    assert ours["missing_keys"] == theirs["missing_keys"] == {"score.weight"}


def test_from_pretrained_with_config_and_state_dict_and_no_path(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "no_final_ln")
    ref.save_pretrained(tmp_path)
    config = OPTConfig.from_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")  # saved tied: no lm_head.weight
    ours = optlite.OPTForCausalLM.from_pretrained(None, config=config, state_dict=state)
    assert ours.lm_head.weight is ours.model.decoder.embed_tokens.weight and not ours.training
    ids, mask = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    # A folder with state_dict= takes the config from the folder and the weights from the dict.
    bare = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    again = optlite.OPTModel.from_pretrained(tmp_path, state_dict=bare)
    torch.testing.assert_close(again.decoder.embed_tokens.weight, ref.model.decoder.embed_tokens.weight)
    with pytest.raises(ValueError, match="needs both config= .* and state_dict="):
        optlite.OPTForCausalLM.from_pretrained(None, config=config)
    with pytest.raises(TypeError, match="state_dict must map str keys to tensors"):
        optlite.OPTForCausalLM.from_pretrained(None, config=config, state_dict={"x": [1.0]})


def test_state_dict_saves_with_safetensors_and_loads_back_tied(tmp_path):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    state = ours.state_dict()
    assert list(state) == list(ref.state_dict())  # transformers' keys, the tied head included
    safetensors.torch.save_file(state, tmp_path / "plain.safetensors")  # refused if two keys shared a tensor
    assert ours.state_dict(keep_vars=True)["lm_head.weight"] is ours.lm_head.weight
    fresh = optlite.OPTForCausalLM(ours.config)
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "plain.safetensors"))
    assert fresh.lm_head.weight is fresh.model.decoder.embed_tokens.weight
    torch.testing.assert_close(fresh.lm_head.weight, ours.lm_head.weight, rtol=0, atol=0)
    # save_pretrained stores the tied head once; a strict load_state_dict of that file still works and stays tied.
    ours.save_pretrained(tmp_path / "ckpt")
    stored = safetensors.torch.load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "lm_head.weight" not in stored
    fresh = optlite.OPTForCausalLM(ours.config)
    fresh.load_state_dict(stored)
    assert fresh.lm_head.weight is fresh.model.decoder.embed_tokens.weight


# ---- the model object ----


@pytest.mark.parametrize("cls_name", CLASSES)
def test_model_object_attributes_match_transformers(cls_name):
    ref, ours = make_pair(cls_name, "pre_ln")
    assert ours.can_generate() == type(ref).can_generate() == (cls_name == "OPTForCausalLM")
    assert type(ours).base_model_prefix == type(ref).base_model_prefix
    assert ours.main_input_name == ref.main_input_name == "input_ids"
    assert ours.supports_gradient_checkpointing and ref.supports_gradient_checkpointing
    assert type(ours).base_model.fget(ours) is (ours if cls_name == "OPTModel" else ours.model)
    assert ours.get_decoder() is ours.base_model.decoder
    assert type(ref.get_decoder()).__name__ == type(ours.get_decoder()).__name__ == "OPTDecoder"
    assert (ours._tied_weights_keys or {}) == (ref._tied_weights_keys or {})
    assert set(ours._keys_to_ignore_on_save or ()) == set(ref._keys_to_ignore_on_save or ())
    if cls_name == "OPTForCausalLM":
        assert ours.generation_config.to_dict() == {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert getattr(ours.generation_config, name) == getattr(ref.generation_config, name)
    else:
        assert ours.generation_config is None


def test_generation_config_is_saved_and_read_back(tmp_path):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ours.save_pretrained(tmp_path)
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (2, 2, 1)
    ours.generation_config.max_new_tokens = 7
    ours.save_pretrained(tmp_path)
    assert optlite.OPTForCausalLM.from_pretrained(tmp_path).generation_config.max_new_tokens == 7


def test_add_model_tags_keeps_order_without_repeats():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    assert ours.model_tags is None
    ours.add_model_tags("trl")
    ours.add_model_tags(["sft", "trl"])
    assert ours.model_tags == ["trl", "sft"]


def test_input_require_grads_reaches_a_frozen_embedding_output():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ours.requires_grad_(False)
    seen = []
    ours.model.decoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    ids, _ = batch("none")
    ours.enable_input_require_grads()
    ours.enable_input_require_grads()  # a second call replaces the hook, as transformers' does
    ours(ids)
    ours.disable_input_require_grads()
    ours(ids)
    assert seen == [True, False]


def test_gradient_checkpointing_accepts_what_trainer_and_peft_pass():
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert ours.is_gradient_checkpointing and ours.model.decoder.checkpoint_kwargs == {"use_reentrant": True}
    ours.gradient_checkpointing_disable()
    ours.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    assert ours.is_activation_checkpointing and ours.model.decoder.checkpoint_kwargs == {"use_reentrant": False}
    with pytest.raises(NotImplementedError, match="every_n_layers=2"):
        ours.gradient_checkpointing_enable(every_n_layers=2)
    ours.requires_grad_(False)  # a frozen base, as under adapters: the layers' input must still carry grad
    ours.train()
    seen = []
    ours.model.decoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    ours(batch("none")[0])
    assert seen == [True]


def _same_inputs(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
            assert a[key].is_contiguous() == b[key].is_contiguous(), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("case", ["prefill", "step", "positions", "embeds_first", "embeds_later"])
def test_prepare_inputs_for_generation_matches_transformers(case):
    ref, ours = make_pair("OPTForCausalLM", "pre_ln")
    ids, mask = batch("left")
    embeds = torch.randn(3, 7, 32)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {
        "prefill": dict(attention_mask=mask, use_cache=True, labels=ids),
        "step": dict(next_sequence_length=1, attention_mask=mask, use_cache=True, output_attentions=False),
        "positions": dict(next_sequence_length=2, position_ids=positions, attention_mask=mask),
        "embeds_first": dict(inputs_embeds=embeds, is_first_iteration=True, attention_mask=mask),
        "embeds_later": dict(inputs_embeds=embeds, next_sequence_length=1, attention_mask=mask),
    }[case]
    _same_inputs(ours.prepare_inputs_for_generation(ids, **kwargs), ref.prepare_inputs_for_generation(ids, **kwargs))
    cache = optlite.DynamicCache()
    assert ours.prepare_inputs_for_generation(ids, past_key_values=cache)["past_key_values"] is cache
