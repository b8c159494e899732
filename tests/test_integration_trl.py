"""TRL's SFTTrainer, as its docs show for a transformers model, with optlite in its place: a few steps, compared with
the same run on transformers' OPT."""

from __future__ import annotations

import pytest
import torch
import transformers

import optlite

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

TEXTS = ["Hello, my dog is cute", "A photo of a cat", "This is a test", "I like you."] * 2


def sft(model, tokenizer, folder) -> tuple[list[float], trl.SFTTrainer]:
    args = trl.SFTConfig(str(folder), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, logging_steps=1,
                         report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no", max_length=32)
    # TRL checks the tokenizer's type: it takes transformers' tokenizer of the checkpoint (see the README).
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], trainer


def test_sft_trainer_steps_like_transformers(hf_checkpoint, tmp_path, one_thread):
    tok = transformers.GPT2Tokenizer.from_pretrained(hf_checkpoint)
    ref_losses, _ = sft(transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32), tok,
                        tmp_path / "ref")
    losses, trainer = sft(optlite.OPTForCausalLM.from_pretrained(hf_checkpoint), tok, tmp_path / "ours")
    assert len(losses) == len(ref_losses) == 3
    assert losses == pytest.approx(ref_losses, rel=1e-4)  # logged values are rounded to 4 digits
    assert "sft" in trainer.model.model_tags and "trl" in trainer.model.model_tags
