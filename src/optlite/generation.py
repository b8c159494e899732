"""Text generation: settings, logits processors, samplers, beam search, and the one decoding loop.

Read top to bottom: `GenerationConfig` (what the defaults are and where they come from), the logits processors
(pure functions of the scores), the samplers, the beam-search pieces, then `generate` — checks, prefill, and the
token loop — and `generate_text`, the string-in, string-out helper. Tokens match transformers' `generate` exactly
(tests/test_generation.py); the comments say where that needs a transformers quirk.

Shapes: B batch (rows after expanding for beams / returned sequences), T tokens so far, V vocabulary, K beams.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cache import Cache, DynamicCache, StaticCache
from .outputs import ModelOutput
from .streaming import ends_stream_on_error

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Maps (input_ids (B, T), scores (B, V)) to new scores, like a transformers LogitsProcessor."""

# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------

# transformers 5.23's model-agnostic defaults (GenerationConfig._get_default_generation_params), for the fields here.
DEFAULTS: dict[str, Any] = dict(
    min_length=0, do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
    no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=False, num_return_sequences=1, use_cache=True,
    output_scores=False, output_logits=False, return_dict_in_generate=False,
)
OFF: dict[str, Any] = {**DEFAULTS, "top_k": 0}  # what a setting passed as None means
DEFAULT_MAX_NEW_TOKENS = 20  # with neither max_length nor max_new_tokens set anywhere, as transformers
CONFIG_FILE = "generation_config.json"


@dataclass
class GenerationConfig:
    """How `generate` decodes; field names and meanings are transformers' `GenerationConfig`'s.

    A field left at None is taken from the next source: the `generate(...)` keyword, then this object, then
    `model.generation_config` (a checkpoint's generation_config.json), then the model config's special tokens,
    then `DEFAULTS` (transformers' own). Keys of a generation_config.json this class does not know are kept in
    `extra` and written back by `to_dict`.

    Example:
        >>> cfg = GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.9)
        >>> cfg.top_k is None  # unset: 50 (transformers' default) applies when sampling
        True
        >>> GenerationConfig.from_dict({"eos_token_id": 2, "transformers_version": "4.27"}).extra
        {'transformers_version': '4.27'}
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    num_beams: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    num_return_sequences: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool | None = None
    cache_implementation: str | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    return_dict_in_generate: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        names = set(cls.field_names())
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GenerationConfig:
        """Read `generation_config.json` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_FILE if path.is_dir() else path
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_FILE} at {file}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The special tokens of a model config (what transformers builds when a checkpoint has no file)."""
        return cls(bos_token_id=getattr(config, "bos_token_id", None),
                   eos_token_id=getattr(config, "eos_token_id", None),
                   pad_token_id=getattr(config, "pad_token_id", None))

    def to_dict(self) -> dict[str, Any]:
        """The generation_config.json dict: the fields that are set, plus unknown keys read earlier."""
        out = dict(self.extra)
        out.update({k: getattr(self, k) for k in self.field_names() if getattr(self, k) is not None})
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `generation_config.json` into `directory` and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / CONFIG_FILE
        from .saving import atomic_write

        atomic_write(file, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file


def _read(source: Any, name: str) -> Any:
    """A field of a GenerationConfig-like source: ours, transformers', a plain dict, or None."""
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(name)
    return getattr(source, name, None)


def resolve_config(model: Any, generation_config: Any = None, **overrides: Any) -> GenerationConfig:
    """Every field set: keyword overrides > `generation_config` > `model.generation_config` > the model config's
    special tokens > `DEFAULTS`. A keyword passed as None turns its setting off (eos_token_id=None: no eos, top_k=None:
    no top-k), as in transformers. Lengths are taken as a pair from the first source that sets either (None there
    means "not given"), so an explicit `max_length=` is not overruled by a checkpoint's `max_new_tokens`.
    Unknown keywords raise TypeError."""
    names = GenerationConfig.field_names()
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, names, n=1)) else repr(u)
                 for u in unknown]
        raise TypeError(f"generate() got unknown keyword argument(s): {', '.join(hints)}. "
                        f"Known settings: {', '.join(names)}, plus generator, streamer, logits_processor, "
                        "generation_config")
    config = getattr(model, "config", None)
    sources = [overrides, generation_config, getattr(model, "generation_config", None),
               {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}]
    values: dict[str, Any] = {}
    for name in names:
        if name in overrides:  # an explicit None switches a setting off (top_k=None: no top-k), as in transformers
            values[name] = overrides[name] if overrides[name] is not None else OFF.get(name)
        else:
            values[name] = next((v for s in sources if (v := _read(s, name)) is not None), DEFAULTS.get(name))
    for pair in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        source = next((s for s in sources if any(_read(s, n) is not None for n in pair)), None)
        for name in pair:
            values[name] = _read(source, name)
    if values["min_length"] is None:
        values["min_length"] = DEFAULTS["min_length"]
    return GenerationConfig(**values)


def eos_ids(eos_token_id: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    """eos_token_id as a list (it may be one id or several)."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(t) for t in eos_token_id.reshape(-1).tolist()]
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def max_total_length(cfg: GenerationConfig, prompt_len: int, max_positions: int | None) -> int:
    """Prompt plus new tokens. With no length set anywhere: 20 new tokens, cut to max_position_embeddings."""
    if cfg.max_new_tokens is not None:
        return prompt_len + cfg.max_new_tokens
    if cfg.max_length is not None:
        return cfg.max_length
    total = prompt_len + DEFAULT_MAX_NEW_TOKENS
    return min(total, max_positions) if max_positions is not None else total


def validate_config(cfg: GenerationConfig, prompt_len: int, max_positions: int | None) -> int:
    """Raise ValueError naming the setting when a value cannot work; return the total length to decode to."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(cfg.max_new_tokens is None or (is_int(cfg.max_new_tokens) and cfg.max_new_tokens >= 0),
         f"max_new_tokens must be an integer >= 0, got {cfg.max_new_tokens!r}")
    need(cfg.max_length is None or is_int(cfg.max_length), f"max_length must be an integer, got {cfg.max_length!r}")
    total = max_total_length(cfg, prompt_len, max_positions)
    need(total >= prompt_len, f"max_length={total} is shorter than the prompt ({prompt_len} tokens); "
                              "set max_new_tokens instead")
    need(max_positions is None or total <= max_positions,
         f"the prompt ({prompt_len} tokens) plus {total - prompt_len} new tokens is {total} tokens, more than the "
         f"model's max_position_embeddings={max_positions}; lower max_new_tokens / max_length")
    for name in ("min_new_tokens", "min_length", "no_repeat_ngram_size"):
        value = getattr(cfg, name)
        need(value is None or (is_int(value) and value >= 0), f"{name} must be an integer >= 0, got {value!r}")
    need(is_int(cfg.num_beams) and cfg.num_beams >= 1, f"num_beams must be an integer >= 1, got {cfg.num_beams!r}")
    need(is_int(cfg.num_return_sequences) and cfg.num_return_sequences >= 1,
         f"num_return_sequences must be an integer >= 1, got {cfg.num_return_sequences!r}")
    if cfg.num_beams > 1:
        need(cfg.num_return_sequences <= cfg.num_beams,
             f"num_return_sequences ({cfg.num_return_sequences}) must be <= num_beams ({cfg.num_beams})")
    elif not cfg.do_sample:
        need(cfg.num_return_sequences == 1,
             f"greedy decoding (do_sample=False, num_beams=1) returns one sequence per prompt; got "
             f"num_return_sequences={cfg.num_return_sequences}. Use do_sample=True or num_beams > 1")
    need(cfg.top_k is None or (is_int(cfg.top_k) and cfg.top_k >= 0),
         f"top_k must be an integer >= 0 (0 turns it off), got {cfg.top_k!r}")
    need(isinstance(cfg.top_p, (int, float)) and 0.0 < cfg.top_p <= 1.0, f"top_p must be in (0, 1], got {cfg.top_p!r}")
    need(isinstance(cfg.temperature, (int, float)) and (cfg.temperature > 0 or not cfg.do_sample),
         f"temperature must be > 0 when sampling (do_sample=True), got {cfg.temperature!r}; "
         "for deterministic output use do_sample=False")
    need(isinstance(cfg.repetition_penalty, (int, float)) and cfg.repetition_penalty > 0,
         f"repetition_penalty must be > 0 (1.0 turns it off), got {cfg.repetition_penalty!r}")
    need(isinstance(cfg.length_penalty, (int, float)), f"length_penalty must be a number, got {cfg.length_penalty!r}")
    need(cfg.early_stopping is True or cfg.early_stopping is False or cfg.early_stopping == "never",
         f"early_stopping must be True, False or 'never', got {cfg.early_stopping!r}")
    ids = cfg.eos_token_id if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id]
    need(all(t is None or is_int(t) for t in ids), f"eos_token_id must be an int or a list of ints, "
                                                   f"got {cfg.eos_token_id!r}")
    need(cfg.pad_token_id is None or is_int(cfg.pad_token_id), f"pad_token_id must be an int, got {cfg.pad_token_id!r}")
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Logits processors: (scores (B, V) float32, ...) -> new scores, never in place. Each is transformers' processor of the
# same name, operation for operation, so the processed scores agree bit for bit.
# ---------------------------------------------------------------------------------------------------------------------


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
    if cur_len >= min_length:
        return scores
    eos_mask = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)
    return torch.where(eos_mask, -float("inf"), scores)


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


def build_logits_processors(cfg: GenerationConfig, prompt_len: int, eos: torch.Tensor | None,
                            ignore_before: torch.Tensor | None = None,
                            extra: Sequence[LogitsProcessor] = ()) -> list[LogitsProcessor]:
    """The processors `cfg` asks for, in transformers' order: penalties and constraints, the caller's own
    processors, then (sampling only) temperature, top-k, top-p."""
    procs: list[LogitsProcessor] = []
    if cfg.repetition_penalty != 1.0:
        procs.append(lambda ids, s: repetition_penalty(s, ids, cfg.repetition_penalty, ignore_before))
    if cfg.no_repeat_ngram_size:
        procs.append(lambda ids, s: no_repeat_ngram(s, ids, cfg.no_repeat_ngram_size))
    min_length = prompt_len + cfg.min_new_tokens if cfg.min_new_tokens is not None else cfg.min_length
    if eos is not None and min_length > prompt_len:
        procs.append(lambda ids, s: suppress_eos(s, ids.shape[-1], min_length, eos))
    procs.extend(extra)
    if cfg.do_sample:
        # Beam sampling keeps at least one token besides the eos ids, so every beam can go on.
        keep = (eos.numel() + 1 if eos is not None else 2) if cfg.num_beams > 1 else 1
        if cfg.temperature != 1.0:
            procs.append(lambda ids, s: apply_temperature(s, cfg.temperature))
        if cfg.top_k:
            procs.append(lambda ids, s: top_k_filter(s, cfg.top_k, keep))
        if cfg.top_p < 1.0:
            procs.append(lambda ids, s: top_p_filter(s, cfg.top_p, keep))
    return procs


def process_logits(processors: Sequence[LogitsProcessor], input_ids: torch.Tensor,
                   scores: torch.Tensor) -> torch.Tensor:
    for proc in processors:
        scores = proc(input_ids, scores)
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Beam search pieces (transformers' vectorized beam search, function for function). Tensors keep a (batch, beam)
# layout; -1e9 marks "impossible" without the NaNs -inf arithmetic could bring.
# ---------------------------------------------------------------------------------------------------------------------

NEG = -1.0e9


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
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NEG)
    return improvable & (best_running > worst_finished).any(-1, keepdim=True)


def beam_search_done(improvable: torch.Tensor, is_finished: torch.Tensor, hit_stop: torch.Tensor,
                     early_stopping: bool | str) -> bool:
    """The search ends when no prompt can improve, or (early_stopping=True) all keep num_beams finished beams,
    or no beam can continue (max length reached). One host sync."""
    go_on = improvable.any() & ~(is_finished.all() & (early_stopping is True)) & ~hit_stop.all()
    return not bool(go_on)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """Greedy / sampling result with `return_dict_in_generate=True` (transformers' class of the same name).
    `scores`: processed scores per step, each (B, V); `logits`: raw logits per step (output_logits=True)."""

    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
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
    past_key_values: Any = None


# ---------------------------------------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------------------------------------


def _make_cache(model: Any, batch_size: int, max_length: int, cache_implementation: str | None) -> Cache:
    """The KV cache one generate call fills: the one place that decides its type. The default is the static
    cache: preallocated for prompt + new tokens, so no step copies the past (a dynamic cache re-allocates every
    layer every step, and that cost grows with the context)."""
    if cache_implementation in (None, "static"):
        return StaticCache(model.config, batch_size, max_length, device=model.device, dtype=model.dtype)
    if cache_implementation == "dynamic":
        return DynamicCache()
    raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {cache_implementation!r}")


def _decode_model(model: Any, compile: bool | dict) -> Any:
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

    def forward(ids: torch.Tensor, **kwargs: Any) -> Any:
        return (compiled[key] if ids.shape[1] == 1 else model)(ids, **kwargs)

    return forward


def _next_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                 cache: Cache | None) -> torch.Tensor:
    """fp32 logits (B, V) for the token after `ids`. With a cache `ids` holds only the tokens not yet cached and
    `positions` their position ids; `mask` always covers cached + new tokens (None: no padding)."""
    out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=cache is not None, logits_to_keep=1)
    return out.logits[:, -1].float()


def _prepare_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: int | None,
                  eos: list[int]) -> torch.Tensor | None:
    """Check or infer the prompt's attention mask, as transformers does; None when nothing is padded."""
    if attention_mask is None:
        if pad is None or not bool((input_ids == pad).any()):
            return None
        if pad in eos:
            warnings.warn(f"input_ids contain pad_token_id={pad}, which is also an eos token, and no attention_mask "
                          "was given, so the padding cannot be told apart: pass attention_mask for reliable "
                          "results", UserWarning, stacklevel=3)
            return None
        warnings.warn(f"input_ids contain pad_token_id={pad} but no attention_mask was given; masking those "
                      "positions as padding (as transformers does). Pass attention_mask to make this explicit",
                      UserWarning, stacklevel=3)
        attention_mask = (input_ids != pad).long()
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(input_ids.device, torch.long)
    if bool(attention_mask.all()):
        return None
    if input_ids.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
        warnings.warn("right padding detected in a batch: decoder-only generation needs left padding "
                      "(tokenizer padding_side='left') for correct results", UserWarning, stacklevel=3)
    return attention_mask


@ends_stream_on_error  # a streamer's reader gets the error, not a wait for text that never comes
@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             generation_config: GenerationConfig | dict | None = None, generator: torch.Generator | None = None,
             streamer: Any = None, logits_processor: Sequence[LogitsProcessor] | None = None,
             compile: bool | dict = False,
             **kwargs: Any) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """Continue each prompt with greedy decoding, sampling or beam search, as transformers' `generate` does.

    Returns prompt + new tokens (B * num_return_sequences, T); rows that ended early are filled with pad_token_id.
    Generation stops when every row has produced an eos token or the length limit is reached.

    Settings (keywords; any left out come from `generation_config`, then `model.generation_config`, then
    transformers' defaults, see `GenerationConfig`):
        max_new_tokens / max_length: new tokens / total length (default 20 new, within max_position_embeddings);
        min_new_tokens / min_length: eos is forbidden before that; do_sample (False), num_beams (1);
        temperature (1.0), top_k (50, 0 = off), top_p (1.0): sampling only; repetition_penalty (1.0),
        no_repeat_ngram_size (0); length_penalty (1.0), early_stopping (False | True | "never"): beam search;
        num_return_sequences (1); eos_token_id (int or list), pad_token_id, bos_token_id; use_cache (True),
        cache_implementation ("static", or "dynamic"); return_dict_in_generate, output_scores, output_logits (False).
    Other arguments: `generator` draws the samples (reproducible sampling; default: torch's global generator),
    `streamer` receives the prompt then each new token through `put(ids)` and `end()` (greedy / sampling, one row),
    `logits_processor` is a list of extra `f(input_ids, scores) -> scores`. `compile=True` (or a dict of
    `torch.compile` options) compiles the one-token decode step; it pays off on long generations and on GPUs.

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> from optlite.generation import generate
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
        >>> generate(model, torch.tensor([[2, 31414, 6]]), max_new_tokens=4).shape
        torch.Size([1, 7])
    """
    cfg = resolve_config(model, generation_config, **kwargs)
    if input_ids is None:
        if cfg.bos_token_id is None:
            raise ValueError("input_ids is None and no bos_token_id is set to start from")
        input_ids = torch.full((1, 1), cfg.bos_token_id, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (batch, prompt_length) tensor with at least one token, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    model_config = getattr(model, "config", None)
    prompt_len = input_ids.shape[1]
    max_len = validate_config(cfg, prompt_len, getattr(model_config, "max_position_embeddings", None))
    beam = cfg.num_beams > 1
    if beam and streamer is not None:
        raise ValueError("streamer works with greedy decoding and sampling only; got num_beams="
                         f"{cfg.num_beams}")
    eos_list = eos_ids(cfg.eos_token_id)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_list[0] if eos_list else None)

    device = getattr(model, "device", input_ids.device)
    input_ids = input_ids.to(device)
    mask = _prepare_mask(input_ids, attention_mask, pad, eos_list)

    expand = max(cfg.num_beams, cfg.num_return_sequences)
    if expand > 1:
        input_ids = input_ids.repeat_interleave(expand, dim=0)
        mask = mask.repeat_interleave(expand, dim=0) if mask is not None else None
    batch = input_ids.shape[0]
    if compile and not cfg.use_cache:
        raise ValueError("compile=True needs use_cache=True: only the one-token decode step is compiled")
    cache = _make_cache(model, batch, max_len, cfg.cache_implementation) if cfg.use_cache else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    eos = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
    # transformers' repetition penalty skips the left padding of each row.
    ignore_before = mask.argmax(dim=1) if mask is not None and cfg.repetition_penalty != 1.0 else None
    processors = build_logits_processors(cfg, prompt_len, eos, ignore_before, logits_processor or ())

    if mask is not None:  # one preallocated mask: each step attends to one more column of ones
        full_mask = torch.ones((batch, max_len), dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = mask
    else:
        full_mask = None
    # Position of each row's last prompt token (pads excluded); each new token takes the next one.
    if mask is not None:
        positions = ((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))[:, -1:]  # (B, 1)
    else:
        positions = torch.full((batch, 1), prompt_len - 1, dtype=torch.long, device=device)

    decode = _beam_search if beam else _sample
    return decode(_decode_model(model, compile), input_ids, full_mask, positions, cache, cfg, max_len, processors, eos,
                  pad, generator, streamer)


def _step_inputs(ids: torch.Tensor, cur: int, full_mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: Cache | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What the model reads for the next token. `ids` are the `cur` tokens so far (B, cur) or, with a cache, may be
    just the newest (B, 1): with a cache the model reads only that token, without one the whole sequence again."""
    mask = full_mask[:, :cur] if full_mask is not None else None
    if cache is None:
        return ids, mask, None  # the model derives the positions from the mask
    return ids[:, -1:], mask, positions


def _sample(model: Any, input_ids: torch.Tensor, full_mask: torch.Tensor | None, positions: torch.Tensor,
            cache: Cache | None, cfg: GenerationConfig, max_len: int, processors: list[LogitsProcessor],
            eos: torch.Tensor | None, pad: int | None, generator: torch.Generator | None,
            streamer: Any) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Greedy decoding or multinomial sampling: one model forward per new token."""
    batch, cur = input_ids.shape
    keep_scores = cfg.return_dict_in_generate and cfg.output_scores
    keep_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    ids = torch.full((batch, max_len), pad if pad is not None else 0, dtype=torch.long, device=input_ids.device)
    ids[:, :cur] = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    pad_t = torch.tensor(pad if pad is not None else 0, device=input_ids.device)

    if cur < max_len:
        mask = full_mask[:, :cur] if full_mask is not None else None
        logits = _next_logits(model, input_ids, mask, None, cache)  # prefill: the model finds positions itself
    while cur < max_len:
        scores = process_logits(processors, ids[:, :cur], logits)
        if keep_scores:
            scores_out.append(scores)
        if keep_logits:
            logits_out.append(logits)
        token = sample_token(scores, generator) if cfg.do_sample else greedy_token(scores)
        if eos is not None:
            token = torch.where(unfinished, token, pad_t)  # rows already ended get padding
        ids[:, cur] = token
        cur += 1
        if streamer is not None:
            streamer.put(token.cpu())
        if eos is not None:
            unfinished &= ~torch.isin(token, eos)
            if not bool(unfinished.any()):  # the one host sync per step
                break
        if cur == max_len:
            break
        positions += 1
        logits = _next_logits(model, *_step_inputs(ids[:, :cur], cur, full_mask, positions, cache), cache)
    if streamer is not None:
        streamer.end()

    sequences = ids if cur == max_len else ids[:, :cur].clone()
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores_out) if keep_scores else None,
                                     logits=tuple(logits_out) if keep_logits else None, past_key_values=cache)


def _beam_search(model: Any, input_ids: torch.Tensor, full_mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: Cache | None, cfg: GenerationConfig, max_len: int, processors: list[LogitsProcessor],
                 eos: torch.Tensor | None, pad: int | None, generator: torch.Generator | None,
                 streamer: Any) -> torch.Tensor | GenerateBeamDecoderOnlyOutput:
    """Beam search (or beam sampling with do_sample=True), vectorized over prompts and beams as transformers does.

    Each step keeps K' = max(2, 1 + #eos) * K candidates, so that K beams can go on even when the best ones end.
    Finished candidates among the top K enter a per-prompt pool of the K best finished beams, scored by
    `length_normalized`; the running beams continue until `beam_search_done`."""
    rows, prompt_len = input_ids.shape
    beams = cfg.num_beams
    batch = rows // beams
    device = input_ids.device
    count = max(2, 1 + (eos.numel() if eos is not None else 0)) * beams
    new_max = max_len - prompt_len
    lp, early = cfg.length_penalty, cfg.early_stopping
    keep_scores = cfg.return_dict_in_generate and cfg.output_scores
    keep_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    # transformers fills unused positions with `pad or eos[0]` (-1 without eos, where every beam has full length).
    fill = (pad if pad else int(eos[0])) if eos is not None else -1
    running = torch.full((batch, beams, max_len), fill, dtype=torch.long, device=device)  # (B, K, L)
    running[:, :, :prompt_len] = input_ids.view(batch, beams, prompt_len)
    finished = running.clone()
    running_scores = torch.zeros((batch, beams), device=device)
    running_scores[:, 1:] = NEG  # the K copies of a prompt are identical: start from the first only
    finished_scores = torch.full((batch, beams), NEG, device=device)
    is_finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_src = torch.full((batch, beams, new_max), -1, dtype=torch.int32, device=device)  # row of step t's parent
    finished_src = running_src.clone()
    among_top = torch.arange(count, device=device) < beams  # only the top K candidates may finish
    row_offset = torch.arange(batch, device=device).view(-1, 1) * beams

    cur = prompt_len
    if cur < max_len:
        mask = full_mask[:, :cur] if full_mask is not None else None
        logits = _next_logits(model, input_ids, mask, None, cache)
    while cur < max_len:
        history = running[:, :, :cur].reshape(rows, cur) if processors else None  # (B*K, T): a copy, so only if read
        log_probs = process_logits(processors, history, F.log_softmax(logits, dim=-1))
        if keep_scores:
            scores_out.append(log_probs.clone())
        if keep_logits:
            logits_out.append(logits.clone())
        vocab = log_probs.shape[-1]
        accumulated = log_probs.view(batch, beams, vocab) + running_scores[:, :, None]
        top_scores, src, tokens = top_continuations(accumulated, count, cfg.do_sample, generator)

        cand = gather_beams(running, src)  # (B, K', L)
        cand[:, :, cur] = tokens
        cand_src = gather_beams(running_src, src)
        cand_src[:, :, cur - prompt_len] = (src + row_offset).to(torch.int32)
        hit_stop = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
        hit_stop = hit_stop | (cur + 1 >= max_len)

        # The K best candidates that did not stop run on.
        run_scores = top_scores + hit_stop.to(torch.float32) * NEG
        keep = torch.topk(run_scores, k=beams)[1]
        running, running_scores = gather_beams(cand, keep), gather_beams(run_scores, keep)
        running_src = gather_beams(cand_src, keep)

        # Stopped candidates among the top K join the finished pool if they beat its worst member.
        just_finished = hit_stop & among_top[None, :]
        cand_final = length_normalized(top_scores, cur + 1 - prompt_len, lp)
        cand_final += (is_finished.all(-1, keepdim=True) & (early is True)).to(torch.float32) * NEG
        cand_final += (~improvable).to(torch.float32) * NEG
        cand_final += (~just_finished) * NEG
        merged_scores = torch.cat((finished_scores, cand_final), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        finished = gather_beams(torch.cat((finished, cand), dim=1), best)
        finished_scores = gather_beams(merged_scores, best)
        finished_src = gather_beams(torch.cat((finished_src, cand_src), dim=1), best)
        is_finished = gather_beams(torch.cat((is_finished, just_finished), dim=1), best)

        cur += 1
        improvable = can_still_improve(improvable, running_scores, finished_scores, is_finished, cur, max_len,
                                       prompt_len, early, lp)
        done = beam_search_done(improvable, is_finished, hit_stop, early)
        if cache is not None and (not done or cfg.return_dict_in_generate):
            cache.reorder_cache(running_src[:, :, cur - 1 - prompt_len].reshape(-1))
        if done:
            break
        positions += 1
        step_ids = running[:, :, cur - 1:cur] if cache is not None else running[:, :, :cur]
        logits = _next_logits(model, *_step_inputs(step_ids.reshape(rows, -1), cur, full_mask, positions, cache),
                              cache)

    n = cfg.num_return_sequences
    sequences = finished[:, :n].reshape(batch * n, max_len)
    seq_scores = finished_scores[:, :n].reshape(batch * n)
    beam_indices = finished_src[:, :n].reshape(batch * n, new_max)
    generated = int((beam_indices >= 0).sum(1).max()) if new_max else 0
    sequences = sequences[:, :prompt_len + generated]
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=seq_scores if cfg.output_scores else None,
        scores=tuple(scores_out) if keep_scores else None, logits=tuple(logits_out) if keep_logits else None,
        beam_indices=beam_indices[:, :generated], past_key_values=cache)


# ---------------------------------------------------------------------------------------------------------------------
# Strings in, strings out
# ---------------------------------------------------------------------------------------------------------------------


def generate_text(model: Any, tokenizer: Any, prompt: str | Sequence[str],
                  **generate_kwargs: Any) -> str | list[str] | list[list[str]]:
    """Continue one prompt or a batch of prompts and return only the new text.

    The tokenizer adds OPT's one `</s>` (BOS) itself; batches are left-padded; the continuation is decoded with
    `skip_special_tokens=True`. A string gives a string (a list of strings with num_return_sequences > 1); a list
    of prompts gives a list (of lists with num_return_sequences > 1).

    Example:
        >>> text = generate_text(model, tokenizer, "Paris is the capital of", max_new_tokens=8)  # doctest: +SKIP
        >>> texts = generate_text(model, tokenizer, ["Hello,", "A photo of"], do_sample=True, top_p=0.9,
        ...                       generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    device = getattr(model, "device", None)
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    out = generate(model, ids, mask, **generate_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    texts = tokenizer.batch_decode(sequences[:, ids.shape[1]:].tolist(), skip_special_tokens=True)
    n = len(texts) // len(prompts)
    groups = [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
    if single:
        return groups[0][0] if n == 1 else groups[0]
    return [g[0] for g in groups] if n == 1 else groups
