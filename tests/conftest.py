"""Shared fixtures: offline hub access, and the summary of parity differences printed after the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "opt_tokenizer"
# A program run by the kill -9 tests (it patches the loop and trains on import), not a module to collect.
collect_ignore = ["kill_driver.py"]


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, also in huggingface_hub's constant (it reads the variable once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second intra-op thread; on 2 shared cores its contention costs 20-50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny OPTForCausalLM saved with the real OPT tokenizer: a stand-in for a hub checkpoint."""
    from optlite import OPTConfig, OPTForCausalLM, OPTTokenizer

    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("the real OPT tokenizer files (../shared/opt_tokenizer) are absent")
    folder = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    config = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, dropout=0.0)
    OPTForCausalLM(config).save_pretrained(folder)
    OPTTokenizer.from_pretrained(SHARED_TOKENIZER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A tiny OPTForCausalLM saved by transformers, with the real OPT tokenizer files beside it, as a hub repo of
    facebook/opt-* looks: what the tool integration tests load into both transformers and optlite."""
    import shutil

    import transformers
    from tiny import randomize_

    if not SHARED_TOKENIZER.is_dir():
        pytest.skip("the real OPT tokenizer files (../shared/opt_tokenizer) are absent")
    folder = tmp_path_factory.mktemp("hf-tiny-opt")
    config = transformers.OPTConfig(vocab_size=50272, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, dropout=0.0)
    model = transformers.OPTForCausalLM(config)
    randomize_(model, seed=0)
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED_TOKENIZER / name, folder / name)
    return folder


def pytest_terminal_summary(terminalreporter):
    import tiny

    if tiny.MAX_DIFFS:
        terminalreporter.section("largest differences measured (fp32; vs transformers unless named otherwise)")
        for name, diff in sorted(tiny.MAX_DIFFS.items()):
            terminalreporter.write_line(f"{name:<48} {diff:.3e}")


def pytest_configure(config: pytest.Config) -> None:
    from doctest_env import DoctestEnvironment

    config.pluginmanager.register(DoctestEnvironment(), "optlite-doctest-environment")
