"""The key/value cache passed into and returned by forward(), in transformers' layout (B, heads, seq, head_dim)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils import _pytree as pytree

LegacyCache = Sequence[tuple[torch.Tensor, torch.Tensor]]


class DynamicCache:
    """Per-layer keys and values that grow by concatenation as tokens are decoded.

    It also behaves like the legacy tuple of `(key, value)` per layer: `len(cache)`, `cache[i]`, iteration.

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
        >>> out = model(torch.tensor([[2, 100, 200]]), use_cache=True)
        >>> out.past_key_values[0][0].shape  # layer 0 keys: (batch, heads, seq, head_dim)
        torch.Size([1, 4, 3, 16])
        >>> nxt = model(torch.tensor([[300]]), past_key_values=out.past_key_values, use_cache=True)
        >>> nxt.past_key_values.get_seq_length()
        4
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @classmethod
    def from_legacy_cache(cls, past: LegacyCache) -> DynamicCache:
        """Wrap a tuple of `(key, value)` per layer, each `(batch, heads, seq, head_dim)`."""
        cache = cls()
        for i, layer in enumerate(past):
            if len(layer) != 2:
                raise ValueError(f"past_key_values[{i}] must be a (key, value) pair, got {len(layer)} items")
            key, value = layer
            if key.dim() != 4 or key.shape != value.shape:
                raise ValueError(f"past_key_values[{i}] key and value must both be (batch, heads, seq, head_dim); "
                                 f"got {tuple(key.shape)} and {tuple(value.shape)}")
            cache.keys.append(key)
            cache.values.append(value)
        return cache

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for one layer and return everything cached for it."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for one layer (0 before its first update)."""
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def crop(self, length: int) -> None:
        """Forget every cached token after the first `length` (assisted decoding's rejected drafts)."""
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Select batch rows in place (beam search keeps the beams it extends)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, index.to(self.keys[i].device))
            self.values[i] = self.values[i].index_select(0, index.to(self.values[i].device))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer_idx], self.values[layer_idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(self.keys, self.values, strict=True))


class StaticCache:
    """Keys and values preallocated for `max_cache_len` tokens: each step writes in place, so the cost of a
    decoded token does not grow with copying the past (a DynamicCache re-allocates every layer every step).

    `update` returns views of the filled part, so attention reads only the tokens seen so far.

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForCausalLM, StaticCache
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
        >>> cache = StaticCache(model.config, batch_size=1, max_cache_len=16)
        >>> out = model(torch.tensor([[2, 100, 200]]), past_key_values=cache)
        >>> out.past_key_values is cache, cache.get_seq_length()
        (True, 3)
    """

    def __init__(self, config, batch_size: int, max_cache_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if max_cache_len > config.max_position_embeddings:
            raise ValueError(f"max_cache_len={max_cache_len} exceeds max_position_embeddings="
                             f"{config.max_position_embeddings}")
        shape = (batch_size, config.num_attention_heads, max_cache_len, config.head_dim)
        self.max_cache_len = max_cache_len
        # Never read beyond what `update` wrote, so the buffers need no initialisation.
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.lengths = [0] * config.num_hidden_layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.lengths[layer_idx], self.lengths[layer_idx] + key.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"StaticCache holds {self.max_cache_len} tokens; {end} were asked for")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.narrow(2, start, end - start).copy_(key)
        values.narrow(2, start, end - start).copy_(value)
        self.lengths[layer_idx] = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def crop(self, length: int) -> None:
        """Forget every cached token after the first `length`; the buffers keep their size."""
        self.lengths = [min(n, length) for n in self.lengths]

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Select batch rows in place (beam search); the buffers keep their size."""
        for i, end in enumerate(self.lengths):
            for buf in (self.keys[i], self.values[i]):
                buf[:, :, :end] = buf[:, :, :end].index_select(0, index.to(buf.device))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.lengths[layer_idx]
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


Cache = DynamicCache | StaticCache


# Pytree nodes, so an exported or compiled forward can take and return a cache: the tensors are the children,
# a StaticCache's sizes and fill levels are the (static) context.
def _flatten_dynamic(cache: DynamicCache) -> tuple[list, None]:
    return [cache.keys, cache.values], None


def _unflatten_dynamic(children: Iterable, context: None) -> DynamicCache:
    cache = DynamicCache()
    keys, values = children
    cache.keys, cache.values = list(keys), list(values)
    return cache


def _flatten_static(cache: StaticCache) -> tuple[list, tuple[int, tuple[int, ...]]]:
    return [cache.keys, cache.values], (cache.max_cache_len, tuple(cache.lengths))


def _unflatten_static(children: Iterable, context: tuple[int, tuple[int, ...]]) -> StaticCache:
    cache = StaticCache.__new__(StaticCache)
    keys, values = children
    cache.keys, cache.values = list(keys), list(values)
    cache.max_cache_len, cache.lengths = context[0], list(context[1])
    return cache


def _with_keys(flatten: Callable) -> Callable:
    def flatten_with_keys(cache: Cache) -> tuple[list, object]:
        children, context = flatten(cache)
        return [(pytree.GetAttrKey("keys"), children[0]), (pytree.GetAttrKey("values"), children[1])], context
    return flatten_with_keys


pytree.register_pytree_node(DynamicCache, _flatten_dynamic, _unflatten_dynamic,
                            serialized_type_name="optlite.cache.DynamicCache",
                            flatten_with_keys_fn=_with_keys(_flatten_dynamic))
pytree.register_pytree_node(StaticCache, _flatten_static, _unflatten_static,
                            serialized_type_name="optlite.cache.StaticCache",
                            flatten_with_keys_fn=_with_keys(_flatten_static))


def as_cache(past: Cache | LegacyCache | None, num_layers: int) -> Cache | None:
    """Accept our cache or a legacy tuple; check it has one entry per decoder layer (or none yet)."""
    if past is None:
        return None
    cache = past if hasattr(past, "update") else DynamicCache.from_legacy_cache(past)
    if len(cache) not in (0, num_layers) or (isinstance(cache, StaticCache) and len(cache) != num_layers):
        raise ValueError(f"past_key_values holds {len(cache)} layers but the model has {num_layers} decoder layers")
    return cache
