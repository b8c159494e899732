"""Names the docstring examples of src/optlite use without defining them: `tok`, the real OPT tokenizer (the files
the tests read from ../shared/opt_tokenizer)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

TOKENIZER_FILES = Path(__file__).resolve().parents[2] / "shared" / "opt_tokenizer"


@functools.cache
def _tokenizer() -> Any:
    from optlite import OPTTokenizer

    return OPTTokenizer.from_pretrained(TOKENIZER_FILES)


@pytest.fixture(autouse=True)
def _example_names(request: pytest.FixtureRequest, doctest_namespace: dict[str, Any]) -> None:
    if TOKENIZER_FILES.is_dir():
        doctest_namespace["tok"] = _tokenizer()
    elif "tok" in (getattr(getattr(request.node, "dtest", None), "docstring", None) or ""):
        pytest.skip("the real OPT tokenizer files (../shared/opt_tokenizer) are absent")
