"""Checkpoints: every layout of the hub and of transformers' save_pretrained loads into the four classes with
transformers' outputs; saves are read back by transformers; hub resolution from a cache folder; atomic saves;
device_map with disk offload; memory mapping; and a clear error for each kind of bad input.

Expected values come from transformers (the reference) or from published facts, never from optlite itself."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_cache import make_hub_cache
from peak_memory import load_peak
from safetensors.torch import save_file
from tiny import CLASSES, batch, make_pair

import optlite
from optlite import checkpoint, saving
from optlite.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------------------------------------------------
# Reference checkpoints, written by transformers or by hand in the hub's layouts
# ---------------------------------------------------------------------------------------------------------------


def hub_style(ref, folder: Path, *, prefix: str, lm_head: bool, fmt: str, dtype=torch.float16, shards: int = 1,
              version: bool = True) -> Path:
    """A checkpoint as the hub ships them (OPT_FACTS §2): `decoder.*` or `model.decoder.*`, with or without
    lm_head.weight, a `decoder.version` leftover, fp16, .bin or .safetensors (sharded with an index as 6.7b-66b are),
    config with torch_dtype."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in ref.state_dict().items():
        if key == "lm_head.weight":
            continue
        state[prefix + key.removeprefix("model.")] = value.detach().to(dtype).clone()
    if lm_head:
        state["lm_head.weight"] = state[prefix + "decoder.embed_tokens.weight"].clone()
    if version:
        state[prefix + "decoder.version"] = torch.tensor([3.0])
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    keys = list(state)
    parts = [keys[i * len(keys) // shards:(i + 1) * len(keys) // shards] for i in range(shards)]
    names = [f"{stem}-{i:05d}-of-{shards:05d}.{ext}" for i in range(1, shards + 1)] if shards > 1 else [f"{stem}.{ext}"]
    for name, part in zip(names, parts, strict=True):
        tensors = {k: state[k] for k in part}
        if fmt == "bin":
            torch.save(tensors, folder / name)
        else:
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
    if shards > 1:
        weight_map = {k: name for name, part in zip(names, parts, strict=True) for k in part}
        total = sum(v.numel() * v.element_size() for v in state.values())
        (folder / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = ref.config.to_dict()
    config.pop("dtype", None)
    config.update(torch_dtype=str(dtype).removeprefix("torch."), architectures=["OPTForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


LAYOUTS = {
    # name: (tiny shape, how it is written)
    "tf_single": ("pre_ln", dict(how="transformers")),
    "tf_sharded": ("post_ln_proj", dict(how="transformers", max_shard_size="20KB")),
    # transformers 4's safe_serialization=False (5 writes safetensors only): model.decoder.*, tied head left out
    "tf4_bin": ("pre_ln", dict(how="hub", prefix="model.", lm_head=False, fmt="bin", dtype=torch.float32,
                               version=False)),
    "hub_125m_bin": ("pre_ln", dict(how="hub", prefix="model.", lm_head=True, fmt="bin")),
    "hub_350m_bin": ("post_ln_proj", dict(how="hub", prefix="", lm_head=False, fmt="bin")),
    "hub_6.7b_sharded_bin": ("pre_ln", dict(how="hub", prefix="", lm_head=False, fmt="bin", shards=3)),
    "hub_pr_safetensors": ("post_ln_proj", dict(how="hub", prefix="", lm_head=False, fmt="safetensors")),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, (shape, spec) in LAYOUTS.items():
        spec = dict(spec)
        ref, _ = make_pair("OPTForCausalLM", shape, seed=len(out))
        if spec.pop("how") == "transformers":
            ref.save_pretrained(root / name, **spec)
            out[name] = root / name
        else:
            out[name] = hub_style(ref, root / name, **spec)
    return out


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    main = {"OPTModel": "last_hidden_state", "OPTForCausalLM": "logits", "OPTForSequenceClassification": "logits",
            "OPTForQuestionAnswering": "start_logits"}[type(model).__name__]
    return getattr(out, main), out.hidden_states[-1]


def assert_same(a, b, atol=1e-5):
    """Equal within atol, relative to the size of the values (at least 1): logits run to tens."""
    assert a.shape == b.shape
    assert ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1.0)).max().item() <= atol


# ---------------------------------------------------------------------------------------------------------------
# Loading every layout into every class
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_every_layout_loads_into_every_class_like_transformers(layouts, layout, cls_name):
    folder = layouts[layout]
    ref = getattr(transformers, cls_name).from_pretrained(folder, dtype=torch.float32).eval()
    ours, info = getattr(optlite, cls_name).from_pretrained(folder, output_loading_info=True)
    ids, mask = batch("left")
    (a, ha), (b, hb) = outputs(ref, ids, mask), outputs(ours, ids, mask)
    assert_same(ha, hb)  # the decoder's output: loaded weights are transformers' weights
    head = {"OPTForSequenceClassification": "score", "OPTForQuestionAnswering": "qa_outputs"}.get(cls_name)
    if head is None:
        assert_same(a, b)
        assert info["missing_keys"] == info["newly_initialized_keys"] == set()
    else:  # both initialise a head the checkpoint lacks; they draw different random numbers
        assert info["newly_initialized_keys"] == {k for k in ours.state_dict() if k.startswith(head)}
        module = getattr(ours, head)
        assert module.weight.std().item() == pytest.approx(ours.config.init_std, rel=0.5)
        if module.bias is not None:
            assert module.bias.eq(0).all()
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in ours.parameters())
    assert not ours.training
    if cls_name == "OPTForCausalLM":
        assert ours.lm_head.weight is ours.model.decoder.embed_tokens.weight
    if cls_name == "OPTModel" and layout == "hub_125m_bin":
        assert info["unexpected_keys"] == {"lm_head.weight"}


def test_task_checkpoints_load_into_their_class_and_base_classes_drop_the_head(tmp_path, caplog):
    ids, mask = batch("right")
    for cls_name, head in [("OPTForSequenceClassification", "score"), ("OPTForQuestionAnswering", "qa_outputs")]:
        ref, _ = make_pair(cls_name, "post_ln_proj", num_labels=3)
        ref.save_pretrained(tmp_path / cls_name)
        ours = getattr(optlite, cls_name).from_pretrained(tmp_path / cls_name)
        assert_same(outputs(ref, ids, mask)[0], outputs(ours, ids, mask)[0])
        with caplog.at_level(logging.INFO, logger="optlite.checkpoint"):
            base, info = optlite.OPTModel.from_pretrained(tmp_path / cls_name, output_loading_info=True)
        assert info["unexpected_keys"] == {k for k in ref.state_dict() if k.startswith(head)}
        assert "dropped the head weights" in caplog.text and head in caplog.text
        assert_same(outputs(ref, ids, mask)[1], outputs(base, ids, mask)[0])


def test_new_head_is_reported(layouts, caplog):
    with caplog.at_level(logging.INFO, logger="optlite.checkpoint"):
        optlite.OPTForSequenceClassification.from_pretrained(layouts["tf_single"], num_labels=3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("newly initialised" in r.getMessage() and "score.weight" in r.getMessage() for r in warnings)


def test_config_overrides_reach_the_config(layouts):
    model = optlite.OPTForSequenceClassification.from_pretrained(layouts["tf_single"], num_labels=5, dropout=0.0)
    assert model.config.num_labels == 5 and model.config.dropout == 0.0
    assert model.score.weight.shape == (5, model.config.word_embed_proj_dim)


def test_untied_lm_head_is_loaded_and_a_differing_tied_copy_is_warned_about(tmp_path, caplog):
    ref, _ = make_pair("OPTForCausalLM", "pre_ln", tie_word_embeddings=False)
    with torch.no_grad():
        ref.lm_head.weight.normal_()
    ref.save_pretrained(tmp_path / "untied")
    ours = optlite.OPTForCausalLM.from_pretrained(tmp_path / "untied")
    assert ours.lm_head.weight is not ours.model.decoder.embed_tokens.weight
    ids, mask = batch("left")
    assert_same(outputs(ref, ids, mask)[0], outputs(ours, ids, mask)[0])
    # The same files with a config that ties: as in transformers, the stored head is used, untied, and we say so.
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with caplog.at_level(logging.WARNING, logger="optlite.checkpoint"):
        tied = optlite.OPTForCausalLM.from_pretrained(tmp_path / "untied")
    assert "lm_head.weight differs from embed_tokens" in caplog.text
    assert tied.config.tie_word_embeddings is False
    ref_tied = transformers.OPTForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert_same(outputs(ref_tied, ids, mask)[0], outputs(tied, ids, mask)[0])
    tied.save_pretrained(tmp_path / "resaved")  # the head is not lost on the next save
    assert_same(outputs(ref, ids, mask)[0],
                outputs(optlite.OPTForCausalLM.from_pretrained(tmp_path / "resaved"), ids, mask)[0])


# ---------------------------------------------------------------------------------------------------------------
# dtype and device
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16, torch.bfloat16, "float16", "bfloat16",
                                   "auto"])
def test_dtypes_match_transformers_weights(layouts, dtype):
    folder = layouts["hub_350m_bin"]  # stored in fp16, config torch_dtype float16
    ours = optlite.OPTForCausalLM.from_pretrained(folder, dtype=dtype)
    expected = {None: torch.float32, "auto": torch.float16, "float16": torch.float16,
                "bfloat16": torch.bfloat16}.get(dtype, dtype)
    ref = transformers.OPTForCausalLM.from_pretrained(folder, dtype=expected)
    assert {p.dtype for p in ours.parameters()} == {expected}
    theirs = ref.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_torch_dtype_alias_and_auto_without_config_dtype(tmp_path):
    ref, _ = make_pair("OPTModel", "pre_ln")
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert optlite.OPTModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16  # the stored dtype
    assert optlite.OPTModel.from_pretrained(tmp_path, torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="disagree"):
        optlite.OPTModel.from_pretrained(tmp_path, dtype="float16", torch_dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        optlite.OPTModel.from_pretrained(tmp_path, dtype="float8")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"),
                                    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="no CUDA")),
                                    pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(),
                                                                                 reason="no MPS"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device(layouts, device, dtype):
    ours = optlite.OPTForCausalLM.from_pretrained(layouts["hub_125m_bin"], device=device, dtype=dtype)
    assert {p.device.type for p in ours.parameters()} == {torch.device(device).type}
    assert {p.dtype for p in ours.parameters()} == {dtype}
    assert ours.lm_head.weight is ours.model.decoder.embed_tokens.weight
    ref = transformers.OPTForCausalLM.from_pretrained(layouts["hub_125m_bin"], dtype=dtype)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key].cpu()), key


def test_new_heads_are_materialised_in_the_target_dtype(layouts):
    model = optlite.OPTForQuestionAnswering.from_pretrained(layouts["tf_single"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.qa_outputs.bias.eq(0).all() and model.qa_outputs.weight.abs().sum() > 0


def test_legacy_non_zip_bin_loads(tmp_path, layouts):
    (tmp_path / "config.json").write_bytes((layouts["tf4_bin"] / "config.json").read_bytes())
    state = torch.load(layouts["tf4_bin"] / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # cannot be mmapped
    model = optlite.OPTForCausalLM.from_pretrained(tmp_path)
    ref = transformers.OPTForCausalLM.from_pretrained(layouts["tf4_bin"]).eval()
    ids, mask = batch("left")
    assert_same(outputs(ref, ids, mask)[0], outputs(model, ids, mask)[0])


class WithScratchBuffer(optlite.OPTModel):
    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)  # in no checkpoint


def test_nothing_stays_on_meta(layouts):
    with pytest.raises(CheckpointError, match="still on the meta device.*scratch"):
        WithScratchBuffer.from_pretrained(layouts["tf_single"])


def test_import_pulls_in_neither_transformers_nor_accelerate():
    code = "import sys, optlite; print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "PYTHONPATH": SRC}, check=True)
    assert out.stdout.strip() == "[]"


def test_a_head_untied_by_hand_is_saved(tmp_path):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ours.lm_head.weight = torch.nn.Parameter(ours.lm_head.weight.detach() * 2)
    ours.save_pretrained(tmp_path)
    ref = transformers.OPTForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = batch("none")
    assert_same(outputs(ours, ids, mask)[0], outputs(ref, ids, mask)[0])


def test_loaded_weights_share_the_file_mapping_when_the_dtype_matches(tmp_path):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc/self/maps")
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    ref.save_pretrained(tmp_path)  # fp32 safetensors
    weights = str((tmp_path / "model.safetensors").resolve())

    def mapped_ranges():
        ranges = []
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.endswith(weights):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
        return ranges

    def in_mapping(t, ranges):
        start = t.data_ptr()
        return any(lo <= start and start + t.numel() * t.element_size() <= hi for lo, hi in ranges)

    same = optlite.OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ranges = mapped_ranges()
    assert ranges, "the weights file is not memory-mapped"
    assert all(in_mapping(p, ranges) for p in same.parameters())  # nothing was copied
    cast = optlite.OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not any(in_mapping(p, mapped_ranges()) for p in cast.parameters())
    with torch.no_grad():  # the mapping is private: writing to a parameter never touches the file
        same.model.decoder.embed_tokens.weight.add_(1.0)
    reread = optlite.OPTForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reread.model.decoder.embed_tokens.weight, ref.model.decoder.embed_tokens.weight)


def test_upcast_tensors_own_their_memory(tmp_path):
    import transformers

    ref, _ = make_pair("OPTForCausalLM", "pre_ln", vocab_size=4096, hidden_size=512, ffn_dim=64)
    ref.half().save_pretrained(tmp_path)
    ours = optlite.OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    embed = ours.model.decoder.embed_tokens.weight
    # each storage holds exactly the tensors that view it (one, or a layer's stacked q/k/v): torch.save writes no
    # padding and no bytes twice
    views: dict[int, list[torch.Tensor]] = {}
    for p in ours.parameters():
        views.setdefault(p.untyped_storage().data_ptr(), []).append(p)
        assert p.dtype == torch.float32 and p.is_contiguous()
    for group in views.values():
        assert group[0].untyped_storage().nbytes() == sum(p.numel() * p.element_size() for p in group)
        assert len(group) in (1, 3)
    assert ours.lm_head.weight is embed
    ref32 = transformers.OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = batch("left", vocab=4096)
    a, b = outputs(ours, ids, mask)[0], outputs(ref32, ids, mask)[0]
    # 512-wide sums of large random weights amplify fp32 rounding layer by layer, and how much depends on the
    # kernel's summation order (MKL here is 2e-6 of the largest logit off float64, oneDNN 1.1e-5): compare relative
    # to the largest logit, near 30.
    assert_same(a / b.abs().max(), b / b.abs().max(), atol=3e-5)
    with torch.no_grad():
        embed.mul_(2.0)  # writable, and private to this model
    assert torch.equal(embed, 2.0 * ref.model.decoder.embed_tokens.weight.float())


def test_upcast_peak_memory_is_the_final_weights(tmp_path):
    # 54 MB of fp32 weights from a 27 MB fp16 file, no tensor over 4 MB: reading the whole file and then casting
    # would peak near 81 MB; casting tensor by tensor and releasing what was read, near 54 MB.
    ref, _ = make_pair("OPTForCausalLM", "pre_ln", vocab_size=1024, hidden_size=512, ffn_dim=2048,
                       num_hidden_layers=4, max_position_embeddings=64)
    weights = sum(p.numel() * 4 for p in ref.parameters())
    ref.half().save_pretrained(tmp_path)
    peak = load_peak(tmp_path, dtype="float32")
    assert weights >= 50 << 20
    assert peak < 1.25 * weights, f"upcast peaked at {peak / weights:.2f}x the final weights"


# ---------------------------------------------------------------------------------------------------------------
# Saving: read back by transformers, sharding, formats
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("how", [dict(), dict(max_shard_size="10KB"), dict(safe_serialization=False)])
def test_transformers_reads_what_we_save(tmp_path, cls_name, how):
    _, ours = make_pair(cls_name, "post_ln_proj", num_labels=3)
    ours.save_pretrained(tmp_path, **how)
    ref = getattr(transformers, cls_name).from_pretrained(tmp_path).eval()
    ids, mask = batch("left")
    assert_same(outputs(ours, ids, mask)[0], outputs(ref, ids, mask)[0], atol=0.0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "opt" and config["architectures"] == [cls_name]
    assert config["torch_dtype"] == "float32"
    assert transformers.AutoConfig.from_pretrained(tmp_path).word_embed_proj_dim == 16


def test_saved_files_layout(tmp_path):
    _, ours = make_pair("OPTForCausalLM", "pre_ln")
    ours.save_pretrained(tmp_path / "one")
    # A causal LM writes its decoding defaults too, as transformers does (derived from the config when fresh).
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "generation_config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.decoder.embed_tokens.weight" in keys
    ours.save_pretrained(tmp_path / "many", max_shard_size=30_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    sizes = {k: v.numel() * v.element_size() for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(sizes)
    for shard in shards:  # every shard within the limit unless it holds one tensor larger than the limit
        with safe_open(str(tmp_path / "many" / shard), "pt") as f:
            keys = list(f.keys())
        assert len(keys) == 1 or sum(sizes[k] for k in keys) <= 30_000
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="40KB")
    names = sorted(os.listdir(tmp_path / "bin"))
    assert "pytorch_model.bin.index.json" in names and not any(n.endswith(".safetensors") for n in names)
    assert sum(os.path.getsize(tmp_path / "bin" / n) for n in names) < 3 * sum(sizes.values())


def test_OPTModel_saves_bare_decoder_keys_as_transformers_does(tmp_path):
    ref, ours = make_pair("OPTModel", "pre_ln")
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors import safe_open

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(tmp_path / "ours") == keys(tmp_path / "ref")


@pytest.mark.parametrize("size, expected", [(123, 123), ("5GB", 5 * 10**9), ("200MB", 200 * 10**6),
                                            ("10KB", 10_000), ("2GiB", 2 * 2**30), ("1.5 mb", 1_500_000)])
def test_parse_size(size, expected):
    assert checkpoint.parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "", "-1MB", 0, "GB"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        checkpoint.parse_size(size)


# ---------------------------------------------------------------------------------------------------------------
# Atomic saves
# ---------------------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_failing_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old, new = make_pair("OPTForCausalLM", "pre_ln", seed=1)[1], make_pair("OPTForCausalLM", "pre_ln", seed=2)[1]
    target = tmp_path / "ckpt"
    old.save_pretrained(target, max_shard_size="30KB")
    (target / "README.md").write_text("mine")
    before = snapshot(target)
    calls = []
    real = saving.save_file

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(saving, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(target, max_shard_size="30KB")
    assert snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the staging folder is gone too
    monkeypatch.undo()
    reloaded = optlite.OPTForCausalLM.from_pretrained(target)
    for key, value in old.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
    # A successful save replaces every owned file (no stale shard stays) and keeps the user's other files.
    new.save_pretrained(target)
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    new.save_pretrained(target, safe_serialization=False)
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "generation_config.json", "pytorch_model.bin"]


CHILD = """
import resource, signal, sys, torch
sys.path.insert(0, {src!r})
import optlite
model = optlite.OPTForCausalLM(optlite.OPTConfig(vocab_size=4000, hidden_size=64, ffn_dim=64, num_hidden_layers=1,
                                                 num_attention_heads=4, max_position_embeddings=32))
mode = sys.argv[1]
if mode == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the weights (about 1.1 MB) do not fit
else:
    import os
    from optlite import saving
    def killed(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    saving.save_file = killed
model.save_pretrained(sys.argv[2])
"""


@pytest.mark.parametrize("mode", ["fsize", "kill"])
def test_save_in_a_child_that_hits_the_file_size_limit_or_is_killed(tmp_path, mode):
    old = make_pair("OPTForCausalLM", "pre_ln")[1]
    target = tmp_path / "ckpt"
    old.save_pretrained(target)
    before = snapshot(target)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(src=SRC))
    proc = subprocess.run([sys.executable, str(script), mode, str(target)], capture_output=True, text=True,
                          timeout=120)
    if mode == "fsize":
        assert proc.returncode == 1 and "File too large" in proc.stderr
        assert sorted(os.listdir(tmp_path)) == ["child.py", "ckpt"]
    else:
        assert proc.returncode == -9
        left = [n for n in os.listdir(tmp_path) if n not in ("child.py", "ckpt")]
        assert len(left) == 1 and left[0].startswith(".ckpt.")  # the dead save's staging folder, not a checkpoint
        assert not list((tmp_path / left[0]).glob("model*.safetensors"))
    assert snapshot(target) == before
    reloaded = optlite.OPTForCausalLM.from_pretrained(target)
    for key, value in old.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key])
    old.save_pretrained(target)  # the next save clears what a killed one left behind
    assert sorted(os.listdir(tmp_path)) == ["child.py", "ckpt"]


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    _, ours = make_pair("OPTModel", "pre_ln")
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt")
    ours.save_pretrained(".")
    ours.save_pretrained(".")
    assert Path.cwd() == (tmp_path / "ckpt").resolve() and Path("model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_saving_over_the_checkpoint_a_model_was_mapped_from(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    ref.save_pretrained(tmp_path)
    model = optlite.OPTForCausalLM.from_pretrained(tmp_path)  # its weights are the file's pages
    ids, mask = batch("none")
    before = outputs(model, ids, mask)[0]
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.bias.add_(1.0)
    expected = outputs(model, ids, mask)[0]
    model.save_pretrained(tmp_path)  # the old file is replaced, not overwritten in place
    assert_same(outputs(model, ids, mask)[0], expected, atol=0.0)
    reloaded = optlite.OPTForCausalLM.from_pretrained(tmp_path)
    assert_same(outputs(reloaded, ids, mask)[0], expected, atol=0.0)
    assert not torch.equal(before, expected)


# ---------------------------------------------------------------------------------------------------------------
# Hub repos from a cache folder, offline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(hf_offline, monkeypatch):
    requested = []
    real = optlite.hub.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        requested.append((kwargs.get("revision"), filename))
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(optlite.hub, "hf_hub_download", recording)
    return requested


def test_hub_repo_from_cache_fetches_only_the_needed_files(tmp_path, layouts, offline):
    single, bin_only = layouts["tf_single"], layouts["tf4_bin"]
    files = {"config.json": single / "config.json", "model.safetensors": single / "model.safetensors",
             "pytorch_model.bin": bin_only / "pytorch_model.bin", "tf_model.h5": b"not fetched",
             "flax_model.msgpack": b"not fetched"}
    make_hub_cache(tmp_path, "facebook/opt-tiny", files)
    model = optlite.OPTForCausalLM.from_pretrained("facebook/opt-tiny", cache_dir=tmp_path)
    # generation_config.json is asked for (optional: absent here), the .bin and the TF/Flax files never are.
    assert [name for _, name in offline] == ["config.json", "model.safetensors", "generation_config.json"]
    ref = transformers.OPTForCausalLM.from_pretrained(single).eval()
    ids, mask = batch("left")
    assert_same(outputs(ref, ids, mask)[0], outputs(model, ids, mask)[0])


def test_hub_revision_refs_pr_and_sharded_repo(tmp_path, layouts, offline):
    sharded, bin_only = layouts["tf_sharded"], layouts["tf4_bin"]
    make_hub_cache(tmp_path, "org/opt", {"config.json": bin_only / "config.json",
                                         "pytorch_model.bin": bin_only / "pytorch_model.bin",
                                         "tf_model.h5": b"never"})
    shard_files = {p.name: p for p in sharded.iterdir() if p.name.startswith("model")}
    make_hub_cache(tmp_path, "org/opt", {"config.json": sharded / "config.json", **shard_files,
                                         "tf_model.h5": b"never"}, revision="refs/pr/35")
    # The helper's cache is what huggingface_hub expects: transformers itself reads it.
    ref = transformers.OPTForCausalLM.from_pretrained("org/opt", cache_dir=tmp_path, revision="refs/pr/35").eval()
    offline.clear()
    pr = optlite.OPTForCausalLM.from_pretrained("org/opt", cache_dir=tmp_path, revision="refs/pr/35")
    names = [name for _, name in offline]
    assert names[:3] == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    assert sorted(names[3:]) == sorted([*(n for n in shard_files if n.endswith(".safetensors")),
                                        "generation_config.json"])
    assert {rev for rev, _ in offline} == {"refs/pr/35"}
    ids, mask = batch("left")
    assert_same(outputs(ref, ids, mask)[0], outputs(pr, ids, mask)[0])
    offline.clear()
    main = optlite.OPTForCausalLM.from_pretrained("org/opt", cache_dir=tmp_path)
    assert "pytorch_model.bin" in [name for _, name in offline]
    assert "tf_model.h5" not in [name for _, name in offline]
    assert main.config.word_embed_proj_dim == 32  # the main branch's own config


def test_local_files_only_without_offline_env(tmp_path, layouts):
    make_hub_cache(tmp_path, "org/opt", {"config.json": layouts["tf_single"] / "config.json",
                                         "model.safetensors": layouts["tf_single"] / "model.safetensors"})
    model = optlite.OPTModel.from_pretrained("org/opt", cache_dir=tmp_path, local_files_only=True)
    assert model.config.hidden_size == 32
    with pytest.raises(FileNotFoundError, match="config.json.*org/absent"):
        optlite.OPTModel.from_pretrained("org/absent", cache_dir=tmp_path, local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------

PRESETS = ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"]
PUBLISHED_PARAMS = {"opt-125m": 125_239_296, "opt-350m": 331_196_416}  # OPT_FACTS §1


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_transformers_keys_shapes_and_sizes(name):
    config = optlite.OPTConfig.from_preset(name)
    with torch.device("meta"):
        ours = optlite.OPTForCausalLM(config)
        ref = transformers.OPTForCausalLM(transformers.OPTConfig(**config.to_dict()))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert ours.num_parameters() == ref.num_parameters()
    if name in PUBLISHED_PARAMS:
        assert ours.num_parameters() == PUBLISHED_PARAMS[name]


def test_preset_names_are_not_checkpoints(tmp_path, monkeypatch, offline, layouts):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="preset name.*OPTConfig.from_preset"):
        optlite.OPTForCausalLM.from_pretrained("opt-125m")
    (tmp_path / "opt-125m").symlink_to(layouts["tf_single"])  # a local folder of that name is a checkpoint
    assert optlite.OPTForCausalLM.from_pretrained("opt-125m").config.hidden_size == 32


# ---------------------------------------------------------------------------------------------------------------
# device_map (accelerate) with disk offload
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("embed, head", [("cpu", "cpu"), ("disk", "disk"), ("disk", "cpu"), ("cpu", "disk")])
def test_explicit_device_map_with_disk_offload(tmp_path, layouts, embed, head):
    folder = layouts["tf_single"]
    device_map = {"model.decoder.embed_tokens": embed, "model.decoder.embed_positions": "cpu",
                  "model.decoder.layers.0": "disk", "model.decoder.layers.1": "cpu", "model.decoder.layers.2": "disk",
                  "model.decoder.final_layer_norm": "cpu", "lm_head": head}
    model = optlite.OPTForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "off")
    whole = optlite.OPTForCausalLM.from_pretrained(folder)
    ids, mask = batch("left")
    for _ in range(2):  # the second pass checks that the hooks put the offloaded weights back
        assert_same(outputs(whole, ids, mask)[0], outputs(model, ids, mask)[0], atol=0.0)
    assert model.hf_device_map == device_map
    assert (tmp_path / "off" / "index.json").exists()
    model.save_pretrained(tmp_path / "saved")  # offloaded weights are read back for saving
    again = optlite.OPTForCausalLM.from_pretrained(tmp_path / "saved")
    assert_same(outputs(whole, ids, mask)[0], outputs(again, ids, mask)[0], atol=0.0)


@pytest.mark.parametrize("device_map", ["auto", "sequential", "balanced"])
def test_automatic_device_map_with_max_memory_forcing_offload(tmp_path, layouts, device_map):
    folder = layouts["tf_sharded"]
    model = optlite.OPTForCausalLM.from_pretrained(folder, device_map=device_map, max_memory={"cpu": 60_000},
                                                   offload_folder=tmp_path)
    placed = set(model.hf_device_map.values())
    assert placed == {"cpu", "disk"}
    assert not any("layers.0." in name for name in model.hf_device_map)  # a decoder layer is never split
    whole = transformers.OPTForCausalLM.from_pretrained(folder).eval()
    ids, mask = batch("left")
    assert_same(outputs(whole, ids, mask)[0], outputs(model, ids, mask)[0])


def test_device_map_task_class_and_whole_model_mapping(tmp_path, layouts):
    folder = layouts["tf_single"]
    model = optlite.OPTForSequenceClassification.from_pretrained(
        folder, num_labels=3, device_map={"model": "disk", "score": "cpu"}, offload_folder=tmp_path)
    with torch.no_grad():
        plain = optlite.OPTForSequenceClassification.from_pretrained(folder, num_labels=3)
        plain.score.weight.copy_(model.score.weight)
    ids, mask = batch("right")
    assert_same(outputs(plain, ids, mask)[0], outputs(model, ids, mask)[0], atol=0.0)


def test_device_map_errors(tmp_path, layouts):
    folder = layouts["tf_single"]
    with pytest.raises(ValueError, match="offload_folder"):
        optlite.OPTForCausalLM.from_pretrained(folder, device_map={"": "disk"})
    with pytest.raises(ValueError, match="does not place .*model.decoder.layers.1"):
        optlite.OPTForCausalLM.from_pretrained(folder, device_map={"model.decoder.layers.0": "cpu"})
    with pytest.raises(ValueError, match="either device or device_map"):
        optlite.OPTForCausalLM.from_pretrained(folder, device="cpu", device_map="auto")


# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------


def test_convert_sharded_bin_to_safetensors(tmp_path, layouts):
    src = tmp_path / "src"
    shutil.copytree(layouts["hub_6.7b_sharded_bin"], src)  # decoder.* in 3 fp16 .bin shards with an index
    (src / "vocab.json").write_text("{}")
    assert (src / "pytorch_model.bin.index.json").exists()
    expected = transformers.OPTForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    dst = optlite.convert(src, tmp_path / "dst", dtype="bfloat16", max_shard_size="30KB", progress=False)
    names = sorted(os.listdir(dst))
    assert "model.safetensors.index.json" in names and "vocab.json" in names
    assert not any(n.endswith(".bin") for n in names)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert all(k.startswith("model.decoder.") for k in index["weight_map"])  # our layout, tied lm_head not stored
    assert "model.decoder.version" not in index["weight_map"]
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    converted = transformers.OPTForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    for key, value in expected.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), converted.state_dict()[key].to(torch.bfloat16)), key
    # The hub's 125m layout (model.decoder.* + a stored copy of lm_head), dtype kept, one file.
    dst2 = optlite.convert(layouts["hub_125m_bin"], tmp_path / "dst2")
    assert sorted(os.listdir(dst2)) == ["config.json", "model.safetensors"]
    ref = transformers.OPTForCausalLM.from_pretrained(layouts["hub_125m_bin"], dtype=torch.float16).eval()
    ours = optlite.OPTForCausalLM.from_pretrained(dst2, dtype="auto")
    assert ours.dtype == torch.float16
    for key, value in ref.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------------------------------------------


def test_progress_bar_only_for_several_shards(layouts, capsys):
    optlite.OPTForCausalLM.from_pretrained(layouts["tf_single"])
    assert "Loading checkpoint shards" not in capsys.readouterr().err
    optlite.OPTForCausalLM.from_pretrained(layouts["tf_sharded"], progress=False)
    assert "Loading checkpoint shards" not in capsys.readouterr().err
    optlite.OPTForCausalLM.from_pretrained(layouts["tf_sharded"])
    assert "Loading checkpoint shards" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file, key or shard
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    ref.save_pretrained(tmp_path / "good", max_shard_size="30KB")
    return tmp_path / "good"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_config(good):
    (good / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json.*good"):
        optlite.OPTForCausalLM.from_pretrained(good)


def test_config_of_another_model_type(good):
    edit_json(good / "config.json", model_type="gpt2")
    with pytest.raises(ValueError, match="config.json.*model_type 'gpt2'"):
        optlite.OPTForCausalLM.from_pretrained(good)


def test_invalid_config_value(good):
    edit_json(good / "config.json", num_attention_heads=5)
    with pytest.raises(ValueError, match="config.json.*hidden_size \\(32\\) must be divisible"):
        optlite.OPTForCausalLM.from_pretrained(good)


def test_unknown_config_override(good):
    with pytest.raises(TypeError, match="'num_lables'"):
        optlite.OPTForCausalLM.from_pretrained(good, num_lables=3)


def test_truncated_safetensors(good):
    shard = good / "model-00002-of-00004.safetensors"
    assert shard.exists()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model-00002-of-00004.safetensors: truncated"):
        optlite.OPTForCausalLM.from_pretrained(good)


@pytest.mark.parametrize("garbage", [b"\x07", b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00not json!!!xx"])
def test_corrupt_safetensors_header(good, garbage):
    (good / "model-00003-of-00004.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors: .*(header|truncated)"):
        optlite.OPTForCausalLM.from_pretrained(good)


def test_missing_shard(good):
    (good / "model-00004-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard 'model-00004-of-00004.safetensors'.*missing"):
        optlite.OPTForCausalLM.from_pretrained(good)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_paths_leaving_the_folder_are_refused(good, bad):
    index = json.loads((good / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = bad
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing shard path"):
        optlite.OPTForCausalLM.from_pretrained(good)


def test_shape_mismatch_names_key_and_shapes_unless_ignored(good):
    with pytest.raises(CheckpointError, match=r"model.decoder.embed_tokens.weight in model-0000\d-of-00004"
                                              r".safetensors: checkpoint shape \(99, 32\) .* \(120, 32\)"):
        optlite.OPTForCausalLM.from_pretrained(good, vocab_size=120)
    model, info = optlite.OPTForCausalLM.from_pretrained(good, vocab_size=120, ignore_mismatched_sizes=True,
                                                         output_loading_info=True)
    assert info["mismatched_keys"] == {("model.decoder.embed_tokens.weight", (99, 32), (120, 32))}
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.model.decoder.embed_tokens.weight[1].eq(0).all()  # re-initialised: the padding row is zero


def test_missing_decoder_weight_is_an_error(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    state = {k: v for k, v in ref.state_dict().items() if "layers.1.fc2" not in k and k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    ref.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*model.decoder.layers.1.fc2.weight"):
        optlite.OPTForCausalLM.from_pretrained(tmp_path)


def test_integer_weights_name_the_file_and_key(tmp_path):
    ref, _ = make_pair("OPTForCausalLM", "pre_ln")
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    state["model.decoder.layers.1.fc2.weight"] = state["model.decoder.layers.1.fc2.weight"].to(torch.int8)
    save_file(state, str(tmp_path / "model.safetensors"))
    ref.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=rf"model.decoder.layers.1.fc2.weight in {tmp_path}/model.safetensors: "
                                              r"stored as int8, expected a floating-point weight"):
        optlite.OPTForCausalLM.from_pretrained(tmp_path)


def test_a_full_disk_names_the_target_folder(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    model = make_pair("OPTForCausalLM", "pre_ln")[1]

    def full(tensors, path, metadata=None):  # what safetensors raises when the disk is full
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(saving, "save_file", full)
    with pytest.raises(saving.SaveError, match=rf"could not save {tmp_path / 'ckpt'}: No space left on device"):
        model.save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    model.config.save_pretrained(tmp_path / "cfg")
    before = (tmp_path / "cfg" / "config.json").read_bytes()
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError, match=rf"could not save {tmp_path / 'cfg' / 'config.json'}: No space left"):
        model.config.save_pretrained(tmp_path / "cfg")
    assert (tmp_path / "cfg" / "config.json").read_bytes() == before
    assert os.listdir(tmp_path / "cfg") == ["config.json"]


class NotATensor:
    pass


def test_bin_that_is_not_a_plain_tensor_dict(tmp_path, layouts):
    (tmp_path / "config.json").write_bytes((layouts["tf4_bin"] / "config.json").read_bytes())
    torch.save({"weight": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a plain tensor dict.*weights_only"):
        optlite.OPTForCausalLM.from_pretrained(tmp_path)
    torch.save({"step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a plain tensor dict: key 'step'"):
        optlite.OPTForCausalLM.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path, layouts):
    (tmp_path / "config.json").write_bytes((layouts["tf4_bin"] / "config.json").read_bytes())
    (tmp_path / "tf_model.h5").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no weights file.*model.safetensors.*pytorch_model.bin.index.json"):
        optlite.OPTForCausalLM.from_pretrained(tmp_path)


def test_config_from_pretrained_and_save_pretrained(tmp_path, layouts):
    config = optlite.OPTConfig.from_pretrained(layouts["tf_sharded"], num_labels=4)
    assert (config.word_embed_proj_dim, config.do_layer_norm_before, config.num_labels) == (16, False, 4)
    config.save_pretrained(tmp_path / "cfg")
    ref = transformers.AutoConfig.from_pretrained(tmp_path / "cfg")
    assert (ref.model_type, ref.word_embed_proj_dim, ref.num_labels) == ("opt", 16, 4)
    with pytest.raises(TypeError, match="'hidden'"):
        optlite.OPTConfig.from_pretrained(layouts["tf_sharded"], hidden=3)
