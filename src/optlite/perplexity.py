"""Perplexity of a long token sequence with a sliding window, for texts longer than the model's context."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], *, max_length: int | None = None,
               stride: int | None = None, progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of every token after the first, each scored exactly once.

    Tokens are scored `stride` at a time; each chunk is run with up to `max_length` tokens of context
    ending at the chunk's end, so every token sees at least `max_length - stride` earlier tokens (except
    near the start). `max_length` defaults to the model's max_position_embeddings, `stride` to half of it.

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForCausalLM, perplexity
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
        >>> round(perplexity(model, torch.randint(3, 50000, (300,)), max_length=128, stride=64)) > 1000
        True
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    max_length = model.config.max_position_embeddings if max_length is None else max_length
    stride = max(1, max_length // 2) if stride is None else stride  # 0 is refused below, not taken as "default"
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a token and its context), got {max_length}")
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length) so every scored token has context; got stride={stride}, "
                         f"max_length={max_length}")
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll, pos = 0.0, 1  # the first token has no context and is never scored
    chunks = tqdm(total=ids.numel() - 1, unit="tok", disable=not progress, desc="scoring")
    while pos < ids.numel():
        end = min(pos + stride, ids.numel())
        start = max(0, end - max_length)
        # Logits only where they are scored, the window's last end - pos + 1 positions (the very last predicts
        # beyond the chunk): the context positions' logits would cost a vocabulary-wide product and memory each.
        logits = model(ids[None, start:end], use_cache=False, logits_to_keep=end - pos + 1).logits[0]
        scored = logits[:-1].float()  # (end - pos, V); row i predicts token pos + i
        nll += F.cross_entropy(scored, ids[pos:end], reduction="sum").item()
        chunks.update(end - pos)
        pos = end
    chunks.close()
    return math.exp(nll / (ids.numel() - 1))
