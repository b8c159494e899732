"""Logits processors: pure functions `(scores (B, V) float32, ...) -> new scores`, never in place.

Each is transformers' processor of the same name, operation for operation, so the processed scores agree bit for
bit; `build_logits_processors` puts the ones a `GenerationConfig` asks for in transformers' order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Maps (input_ids (B, T), scores (B, V)) to new scores, like a transformers LogitsProcessor."""

NEG_INF = -float("inf")


def repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float,
                       ignore_before: torch.Tensor | None = None) -> torch.Tensor:
    """Make every token already in a row less likely: divide its score by `penalty` when positive, multiply when
    negative (CTRL, Keskar et al. 2019). Positions before `ignore_before[row]` (left padding) do not count.

    Example:
        >>> repetition_penalty(torch.tensor([[2.0, -1.0, 3.0]]), torch.tensor([[0, 1]]), 2.0)
        tensor([[ 1., -2.,  3.]])
    """
    vocab = scores.shape[-1]
    if ignore_before is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = input_ids.masked_fill(positions[None, :] < ignore_before[:, None], vocab)
    input_ids = input_ids.clamp(max=vocab)  # column `vocab` is a spare that absorbs ignored ids
    padded = F.pad(scores, (0, 1))  # (B, V + 1)
    seen = padded.gather(1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, input_ids, seen)[:, :vocab]


def no_repeat_ngram(scores: torch.Tensor, input_ids: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the row (prompt included).

    Example:
        >>> no_repeat_ngram(torch.zeros(1, 4), torch.tensor([[1, 2, 3, 1]]), 2)  # "1 2" was seen: 2 is banned
        tensor([[0., 0., -inf, 0.]])
    """
    cur_len = input_ids.shape[-1]
    if cur_len < ngram_size:
        return scores
    prefix = input_ids[:, cur_len + 1 - ngram_size:]  # (B, n-1): the tokens a new n-gram would start with
    windows = input_ids.unfold(1, ngram_size, 1)  # (B, T-n+1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)  # (B, T-n+1)
    vocab = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)  # spare column for non-matches
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def suppress_eos(scores: torch.Tensor, cur_len: int, min_length: int, eos: torch.Tensor) -> torch.Tensor:
    """While the rows are shorter than `min_length` tokens (prompt included), end-of-sequence cannot be chosen.

    Example:
        >>> suppress_eos(torch.zeros(1, 3), cur_len=4, min_length=6, eos=torch.tensor([2]))
        tensor([[0., 0., -inf]])
    """
    return scores if cur_len >= min_length else ban(scores, eos)


def ban(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`scores` with the columns of `tokens` at -inf; ids outside the vocabulary change nothing. One pass over
    the scores and no host sync: such ids mark a spare column of the mask, which is cut off.

    Example:
        >>> ban(torch.zeros(1, 3), torch.tensor([1, 5, -1]))
        tensor([[0., -inf, 0.]])
    """
    vocab = scores.shape[-1]
    tokens = tokens.to(scores.device).reshape(-1)
    columns = torch.where((tokens >= 0) & (tokens < vocab), tokens, vocab)
    banned = torch.zeros(vocab + 1, dtype=torch.bool, device=scores.device).index_fill_(0, columns, True)
    return scores.masked_fill(banned[:vocab], NEG_INF)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Flatten (>1) or sharpen (<1) the distribution."""
    return scores / temperature


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the `top_k` best scores of each row (ties with the k-th included); the rest become -inf.

    Example:
        >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
        tensor([[-inf, 3., 2., -inf]])
    """
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens whose probabilities add up to at least
    `top_p`; the rest become -inf.

    Example:
        >>> top_p_filter(torch.tensor([[0.5, 0.3, 0.2]]).log(), 0.7).exp()
        tensor([[0.5000, 0.3000, 0.0000]])
    """
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def min_p_filter(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than `min_p` times the best token's probability (Nguyen et al. 2024).

    Example:
        >>> min_p_filter(torch.tensor([[0.6, 0.3, 0.1]]).log(), 0.4).exp()
        tensor([[0.6000, 0.3000, 0.0000]])
    """
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    best = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    return scores.masked_fill(remove.scatter(-1, best, False), NEG_INF)


def typical_filter(scores: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprisal is closest to the entropy,
    up to probability `mass`."""
    log_probs = F.log_softmax(scores, dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum(-1, keepdim=True)
    distance, order = torch.sort((-log_probs - entropy).abs(), descending=False)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(dim=1).clamp(max=distance.shape[-1] - 1)
    remove = distance > distance.gather(1, last.view(-1, 1))
    remove[..., :min_tokens_to_keep] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def epsilon_filter(scores: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Truncation sampling (Hewitt et al. 2022): drop tokens with probability below `epsilon`."""
    kth = torch.topk(scores, min(min_tokens_to_keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill((scores.softmax(-1) < epsilon) & (scores < kth), NEG_INF)


def eta_filter(scores: torch.Tensor, epsilon: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022): the cut-off is min(eta, sqrt(eta) * exp(-entropy)) per row."""
    eps = torch.tensor(epsilon, device=scores.device)  # float32 arithmetic, as transformers
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    eta = torch.min(eps, eps.sqrt() * torch.exp(-entropy))[..., None]
    kth = torch.topk(scores, min(min_tokens_to_keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill((scores.softmax(-1) < eta) & (scores < kth), NEG_INF)


def sequence_bias(scores: torch.Tensor, input_ids: torch.Tensor, biases: dict[tuple[int, ...], float]) -> torch.Tensor:
    """Add `biases[seq]` to the score of seq's last token wherever the row ends with the rest of seq (every row for
    one-token sequences). A bias of -inf bans the sequence (`bad_words_ids`).

    Example:
        >>> sequence_bias(torch.zeros(1, 4), torch.tensor([[3, 1]]), {(2,): -1.0, (1, 3): 5.0, (0, 3): 9.0})
        tensor([[ 0.,  0., -1.,  5.]])
    """
    vocab = scores.shape[-1]
    bias = scores.new_zeros(vocab)
    single = [(seq[0], b) for seq, b in biases.items() if len(seq) == 1]
    if single:
        bias[[t for t, _ in single]] = torch.tensor([b for _, b in single], device=scores.device)
    bias = bias.expand_as(scores).clone()
    groups: dict[int, list[tuple[tuple[int, ...], float]]] = {}
    for seq, b in biases.items():
        if len(seq) > 1:
            groups.setdefault(len(seq) - 1, []).append((seq, b))
    for n, group in groups.items():
        if n > input_ids.shape[1]:  # the prefix is longer than the context so far
            continue
        prefixes = torch.tensor([seq[:-1] for seq, _ in group], device=scores.device)  # (G, n)
        matching = (input_ids[:, None, -n:] == prefixes).all(-1)  # (B, G)
        values = torch.tensor([b for _, b in group], device=scores.device)
        last = torch.tensor([seq[-1] for seq, _ in group], device=scores.device)
        bias.index_add_(1, last, torch.where(matching, values, 0.0))
    return scores + bias


def force_tokens(scores: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Only `tokens` remain possible (score 0); used for forced_bos_token_id / forced_eos_token_id."""
    out = torch.full_like(scores, NEG_INF)
    out[:, list(tokens)] = 0
    return out


def suppress(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` can never be chosen (suppress_tokens, begin_suppress_tokens)."""
    return ban(scores, tokens)


def remove_invalid(scores: torch.Tensor) -> torch.Tensor:
    """NaN becomes 0 and ±inf the largest / smallest finite float, so sampling cannot fail on them."""
    finfo = torch.finfo(scores.dtype)
    out = torch.where(scores != scores, 0.0, scores)
    out = torch.where(scores == float("inf"), finfo.max, out)
    return torch.where(scores == NEG_INF, finfo.min, out)


def exponential_decay_length_penalty(scores: torch.Tensor, cur_len: int, start: int, factor: float,
                                     eos: torch.Tensor) -> torch.Tensor:
    """After `start` tokens (prompt included), raise the eos scores by |score| * (factor ** (cur_len - start) - 1)."""
    if cur_len <= start:
        return scores
    eos = eos.to(scores.device)
    penalty = scores[:, eos].abs() * (pow(factor, cur_len - start) - 1)
    penalties = torch.zeros_like(scores)
    penalties[:, eos] = penalty.masked_fill(~torch.isfinite(scores[:, eos]), 0.0)
    return scores + penalties


def renormalize(scores: torch.Tensor) -> torch.Tensor:
    """Log-probabilities again after the other processors (renormalize_logits=True; always the last one)."""
    return scores.log_softmax(dim=-1)


def bias_dict(sequence_bias: Any) -> dict[tuple[int, ...], float]:
    """sequence_bias as {token ids: bias}, from transformers' [[ids, bias], ...] list or a dict of tuples."""
    if isinstance(sequence_bias, dict):
        return {tuple(k): float(v) for k, v in sequence_bias.items()}
    return {tuple(ids): float(b) for ids, b in sequence_bias}


def _constraints(cfg: Any, prompt_len: int, max_len: int, eos: torch.Tensor | None,
                 ignore_before: torch.Tensor | None) -> list[LogitsProcessor]:
    """The processors that apply to every search, in transformers' order."""
    procs: list[LogitsProcessor] = []
    if cfg.sequence_bias is not None:
        biases = bias_dict(cfg.sequence_bias)
        procs.append(lambda ids, s: sequence_bias(s, ids, biases))
    if cfg.repetition_penalty != 1.0:
        procs.append(lambda ids, s: repetition_penalty(s, ids, cfg.repetition_penalty, ignore_before))
    if cfg.no_repeat_ngram_size:
        procs.append(lambda ids, s: no_repeat_ngram(s, ids, cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        eos_list = eos.tolist() if eos is not None else []
        banned = {tuple(w): NEG_INF for w in cfg.bad_words_ids if list(w) not in [[e] for e in eos_list]}
        procs.append(lambda ids, s: sequence_bias(s, ids, banned))
    if eos is not None:
        if cfg.min_length:
            procs.append(lambda ids, s: suppress_eos(s, ids.shape[-1], cfg.min_length, eos))
        if cfg.min_new_tokens:
            procs.append(lambda ids, s: suppress_eos(s, ids.shape[-1], prompt_len + cfg.min_new_tokens, eos))
    if cfg.forced_bos_token_id is not None:
        procs.append(lambda ids, s: force_tokens(s, [cfg.forced_bos_token_id]) if ids.shape[-1] == 1 else s)
    if cfg.forced_eos_token_id is not None:
        forced = cfg.forced_eos_token_id if isinstance(cfg.forced_eos_token_id, list) else [cfg.forced_eos_token_id]
        procs.append(lambda ids, s: force_tokens(s, forced) if ids.shape[-1] == max_len - 1 else s)
    if cfg.remove_invalid_values:
        procs.append(lambda ids, s: remove_invalid(s))
    if cfg.exponential_decay_length_penalty is not None and eos is not None:
        start, factor = cfg.exponential_decay_length_penalty
        procs.append(lambda ids, s: exponential_decay_length_penalty(s, ids.shape[-1], start + prompt_len, factor, eos))
    if cfg.suppress_tokens is not None:
        suppressed = torch.tensor(list(cfg.suppress_tokens), dtype=torch.long)
        procs.append(lambda ids, s: suppress(s, suppressed))
    if cfg.begin_suppress_tokens is not None:
        # A one-token prompt with a forced BOS suppresses one step later, as transformers.
        begin = prompt_len if prompt_len > 1 or cfg.forced_bos_token_id is None else prompt_len + 1
        at_begin = torch.tensor(list(cfg.begin_suppress_tokens), dtype=torch.long)
        procs.append(lambda ids, s: suppress(s, at_begin) if ids.shape[-1] == begin else s)
    return procs


def _warpers(cfg: Any, eos: torch.Tensor | None) -> list[LogitsProcessor]:
    """The sampling-only processors, in transformers' order."""
    # Beam sampling keeps at least one token besides the eos ids, so every beam can go on.
    keep = (eos.numel() + 1 if eos is not None else 2) if cfg.num_beams > 1 else 1
    procs: list[LogitsProcessor] = []
    if cfg.temperature != 1.0:
        procs.append(lambda ids, s: apply_temperature(s, cfg.temperature))
    if cfg.top_k:
        procs.append(lambda ids, s: top_k_filter(s, cfg.top_k, keep))
    if cfg.top_p < 1.0:
        procs.append(lambda ids, s: top_p_filter(s, cfg.top_p, keep))
    if cfg.min_p is not None:
        procs.append(lambda ids, s: min_p_filter(s, cfg.min_p, keep))
    if cfg.typical_p < 1.0:
        procs.append(lambda ids, s: typical_filter(s, cfg.typical_p, keep))
    if 0.0 < cfg.epsilon_cutoff < 1.0:
        procs.append(lambda ids, s: epsilon_filter(s, cfg.epsilon_cutoff, keep))
    if 0.0 < cfg.eta_cutoff < 1.0:
        procs.append(lambda ids, s: eta_filter(s, cfg.eta_cutoff, keep))
    return procs


def build_logits_processors(cfg: Any, prompt_len: int, max_len: int, eos: torch.Tensor | None,
                            ignore_before: torch.Tensor | None = None,
                            extra: Sequence[LogitsProcessor] = ()) -> list[LogitsProcessor]:
    """The processors a resolved GenerationConfig asks for, in transformers' order: biases, penalties and
    constraints, the caller's own processors (a transformers LogitsProcessorList works), then (sampling only) the
    warpers from temperature to eta, and renormalization last. `max_len` is the length decoded to (forced eos)."""
    procs = _constraints(cfg, prompt_len, max_len, eos, ignore_before)
    procs.extend(extra)
    if cfg.do_sample:
        procs.extend(_warpers(cfg, eos))
    if cfg.renormalize_logits:
        procs.append(lambda ids, s: renormalize(s))
    return procs


def process_logits(processors: Sequence[LogitsProcessor], input_ids: torch.Tensor,
                   scores: torch.Tensor) -> torch.Tensor:
    for proc in processors:
        scores = proc(input_ids, scores)
    return scores
