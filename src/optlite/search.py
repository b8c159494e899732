"""The decoding loops: one `DecodeState` carried through small named steps (prefill, decode one token), then greedy /
sampling (`sample`) and beam search (`beam_search`), as transformers runs them, token for token.

Coordinates: the model has seen `state.offset` context tokens that are not in `state.ids` (an `inputs_embeds`
prompt) plus the tokens of `state.ids`; `state.mask` and `state.positions` cover both, one column per token.
Shapes: B rows (after expanding for beams / returned sequences), T tokens so far, V vocabulary, K beams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .cache import Cache, DynamicCache, StaticCache
from .logits_processors import LogitsProcessor, process_logits
from .outputs import ModelOutput
from .stopping import StoppingCriterion, stopped

IMPOSSIBLE = -1.0e9  # the score beam search gives what may not be chosen: -inf arithmetic could bring NaNs


# ------------------------------------------ outputs (transformers' classes of the same names, fields in the same order)


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """Greedy / sampling result with `return_dict_in_generate=True`. `scores`: processed scores per step, each
    (B, V); `logits`: raw logits per step; `attentions` / `hidden_states`: per step, the model's per-layer tuple."""

    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    past_key_values: Any = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """Beam-search result with `return_dict_in_generate=True`. As in transformers, `sequences_scores` (the length-
    normalized score of each returned beam) and `scores` (processed log-probabilities per step, (B*num_beams, V))
    are filled when `output_scores=True`; `beam_indices[i, t]` is the row that step t of sequence i came from."""

    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    past_key_values: Any = None


@dataclass
class Recorder:
    """The per-step tensors `return_dict_in_generate` asks for; a list is None when not asked for."""

    scores: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] | None = None
    attentions: list[tuple[torch.Tensor, ...]] | None = None
    hidden_states: list[tuple[torch.Tensor, ...]] | None = None

    @classmethod
    def asked(cls, cfg: Any) -> Recorder:
        on = bool(cfg.return_dict_in_generate)
        return cls(*([] if on and getattr(cfg, name) else None
                     for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")))

    def add(self, scores: torch.Tensor, logits: torch.Tensor, out: Any) -> None:
        for name, value in (("scores", scores), ("logits", logits), ("attentions", getattr(out, "attentions", None)),
                            ("hidden_states", getattr(out, "hidden_states", None))):
            if getattr(self, name) is not None:
                getattr(self, name).append(value)

    def get(self, name: str) -> tuple | None:
        value = getattr(self, name)
        return tuple(value) if value is not None else None


# --------------------------------------------------------------------------------------- the decode state and its steps


@dataclass
class Search:
    """What a generate call decodes with, fixed for the call: settings, processors, criteria, special tokens."""

    cfg: Any  # a resolved GenerationConfig
    max_len: int  # length of `ids` to decode to
    processors: Sequence[LogitsProcessor] = ()
    criteria: Sequence[StoppingCriterion] = ()
    eos: torch.Tensor | None = None
    pad: int | None = None
    generator: torch.Generator | None = None
    streamer: Any = None


@dataclass
class DecodeState:
    """The tensors one generate call carries from step to step."""

    forward: Callable[..., Any]  # the model (or its compiled decode step)
    ids: torch.Tensor  # (B, T) prompt ids so far (beam search keeps its own (B, K, L) buffers)
    mask: torch.Tensor | None  # (B, offset + max_len): the prompt's mask then ones; None when nothing is padded
    positions: torch.Tensor  # (B, offset + max_len): position id of every column, transformers' numbering
    cache: Cache | None
    offset: int = 0  # context columns not in `ids` (an inputs_embeds prompt)
    past: int = 0  # columns already in the cache when generation started
    want: dict[str, bool] = field(default_factory=dict)  # output_attentions / output_hidden_states


def prompt_positions(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """transformers' numbering of the prompt: the count of real tokens before each one, pads at 0 (B, length)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def all_positions(prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Each new token takes the position after the previous column's (B, prompt + new)."""
    steps = torch.arange(1, new + 1, device=prompt.device)
    return torch.cat([prompt, prompt[:, -1:] + steps], dim=1)


def run_model(state: DecodeState, start: int, end: int, tokens: torch.Tensor | None = None,
              embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """Feed columns [start, end) (tokens or embeddings) and return the fp32 logits (B, V) of the last one."""
    mask = state.mask[:, :end] if state.mask is not None else None
    out = state.forward(tokens, attention_mask=mask, position_ids=state.positions[:, start:end],
                        past_key_values=state.cache, use_cache=state.cache is not None, logits_to_keep=1,
                        inputs_embeds=embeds, **state.want)
    return out.logits[:, -1].float(), out


def prefill(state: DecodeState, inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """Run the prompt (what the cache does not hold yet) through the model."""
    end = state.offset + state.ids.shape[1]
    if inputs_embeds is not None:
        return run_model(state, state.past, end, embeds=inputs_embeds)
    return run_model(state, state.past, end, tokens=state.ids[:, state.past - state.offset:])


def decode_one(state: DecodeState, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, Any]:
    """Logits after token `length` of the rows. `ids` (B, T) are all `length` tokens so far, or with a cache only the
    newest (B, 1): the cache holds the rest, while without one the model reads the whole sequence again."""
    end = state.offset + length
    return run_model(state, end - ids.shape[1], end, tokens=ids)


def step_ids(state: DecodeState, ids: torch.Tensor, length: int) -> torch.Tensor:
    """What `decode_one` needs of ids (B, >= length): the newest token with a cache, else all of them (views)."""
    return ids[:, length - 1:length] if state.cache is not None else ids[:, :length]


def greedy_token(scores: torch.Tensor) -> torch.Tensor:
    """The best token of each row: (B, V) -> (B,)."""
    return scores.argmax(-1)


def sample_token(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row drawn from softmax(scores); -inf scores are never drawn. (B, V) -> (B,).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sample_token(torch.tensor([[0.0, -float("inf"), 0.0]]), g).item() in (0, 2)
        True
    """
    return torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------- greedy decoding and sampling


def sample(state: DecodeState, search: Search, inputs_embeds: torch.Tensor | None = None
           ) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Greedy decoding or multinomial sampling: one model forward per new token."""
    cfg, eos, streamer = search.cfg, search.eos, search.streamer
    batch, cur = state.ids.shape
    device = state.ids.device
    record = Recorder.asked(cfg)
    fill = search.pad if search.pad is not None else 0
    ids = torch.full((batch, search.max_len), fill, dtype=torch.long, device=device)
    ids[:, :cur] = state.ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    pad_t = torch.tensor(fill, device=device)
    # transformers pads finished rows only when an eos criterion exists; custom criteria need the per-step check.
    check = eos is not None or bool(search.criteria)

    if cur < search.max_len:
        logits, out = prefill(state, inputs_embeds)
    while cur < search.max_len:
        scores = process_logits(search.processors, ids[:, :cur], logits)
        record.add(scores, logits, out)
        token = sample_token(scores, search.generator) if cfg.do_sample else greedy_token(scores)
        if eos is not None:
            token = torch.where(unfinished, token, pad_t)  # rows already ended get padding
        ids[:, cur] = token
        cur += 1
        if streamer is not None:
            streamer.put(token.cpu())
        if check:
            if eos is not None:
                unfinished &= ~torch.isin(token, eos)
            if search.criteria:
                unfinished &= ~stopped(search.criteria, ids[:, :cur], record.get("scores"))
            if not bool(unfinished.any()):  # the one host sync per step
                break
        if cur == search.max_len:
            break
        logits, out = decode_one(state, step_ids(state, ids, cur), cur)
    if streamer is not None:
        streamer.end()

    sequences = ids if cur == search.max_len else ids[:, :cur].clone()
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=record.get("scores"), logits=record.get("logits"),
                                     attentions=record.get("attentions"), hidden_states=record.get("hidden_states"),
                                     past_key_values=state.cache)


# --------------------------------------------------------------------------------------------------- beam search pieces
# transformers' vectorized beam search, function for function; tensors keep a (batch, beam) layout.


def gather_beams(tensor: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
    """Select beams along dim 1: tensor (B, K, ...) and beam_idx (B, K') -> (B, K', ...)."""
    while beam_idx.dim() < tensor.dim():
        beam_idx = beam_idx.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_idx, dim=1)


def top_continuations(log_probs: torch.Tensor, count: int, do_sample: bool,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `count` best (or, sampling, drawn without replacement) continuations of all beams of each prompt.
    log_probs (B, K, V) are accumulated scores; returns their scores, source beams and tokens, each (B, count)."""
    batch, beams, vocab = log_probs.shape
    flat = log_probs.reshape(batch, beams * vocab)
    if do_sample:
        index = torch.multinomial(F.softmax(flat, dim=-1), count, generator=generator)
        scores = flat.gather(1, index)
    else:
        scores, index = torch.topk(flat, count)
    return scores, index // vocab, index % vocab


def length_normalized(scores: torch.Tensor, generated_len: int, length_penalty: float) -> torch.Tensor:
    """A finished beam's score: its summed log-probability / generated_len ** length_penalty (> 0 favours long)."""
    return scores / (generated_len ** length_penalty)


def can_still_improve(improvable: torch.Tensor, running_scores: torch.Tensor, finished_scores: torch.Tensor,
                      is_finished: torch.Tensor, cur_len: int, max_length: int, prompt_len: int,
                      early_stopping: bool | str, length_penalty: float) -> torch.Tensor:
    """(B, 1): can the best running beam still beat the worst kept finished one? early_stopping=False estimates its
    final score at the current length, "never" at the best length for the length penalty (canonical beam search).
    With early_stopping=True the search ends when num_beams beams are finished (see `beam_search_done`)."""
    if early_stopping == "never" and length_penalty > 0.0:
        best_len = max_length - prompt_len
    else:
        best_len = cur_len - prompt_len
    best_running = running_scores[:, :1] / (best_len ** length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], IMPOSSIBLE)
    return improvable & (best_running > worst_finished).any(-1, keepdim=True)


def beam_search_done(improvable: torch.Tensor, is_finished: torch.Tensor, hit_stop: torch.Tensor,
                     early_stopping: bool | str) -> bool:
    """The search ends when no prompt can improve, or (early_stopping=True) all keep num_beams finished beams,
    or no beam can continue (max length reached). One host sync."""
    go_on = improvable.any() & ~(is_finished.all() & (early_stopping is True)) & ~hit_stop.all()
    return not bool(go_on)


@dataclass
class Beams:
    """Beam search's running and finished hypotheses, each (B, K, ...), and where each step came from."""

    running: torch.Tensor  # (B, K, L) tokens
    running_scores: torch.Tensor  # (B, K) summed log-probabilities
    running_src: torch.Tensor  # (B, K, new) row of step t's parent, -1 before
    finished: torch.Tensor
    finished_scores: torch.Tensor  # (B, K) length-normalized
    finished_src: torch.Tensor
    is_finished: torch.Tensor  # (B, K) bool
    improvable: torch.Tensor  # (B, 1) bool

    @classmethod
    def start(cls, input_ids: torch.Tensor, beams: int, max_len: int, fill: int) -> Beams:
        rows, prompt_len = input_ids.shape
        batch, device = rows // beams, input_ids.device
        running = torch.full((batch, beams, max_len), fill, dtype=torch.long, device=device)
        running[:, :, :prompt_len] = input_ids.view(batch, beams, prompt_len)
        scores = torch.zeros((batch, beams), device=device)
        scores[:, 1:] = IMPOSSIBLE  # the K copies of a prompt are identical: start from the first only
        src = torch.full((batch, beams, max_len - prompt_len), -1, dtype=torch.int32, device=device)
        return cls(running, scores, src, running.clone(), torch.full((batch, beams), IMPOSSIBLE, device=device),
                   src.clone(), torch.zeros((batch, beams), dtype=torch.bool, device=device),
                   torch.ones((batch, 1), dtype=torch.bool, device=device))


def beam_step(b: Beams, log_probs: torch.Tensor, cur: int, prompt_len: int, search: Search,
              scores_so_far: Any) -> torch.Tensor:
    """Extend every beam by one token: keep the K best that did not stop running, and let the stopped ones among the
    top K join the finished pool if they beat its worst member. Returns hit_stop (B, K')."""
    cfg, eos = search.cfg, search.eos
    batch, beams, vocab = b.running.shape[0], b.running.shape[1], log_probs.shape[-1]
    count = max(2, 1 + (eos.numel() if eos is not None else 0)) * beams  # so K beams go on when the best end
    accumulated = log_probs.view(batch, beams, vocab) + b.running_scores[:, :, None]
    top_scores, src, tokens = top_continuations(accumulated, count, cfg.do_sample, search.generator)

    cand = gather_beams(b.running, src)  # (B, K', L)
    cand[:, :, cur] = tokens
    cand_src = gather_beams(b.running_src, src)
    row_offset = torch.arange(batch, device=src.device).view(-1, 1) * beams
    cand_src[:, :, cur - prompt_len] = (src + row_offset).to(torch.int32)
    hit_stop = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
    if search.criteria:
        flat = cand[:, :, :cur + 1].reshape(batch * count, cur + 1)
        hit_stop = hit_stop | stopped(search.criteria, flat, scores_so_far).view(batch, count)
    hit_stop = hit_stop | (cur + 1 >= search.max_len)

    run_scores = top_scores + hit_stop.to(torch.float32) * IMPOSSIBLE
    keep = torch.topk(run_scores, k=beams)[1]
    b.running, b.running_scores = gather_beams(cand, keep), gather_beams(run_scores, keep)
    b.running_src = gather_beams(cand_src, keep)

    among_top = torch.arange(count, device=src.device) < beams  # only the top K candidates may finish
    just_finished = hit_stop & among_top[None, :]
    cand_final = length_normalized(top_scores, cur + 1 - prompt_len, cfg.length_penalty)
    cand_final += (b.is_finished.all(-1, keepdim=True) & (cfg.early_stopping is True)).to(torch.float32) * IMPOSSIBLE
    cand_final += (~b.improvable).to(torch.float32) * IMPOSSIBLE
    cand_final += (~just_finished) * IMPOSSIBLE
    merged = torch.cat((b.finished_scores, cand_final), dim=1)
    best = torch.topk(merged, k=beams)[1]
    b.finished = gather_beams(torch.cat((b.finished, cand), dim=1), best)
    b.finished_scores = gather_beams(merged, best)
    b.finished_src = gather_beams(torch.cat((b.finished_src, cand_src), dim=1), best)
    b.is_finished = gather_beams(torch.cat((b.is_finished, just_finished), dim=1), best)
    return hit_stop


def beam_search(state: DecodeState, search: Search, inputs_embeds: torch.Tensor | None = None
                ) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    """Beam search (or beam sampling with do_sample=True), vectorized over prompts and beams as transformers does."""
    cfg, eos, max_len = search.cfg, search.eos, search.max_len
    rows, prompt_len = state.ids.shape
    beams = cfg.num_beams
    record = Recorder.asked(cfg)
    # transformers fills unused positions with `pad or eos[0]` (-1 without eos, where every beam has full length).
    fill = (search.pad if search.pad else int(eos[0])) if eos is not None else -1
    b = Beams.start(state.ids, beams, max_len, fill)

    cur = prompt_len
    if cur < max_len:
        logits, out = prefill(state, inputs_embeds)
    while cur < max_len:
        history = b.running[:, :, :cur].reshape(rows, cur) if search.processors else None  # a copy: only if read
        log_probs = process_logits(search.processors, history, F.log_softmax(logits, dim=-1))
        record.add(log_probs.clone(), logits.clone(), out)
        hit_stop = beam_step(b, log_probs, cur, prompt_len, search, record.get("scores"))
        cur += 1
        b.improvable = can_still_improve(b.improvable, b.running_scores, b.finished_scores, b.is_finished, cur,
                                         max_len, prompt_len, cfg.early_stopping, cfg.length_penalty)
        done = beam_search_done(b.improvable, b.is_finished, hit_stop, cfg.early_stopping)
        if state.cache is not None and (not done or cfg.return_dict_in_generate):
            state.cache.reorder_cache(b.running_src[:, :, cur - 1 - prompt_len].reshape(-1))
        if done:
            break
        last = b.running[:, :, cur - 1:cur] if state.cache is not None else b.running[:, :, :cur]
        logits, out = decode_one(state, last.reshape(rows, -1), cur)
    return beam_result(b, search, prompt_len, record, state.cache)


def beam_result(b: Beams, search: Search, prompt_len: int, record: Recorder,
                cache: Cache | None) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    """The num_return_sequences best finished beams of each prompt, cut to the longest one."""
    cfg = search.cfg
    n, batch = cfg.num_return_sequences, b.finished.shape[0]
    sequences = b.finished[:, :n].reshape(batch * n, search.max_len)
    beam_indices = b.finished_src[:, :n].reshape(batch * n, search.max_len - prompt_len)
    generated = int((beam_indices >= 0).sum(1).max()) if beam_indices.shape[1] else 0
    sequences = sequences[:, :prompt_len + generated]
    if not cfg.return_dict_in_generate:
        return sequences
    seq_scores = b.finished_scores[:, :n].reshape(batch * n) if cfg.output_scores else None
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=seq_scores,
        scores=record.get("scores"), logits=record.get("logits"), beam_indices=beam_indices[:, :generated],
        attentions=record.get("attentions"), hidden_states=record.get("hidden_states"), past_key_values=cache)


# -------------------------------------------------------------------------------------- the cache and the compiled step


def make_cache(model: Any, batch_size: int, length: int, cache_implementation: str | None) -> Cache:
    """The KV cache one generate call fills: the one place that decides its type. The default is the static
    cache: preallocated for every token the model will read, so no step copies the past (a dynamic cache
    re-allocates every layer every step, and that cost grows with the context)."""
    if cache_implementation in (None, "static"):
        return StaticCache(model.config, batch_size, max(length, 1), device=model.device, dtype=model.dtype)
    if cache_implementation == "dynamic":
        return DynamicCache()
    raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {cache_implementation!r}")


def fill_cache(cache: Cache, past: Any, expand: int) -> Cache:
    """Copy an earlier cache (ours or legacy (key, value) pairs) into `cache`, each row repeated `expand` times."""
    for i, (key, value) in enumerate(past):
        cache.update(key.repeat_interleave(expand, dim=0), value.repeat_interleave(expand, dim=0), i)
    return cache


def decode_model(model: Any, compile: bool | dict) -> Any:
    """The callable that runs the model: with `compile`, one-token decode steps go through torch.compile
    (compiled once per model and kept; the KV length is a dynamic dimension, so growing it does not recompile),
    while the prefill, run once per call, stays eager."""
    if not compile:
        return model
    options = {"dynamic": True, **(compile if isinstance(compile, dict) else {})}
    if options.get("backend", "inductor") == "inductor" and model.device.type == "cpu":
        # On CPU a one-token step is ~70 small kernels around the GEMVs; a C++ wrapper launches them without
        # Python in between (a few ms of a 125m token's ~35).
        options["options"] = {"cpp_wrapper": True, **options.get("options", {})}
    key = repr(sorted(options.items()))
    compiled = model.__dict__.setdefault("_compiled_decode", {})
    if key not in compiled:
        compiled[key] = torch.compile(model.forward, **options)

    def forward(ids: torch.Tensor | None, **kwargs: Any) -> Any:
        return (compiled[key] if ids is not None and ids.shape[1] == 1 else model)(ids, **kwargs)

    return forward
