"""Fine-tune OPT for sequence classification on a csv / jsonl file of texts and labels.

    python scripts/train_classifier.py --model_name_or_path facebook/opt-125m --train_file train.csv \\
        --validation_file dev.csv --text_column sentence --label_column label --num_train_epochs 3 \\
        --output_dir out/opt-125m-sst2

Labels are integers 0..num_labels-1, or strings mapped to ids in sorted order (or by the checkpoint's
id2label when it has names); the mapping is stored in config.json as id2label / label2id. The result loads with
OPTForSequenceClassification.from_pretrained and transformers' class of the same name.
"""

from __future__ import annotations

import argparse
import sys

from optlite import OPTForSequenceClassification
from optlite.train.config import TrainConfig
from optlite.train.data import ClassificationCollator, LabelMap, classification_examples, read_records
from optlite.train.launch import ModelSource, parse_script_args, run_script, script_parser
from optlite.train.loop import train
from optlite.train.metrics import Accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, train_file_help=".csv (with a header), .jsonl or .json")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--num_labels", type=int, default=None, help="default: from the labels of the train file")
    p.add_argument("--max_length", type=int, default=128, help="longer texts are truncated")
    p.add_argument("--ignore_mismatched_sizes", action="store_true",
                   help="re-initialise a checkpoint's classifier head of another number of labels")
    return parse_script_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    return run_script("train_classifier.py", fit, parse_args(argv))


def fit(args: argparse.Namespace) -> None:
    from accelerate.utils import set_seed

    config = TrainConfig.from_args(args)
    source = ModelSource.resolve(args.model_name_or_path)
    tok = source.tokenizer(args.tokenizer_name)
    columns = [args.text_column, args.label_column]
    train_records = read_records(args.train_file, columns)
    eval_records = read_records(args.validation_file, columns, role="validation file") \
        if args.validation_file else None
    labels = LabelMap.infer(train_records.column(args.label_column),
                            [train_records.where(i) for i in range(len(train_records))],
                            num_labels=args.num_labels, known_names=_named_labels(source))
    examples = classification_examples(train_records, tok, labels, *columns, max_length=args.max_length)
    eval_examples = classification_examples(eval_records, tok, labels, *columns, max_length=args.max_length) \
        if eval_records else None
    set_seed(args.seed)  # the same initial weights (the new head) on every process
    model = source.load(OPTForSequenceClassification, tok, ignore_mismatched_sizes=args.ignore_mismatched_sizes,
                        num_labels=len(labels.names), id2label=labels.id2label, label2id=labels.label2id)
    train(model, examples, ClassificationCollator(tok.pad_token_id), config, eval_dataset=eval_examples,
          metric_factory=Accuracy, tokenizer=tok)


def _named_labels(source: ModelSource) -> list[str] | None:
    """The label names of a fine-tuned classifier checkpoint; None for the placeholder LABEL_i names."""
    names = [source.config.id2label[i] for i in sorted(source.config.id2label)]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


if __name__ == "__main__":
    sys.exit(main())
