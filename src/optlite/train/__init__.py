"""Training OPT models on accelerate: the loop (loop.py), its settings and flags (config.py), where the model comes
from and the launch (launch.py), data sets and collators (data.py), evaluation metrics (metrics.py) and extractive
question answering (qa.py).

Example:
    >>> from optlite.train import CausalLMCollator, TokenBlocks, TrainConfig, train
    >>> TrainConfig("out", max_train_steps=10).max_train_steps
    10
"""

from .config import TrainConfig, add_train_args, parse_with_recipe
from .data import CausalLMCollator, ClassificationCollator, InputError, QACollator, TokenBlocks, read_texts
from .launch import ModelSource, make_accelerator, setup_logging
from .loop import TrainResult, train

__all__ = [
    "CausalLMCollator",
    "ClassificationCollator",
    "InputError",
    "ModelSource",
    "QACollator",
    "TokenBlocks",
    "TrainConfig",
    "TrainResult",
    "add_train_args",
    "make_accelerator",
    "parse_with_recipe",
    "read_texts",
    "setup_logging",
    "train",
]
