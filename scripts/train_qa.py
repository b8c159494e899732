"""Fine-tune OPT for extractive question answering on SQuAD-format json, evaluated by exact match and F1.

    python scripts/train_qa.py --model_name_or_path facebook/opt-350m --train_file train-v1.1.json \\
        --validation_file dev-v1.1.json --max_seq_length 384 --doc_stride 128 --num_train_epochs 2 \\
        --output_dir out/opt-350m-squad

Each question is encoded as `</s> question </s> context` in windows of --max_seq_length tokens overlapping by
--doc_stride; answers are decoded as the best span (at most --max_answer_length tokens) over all windows and
mapped back to the context through the tokenizer's character offsets. The result loads with
OPTForQuestionAnswering.from_pretrained and transformers' class of the same name.
"""

from __future__ import annotations

import argparse
import functools
import sys

from optlite import OPTForQuestionAnswering
from optlite.train.config import TrainConfig
from optlite.train.data import InputError, QACollator
from optlite.train.launch import ModelSource, parse_script_args, run_script, script_parser
from optlite.train.loop import train
from optlite.train.qa import SquadMetric, qa_features, read_squad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, train_file_help="SQuAD-format .json")
    p.add_argument("--max_seq_length", type=int, default=384)
    p.add_argument("--doc_stride", type=int, default=128, help="context tokens shared by consecutive windows")
    p.add_argument("--max_question_length", type=int, default=64, help="longer questions are truncated")
    p.add_argument("--max_answer_length", type=int, default=30, help="in tokens")
    p.add_argument("--version_2_with_negative", action="store_true", help="some questions have no answer")
    return parse_script_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    return run_script("train_qa.py", fit, parse_args(argv))


def fit(args: argparse.Namespace) -> None:
    from accelerate.utils import set_seed

    config = TrainConfig.from_args(args)
    source = ModelSource.resolve(args.model_name_or_path)
    if args.max_seq_length > source.config.max_position_embeddings:
        raise InputError(f"max_seq_length {args.max_seq_length} is larger than the model's "
                         f"max_position_embeddings {source.config.max_position_embeddings}")
    tok = source.tokenizer(args.tokenizer_name)
    featurize = functools.partial(qa_features, tokenizer=tok, max_length=args.max_seq_length,
                                  doc_stride=args.doc_stride, max_question_length=args.max_question_length)
    features = featurize(read_squad(args.train_file))
    eval_examples = read_squad(args.validation_file, role="validation file") if args.validation_file else None
    eval_features = featurize(eval_examples) if eval_examples else None
    metric = functools.partial(SquadMetric, eval_examples, eval_features, args.max_answer_length,
                               args.version_2_with_negative) if eval_examples else None
    set_seed(args.seed)  # the same initial weights (the new head) on every process
    model = source.load(OPTForQuestionAnswering, tok)
    train(model, features, QACollator(tok.pad_token_id), config, eval_dataset=eval_features,
          metric_factory=metric, tokenizer=tok)


if __name__ == "__main__":
    sys.exit(main())
