"""Shared test helpers: a pre-populated Hugging Face cache (hub code paths without the network)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest


def make_hub_cache(
    cache_dir: Path, repo_id: str, files: dict[str, Path | bytes], revision: str = "main"
) -> Path:
    """Lay out `files` as huggingface_hub's cache holds a downloaded model repo; return the snapshot dir.

    Layout: `<cache_dir>/models--org--name/refs/<revision>` (holding the commit hash) and
    `<cache_dir>/models--org--name/snapshots/<commit>/<filename>` (plain files instead of blob links,
    which huggingface_hub accepts). Values are source paths to copy or raw bytes.
    """
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()  # any 40-hex string works
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for name, content in files.items():
        dest = snapshot / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            shutil.copyfile(content, dest)
    ref = repo_dir / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


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
