"""Training data: files to examples, text to token blocks, and the collators of the three tasks.

Readers check their input before any training starts and fail with one line naming the file, line, column or
value at fault (`InputError`). Datasets are plain lists or tensors: anything with `__len__` and `__getitem__`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..heads import IGNORE_INDEX, shift_labels

TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = (".csv", ".jsonl", ".json")


class InputError(ValueError):
    """Bad user input (a file, column, label or option); the message is one line naming the culprit."""


# ---------------------------------------------------------------------------------------------------------------- files


@dataclass
class Records:
    """The rows of a csv / jsonl / json file and where each came from, for error messages.

    Example:
        >>> _ = Path("train.csv").write_text("text,label\\ngreat film,pos\\ndull plot,neg\\n")
        >>> recs = read_records("train.csv", ["text", "label"])
        >>> recs.column("label")[:2], recs.where(0)
        (['pos', 'neg'], 'train.csv line 2')
    """

    path: Path
    rows: list[dict[str, Any]]
    locations: list[str]  # "line 7" or "record 7"

    def where(self, i: int) -> str:
        return f"{self.path} {self.locations[i]}"

    def column(self, name: str) -> list[Any]:
        return [row[name] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def check_file(path: str | Path | None, role: str = "train file") -> Path:
    """The path of an existing, non-empty file; InputError / FileNotFoundError naming `role` otherwise."""
    if path is None or str(path) == "":
        raise InputError(f"no {role} given")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{role} {str(path)!r} does not exist")
    if p.stat().st_size == 0:
        raise InputError(f"{role} {p} is empty")
    return p


def read_records(path: str | Path | None, columns: Sequence[str], role: str = "train file") -> Records:
    """Rows of a .csv (header line), .jsonl (one object a line) or .json (an array of objects, or JSON lines),
    each checked to hold `columns`.

    Example:
        >>> _ = Path("train.jsonl").write_text('{"text": "great film", "label": "pos"}\\n')
        >>> read_records("train.jsonl", ["text", "label"]).rows[0]
        {'text': 'great film', 'label': 'pos'}
    """
    p = check_file(path, role)
    suffix = p.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise InputError(f"{role} {p}: unsupported extension {suffix!r} (use {', '.join(RECORD_SUFFIXES)})")
    text = read_utf8(p, role)
    rows, locations = _parse_csv(p, text, columns, role) if suffix == ".csv" else _parse_json(p, text, role)
    if not rows:
        raise InputError(f"{role} {p} holds no rows")
    for row, loc in zip(rows, locations, strict=True):
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise InputError(f"{role} {p} {loc}: missing column {missing[0]!r} (found: {', '.join(map(str, row))})")
    return Records(p, rows, locations)


def read_texts(path: str | Path | None, text_column: str = "text", keep_linebreaks: bool = True,
               role: str = "train file") -> list[str]:
    """The documents of a text file: the non-blank lines of .txt (as run_clm's text loader, blank lines
    dropped), or the `text_column` of each row of .jsonl / .json / .csv.

    Example:
        >>> _ = Path("corpus.txt").write_text("First line.\\n\\nSecond line.\\n")
        >>> read_texts("corpus.txt")[:2]
        ['First line.\\n', 'Second line.\\n']
    """
    p = check_file(path, role)
    suffix = p.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        texts = [line for line in read_utf8(p, role).splitlines(keepends=keep_linebreaks) if line.strip()]
    elif suffix in RECORD_SUFFIXES:
        records = read_records(p, [text_column], role)
        texts = []
        for i, value in enumerate(records.column(text_column)):
            if not isinstance(value, str):
                raise InputError(f"{role} {records.where(i)}: column {text_column!r} holds "
                                 f"{type(value).__name__}, expected text")
            texts.append(value)
    else:
        raise InputError(f"{role} {p}: unsupported extension {suffix!r} "
                         f"(use {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)})")
    if not any(t.strip() for t in texts):
        raise InputError(f"{role} {p} holds no text")
    return texts


def read_utf8(p: Path, role: str) -> str:
    """The file's text; InputError naming it when it is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{role} {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_csv(p: Path, text: str, columns: Sequence[str], role: str) -> tuple[list[dict], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted fields may hold line breaks
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{role} {p}: missing column {missing[0]!r} (header: {', '.join(header)})")
    rows, locations = [], []
    for row in reader:
        rows.append(row)
        locations.append(f"line {reader.line_num}")
    return rows, locations


def _parse_json(p: Path, text: str, role: str) -> tuple[list[dict], list[str]]:
    try:  # a whole-file JSON array first; JSON lines otherwise
        data = json.loads(text)
        rows = data if isinstance(data, list) else None
        locations = [f"record {i + 1}" for i in range(len(rows))] if rows is not None else []
    except json.JSONDecodeError:
        rows = None
    if rows is None:
        rows, locations = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{role} {p} line {n}: not valid JSON ({e.msg})") from None
            locations.append(f"line {n}")
    for row, loc in zip(rows, locations, strict=True):
        if not isinstance(row, dict):
            raise InputError(f"{role} {p} {loc}: expected a JSON object, got {type(row).__name__}")
    return rows, locations


# ------------------------------------------------------------------------------------------------------------ causal LM


def check_block_size(block_size: int | None, max_position_embeddings: int) -> int:
    """The block size to train on: `block_size`, or min(1024, max positions) when None (as run_clm does)."""
    if block_size is None:
        return min(1024, max_position_embeddings)
    if block_size < 2:
        raise InputError(f"block_size must be at least 2 (one token and its successor), got {block_size}")
    if block_size > max_position_embeddings:
        raise InputError(f"block_size {block_size} is larger than the model's max_position_embeddings "
                         f"{max_position_embeddings}")
    return block_size


def group_texts(token_lists: Iterable[Sequence[int]], block_size: int) -> torch.Tensor:
    """Concatenate tokenized documents and cut them into rows of `block_size`, dropping the remainder
    (run_clm's `group_texts`), as a (n_blocks, block_size) long tensor.

    Example:
        >>> group_texts([[2, 10, 11], [2, 12, 13, 14]], block_size=3)
        tensor([[ 2, 10, 11],
                [ 2, 12, 13]])
    """
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


class TokenBlocks(torch.utils.data.Dataset):
    """Equal-length token blocks for causal LM training: item i is {"input_ids": (block_size,) tensor}.

    Example:
        >>> blocks = TokenBlocks.from_texts(["Hello there.\\n"] * 50, tok, block_size=16)
        >>> len(blocks), blocks[0]["input_ids"].shape
        (15, torch.Size([16]))
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Any, block_size: int, source: str = "the text",
                   chunk: int = 1000) -> TokenBlocks:
        """Tokenize each text as run_clm does (one `</s>` before each), then group into blocks."""
        ids: list[list[int]] = []
        for i in range(0, len(texts), chunk):
            ids.extend(tokenizer(list(texts[i : i + chunk]))["input_ids"])
        blocks = group_texts(ids, block_size)
        if len(blocks) == 0:
            total = sum(len(x) for x in ids)
            raise InputError(f"{source} has {total} tokens, fewer than one block of block_size={block_size}")
        return cls(blocks)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


# ------------------------------------------------------------------------------------------------------------ collators


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], pad_value: int,
             pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest (rounded up to a multiple): (values, attention_mask), both (B, T) long.

    Example:
        >>> pad_rows([[5, 6, 7], [8]], pad_value=1)
        (tensor([[5, 6, 7],
                [8, 1, 1]]), tensor([[1, 1, 1],
                [1, 0, 0]]))
    """
    lengths = [len(r) for r in rows]
    width = max(lengths, default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    values = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        values[i, :n] = torch.as_tensor(row, dtype=torch.long)
        mask[i, :n] = 1
    return values, mask


@dataclass
class CausalLMCollator:
    """Batch token rows for causal LM: input_ids, attention_mask and labels (= input_ids, -100 on padding;
    the model shifts them). Rows may differ in length; items may carry their own "labels".

    Example:
        >>> CausalLMCollator(pad_token_id=1)([{"input_ids": [2, 7, 8]}, {"input_ids": [2, 9]}])["labels"]
        tensor([[   2,    7,    8],
                [   2,    9, -100]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_rows([it["input_ids"] for it in items], self.pad_token_id, self.pad_to_multiple_of)
        if "labels" in items[0]:
            labels, _ = pad_rows([it["labels"] for it in items], IGNORE_INDEX, self.pad_to_multiple_of)
        else:
            labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class ClassificationCollator:
    """Batch {"input_ids", "label"} items: right-padded input_ids, attention_mask and labels (B,).

    Right padding is safe: the classifier pools the last non-pad token of each row.

    Example:
        >>> ClassificationCollator(1)([{"input_ids": [2, 7], "label": 1}, {"input_ids": [2], "label": 0}])["labels"]
        tensor([1, 0])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_rows([it["input_ids"] for it in items], self.pad_token_id, self.pad_to_multiple_of)
        labels = torch.tensor([it["label"] for it in items])
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class QACollator:
    """Batch QA features: input_ids, attention_mask, start_positions, end_positions and feature_index
    (the row of the feature in its dataset, which span decoding needs; it is not a model input).

    Example:
        >>> QACollator(1)([{"input_ids": [2, 7, 2, 9], "start_positions": 3, "end_positions": 3,
        ...                 "feature_index": 0}])["start_positions"]
        tensor([3])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_rows([it["input_ids"] for it in items], self.pad_token_id, self.pad_to_multiple_of)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        for key in ("start_positions", "end_positions", "feature_index"):
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
        return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "start_positions", "end_positions")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a batch that the model's forward takes (collators may add bookkeeping such as feature_index)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def count_loss_items(batch: dict[str, torch.Tensor]) -> int:
    """How many terms the model's mean loss averages over in this batch: next-token labels that are not -100
    for causal LM (2-D integer labels, shifted by one as the model does), else one per label element
    (classification: rows; multi-label: rows x labels) or per start position (QA).

    Example:
        >>> count_loss_items({"labels": torch.tensor([[2, 7, 8], [2, 9, -100]])})
        3
    """
    labels = batch.get("labels")
    if labels is not None:
        if labels.dim() == 2 and not labels.is_floating_point():
            return int((shift_labels(labels) != IGNORE_INDEX).sum())
        return labels.numel()
    if "start_positions" in batch:
        return batch["start_positions"].numel()
    raise ValueError("the batch has neither labels nor start_positions: nothing to train on")


# ------------------------------------------------------------------------------------------------------- classification


@dataclass
class LabelMap:
    """Label names by id, and how the labels of the data files map onto them.

    `numeric` labels are ids already (0 … num_labels-1); otherwise labels are names looked up in `names`.

    Example:
        >>> lm = LabelMap.infer(["pos", "neg", "pos"])
        >>> lm.names, lm.encode("pos", "train.csv line 2")
        (['neg', 'pos'], 1)
    """

    names: list[str]
    numeric: bool

    @classmethod
    def infer(cls, values: Sequence[Any], where: Sequence[str] | None = None, num_labels: int | None = None,
              known_names: Sequence[str] | None = None) -> LabelMap:
        """The label map of training labels `values`. Integer labels (ints or digit strings, as csv gives) are
        ids, checked against `num_labels` (default: the largest id + 1). Other labels are names: those of
        `known_names` (a fine-tuned checkpoint's id2label) when given, else the sorted distinct values."""
        where = where or [f"row {i + 1}" for i in range(len(values))]
        for v, loc in zip(values, where, strict=True):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise InputError(f"{loc}: empty label")
        if all(_as_int(v) is not None for v in values):
            ids = [_as_int(v) for v in values]
            n = num_labels or (len(known_names) if known_names else max(ids) + 1)
            names = list(known_names) if known_names and len(known_names) == n else [f"LABEL_{i}" for i in range(n)]
            label_map = cls(names, numeric=True)
        else:
            names = list(known_names) if known_names else sorted({str(v) for v in values})
            if num_labels is not None and len(names) > num_labels:
                raise InputError(f"{len(names)} distinct labels ({', '.join(names[:5])}…) but num_labels={num_labels}")
            label_map = cls(names, numeric=False)
        for v, loc in zip(values, where, strict=True):
            label_map.encode(v, loc)
        return label_map

    def encode(self, value: Any, where: str) -> int:
        """The id of one label; InputError naming `where` and the value when it has none."""
        if self.numeric:
            i = _as_int(value)
            if i is None or not 0 <= i < len(self.names):
                raise InputError(f"{where}: label {value!r} is outside 0..{len(self.names) - 1} "
                                 f"(num_labels={len(self.names)})")
            return i
        try:
            return self.names.index(str(value))
        except ValueError:
            raise InputError(f"{where}: label {value!r} is not one of the known labels "
                             f"({', '.join(self.names[:10])})") from None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def classification_examples(records: Records, tokenizer: Any, labels: LabelMap, text_column: str = "text",
                            label_column: str = "label", max_length: int = 128) -> list[dict[str, Any]]:
    """Tokenized {"input_ids", "label"} items, truncated to `max_length` tokens.

    Example:
        >>> _ = Path("train.csv").write_text("text,label\\ngreat film,pos\\ndull plot,neg\\n")
        >>> recs = read_records("train.csv", ["text", "label"])
        >>> classification_examples(recs, tok, LabelMap.infer(recs.column("label")))[0]
        {'input_ids': [2, 12338, 822], 'label': 1}
    """
    texts = []
    for i, value in enumerate(records.column(text_column)):
        if not isinstance(value, str):
            raise InputError(f"{records.where(i)}: column {text_column!r} holds {type(value).__name__}, expected text")
        texts.append(value)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": row, "label": labels.encode(v, records.where(i))}
            for i, (row, v) in enumerate(zip(ids, records.column(label_column), strict=True))]
