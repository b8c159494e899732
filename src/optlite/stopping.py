"""Stopping criteria: callables `(input_ids (B, T), scores) -> (B,) bool` that end rows of a generate call.

They have the shape of transformers' `StoppingCriteria`, so a `transformers.StoppingCriteriaList` (what lm-eval's
`generate_until` passes) works as given. Criteria run after each new token; `scores` is the tuple of the scores kept
so far (None unless `output_scores`), as in transformers. eos and the length limit are handled by the search loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

StoppingCriterion = Callable[[torch.Tensor, Any], "torch.Tensor | bool"]


def stopped(criteria: Sequence[StoppingCriterion], input_ids: torch.Tensor, scores: Any) -> torch.Tensor:
    """(B,) bool: the rows that any criterion ends now. A criterion may return one bool for the whole batch.

    Example:
        >>> stopped([lambda ids, s: ids[:, -1] == 7], torch.tensor([[1, 7], [1, 5]]), None)
        tensor([ True, False])
    """
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for criterion in criteria:
        result = criterion(input_ids, scores)
        done = done | torch.as_tensor(result, device=input_ids.device).to(torch.bool)
    return done


def max_time_criterion(max_time: float, start: float | None = None) -> StoppingCriterion:
    """Ends every row once `max_time` seconds have passed since `start` (default: now)."""
    start = time.time() if start is None else start

    def criterion(input_ids: torch.Tensor, scores: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), time.time() - start > max_time, device=input_ids.device)

    return criterion


def ends_with_stop_string(pieces: Sequence[str], stop: str) -> bool:
    """Does the stop string occur in the text of `pieces` (token strings) and end inside the last piece?

    This is transformers' StopStringCriteria rule: the stop string may begin in earlier tokens and the last token
    may run on past it, but a stop string that lies wholly before the last token does not count again.

    Example:
        >>> ends_with_stop_string(["las", "topper"], "stop"), ends_with_stop_string(["stop", "at"], "stop")
        (True, False)
    """
    if not pieces:
        return False
    before = sum(len(p) for p in pieces[:-1])
    return stop in "".join(pieces)[max(0, before - len(stop) + 1):]


def stop_string_criterion(stop_strings: str | Sequence[str], tokenizer: Any) -> StoppingCriterion:
    """Ends a row when its newest token completes one of `stop_strings` (text of the tokens, via `tokenizer.decode`)."""
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in texts:
            texts[token] = tokenizer.decode([token])
        return texts[token]

    def row_done(row: list[int]) -> bool:
        for stop in stops:
            pieces: list[str] = []
            length = 0
            for token in reversed(row):  # only as many tokens as the stop string can span
                pieces.insert(0, text(token))
                length += len(pieces[0])
                if length - len(pieces[-1]) >= len(stop) - 1:
                    break
            if ends_with_stop_string(pieces, stop):
                return True
        return False

    def criterion(input_ids: torch.Tensor, scores: Any) -> torch.Tensor:
        return torch.tensor([row_done(row) for row in input_ids.tolist()], device=input_ids.device)

    return criterion
