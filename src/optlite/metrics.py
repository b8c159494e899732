"""Evaluation metrics of the three tasks, summed over processes: perplexity, accuracy, SQuAD exact match / F1.

A metric sees each evaluation batch with the model's outputs and a `keep` mask (rows that pad a process's share
of the data so all processes run the same number of batches have keep = 0), then `compute` reduces across
processes. Losses are recomputed per row from the logits so that padding rows can be left out exactly.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, QAExample, QAFeatures


class EvalMetric(Protocol):
    def update(self, batch: dict[str, torch.Tensor], outputs: Any, keep: torch.Tensor) -> None: ...

    def compute(self, accelerator: Any) -> dict[str, float]: ...


class _Sums:
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
        >>> metrics = evaluate(accelerator, model, blocks, collate, 8, Perplexity())  # doctest: +SKIP
        >>> metrics  # doctest: +SKIP
        {'eval_loss': 3.21, 'perplexity': 24.8, 'eval_tokens': 16320}
    """

    def __init__(self) -> None:
        self.sums = _Sums("loss", "tokens")

    def update(self, batch: dict[str, torch.Tensor], outputs: Any, keep: torch.Tensor) -> None:
        logits = outputs.logits.float()  # (B, T, V)
        targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T): position t predicts t + 1
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counted = (targets != IGNORE_INDEX).sum(-1) * keep  # (B,)
        self.sums.add(nll.sum(-1) * keep, counted)

    def compute(self, accelerator: Any) -> dict[str, float]:
        s = self.sums.reduce(accelerator)
        loss = s["loss"] / max(s["tokens"], 1.0)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(s["tokens"])}


class Accuracy:
    """Mean cross-entropy and accuracy of a single-label classifier.

    Example:
        >>> evaluate(accelerator, model, examples, collate, 32, Accuracy())  # doctest: +SKIP
        {'eval_loss': 0.41, 'accuracy': 0.87, 'eval_examples': 872}
    """

    def __init__(self) -> None:
        self.sums = _Sums("loss", "correct", "examples")

    def update(self, batch: dict[str, torch.Tensor], outputs: Any, keep: torch.Tensor) -> None:
        logits, labels = outputs.logits.float(), batch["labels"]
        loss = F.cross_entropy(logits, labels, reduction="none")
        self.sums.add(loss * keep, (logits.argmax(-1) == labels) * keep, keep)

    def compute(self, accelerator: Any) -> dict[str, float]:
        s = self.sums.reduce(accelerator)
        n = max(s["examples"], 1.0)
        return {"eval_loss": s["loss"] / n, "accuracy": s["correct"] / n, "eval_examples": int(s["examples"])}


class SquadMetric:
    """SQuAD exact match and F1 (0-100, standard answer normalisation) of spans decoded from start/end logits,
    the best span of each question over all its windows; with `null_answer` (SQuAD v2) the empty answer wins
    when its score (start and end on the first token) beats every span.

    Example:
        >>> metric = SquadMetric(examples, features, max_answer_length=30)  # doctest: +SKIP
        >>> evaluate(accelerator, model, features, QACollator(1), 16, metric)  # doctest: +SKIP
        {'eval_loss': 1.2, 'exact_match': 71.3, 'f1': 80.4, 'eval_examples': 10570}
    """

    def __init__(self, examples: Sequence[QAExample], features: QAFeatures, max_answer_length: int = 30,
                 null_answer: bool = False):
        self.examples, self.features = examples, features
        self.max_answer_length, self.null_answer = max_answer_length, null_answer
        self.sums = _Sums("loss", "features")
        self.candidates: list[tuple[int, float, str]] = []  # (example index, score, answer text)
        self.predictions: dict[str, str] = {}

    def update(self, batch: dict[str, torch.Tensor], outputs: Any, keep: torch.Tensor) -> None:
        start, end = outputs.start_logits.float(), outputs.end_logits.float()  # (B, T)
        loss = (F.cross_entropy(start, batch["start_positions"], reduction="none")
                + F.cross_entropy(end, batch["end_positions"], reduction="none")) / 2
        self.sums.add(loss * keep, keep)
        for row, f in enumerate(batch["feature_index"].tolist()):
            if keep[row]:
                self.candidates.extend(self._spans(f, start[row].cpu(), end[row].cpu()))

    def _spans(self, f: int, start: torch.Tensor, end: torch.Tensor) -> list[tuple[int, float, str]]:
        ex = self.features.example_index[f]
        lo, offsets = self.features.context_start[f], self.features.offsets[f]
        found = []
        if offsets:
            i, j, score = best_span(start[lo : lo + len(offsets)], end[lo : lo + len(offsets)],
                                    self.max_answer_length)
            text = self.examples[ex].context[offsets[i][0] : offsets[j][1]].strip()
            found.append((ex, score, text))
        if self.null_answer:
            found.append((ex, float(start[0] + end[0]), ""))
        return found

    def compute(self, accelerator: Any) -> dict[str, float]:
        s = self.sums.reduce(accelerator)
        candidates = self.candidates
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            candidates = gather_object(candidates)
        best: dict[int, tuple[float, str]] = {}
        for ex, score, text in candidates:
            if ex not in best or score > best[ex][0]:
                best[ex] = (score, text)
        self.predictions = {self.examples[ex].id: text for ex, (_, text) in sorted(best.items())}
        em = f1 = 0.0
        for ex, (_, text) in best.items():
            golds = [a["text"] for a in self.examples[ex].answers] or [""]
            em += max(exact_match(text, g) for g in golds)
            f1 += max(f1_score(text, g) for g in golds)
        n = max(len(best), 1)
        return {"eval_loss": s["loss"] / max(s["features"], 1.0), "exact_match": 100.0 * em / n,
                "f1": 100.0 * f1 / n, "eval_examples": len(best)}


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, max_answer_length: int) -> tuple[int, int, float]:
    """The (start, end, score) maximising start_logits[start] + end_logits[end] with start <= end and at most
    `max_answer_length` tokens, over all pairs (not only the top-k of each, as some scripts do).

    Example:
        >>> best_span(torch.tensor([0.0, 5.0, 1.0]), torch.tensor([1.0, 0.0, 2.0]), max_answer_length=2)
        (1, 2, 7.0)
    """
    n = start_logits.shape[0]
    scores = start_logits[:, None] + end_logits[None, :]  # (n, n): start i, end j
    idx = torch.arange(n)
    length = idx[None, :] - idx[:, None]  # j - i
    scores = scores.masked_fill((length < 0) | (length >= max_answer_length), float("-inf"))
    flat = int(scores.argmax())
    return flat // n, flat % n, float(scores.view(-1)[flat])


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces.

    Example:
        >>> normalize_answer("The  Denver Broncos!")
        'denver broncos'
    """
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised strings (SQuAD v2: two empty answers score 1).

    Example:
        >>> round(f1_score("the Denver Broncos team", "Denver Broncos"), 3)
        0.8
    """
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
