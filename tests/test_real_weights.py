"""Published outputs of the real OPT weights (transformers' integration tests). The weights cannot be
downloaded here: set OPTLITE_REAL_WEIGHTS to a folder holding local copies named opt-125m/ and opt-350m/
(checkpoint + tokenizer files, as on the hub) to run these."""

import os
from pathlib import Path

import pytest
import torch

from optlite import OPTForCausalLM, OPTModel, OPTTokenizer, generate_text

ROOT = os.environ.get("OPTLITE_REAL_WEIGHTS")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not ROOT, reason="OPTLITE_REAL_WEIGHTS is not set")]


def local(name: str) -> Path:
    path = Path(ROOT or "") / name
    if not path.is_dir():
        pytest.skip(f"no local copy of {name} in {ROOT}")
    return path


@pytest.mark.parametrize("prompt,expected", [
    ("In the city of", "In the city of New York, the city"),
    ("Paris is the capital of France and", "Paris is the capital of France and the capital"),
])
def test_opt_125m_greedy_continuations(prompt, expected):
    path = local("opt-125m")
    model, tok = OPTForCausalLM.from_pretrained(path), OPTTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_length=10, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True) == expected
    assert prompt + generate_text(model, tok, prompt, max_length=10) == expected


def test_opt_350m_hidden_states():
    model = OPTModel.from_pretrained(local("opt-350m"))
    ids = torch.tensor([[0, 31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588, 2]])
    with torch.no_grad():
        out = model(ids).last_hidden_state
    assert out.shape == (1, 11, 512)
    expected = torch.tensor([[-0.28726277, -1.9241608, -0.3058734], [-1.2737825, -0.13332152, -0.18766522],
                             [0.41159445, 0.1191957, -1.3107123]])
    torch.testing.assert_close(out[0, :3, :3], expected, atol=5e-5, rtol=0)
