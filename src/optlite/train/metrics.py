"""Evaluation metrics summed over processes: perplexity (causal LM) and accuracy (classification); the SQuAD
metric lives with the rest of question answering in qa.py.

A metric sees each evaluation batch with the model's outputs and a `real_rows` mask (rows that pad a process's share
of the data so all processes run the same number of batches have real_rows = 0), then `compute` reduces across
processes. Losses are recomputed per row from the logits so that padding rows can be left out exactly.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..heads import IGNORE_INDEX, shift_labels


class EvalMetric(Protocol):
    def update(self, batch: dict[str, torch.Tensor], outputs: Any, real_rows: torch.Tensor) -> None: ...

    def compute(self, accelerator: Any) -> dict[str, float]: ...


class RunningSums:
    """Named float64 running sums, reduced across processes in one collective."""

    def __init__(self, *names: str):
        self.names = names
        self.values: torch.Tensor | None = None

    def add(self, *values: torch.Tensor) -> None:
        row = torch.stack([v.double().sum() for v in values])
        self.values = row if self.values is None else self.values + row

    def reduce(self, accelerator: Any) -> dict[str, float]:
        values = self.values if self.values is not None else torch.zeros(len(self.names), dtype=torch.float64,
                                                                         device=accelerator.device)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values.clone(), reduction="sum")
        return dict(zip(self.names, values.tolist(), strict=True))


class Perplexity:
    """Token-weighted eval loss of a causal LM and its exp, the perplexity.

    Example:
        >>> from optlite.train import CausalLMCollator, TokenBlocks
        >>> from optlite.train.loop import evaluate
        >>> blocks = TokenBlocks.from_texts(["Hello there.\\n"] * 20, tok, block_size=16)
        >>> metrics = evaluate(accelerator, model, blocks, CausalLMCollator(tok.pad_token_id), 8, Perplexity())
        >>> metrics["eval_tokens"], math.isclose(metrics["perplexity"], math.exp(metrics["eval_loss"]))
        (90, True)
    """

    def __init__(self) -> None:
        self.sums = RunningSums("loss", "tokens")

    def update(self, batch: dict[str, torch.Tensor], outputs: Any, real_rows: torch.Tensor) -> None:
        logits = outputs.logits.float()  # (B, T, V)
        targets = shift_labels(batch["labels"])  # (B, T)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counted = (targets != IGNORE_INDEX).sum(-1) * real_rows  # (B,)
        self.sums.add(nll.sum(-1) * real_rows, counted)

    def compute(self, accelerator: Any) -> dict[str, float]:
        s = self.sums.reduce(accelerator)
        loss = s["loss"] / max(s["tokens"], 1.0)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(s["tokens"])}


class Accuracy:
    """Mean cross-entropy and accuracy of a single-label classifier.

    Example:
        >>> from optlite import OPTConfig, OPTForSequenceClassification
        >>> from optlite.train import ClassificationCollator
        >>> from optlite.train.loop import evaluate
        >>> classifier = OPTForSequenceClassification(OPTConfig.from_preset("opt-tiny", num_labels=2))
        >>> examples = [{"input_ids": tok("great film").input_ids, "label": 1}, {"input_ids": [2, 7], "label": 0}]
        >>> metrics = evaluate(accelerator, classifier, examples, ClassificationCollator(1), 32, Accuracy())
        >>> sorted(metrics), metrics["eval_examples"]
        (['accuracy', 'eval_examples', 'eval_loss'], 2)
    """

    def __init__(self) -> None:
        self.sums = RunningSums("loss", "correct", "examples")

    def update(self, batch: dict[str, torch.Tensor], outputs: Any, real_rows: torch.Tensor) -> None:
        logits, labels = outputs.logits.float(), batch["labels"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        self.sums.add(loss * real_rows, (logits.argmax(-1) == labels) * real_rows, real_rows)

    def compute(self, accelerator: Any) -> dict[str, float]:
        s = self.sums.reduce(accelerator)
        n = max(s["examples"], 1.0)
        return {"eval_loss": s["loss"] / n, "accuracy": s["correct"] / n, "eval_examples": int(s["examples"])}
