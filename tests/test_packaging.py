"""Packaging: pyproject metadata that current setuptools accepts without warnings, and the Makefile's torch index."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # a {text = ...} table warns on every install
    assert project["build-system"]["requires"] == ["setuptools>=77"]  # the first to read SPDX strings


@pytest.mark.parametrize("index", ["", "https://download.pytorch.org/whl/cpu"])
def test_makefile_takes_the_torch_index_from_a_variable(index):
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "install", f"TORCH_INDEX_URL={index}",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "No such file" in done.stderr:
        pytest.skip("make is not installed")
    line = next(x for x in done.stdout.splitlines() if "install -q torch==" in x)
    assert ("--index-url" in line) == bool(index)
    assert not index or line.rstrip().endswith(f"--index-url {index}")
