"""Model outputs: small dataclasses read by attribute, key or index, like transformers' ModelOutput.

Each is a registered pytree node, so torch.export and torch.compile see through them to the tensors inside."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils import _pytree as pytree


class ModelOutput:
    """Base of the output dataclasses. Fields that are None are skipped by keys, iteration and indexing,
    so `out[0]` is the loss when there is one and the logits otherwise, exactly as in transformers."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


def pytree_output(cls: type) -> type:
    """Register an output dataclass as a pytree node (its fields are its children; None fields hold no leaves)."""
    pytree.register_dataclass(cls, serialized_type_name=f"optlite.outputs.{cls.__name__}")
    return cls


@pytree_output
@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@pytree_output
@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# transformers' name for the same fields, returned by the sequence classifier (logits: one row per sequence).
SequenceClassifierOutputWithPast = CausalLMOutputWithPast


@pytree_output
@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
