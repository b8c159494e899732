"""Assisted decoding: a cheap drafter proposes tokens and the model checks them all in one forward.

Two drafters, as in transformers: a smaller model with the same vocabulary (`assistant_model=`), or n-grams looked
up in the sequence so far (`prompt_lookup_num_tokens=`). With greedy decoding the result is exactly plain greedy
decoding; with sampling and an assistant model, drafts are accepted by the speculative-sampling rule (Leviathan et
al. 2023, Chen et al. 2023), so the tokens follow the model's own distribution. One prompt at a time, as in
transformers. The draft length follows transformers: `num_assistant_tokens` (20) per round, "constant" or
"heuristic" (+2 after a fully accepted draft, -1 otherwise), and an assistant stops drafting when its probability
for its own token falls below `assistant_confidence_threshold` (0.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cache import Cache, DynamicCache
from .logits_processors import process_logits
from .search import DecodeState, GenerateDecoderOnlyOutput, Recorder, Search, sample_token
from .stopping import stopped


@dataclass
class Drafter:
    """Where the drafts come from, and the draft-length schedule."""

    assistant: Any = None  # a smaller causal LM with the same vocabulary
    lookup: int | None = None  # prompt lookup: tokens to propose per match
    max_ngram: int = 2  # prompt lookup: longest n-gram matched (transformers' max_matching_ngram_size)
    length: float = 20  # num_assistant_tokens
    schedule: str = "constant"
    confidence: float | None = 0.4  # assistant_confidence_threshold
    cache: Cache | None = None  # the assistant's

    def update(self, accepted: int, drafted: int) -> None:
        if self.schedule in ("heuristic", "heuristic_transient"):
            self.length = self.length + 2 if accepted == drafted else max(1, self.length - 1)


def lookup_draft(ids: torch.Tensor, count: int, max_ngram: int, max_len: int) -> torch.Tensor:
    """Prompt lookup (Saxena 2023): find the last n tokens (n = max_ngram … 1) earlier in the row and propose the
    `count` tokens that followed the first such match. ids (1, T) -> (k,), possibly empty."""
    cur = ids.shape[1]
    for n in range(min(max_ngram, cur - 1), 0, -1):
        windows = ids.unfold(1, n, 1)  # (1, T - n + 1, n)
        matches = (windows == ids[0, -n:]).all(-1).nonzero(as_tuple=True)[1]
        for start in (matches + n).tolist():
            end = min(start + count, cur, max_len)
            if start < end:
                return ids[0, start:end]
    return ids.new_zeros(0)


def assistant_draft(d: Drafter, ids: torch.Tensor, count: int, search: Search) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` tokens from the assistant, decoded as the main search decodes (greedy or sampled, the same
    processors); returns them (k,) and the assistant's processed scores for each (k, V)."""
    tokens, scores = [], []
    seq = ids
    for _ in range(count):
        seen = d.cache.get_seq_length()
        out = d.assistant(seq[:, seen:], past_key_values=d.cache, use_cache=True, logits_to_keep=1)
        step = process_logits(search.processors, seq, out.logits[:, -1].float())
        token = sample_token(step, search.generator) if search.cfg.do_sample else step.argmax(-1)
        tokens.append(token)
        scores.append(step[0])
        seq = torch.cat([seq, token[:, None]], dim=1)
        if search.eos is not None and bool(torch.isin(token, search.eos).any()):
            break
        if d.confidence and float(step.softmax(-1)[0, token[0]]) < d.confidence:
            break
    if not tokens:
        return ids.new_zeros(0), ids.new_zeros((0, 0), dtype=torch.float32)
    return torch.cat(tokens), torch.stack(scores)


def verify(state: DecodeState, ids: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """One forward of the model over the newest token and the draft: its logits at each of those k + 1 places."""
    cur = ids.shape[1]
    fed = torch.cat([ids[:, -1:], draft[None]], dim=1)  # (1, k + 1)
    mask = state.mask[:, :cur + len(draft)] if state.mask is not None else None
    out = state.forward(fed, attention_mask=mask, position_ids=state.positions[:, cur - 1:cur + len(draft)],
                        past_key_values=state.cache, use_cache=True, logits_to_keep=len(draft) + 1)
    return out.logits[0].float()  # (k + 1, V)


def accept(draft: torch.Tensor, draft_scores: torch.Tensor | None, scores: torch.Tensor,
           search: Search) -> torch.Tensor:
    """The new tokens of this round: the accepted part of the draft plus one token chosen by the model.
    scores (k + 1, V) are the model's processed scores at each place."""
    k = len(draft)
    if search.cfg.do_sample and draft_scores is not None and k:
        p, q = scores.softmax(-1), draft_scores.softmax(-1)  # (k + 1, V), (k, V)
        places = torch.arange(k, device=draft.device)
        ratio = p[places, draft] / q[places, draft]
        keep = torch.rand(ratio.shape, generator=search.generator, device=ratio.device) <= ratio
        n = int((~keep).cumsum(-1).lt(1).sum())
        if n < k:  # rejected: draw from the part of p that q under-weights
            residual = (p[n] - q[n]).clamp(min=0)
            last = torch.multinomial(residual / residual.sum(), 1, generator=search.generator)
        else:
            last = torch.multinomial(p[k], 1, generator=search.generator)
        return torch.cat([draft[:n], last])
    chosen = sample_token(scores, search.generator) if search.cfg.do_sample else scores.argmax(-1)  # (k + 1,)
    n = int((chosen[:k] == draft).cumprod(0).sum())
    return chosen[:n + 1]


def assisted_decode(state: DecodeState, search: Search, d: Drafter) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Draft, verify, accept, until eos, a stopping criterion or the length limit."""
    ids = state.ids
    record = Recorder.asked(search.cfg)
    if d.assistant is not None:
        d.cache = DynamicCache()
    _prefill_all_but_last(state, ids.shape[1])
    while ids.shape[1] < search.max_len:
        cur = ids.shape[1]
        count = min(int(d.length), search.max_len - cur - 1)
        draft, draft_scores = ids.new_zeros(0), None
        if count > 0 and d.assistant is not None:
            draft, draft_scores = assistant_draft(d, ids, count, search)
        elif count > 0:
            draft = lookup_draft(ids, d.lookup, d.max_ngram, search.max_len)[:count]
        logits = verify(state, ids, draft)
        scores = torch.cat([process_logits(search.processors, torch.cat([ids, draft[None, :j]], 1), logits[j:j + 1])
                            for j in range(len(draft) + 1)])  # (k + 1, V): each place sees the draft before it
        new = accept(draft, draft_scores, scores, search)
        new = _cut_at_stop(new, search)
        for j in range(len(new)):
            record.add(scores[j:j + 1], logits[j:j + 1], None)
        d.update(len(new) - 1, len(draft))
        ids = torch.cat([ids, new[None]], dim=1)
        state.cache.crop(state.offset + ids.shape[1] - 1)
        if d.cache is not None:
            d.cache.crop(ids.shape[1] - 1)
        if search.streamer is not None:
            search.streamer.put(new.cpu())
        done = _stop_at(ids, len(new), search, record)
        if done:
            ids = ids[:, :done]
            break
    if search.streamer is not None:
        search.streamer.end()
    if not search.cfg.return_dict_in_generate:
        return ids
    return GenerateDecoderOnlyOutput(sequences=ids, scores=record.get("scores"), logits=record.get("logits"),
                                     past_key_values=state.cache)


def _cut_at_stop(new: torch.Tensor, search: Search) -> torch.Tensor:
    """Nothing after the first eos of the round."""
    if search.eos is None:
        return new
    hits = torch.isin(new, search.eos).nonzero()
    return new[:int(hits[0]) + 1] if len(hits) else new


def _prefill_all_but_last(state: DecodeState, length: int) -> None:
    """Cache every prompt token but the last one, which each round feeds together with its draft."""
    if length - 1 <= state.past:
        return
    mask = state.mask[:, :length - 1] if state.mask is not None else None
    state.forward(state.ids[:, state.past:length - 1], attention_mask=mask,
                  position_ids=state.positions[:, state.past:length - 1], past_key_values=state.cache, use_cache=True,
                  logits_to_keep=1)


def _stop_at(ids: torch.Tensor, added: int, search: Search, record: Recorder) -> int:
    """0 to go on, else the length the sequence ends at: eos, or the first new token where a criterion holds."""
    if search.eos is not None and bool(torch.isin(ids[0, -1], search.eos)):
        return ids.shape[1]
    for j in range(ids.shape[1] - added + 1, ids.shape[1] + 1):
        if search.criteria and bool(stopped(search.criteria, ids[:, :j], record.get("scores")).all()):
            return j
    return 0
