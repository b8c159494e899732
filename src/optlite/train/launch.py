"""What a training script settles besides the loop's settings: where the model comes from (checkpoint, hub id or
preset), an Accelerator that sees the launch (torchrun or accelerate launch, GPUs or CPU processes), and logging.

Example:
    >>> ModelSource.resolve("opt-125m").is_preset
    True
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import OPTConfig, preset_name
from ..tokenizer import OPTTokenizer
from .config import add_train_args, parse_with_recipe
from .data import InputError

# --------------------------------------------------------------------------------------------------------- model source


@dataclass
class ModelSource:
    """What `--model_name_or_path` names: a checkpoint folder, a hub repo id, or a preset name ("opt-125m",
    random weights: the tokenizer must then come from elsewhere).

    Example:
        >>> src = ModelSource.resolve("opt-125m")
        >>> src.is_preset, src.config.hidden_size
        (True, 768)
    """

    name: str
    config: OPTConfig
    is_preset: bool

    @classmethod
    def resolve(cls, name_or_path: str) -> ModelSource:
        if preset_name(name_or_path):
            return cls(name_or_path, OPTConfig.from_preset(name_or_path), True)
        return cls(str(name_or_path), OPTConfig.from_pretrained(name_or_path), False)

    def tokenizer(self, tokenizer_name: str | None = None) -> OPTTokenizer:
        """The tokenizer of `tokenizer_name`, else of the checkpoint itself."""
        if tokenizer_name is None and self.is_preset:
            raise InputError(f"model {self.name!r} is a preset (random weights, no tokenizer): "
                             "pass --tokenizer_name (a tokenizer folder or hub id)")
        return OPTTokenizer.from_pretrained(tokenizer_name or self.name)

    def load(self, cls: type[nn.Module], tokenizer: OPTTokenizer | None = None, ignore_mismatched_sizes: bool = False,
             **config_overrides: Any) -> nn.Module:
        """The model in fp32 (the optimizer's master weights): the checkpoint's weights, or a random init of the
        preset (seed first). The pad id follows the tokenizer's, and the embeddings grow to its size if needed."""
        if tokenizer is not None:
            config_overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        if self.is_preset:
            model = cls(OPTConfig.from_preset(self.name, **config_overrides))
        else:
            model = cls.from_pretrained(self.name, ignore_mismatched_sizes=ignore_mismatched_sizes, **config_overrides)
        if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))  # as run_clm: new tokens get rows
        return model


# -------------------------------------------------------------------------------------------------------------- scripts


def script_parser(doc: str, train_file_help: str) -> argparse.ArgumentParser:
    """The parser of a training script (scripts/train_*.py): its docstring's first paragraph as description, and
    the flags they all take (the model, its tokenizer, the train and validation files) before the script's own.

    Example:
        >>> p = script_parser("Train a model.", ".txt")
        >>> parse_script_args(p, ["--model_name_or_path", "opt-125m", "--train_file", "a.txt",
        ...                       "--output_dir", "out"]).tokenizer_name is None
        True
    """
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_name_or_path", help="checkpoint folder, hub id, or preset (opt-125m); required")
    p.add_argument("--tokenizer_name", default=None, help="tokenizer folder or hub id (default: the model's)")
    p.add_argument("--train_file", help=train_file_help)
    p.add_argument("--validation_file", default=None)
    return p


def parse_script_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser`'s flags plus the training-loop ones, with defaults from a `--config` recipe."""
    return parse_with_recipe(add_train_args(parser), argv)


def run_script(script: str, run: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a training script's body with logging set up; bad input ends it with one line naming the script."""
    setup_logging()
    try:
        run(args)
    except (InputError, FileNotFoundError) as e:
        sys.exit(f"{script}: error: {e}")
    return 0


# --------------------------------------------------------------------------------------------------------------- launch


def make_accelerator(mixed_precision: str | None = None) -> Any:
    """An Accelerator that sees the launch at hand, including `torchrun --nproc_per_node N` on a machine without
    GPUs: accelerate treats such processes as one-process runs unless told cpu=True, which is passed here.

    Example:
        >>> acc = make_accelerator()  # under torchrun --nproc_per_node 2 on CPUs: 2, DistributedType.MULTI_CPU
        >>> acc.num_processes, acc.distributed_type
        (1, <DistributedType.NO: 'NO'>)
    """
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    acc = Accelerator(mixed_precision=mixed_precision, cpu=world > 1 and not _has_accelerator_device())
    if world > 1 and acc.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate sees {acc.num_processes}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type == "MULTI_CPU":
        _enable_fsdp_on_cpu(acc)
    return acc


def _enable_fsdp_on_cpu(accelerator: Any) -> None:
    """accelerate's AcceleratorState turns an FSDP launch config into DistributedType.FSDP only for GPU-like
    backends, and on CPU silently runs DDP instead; torch's fully_shard works on gloo, so switch the state over
    with the plugin accelerate builds from the launch config (its FSDP_* environment variables)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise InputError("FSDP on CPU needs fsdp_version: 2 (torch's fully_shard) in the accelerate config")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # as AcceleratorState does on GPUs, or it reverts to DDP


def setup_logging(level: int = logging.INFO) -> None:
    """Logging for the training scripts: `level` on the main process (RANK 0), warnings only on the others, and
    accelerate's several INFO lines per checkpoint silenced."""
    main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=level if main else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def _has_accelerator_device() -> bool:
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()
