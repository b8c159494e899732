"""Extractive question answering, SQuAD style: reading the json, windows of question + context with the answer's
token span, decoding the best span from start/end logits, and exact match / F1 with SQuAD's normalisation.

Example:
    >>> answer = {"text": "Meta AI", "answer_start": 20}
    >>> examples = [QAExample("q1", "Who released OPT?", "OPT was released by Meta AI.", [answer])]  # or read_squad
    >>> features = qa_features(examples, tok, max_length=384, doc_stride=128)
    >>> metric = SquadMetric(examples, features, max_answer_length=30)
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ..heads import span_loss
from .data import InputError, check_file, read_utf8
from .metrics import RunningSums

# ----------------------------------------------------------------------------------------------------------------- data


@dataclass
class QAExample:
    """One SQuAD question: answers are {"text", "answer_start"} dicts (empty when unanswerable, SQuAD v2)."""

    id: str
    question: str
    context: str
    answers: list[dict[str, Any]]


def read_squad(path: str | Path | None, role: str = "train file") -> list[QAExample]:
    """The questions of a SQuAD-format json file ({"data": [{"paragraphs": [{"context", "qas"}]}]}), each
    answer checked to sit at its answer_start in the context.

    Example:
        >>> answer = {"text": "Meta AI", "answer_start": 20}
        >>> question = {"id": "q1", "question": "Who released OPT?", "answers": [answer]}
        >>> squad = {"data": [{"paragraphs": [{"context": "OPT was released by Meta AI.", "qas": [question]}]}]}
        >>> _ = Path("dev-v1.1.json").write_text(json.dumps(squad))
        >>> read_squad("dev-v1.1.json")[0].answers
        [{'text': 'Meta AI', 'answer_start': 20}]
    """
    p = check_file(path, role)
    try:
        data = json.loads(read_utf8(p, role))
    except json.JSONDecodeError as e:
        raise InputError(f"{role} {p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise InputError(f"{role} {p}: expected SQuAD format, an object with a \"data\" list")
    examples = []
    for a, article in enumerate(data["data"]):
        for g, para in enumerate(article.get("paragraphs", [])):
            where = f"{role} {p} data[{a}].paragraphs[{g}]"
            if not isinstance(para.get("context"), str):
                raise InputError(f"{where}: missing column 'context'")
            for qa in para.get("qas", []):
                examples.append(_squad_question(qa, para["context"], where))
    if not examples:
        raise InputError(f"{role} {p} holds no questions")
    return examples


def _squad_question(qa: dict[str, Any], context: str, where: str) -> QAExample:
    for key in ("id", "question"):
        if key not in qa:
            raise InputError(f"{where}: a question is missing column {key!r}")
    answers = qa.get("answers", [])
    if not answers and not qa.get("is_impossible", False):
        raise InputError(f"{where} question {qa['id']!r}: missing column 'answers'")
    for ans in answers:
        text, start = ans.get("text"), ans.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int):
            raise InputError(f"{where} question {qa['id']!r}: an answer needs 'text' and an integer 'answer_start'")
        if context[start : start + len(text)] != text:
            raise InputError(f"{where} question {qa['id']!r}: answer {text!r} is not at answer_start {start} "
                             f"of its context")
    return QAExample(str(qa["id"]), qa["question"], context, list(answers))


@dataclass
class QAFeatures:
    """Model-ready windows of QA examples (`items`, for QACollator) and what span decoding needs per item:
    the example it came from, the position of its first context token, and the context tokens' char offsets."""

    items: list[dict[str, int | list[int]]] = field(default_factory=list)
    example_index: list[int] = field(default_factory=list)
    context_start: list[int] = field(default_factory=list)
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def qa_features(examples: Sequence[QAExample], tokenizer: Any, max_length: int = 384, doc_stride: int = 128,
                max_question_length: int = 64) -> QAFeatures:
    """Encode each example as `</s> question </s> context` (the pair template of the tokenizer) in windows of
    at most `max_length` tokens that overlap by `doc_stride` context tokens; the answer's token span is the
    target in the window that holds it whole, (0, 0) elsewhere and for unanswerable questions.

    Example:
        >>> answer = {"text": "Meta AI", "answer_start": 20}
        >>> examples = [QAExample("q1", "Who released OPT?", "OPT was released by Meta AI.", [answer])]
        >>> feats = qa_features(examples, tok, max_length=256, doc_stride=64)
        >>> feats[0].keys()
        dict_keys(['input_ids', 'start_positions', 'end_positions', 'feature_index'])
        >>> tok.decode(feats[0]["input_ids"][feats[0]["start_positions"] : feats[0]["end_positions"] + 1])
        ' Meta AI'
    """
    if doc_stride >= max_length - max_question_length - 2:
        raise InputError(f"doc_stride {doc_stride} must be smaller than max_seq_length {max_length} minus the "
                         f"question ({max_question_length} tokens) and 2 separators")
    backend = offsets_tokenizer(tokenizer)
    bos, sep = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = QAFeatures()
    for ex_index, ex in enumerate(examples):
        question = backend.encode(ex.question, add_special_tokens=False).ids[:max_question_length]
        ctx = backend.encode(ex.context, add_special_tokens=False)
        room = max_length - len(question) - 2
        answer = ex.answers[0] if ex.answers else None
        for lo, hi in _windows(len(ctx.ids), room, doc_stride):
            prefix = [bos, *question, sep]
            span = _answer_span(ctx.offsets, lo, hi, answer) if answer else None
            start, end = (span[0] + len(prefix), span[1] + len(prefix)) if span else (0, 0)
            out.items.append({"input_ids": prefix + ctx.ids[lo:hi], "start_positions": start, "end_positions": end,
                              "feature_index": len(out.items)})
            out.example_index.append(ex_index)
            out.context_start.append(len(prefix))
            out.offsets.append(list(ctx.offsets[lo:hi]))
    return out


def offsets_tokenizer(tokenizer: Any) -> Tokenizer:
    """A private copy of the tokenizer's Rust backend, without padding or truncation, for char offsets
    (the shared backend carries the settings of the last call)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def _windows(n: int, room: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of at most `room` tokens covering 0..n, consecutive ones sharing `overlap`."""
    spans, lo = [], 0
    while True:
        hi = min(lo + room, n)
        spans.append((lo, hi))
        if hi >= n:
            return spans
        lo += room - overlap


def _answer_span(offsets: Sequence[tuple[int, int]], lo: int, hi: int,
                 answer: dict[str, Any]) -> tuple[int, int] | None:
    """Window-relative first and last token of the answer, or None when the window does not hold all of it.
    Byte-level tokens carry their leading space, so a token 'covers' a char when its end lies past it."""
    char_start = answer["answer_start"]
    char_end = char_start + len(answer["text"])
    if hi <= lo or offsets[lo][0] > char_start or offsets[hi - 1][1] < char_end:
        return None
    first = next(i for i in range(lo, hi) if offsets[i][1] > char_start)
    last = next(i for i in range(hi - 1, lo - 1, -1) if offsets[i][0] < char_end)
    return first - lo, last - lo

# -------------------------------------------------------------------------------------------------------------- metrics


class SquadMetric:
    """SQuAD exact match and F1 (0-100, standard answer normalisation) of spans decoded from start/end logits,
    the best span of each question over all its windows; with `null_answer` (SQuAD v2) the empty answer wins
    when its score (start and end on the first token) beats every span.

    Example:
        >>> from optlite import OPTConfig, OPTForQuestionAnswering
        >>> from optlite.train import QACollator
        >>> from optlite.train.loop import evaluate
        >>> answer = {"text": "Meta AI", "answer_start": 20}
        >>> examples = [QAExample("q1", "Who released OPT?", "OPT was released by Meta AI.", [answer])]
        >>> features = qa_features(examples, tok)
        >>> metric = SquadMetric(examples, features, max_answer_length=30)
        >>> qa_model = OPTForQuestionAnswering(OPTConfig.from_preset("opt-tiny"))
        >>> sorted(evaluate(accelerator, qa_model, features, QACollator(1), 16, metric))
        ['eval_examples', 'eval_loss', 'exact_match', 'f1']
    """

    def __init__(self, examples: Sequence[QAExample], features: QAFeatures, max_answer_length: int = 30,
                 null_answer: bool = False):
        self.examples, self.features = examples, features
        self.max_answer_length, self.null_answer = max_answer_length, null_answer
        self.sums = RunningSums("loss", "features")
        self.candidates: list[tuple[int, float, str]] = []  # (example index, score, answer text)
        self.predictions: dict[str, str] = {}

    def update(self, batch: dict[str, torch.Tensor], outputs: Any, real_rows: torch.Tensor) -> None:
        start, end = outputs.start_logits.float(), outputs.end_logits.float()  # (B, T)
        loss = span_loss(start, end, batch["start_positions"], batch["end_positions"], reduction="none")  # (B,)
        self.sums.add(loss * real_rows, real_rows)
        for row, f in enumerate(batch["feature_index"].tolist()):
            if real_rows[row]:
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
