"""The training loop's settings, their command-line flags, and recipe files (--config recipe.yaml) that give
their defaults. Where the model comes from and the Accelerator of a launch are in launch.py.

Example:
    >>> import argparse
    >>> args = add_train_args(argparse.ArgumentParser()).parse_args(["--output_dir", "out", "--max_train_steps", "9"])
    >>> TrainConfig.from_args(args).max_train_steps
    9
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import InputError

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


# -------------------------------------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """The training-loop settings, under the flag names of accelerate's / transformers' run_clm_no_trainer.py.

    `max_train_steps` (optimizer steps) wins over `num_train_epochs`. `checkpointing_steps`: an int (every N steps,
    into output_dir/step_N) or "epoch" (output_dir/epoch_E). `resume_from_checkpoint`: such a folder, or "latest"
    (the most advanced complete one in output_dir). An output_dir that already holds files is refused unless the
    run resumes or `overwrite_output_dir` is set, as in transformers' examples. `mixed_precision`: "no", "fp16",
    "bf16", or None for accelerate's config / environment.

    Example:
        >>> TrainConfig("out", max_train_steps=100, checkpointing_steps="50").checkpointing_steps
        50
    """

    output_dir: str
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    num_train_epochs: int = 3
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    num_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    seed: int = 42
    checkpointing_steps: int | str | None = None
    resume_from_checkpoint: str | None = None
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None
    logging_steps: int = 10
    eval_steps: int | None = None  # besides the evaluation at each epoch's end and at the last step
    dataloader_num_workers: int = 0
    write_rank_digests: bool = False  # each process writes a hash of its parameters (checks that ranks agree)
    overwrite_output_dir: bool = False  # train anew into an output_dir that holds an earlier run

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs",
                     "gradient_accumulation_steps", "logging_steps", "max_train_steps", "eval_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.num_warmup_steps < 0:
            raise InputError(f"num_warmup_steps must be >= 0, got {self.num_warmup_steps}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise InputError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise InputError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        ckpt = self.checkpointing_steps
        if isinstance(ckpt, str) and ckpt.isdigit():
            self.checkpointing_steps = ckpt = int(ckpt)
        if ckpt is not None and ckpt != "epoch" and (not isinstance(ckpt, int) or ckpt < 1):
            raise InputError(f"checkpointing_steps must be a positive integer or 'epoch', got {ckpt!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config from parsed command-line flags (those `add_train_args` defines)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training-loop flags, with run_clm_no_trainer.py's names and defaults, to `parser`.

    Example:
        >>> args = add_train_args(argparse.ArgumentParser()).parse_args(["--output_dir", "out"])
        >>> TrainConfig.from_args(args).learning_rate
        5e-05
    """
    defaults = TrainConfig("")
    add = parser.add_argument
    add("--output_dir", help="where the model, checkpoints and metrics.jsonl are written (required)")
    add("--per_device_train_batch_size", type=int, default=defaults.per_device_train_batch_size)
    add("--per_device_eval_batch_size", type=int, default=defaults.per_device_eval_batch_size)
    add("--learning_rate", type=float, default=defaults.learning_rate, help="peak learning rate of AdamW")
    add("--weight_decay", type=float, default=defaults.weight_decay, help="AdamW decay (not on biases and LayerNorms)")
    add("--num_train_epochs", type=int, default=defaults.num_train_epochs)
    add("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs")
    add("--gradient_accumulation_steps", type=int, default=defaults.gradient_accumulation_steps)
    add("--lr_scheduler_type", default=defaults.lr_scheduler_type, choices=SCHEDULES)
    add("--num_warmup_steps", type=int, default=defaults.num_warmup_steps)
    add("--max_grad_norm", type=float, default=defaults.max_grad_norm, help="gradient clipping; 0 turns it off")
    add("--seed", type=int, default=defaults.seed)
    add("--checkpointing_steps", default=None, help='save the training state every N steps, or "epoch"')
    add("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest" (in --output_dir)')
    add("--gradient_checkpointing", action="store_true", help="recompute activations in backward to save memory")
    add("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="default: accelerate's config")
    add("--logging_steps", type=int, default=defaults.logging_steps)
    add("--eval_steps", type=int, default=None, help="also evaluate every N steps (always: each epoch, the end)")
    add("--dataloader_num_workers", type=int, default=0)
    add("--write_rank_digests", action="store_true", help="each process writes a hash of its weights at the end")
    add("--overwrite_output_dir", action="store_true",
        help="train anew into an --output_dir that holds an earlier run (without it, such a folder is refused)")
    return parser


def parse_with_recipe(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                      required: Sequence[str] = ("model_name_or_path", "train_file", "output_dir"),
                      ) -> argparse.Namespace:
    """Parse flags, taking defaults from a recipe given as `--config recipe.yaml` (or .json): a mapping of flag
    names to values, such as configs/train/opt-125m-clm.yaml. Flags on the command line win over the recipe.

    Example:
        >>> _ = Path("recipe.yaml").write_text("output_dir: out\\nlearning_rate: 3.0e-4\\nseed: 1\\n")
        >>> parser = add_train_args(argparse.ArgumentParser())
        >>> args = parse_with_recipe(parser, ["--config", "recipe.yaml", "--seed", "3"], required=["output_dir"])
        >>> args.learning_rate, args.seed
        (0.0003, 3)
    """
    parser.add_argument("--config", default=None, help="a recipe (.yaml / .json) of flag values; flags win over it")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        values = read_recipe(known.config)
        unknown = sorted(set(values) - {a.dest for a in parser._actions})
        if unknown:
            parser.error(f"recipe {known.config}: unknown key(s) {', '.join(unknown)}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    missing = [f"--{name}" for name in required if getattr(args, name, None) in (None, "")]
    if missing:
        parser.error(f"the following arguments are required (as flags or recipe keys): {', '.join(missing)}")
    return args


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The flag values of a .yaml / .yml / .json recipe file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"recipe {str(path)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml  # a dependency of accelerate

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise InputError(f"recipe {p} must be a mapping of flag names to values")
    return data
