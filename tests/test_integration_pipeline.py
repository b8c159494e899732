"""transformers' text-generation pipeline, as its docs show for a transformers model, with optlite in its place."""

from __future__ import annotations

import pytest
import torch
import transformers

import optlite

PROMPTS = ["Hello, my dog is", "A photo of"]


@pytest.fixture(scope="module")
def models(hf_checkpoint, one_thread):
    ref = transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    return ref, optlite.OPTForCausalLM.from_pretrained(hf_checkpoint), hf_checkpoint


@pytest.mark.parametrize("tokenizer", ["transformers", "optlite"])
def test_text_generation_pipeline_matches_transformers(models, tokenizer):
    ref, ours, folder = models
    ref_tok = transformers.GPT2Tokenizer.from_pretrained(folder)
    tok = ref_tok if tokenizer == "transformers" else optlite.OPTTokenizer.from_pretrained(folder)
    expected = transformers.pipeline("text-generation", model=ref, tokenizer=ref_tok)
    ours_pipe = transformers.pipeline("text-generation", model=ours, tokenizer=tok)
    # The pipeline samples by default (its own generation defaults); greedy makes the comparison exact.
    for kwargs in [dict(max_new_tokens=6, do_sample=False),
                   dict(max_new_tokens=4, do_sample=False, return_full_text=False)]:
        assert ours_pipe(PROMPTS, **kwargs) == expected(PROMPTS, **kwargs)
