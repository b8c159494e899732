"""transformers' Trainer, as its docs show for a transformers model, with optlite in its place: train with gradient
checkpointing and DataCollatorForLanguageModeling, evaluate, save_model, resume from a checkpoint; losses and
weights compared with the same run on transformers' OPT."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers
from tiny import record

import optlite

TEXTS = ["Hello, my dog is cute", "A photo of a cat", "This is a test", "I like you.", "Paris is the capital of"]


def run(model, tokenizer, folder, *, max_steps: int, resume: str | None = None):
    args = transformers.TrainingArguments(
        str(folder), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=1e-2, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, gradient_checkpointing=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    examples = [{"input_ids": tokenizer(t)["input_ids"]} for t in TEXTS]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples,
                                   data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, result, losses


def ref_model(folder):
    return transformers.OPTForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def runs(hf_checkpoint, tmp_path_factory, one_thread):
    ref_tok = transformers.GPT2Tokenizer.from_pretrained(hf_checkpoint)
    our_tok = optlite.OPTTokenizer.from_pretrained(hf_checkpoint)
    ref_dir, our_dir = tmp_path_factory.mktemp("ref-trainer"), tmp_path_factory.mktemp("our-trainer")
    ref = run(ref_model(hf_checkpoint), ref_tok, ref_dir, max_steps=4)
    ours = run(optlite.OPTForCausalLM.from_pretrained(hf_checkpoint), our_tok, our_dir, max_steps=4)
    return ref, ours, our_dir, our_tok


def test_train_with_gradient_checkpointing_and_evaluate_like_transformers(runs):
    (ref_trainer, ref_result, ref_losses), (trainer, result, losses), _, _ = runs
    assert trainer.model.is_gradient_checkpointing
    assert len(losses) == len(ref_losses) == 4
    for a, b in zip(losses, ref_losses, strict=True):
        assert record("trainer loss", torch.tensor(a), torch.tensor(b), relative=True) < 1e-4  # logged rounded
    assert result.training_loss == pytest.approx(ref_result.training_loss, rel=1e-5)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ref_trainer.evaluate()["eval_loss"], rel=1e-5)
    ours, ref = trainer.model.state_dict(), ref_trainer.model.state_dict()
    for key, value in ref.items():
        # A key bias shifts every score of a query alike, which softmax ignores: its true gradient is zero, so
        # what both compute is rounding noise, which Adam scales up to full-size steps.
        if not key.endswith("k_proj.bias"):
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5)


def test_save_model_writes_weights_that_load_back(runs, hf_checkpoint, tmp_path):
    _, (trainer, _, _), _, _ = runs
    trainer.save_model(str(tmp_path))
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")  # a plain module: its state dict
    config = optlite.OPTConfig.from_pretrained(hf_checkpoint)
    reloaded = optlite.OPTForCausalLM.from_pretrained(None, config=config, state_dict=state)
    assert reloaded.lm_head.weight is reloaded.model.decoder.embed_tokens.weight
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert (tmp_path / "tokenizer_config.json").is_file()  # the collator's tokenizer is saved beside it


def test_resume_from_checkpoint_continues_like_an_uninterrupted_run(runs, hf_checkpoint, tmp_path):
    _, (trainer, result, losses), folder, tok = runs
    resumed_trainer, resumed, resumed_losses = run(optlite.OPTForCausalLM.from_pretrained(hf_checkpoint), tok,
                                                   tmp_path, max_steps=4, resume=str(folder / "checkpoint-2"))
    assert resumed.global_step == 4
    assert len(resumed_losses) == 4  # the first two come back with the checkpoint's trainer state
    assert resumed_losses[2:] == pytest.approx(losses[2:], rel=1e-5)
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed_trainer.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
