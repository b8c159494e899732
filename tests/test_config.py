"""OPTConfig: transformers' fields and defaults, config.json round trips, validation, presets."""

import dataclasses
import json

import pytest

from optlite import OPTConfig


def test_fields_and_defaults_equal_transformers():
    import transformers

    ref = transformers.OPTConfig()
    ours = OPTConfig()
    names = ["vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
             "do_layer_norm_before", "_remove_final_layer_norm", "word_embed_proj_dim", "dropout",
             "attention_dropout", "num_attention_heads", "activation_function", "layerdrop", "init_std",
             "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "enable_bias",
             "layer_norm_elementwise_affine", "tie_word_embeddings", "num_labels", "problem_type"]
    for name in names:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.id2label == ref.id2label and ours.label2id == ref.label2id


def test_hub_config_round_trip_keeps_unknown_keys(tmp_path):
    hub = {"_name_or_path": "facebook/opt-13b", "architectures": ["OPTForCausalLM"], "model_type": "opt",
           "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40, "num_attention_heads": 40,
           "output_projection": True, "prefix": "</s>", "torch_dtype": "float16", "transformers_version": "4.21.0"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hub))
    cfg = OPTConfig.from_json_file(path)
    assert cfg.hidden_size == 5120 and cfg.word_embed_proj_dim == 5120 and cfg.torch_dtype == "float16"
    assert cfg.extra["output_projection"] is True and cfg.extra["prefix"] == "</s>"
    cfg.to_json_file(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    for key, value in hub.items():
        assert written[key] == value, key
    assert OPTConfig.from_json_file(tmp_path / "out.json") == cfg


def test_written_config_is_read_by_transformers(tmp_path):
    import transformers

    cfg = OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=96, num_hidden_layers=2,
                    word_embed_proj_dim=32, do_layer_norm_before=False, num_labels=3, torch_dtype="bfloat16")
    cfg.to_json_file(tmp_path / "config.json")
    ref = transformers.OPTConfig.from_pretrained(tmp_path)
    for f in dataclasses.fields(OPTConfig):
        if f.name not in ("extra", "torch_dtype"):
            assert getattr(ref, f.name) == getattr(cfg, f.name), f.name
    assert str(ref.dtype) == "torch.bfloat16"


def test_transformers_written_config_is_read(tmp_path):
    import transformers

    transformers.OPTConfig(hidden_size=48, num_attention_heads=3, ffn_dim=96, num_hidden_layers=1,
                           activation_function="gelu", dtype="float16").save_pretrained(tmp_path)
    cfg = OPTConfig.from_json_file(tmp_path / "config.json")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.activation_function, cfg.torch_dtype) == (
        48, 3, "gelu", "float16")


def test_num_labels_builds_label_maps():
    cfg = OPTConfig(num_labels=3)
    assert cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert OPTConfig.from_dict({"id2label": {"0": "neg", "1": "pos"}}).num_labels == 2
    assert OPTConfig.from_dict({"id2label": {"0": "neg", "1": "pos"}}, num_labels=4).num_labels == 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_attention_heads=12), "divisible"),
    (dict(num_hidden_layers=-1), "num_hidden_layers"),
    (dict(ffn_dim=0), "ffn_dim"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(activation_function="mish"), "activation_function"),
    (dict(dropout=1.5), "dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(pad_token_id=60000), "pad_token_id"),
    (dict(problem_type="ranking"), "problem_type"),
])
def test_invalid_values_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OPTConfig(**kwargs)


def test_other_model_type_and_bad_json_are_refused(tmp_path):
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        OPTConfig.from_dict({"model_type": "gpt2"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        OPTConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 10, "num_attention_heads": 3}))
    with pytest.raises(ValueError, match=r"config.json: .*divisible"):
        OPTConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config file"):
        OPTConfig.from_json_file(tmp_path / "missing.json")


def test_presets_match_published_shapes():
    assert OPTConfig.preset_names() == sorted(["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b",
                                               "opt-13b", "opt-30b", "opt-66b", "opt-tiny"])
    c350 = OPTConfig.from_preset("facebook/opt-350m")
    assert (c350.hidden_size, c350.word_embed_proj_dim, c350.do_layer_norm_before) == (1024, 512, False)
    c66 = OPTConfig.from_preset("opt-66b", dropout=0.0)
    assert (c66.hidden_size, c66.num_hidden_layers, c66.num_attention_heads, c66.dropout) == (9216, 64, 72, 0.0)
    with pytest.raises(ValueError, match="unknown preset 'opt-7b'.*opt-6.7b"):
        OPTConfig.from_preset("opt-7b")


def test_derived_embedding_width_follows_an_overridden_hidden_size():
    import optlite

    cfg = OPTConfig.from_preset("opt-tiny", hidden_size=128)
    assert cfg.word_embed_proj_dim == 128
    model = optlite.OPTForCausalLM(cfg)
    assert model.model.decoder.project_in is None and model.model.decoder.project_out is None
    assert OPTConfig.from_preset("opt-tiny", hidden_size=128, word_embed_proj_dim=32).word_embed_proj_dim == 32
    assert OPTConfig.from_preset("opt-350m", hidden_size=2048).word_embed_proj_dim == 512  # not derived in 350m
    assert OPTConfig.from_preset("opt-tiny").word_embed_proj_dim == 64


def test_derived_embedding_width_follows_hidden_size_in_from_pretrained(tmp_path):
    OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=128, num_hidden_layers=1).save_pretrained(tmp_path)
    assert OPTConfig.from_pretrained(tmp_path, hidden_size=96).word_embed_proj_dim == 96
