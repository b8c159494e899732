"""Fine-tune (or pre-train) an OPT causal language model on a text file, with the flags of accelerate's /
transformers' run_clm_no_trainer.py.

    python scripts/train_clm.py --model_name_or_path facebook/opt-125m --train_file corpus.txt \\
        --validation_file valid.txt --block_size 512 --per_device_train_batch_size 8 --max_train_steps 1000 \\
        --checkpointing_steps 200 --output_dir out/opt-125m-corpus
    torchrun --nproc_per_node 2 scripts/train_clm.py ...                  # several CPU processes (gloo)
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train_clm.py ...

--model_name_or_path is a checkpoint folder, a hub id, or a preset name (random weights; then pass
--tokenizer_name). The result in --output_dir loads with OPTForCausalLM.from_pretrained and transformers.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from optlite import OPTForCausalLM
from optlite.train.config import TrainConfig
from optlite.train.data import CausalLMCollator, InputError, TokenBlocks, check_block_size, read_texts
from optlite.train.launch import ModelSource, parse_script_args, run_script, script_parser
from optlite.train.loop import train
from optlite.train.metrics import Perplexity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__, train_file_help=".txt (one document a line) or .jsonl/.json/.csv")
    p.add_argument("--validation_split_percentage", type=int, default=5,
                   help="without --validation_file, hold out this percentage of the train file's documents")
    p.add_argument("--text_column", default="text", help="the text field of .jsonl/.json/.csv rows")
    p.add_argument("--no_keep_linebreaks", action="store_true", help="drop the newline at the end of each line")
    p.add_argument("--block_size", type=int, default=None, help="tokens per training row (default min(1024, max))")
    return parse_script_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    return run_script("train_clm.py", fit, parse_args(argv))


def fit(args: argparse.Namespace) -> None:
    from accelerate.utils import set_seed

    config = TrainConfig.from_args(args)
    source = ModelSource.resolve(args.model_name_or_path)
    block_size = check_block_size(args.block_size, source.config.max_position_embeddings)
    tok = source.tokenizer(args.tokenizer_name)
    blocks, eval_blocks = load_blocks(args, tok, block_size)
    set_seed(args.seed)  # the same initial weights on every process
    model = source.load(OPTForCausalLM, tok)
    train(model, blocks, CausalLMCollator(tok.pad_token_id), config, eval_dataset=eval_blocks,
          metric_factory=Perplexity, tokenizer=tok)


def load_blocks(args: argparse.Namespace, tok: Any, block_size: int) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Train and validation blocks: those of --validation_file, or run_clm's split (the first N% of documents)."""
    keep = not args.no_keep_linebreaks
    texts = read_texts(args.train_file, args.text_column, keep)
    if args.validation_file:
        eval_texts = read_texts(args.validation_file, args.text_column, keep, role="validation file")
        eval_blocks = TokenBlocks.from_texts(eval_texts, tok, block_size, source=args.validation_file)
    else:
        n_eval = len(texts) * args.validation_split_percentage // 100
        eval_texts, texts = texts[:n_eval], texts[n_eval:]
        try:
            eval_blocks = TokenBlocks.from_texts(eval_texts, tok, block_size, source="the held-out text") \
                if eval_texts else None
        except InputError as e:  # a small file's held-out share may not fill a block: train without evaluation
            logging.warning("no evaluation: %s", e)
            eval_blocks = None
    return TokenBlocks.from_texts(texts, tok, block_size, source=f"train file {args.train_file}"), eval_blocks


if __name__ == "__main__":
    sys.exit(main())
