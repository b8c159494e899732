"""What the docstring examples of src/optlite run in: a fresh working folder each, offline hub access to a Hugging
Face cache that holds tiny stand-ins for the repos the examples name, and the names they use without defining them
(`tok` and `tokenizer`: the real OPT tokenizer; `model`: a tiny random OPTForCausalLM; `accelerator`).

A plugin registered by tests/conftest.py rather than a fixture of a conftest, so that it reaches the examples under
src/ as well.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import SHARED_TOKENIZER
from hub_cache import make_hub_cache

if TYPE_CHECKING:
    from optlite import OPTForCausalLM, OPTTokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# facebook/opt-350m's config.json as the hub serves it (its examples read only the config and the tokenizer).
OPT_350M_CONFIG = {
    "model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": 50272, "hidden_size": 1024,
    "ffn_dim": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "word_embed_proj_dim": 512,
    "do_layer_norm_before": False, "max_position_embeddings": 2048, "activation_function": "relu", "dropout": 0.1,
    "attention_dropout": 0.0, "layerdrop": 0.0, "init_std": 0.02, "pad_token_id": 1, "bos_token_id": 2,
    "eos_token_id": 2, "torch_dtype": "float16", "prefix": "</s>",
}


class DoctestEnvironment:
    """Autouse fixtures that act on docstring examples only; other tests stay untouched."""

    @pytest.fixture(autouse=True)
    def _example_environment(self, request: pytest.FixtureRequest, doctest_namespace: dict) -> Iterator[None]:
        examples = getattr(request.node, "dtest", None)
        if examples is None:
            yield
            return
        text = examples.docstring or ""
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.chdir(request.getfixturevalue("tmp_path"))  # examples write "out", "my-tokenizer", ...
        used = set(re.findall(r"\b(tok|tokenizer|model|accelerator)\b", text))
        if (used & {"tok", "tokenizer"} or "facebook/opt-" in text) and not SHARED_TOKENIZER.is_dir():
            pytest.skip("the real OPT tokenizer files (../shared/opt_tokenizer) are absent")
        if "facebook/opt-" in text:
            _offline_hub(monkeypatch, request.getfixturevalue("doctest_hub_cache"))
        for name in used & {"tok", "tokenizer"}:
            doctest_namespace[name] = _real_tokenizer()
        if "model" in used:
            doctest_namespace["model"] = _tiny_model()
        if "accelerator" in used:
            from optlite.train import make_accelerator

            doctest_namespace["accelerator"] = make_accelerator()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models gain nothing from a second thread; on shared cores it costs 20-50x
        yield
        torch.set_num_threads(threads)

    @pytest.fixture(scope="session")
    @classmethod
    def doctest_hub_cache(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """Built once per run, on first use: facebook/opt-125m (main: a tiny fp16 pytorch_model.bin, as the hub's
        main branches ship; refs/pr/35: model.safetensors), facebook/opt-1.3b (a tiny .bin) and facebook/opt-350m
        (config and tokenizer)."""
        return _build_hub_cache(tmp_path_factory)


@functools.cache
def _real_tokenizer() -> OPTTokenizer:
    from optlite import OPTTokenizer

    return OPTTokenizer.from_pretrained(SHARED_TOKENIZER)


def _tiny_model() -> OPTForCausalLM:
    from optlite import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, dropout=0.0)
    return OPTForCausalLM(config).eval()


def _offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1, with `cache` as huggingface_hub's default cache folder."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def _build_hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optlite import OPTConfig, OPTForCausalLM

    cache, build = tmp_path_factory.mktemp("hf-cache"), tmp_path_factory.mktemp("hf-repos")
    tokenizer = {name: SHARED_TOKENIZER / name for name in TOKENIZER_FILES}
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                     torch_dtype="float16")).half()
    for name, safe in (("bin", False), ("safetensors", True)):
        model.save_pretrained(build / name, safe_serialization=safe)
    weights = {name: {p.name: p for p in (build / name).iterdir()} for name in ("bin", "safetensors")}
    make_hub_cache(cache, "facebook/opt-125m", {**weights["bin"], **tokenizer})
    make_hub_cache(cache, "facebook/opt-125m", {**weights["safetensors"], **tokenizer}, revision="refs/pr/35")
    make_hub_cache(cache, "facebook/opt-1.3b", {**weights["bin"], **tokenizer})
    make_hub_cache(cache, "facebook/opt-350m", {"config.json": json.dumps(OPT_350M_CONFIG).encode(), **tokenizer})
    shutil.rmtree(build)
    return cache
