"""Shared fixtures: offline hub access, and the summary of parity differences printed after the run."""

from __future__ import annotations

import pytest


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, also in huggingface_hub's constant (it reads the variable once, at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def pytest_terminal_summary(terminalreporter):
    import tiny

    if tiny.MAX_DIFFS:
        terminalreporter.section("largest differences measured (fp32; vs transformers unless named otherwise)")
        for name, diff in sorted(tiny.MAX_DIFFS.items()):
            terminalreporter.write_line(f"{name:<48} {diff:.3e}")
