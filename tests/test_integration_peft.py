"""PEFT LoRA, as its docs show for a transformers model, with optlite in its place: train steps, generate, save and
load the adapter, merge_and_unload; every number compared with transformers' OPT under the same adapter."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import record

import optlite

IDS = torch.tensor([[2, 31414, 6, 127, 2335, 16, 11962], [1, 1, 2, 250, 1345, 9, 10]])
MASK = (IDS != 1).long()
LABELS = IDS.masked_fill(MASK == 0, -100)


def lora(task_type: str) -> LoraConfig:
    return LoraConfig(task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def wrap(model: torch.nn.Module, task_type: str) -> PeftModel:
    torch.manual_seed(0)  # LoRA's A matrices are drawn at wrap time: the same draws for both models
    peft_model = get_peft_model(model, lora(task_type))
    with torch.no_grad():  # B starts at zero; a nonzero B makes the adapter visible from the first step
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    return peft_model


def train(peft_model: PeftModel, steps: int = 3, **batch) -> list[float]:
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=IDS, attention_mask=MASK, **batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    return losses


@pytest.fixture(scope="module")
def causal(hf_checkpoint, one_thread):
    ref = wrap(transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32), "CAUSAL_LM")
    ours = wrap(optlite.OPTForCausalLM.from_pretrained(hf_checkpoint), "CAUSAL_LM")
    return ref, ours, train(ref, labels=LABELS), train(ours, labels=LABELS)


def test_causal_lm_lora_trains_and_generates_like_transformers(causal):
    ref, ours, ref_losses, our_losses = causal
    assert all(record("peft causal loss", torch.tensor(a), torch.tensor(b), relative=True) < 1e-5
               for a, b in zip(our_losses, ref_losses, strict=True))
    assert our_losses[-1] < our_losses[0]
    kwargs = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(**kwargs), ref.generate(**kwargs))


def test_causal_lm_adapter_saves_loads_and_merges(causal, hf_checkpoint, tmp_path):
    ref, ours, _, _ = causal
    ours.save_pretrained(tmp_path / "adapter")
    ref.save_pretrained(tmp_path / "ref_adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_checkpoint)
    with torch.no_grad():
        trained = ours(input_ids=IDS, attention_mask=MASK).logits
        expected = ref(input_ids=IDS, attention_mask=MASK).logits
        record("peft causal logits", trained, expected, relative=True)
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
        # The adapter on a fresh base, as a user reloads it; transformers' adapter file loads into optlite too.
        for adapter in ("adapter", "ref_adapter"):
            base = optlite.OPTForCausalLM.from_pretrained(hf_checkpoint)
            loaded = PeftModel.from_pretrained(base, tmp_path / adapter).eval()
            torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits, trained, rtol=1e-5,
                                       atol=1e-5)
        merged = loaded.merge_and_unload()
        assert type(merged) is optlite.OPTForCausalLM
        assert type(merged.model.decoder.layers[0].self_attn.q_proj).__name__ != "LoraLinear"
        torch.testing.assert_close(merged(IDS, attention_mask=MASK).logits, trained, rtol=1e-5, atol=1e-5)


def test_sequence_classification_lora_trains_saves_and_merges_like_transformers(hf_checkpoint, tmp_path,
                                                                               one_thread):
    ref_base = transformers.OPTForSequenceClassification.from_pretrained(hf_checkpoint, num_labels=3,
                                                                          dtype=torch.float32)
    our_base = optlite.OPTForSequenceClassification.from_pretrained(hf_checkpoint, num_labels=3)
    with torch.no_grad():
        our_base.score.weight.copy_(ref_base.score.weight)  # the head is new in both: start from the same one
    ref, ours = wrap(ref_base, "SEQ_CLS"), wrap(our_base, "SEQ_CLS")
    labels = torch.tensor([0, 2])
    ref_losses, our_losses = train(ref, labels=labels), train(ours, labels=labels)
    for a, b in zip(our_losses, ref_losses, strict=True):
        assert record("peft seq-cls loss", torch.tensor(a), torch.tensor(b), relative=True) < 1e-5
    ours.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        trained = ours(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(trained, ref(input_ids=IDS, attention_mask=MASK).logits, rtol=1e-5, atol=1e-5)
        base = optlite.OPTForSequenceClassification.from_pretrained(hf_checkpoint, num_labels=3)
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # the trained score head comes too
        torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits, trained, rtol=1e-5, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert type(merged) is optlite.OPTForSequenceClassification
        torch.testing.assert_close(merged(IDS, attention_mask=MASK).logits, trained, rtol=1e-5, atol=1e-5)


def test_lora_under_trainer_with_reentrant_gradient_checkpointing_like_transformers(hf_checkpoint, tmp_path,
                                                                                   one_thread):
    tok = transformers.GPT2Tokenizer.from_pretrained(hf_checkpoint)
    examples = [{"input_ids": tok(t)["input_ids"]} for t in ["Hello, my dog is cute", "A photo of a cat"] * 2]
    results = []
    for name, base in [("ref", transformers.OPTForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32)),
                       ("ours", optlite.OPTForCausalLM.from_pretrained(hf_checkpoint))]:
        model = wrap(base, "CAUSAL_LM")
        args = transformers.TrainingArguments(
            str(tmp_path / name), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
            report_to=[], use_cpu=True, gradient_checkpointing=True, seed=0, disable_tqdm=True, save_strategy="no",
            gradient_checkpointing_kwargs={"use_reentrant": True})  # reentrant: grads reach LoRA only via the inputs
        trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                       data_collator=transformers.DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()
        lora_a = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]
        results.append(([log["loss"] for log in trainer.state.log_history if "loss" in log], lora_a))
    (ref_losses, ref_a), (losses, our_a) = results
    assert losses == pytest.approx(ref_losses, rel=1e-4)  # logged values are rounded to 4 digits
    for a, b in zip(our_a, ref_a, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
