"""Text generation: the settings, their checks, and `generate`, which prepares one decode and hands it to a loop.

Read top to bottom: `GenerationConfig` (what the defaults are and where they come from), `resolve_config` and
`validate_config`, then `generate` — inputs checked, the decode state built, the search run — and `generate_text`,
the string-in, string-out helper. The processors live in `logits_processors.py`, the stopping criteria in
`stopping.py`, the loops in `search.py`, assisted decoding in `assisted.py`. Tokens match transformers' `generate`
exactly (tests/test_generation*.py).

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

from . import search as _search
from .assisted import Drafter, assisted_decode
from .config import read_json_object
from .logits_processors import (
    LogitsProcessor,
    apply_temperature,
    build_logits_processors,
    no_repeat_ngram,
    repetition_penalty,
    suppress_eos,
    top_k_filter,
    top_p_filter,
)
from .search import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    beam_search_done,
    can_still_improve,
    gather_beams,
    greedy_token,
    length_normalized,
    sample_token,
    top_continuations,
)
from .stopping import StoppingCriterion, max_time_criterion, stop_string_criterion
from .streaming import ends_stream_on_error

__all__ = [  # the names this module has always offered, wherever they live now
    "DEFAULTS", "GenerateBeamDecoderOnlyOutput", "GenerateDecoderOnlyOutput", "GenerationConfig", "LogitsProcessor",
    "apply_temperature", "beam_search_done", "build_logits_processors", "can_still_improve", "gather_beams",
    "generate", "generate_text", "greedy_token", "length_normalized", "no_repeat_ngram", "repetition_penalty",
    "resolve_config", "sample_token", "suppress_eos", "top_continuations", "top_k_filter", "top_p_filter",
]

# ------------------------------------------------------------------------------------------------------------- settings

# transformers 5.23's model-agnostic defaults (GenerationConfig._get_default_generation_params), for the fields here.
DEFAULTS: dict[str, Any] = dict(
    min_length=0, do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0,
    no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=False, num_return_sequences=1, use_cache=True,
    output_scores=False, output_logits=False, return_dict_in_generate=False, typical_p=1.0, epsilon_cutoff=0.0,
    eta_cutoff=0.0, remove_invalid_values=False, renormalize_logits=False, output_attentions=False,
    output_hidden_states=False, num_assistant_tokens=20, num_assistant_tokens_schedule="constant",
    assistant_confidence_threshold=0.4,
)
SWITCHED_OFF: dict[str, Any] = {**DEFAULTS, "top_k": 0}  # what a setting passed as None means
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
    output_attentions: bool | None = None
    output_hidden_states: bool | None = None
    # token control
    bad_words_ids: list[list[int]] | None = None
    sequence_bias: Any = None  # [[token ids, bias], ...] or {tuple of ids: bias}
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    # sampling filters and scores
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    remove_invalid_values: bool | None = None
    renormalize_logits: bool | None = None
    # stopping
    stop_strings: str | list[str] | None = None
    max_time: float | None = None
    # assisted decoding
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int | None = None
    num_assistant_tokens_schedule: str | None = None
    assistant_confidence_threshold: float | None = None
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
        return cls.from_dict(read_json_object(path / CONFIG_FILE if path.is_dir() else path, CONFIG_FILE))

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

    def to_diff_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults: those set (transformers' pipelines read this)."""
        return self.to_dict()

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given fields (as transformers' `GenerationConfig.update`); returns the keywords it does not know."""
        names = set(self.field_names())
        for key, value in kwargs.items():
            if key in names:
                setattr(self, key, value)
        return {k: v for k, v in kwargs.items() if k not in names}

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


CALL_ARGUMENTS = ("generation_config", "generator", "streamer", "logits_processor", "stopping_criteria", "tokenizer",
                  "inputs_embeds", "past_key_values", "logits_to_keep", "assistant_model", "compile")

# transformers 5 moved these strategies to Hub repositories ("custom_generate"); the setting that selects each one.
MOVED = {"penalty_alpha": "contrastive search", "dola_layers": "DoLa decoding", "num_beam_groups": "group beam search",
         "diversity_penalty": "group beam search", "constraints": "constrained beam search",
         "force_words_ids": "constrained beam search"}


def refuse_moved_strategies(overrides: dict[str, Any], generation_config: Any) -> None:
    """Raise ValueError for a decoding strategy transformers 5 no longer ships (and optlite does not implement)."""
    for name, strategy in MOVED.items():
        value = overrides.get(name, _read(generation_config, name))
        if value is not None and value is not False and value != 1 and value != 0.0:
            raise ValueError(f"{name}={value!r} asks for {strategy}, which transformers 5 moved to a Hub repository "
                             "and optlite does not implement; use greedy decoding, sampling or beam search")


def resolve_config(model: Any, generation_config: Any = None, **overrides: Any) -> GenerationConfig:
    """Every field set: keyword overrides > `generation_config` > `model.generation_config` > the model config's
    special tokens > `DEFAULTS`. A keyword passed as None turns its setting off (eos_token_id=None: no eos, top_k=None:
    no top-k), as in transformers. Lengths are taken as a pair from the first source that sets either (None there
    means "not given"), so an explicit `max_length=` is not overruled by a checkpoint's `max_new_tokens`.
    Unknown keywords raise TypeError."""
    names = GenerationConfig.field_names()
    refuse_moved_strategies(overrides, generation_config)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, names, n=1)) else repr(u)
                 for u in unknown]
        raise TypeError(f"generate() got unknown keyword argument(s): {', '.join(hints)}. "
                        f"Known settings: {', '.join(names)}, plus {', '.join(CALL_ARGUMENTS)}")
    config = getattr(model, "config", None)
    sources = [overrides, generation_config, getattr(model, "generation_config", None),
               {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}]
    values: dict[str, Any] = {}
    for name in names:
        if name in overrides:  # an explicit None switches a setting off (top_k=None: no top-k), as in transformers
            values[name] = overrides[name] if overrides[name] is not None else SWITCHED_OFF.get(name)
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


def validate_config(cfg: GenerationConfig, prompt_len: int, max_positions: int | None, context: int = 0) -> int:
    """Raise ValueError naming the setting when a value cannot work; return the total length to decode to.
    `context` counts the tokens the model reads besides the `prompt_len` ids (an inputs_embeds prompt)."""
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
    # The last new token is never fed back, so the model reads one token fewer than the sequence holds.
    need(max_positions is None or context + total - 1 <= max_positions,
         f"the prompt ({context + prompt_len} tokens) plus {total - prompt_len} new tokens needs the model to read "
         f"{context + total - 1} tokens, more than its max_position_embeddings={max_positions}; "
         "lower max_new_tokens / max_length")
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




def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_lists(value: Any) -> bool:
    """A non-empty list of non-empty lists of token ids (ints >= 0)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(w, (list, tuple)) and w and all(_is_int(t) and t >= 0 for t in w) for w in value))


def _check_vocab(name: str, ids: Any, vocab: int | None) -> None:
    flat = [t for w in ids for t in w] if ids and isinstance(ids[0], (list, tuple)) else list(ids)
    too_big = [t for t in flat if vocab is not None and t >= vocab]
    if too_big:
        raise ValueError(f"{name} holds ids {too_big} outside the vocabulary of {vocab} tokens")


def validate_processor_settings(cfg: GenerationConfig, vocab: int | None) -> None:
    """Raise ValueError naming the setting when a token-control or filter setting cannot work."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    if cfg.bad_words_ids is not None:
        need(_token_lists(cfg.bad_words_ids), "bad_words_ids must be a non-empty list of lists of token ids "
             f"(ints >= 0), e.g. [[1212], [13, 14]]; got {cfg.bad_words_ids!r}")
        _check_vocab("bad_words_ids", cfg.bad_words_ids, vocab)
    if cfg.sequence_bias is not None:
        pairs = cfg.sequence_bias.items() if isinstance(cfg.sequence_bias, dict) else cfg.sequence_bias
        ok = isinstance(pairs, (list, tuple, type({}.items()))) and len(pairs) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _token_lists([p[0]]) and isinstance(p[1], (int, float))
            and not isinstance(p[1], bool) for p in pairs)
        need(ok, "sequence_bias must be a non-empty list of [token ids, bias] pairs (or a dict {tuple of ids: bias}), "
                 f"e.g. [[[1212], -5.0]]; got {cfg.sequence_bias!r}")
        _check_vocab("sequence_bias", [list(p[0]) for p in pairs], vocab)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        value = getattr(cfg, name)
        if value is not None:
            need(isinstance(value, (list, tuple)) and all(_is_int(t) and t >= 0 for t in value),
                 f"{name} must be a list of token ids, got {value!r}")
            _check_vocab(name, value, vocab)
    forced = cfg.forced_eos_token_id if isinstance(cfg.forced_eos_token_id, list) else [cfg.forced_eos_token_id]
    for name, ids in (("forced_bos_token_id", [cfg.forced_bos_token_id]), ("forced_eos_token_id", forced)):
        need(all(t is None or (_is_int(t) and t >= 0) for t in ids), f"{name} must be a token id, got {ids!r}")
        _check_vocab(name, [t for t in ids if t is not None], vocab)
    _validate_filters(cfg, need)


def _validate_filters(cfg: GenerationConfig, need: Callable[[bool, str], None]) -> None:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    need(cfg.min_p is None or (number(cfg.min_p) and 0.0 <= cfg.min_p <= 1.0), f"min_p must be in [0, 1], got "
                                                                                 f"{cfg.min_p!r}")
    need(number(cfg.typical_p) and 0.0 < cfg.typical_p <= 1.0, f"typical_p must be in (0, 1], got {cfg.typical_p!r}")
    for name in ("epsilon_cutoff", "eta_cutoff"):
        value = getattr(cfg, name)
        need(number(value) and 0.0 <= value < 1.0, f"{name} must be in [0, 1) (0 turns it off), got {value!r}")
    decay = cfg.exponential_decay_length_penalty
    need(decay is None or (isinstance(decay, (list, tuple)) and len(decay) == 2 and _is_int(decay[0])
                           and number(decay[1])),
         f"exponential_decay_length_penalty must be (start_index, decay_factor), got {decay!r}")
    need(cfg.max_time is None or (number(cfg.max_time) and cfg.max_time > 0),
         f"max_time must be a number of seconds > 0, got {cfg.max_time!r}")
    stops = cfg.stop_strings
    need(stops is None or isinstance(stops, str) or (isinstance(stops, (list, tuple)) and stops
                                                     and all(isinstance(x, str) and x for x in stops)),
         f"stop_strings must be a string or a list of non-empty strings, got {stops!r}")


def stopping_criteria_for(cfg: GenerationConfig, tokenizer: Any,
                          extra: Sequence[StoppingCriterion] | None) -> list[StoppingCriterion]:
    """transformers' criteria besides eos and the length limit, which the loops check themselves: max_time,
    stop_strings, then the caller's own (a transformers StoppingCriteriaList works as given)."""
    criteria: list[StoppingCriterion] = []
    if cfg.max_time is not None:
        criteria.append(max_time_criterion(cfg.max_time))
    if cfg.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer to read the generated text: pass tokenizer=... to "
                             "generate()")
        criteria.append(stop_string_criterion(cfg.stop_strings, tokenizer))
    if extra is not None:
        if not all(callable(c) for c in extra):
            raise TypeError("stopping_criteria must be a list of callables (input_ids, scores) -> bool tensor, such as "
                            "a transformers StoppingCriteriaList")
        criteria.extend(extra)
    return criteria


# -------------------------------------------- the generate call: inputs checked, the decode state built, the search run


@dataclass
class Prompt:
    """The checked inputs of one generate call, before expanding for beams."""

    ids: torch.Tensor  # (B, T) prompt ids; T = 0 for a prompt given only as inputs_embeds
    mask: torch.Tensor | None  # (B, context) or None when nothing is padded
    embeds: torch.Tensor | None = None  # (B, context, word_embed_proj_dim)
    past: Any = None  # the cache to continue from
    past_len: int = 0

    @property
    def context(self) -> int:
        """Tokens the model reads before the first new one (cached ones included)."""
        return self.embeds.shape[1] if self.embeds is not None else self.ids.shape[1]


def _check_ids(input_ids: Any, allow_empty: bool) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or (input_ids.shape[1] == 0 and not allow_empty):
        raise ValueError(f"input_ids must be a (batch, prompt_length) tensor with at least one token, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")


def _check_embeds(model: Any, embeds: torch.Tensor, input_ids: torch.Tensor | None) -> None:
    width = getattr(getattr(model, "config", None), "word_embed_proj_dim", None)
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or not embeds.dtype.is_floating_point \
            or (width is not None and embeds.shape[-1] != width) or embeds.shape[1] == 0:
        shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"inputs_embeds must be a float (batch, prompt_length, {width}) tensor (the width is "
                         f"config.word_embed_proj_dim), got {shape}")
    if input_ids is not None and (input_ids.shape[0] != embeds.shape[0]
                                  or input_ids.shape[1] not in (0, embeds.shape[1])):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(embeds.shape)} must describe "
                         "the same prompt: same batch and length")


def _past_length(past: Any) -> int:
    if hasattr(past, "get_seq_length"):
        return past.get_seq_length()
    try:
        return int(past[0][0].shape[-2]) if len(past) else 0
    except (TypeError, IndexError, AttributeError):
        raise ValueError("past_key_values must be a cache returned by the model or generate, or a tuple of (key, "
                         f"value) pairs per layer; got {type(past).__name__}") from None


def _prompt(model: Any, cfg: GenerationConfig, input_ids: Any, attention_mask: Any, inputs_embeds: Any,
            past_key_values: Any, pad: int | None, eos: list[int]) -> Prompt:
    """Check the inputs (before any compute) and find the prompt's mask, as transformers does."""
    device = getattr(model, "device", None)
    if inputs_embeds is not None:
        _check_embeds(model, inputs_embeds, input_ids)
        if past_key_values is not None:
            raise ValueError("past_key_values cannot be combined with inputs_embeds: continue with input_ids")
        if input_ids is None:
            input_ids = torch.zeros((inputs_embeds.shape[0], 0), dtype=torch.long)
    elif input_ids is None:
        if cfg.bos_token_id is None:
            raise ValueError("input_ids is None and no bos_token_id is set to start from")
        input_ids = torch.full((1, 1), cfg.bos_token_id, dtype=torch.long)
    _check_ids(input_ids, allow_empty=inputs_embeds is not None)
    input_ids = input_ids.to(device if device is not None else input_ids.device)
    if inputs_embeds is not None:
        mask = _embeds_mask(attention_mask, inputs_embeds)
        return Prompt(input_ids, mask, inputs_embeds.to(input_ids.device, getattr(model, "dtype", None)))
    mask = _prepare_mask(input_ids, attention_mask, pad, eos)
    prompt = Prompt(input_ids, mask)
    if past_key_values is not None:
        prompt.past, prompt.past_len = past_key_values, _past_length(past_key_values)
        if prompt.past_len >= input_ids.shape[1]:
            raise ValueError(f"past_key_values holds {prompt.past_len} tokens but input_ids / attention_mask cover "
                             f"only {input_ids.shape[1]}: pass the whole sequence so far (the cached tokens and at "
                             "least one more), e.g. generate(out.sequences, past_key_values=out.past_key_values)")
    if pad is not None and input_ids.shape[0] > 1 and _right_padded(input_ids, attention_mask, pad):
        warnings.warn("A decoder-only architecture is being used, but right-padding was detected! For correct "
                      "generation results, please set `padding_side='left'` when initializing the tokenizer.",
                      UserWarning, stacklevel=4)
    return prompt


def _right_padded(input_ids: torch.Tensor, attention_mask: Any, pad: int) -> bool:
    """transformers' test: a 0 in the mask's last column, or without a mask, a pad id there."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape:
        return bool((attention_mask[:, -1] == 0).any())
    return bool((input_ids[:, -1] == pad).any())


def _embeds_mask(attention_mask: Any, embeds: torch.Tensor) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"attention_mask must be (batch, prompt_length) = {tuple(embeds.shape[:2])} for these "
                         f"inputs_embeds, got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(embeds.device, torch.long)
    return None if bool(mask.all()) else mask


def _prepare_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: int | None,
                  eos: list[int]) -> torch.Tensor | None:
    """Check or infer the prompt's attention mask, as transformers does; None when nothing is padded."""
    if attention_mask is None:
        if pad is None or not bool((input_ids == pad).any()):
            return None
        if pad in eos:
            warnings.warn(f"input_ids contain pad_token_id={pad}, which is also an eos token, and no attention_mask "
                          "was given, so the padding cannot be told apart: pass attention_mask for reliable "
                          "results", UserWarning, stacklevel=4)
            return None
        warnings.warn(f"input_ids contain pad_token_id={pad} but no attention_mask was given; masking those "
                      "positions as padding (as transformers does). Pass attention_mask to make this explicit",
                      UserWarning, stacklevel=4)
        attention_mask = (input_ids != pad).long()
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(input_ids.device, torch.long)
    return None if bool(attention_mask.all()) else attention_mask


def _check_call(cfg: GenerationConfig, prompt: Prompt, streamer: Any, compile: bool | dict,
                logits_to_keep: Any) -> None:
    if cfg.num_beams > 1 and streamer is not None:
        raise ValueError(f"streamer works with greedy decoding and sampling only; got num_beams={cfg.num_beams}")
    if prompt.past is not None and not cfg.use_cache:
        raise ValueError("past_key_values needs use_cache=True: without a cache every step reads the whole sequence")
    if compile and not cfg.use_cache:
        raise ValueError("compile=True needs use_cache=True: only the one-token decode step is compiled")
    if logits_to_keep is not None and not (isinstance(logits_to_keep, torch.Tensor)
                                           or (_is_int(logits_to_keep) and logits_to_keep >= 0)):
        raise ValueError(f"logits_to_keep must be an integer >= 0 or a tensor of positions, got {logits_to_keep!r}")


def _drafter(model: Any, cfg: GenerationConfig, prompt: Prompt, assistant: Any) -> Drafter | None:
    """The drafter assisted decoding asks for (None: plain decoding), after checking it can work."""
    lookup = cfg.prompt_lookup_num_tokens
    if assistant is None and lookup is None:
        return None
    if assistant is not None and lookup is not None:
        raise ValueError("pass either assistant_model or prompt_lookup_num_tokens, not both")
    if lookup is not None and not (_is_int(lookup) and lookup >= 1):
        raise ValueError(f"prompt_lookup_num_tokens must be an integer >= 1, got {lookup!r}")
    if cfg.num_beams > 1 or cfg.num_return_sequences > 1:
        raise ValueError("assisted decoding works with greedy decoding and sampling and one sequence per prompt; "
                         f"got num_beams={cfg.num_beams}, num_return_sequences={cfg.num_return_sequences}")
    if not cfg.use_cache:
        raise ValueError("assisted decoding needs use_cache=True: the model checks each draft against its cache")
    if prompt.ids.shape[0] != 1 or prompt.embeds is not None:
        raise ValueError("assisted decoding takes one prompt of input_ids at a time (as in transformers); got "
                         f"{'inputs_embeds' if prompt.embeds is not None else f'a batch of {prompt.ids.shape[0]}'}")
    if assistant is not None:
        ours, theirs = (getattr(getattr(m, "config", None), "vocab_size", None) for m in (model, assistant))
        if ours != theirs:
            raise ValueError(f"assistant_model has a vocabulary of {theirs} tokens but the model has {ours}: the "
                             "assistant must share the model's tokenizer")
    if cfg.num_assistant_tokens_schedule not in ("constant", "heuristic", "heuristic_transient"):
        raise ValueError("num_assistant_tokens_schedule must be 'constant' or 'heuristic', got "
                         f"{cfg.num_assistant_tokens_schedule!r}")
    return Drafter(assistant, lookup, cfg.max_matching_ngram_size or 2, lookup or cfg.num_assistant_tokens,
                   cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold)


def _decode_state(model: Any, cfg: GenerationConfig, prompt: Prompt, max_len: int, compile: bool | dict
                  ) -> tuple[_search.DecodeState, torch.Tensor | None]:
    """Expand the prompt for beams / returned sequences and build what the loops carry: the mask and position of
    every column, and the cache (a fresh one, holding a copy of `past_key_values` when given)."""
    expand = max(cfg.num_beams, cfg.num_return_sequences)
    ids, mask, embeds = prompt.ids, prompt.mask, prompt.embeds
    if expand > 1:
        ids = ids.repeat_interleave(expand, dim=0)
        mask = mask.repeat_interleave(expand, dim=0) if mask is not None else None
        embeds = embeds.repeat_interleave(expand, dim=0) if embeds is not None else None
    batch, context, device = ids.shape[0], prompt.context, ids.device
    offset, new = context - ids.shape[1], max_len - ids.shape[1]
    full_mask = None
    if mask is not None:  # one preallocated mask: each step attends to one more column of ones
        full_mask = torch.ones((batch, context + new), dtype=torch.long, device=device)
        full_mask[:, :context] = mask
    positions = _search.all_positions(_search.prompt_positions(mask, batch, context, device), new)
    cache = None
    if cfg.use_cache:  # every token but the last new one is read, so the cache holds context + new - 1
        cache = _search.make_cache(model, batch, context + new - 1, cfg.cache_implementation)
        if prompt.past is not None:
            _search.fill_cache(cache, prompt.past, expand)
    want = {k: True for k in ("output_attentions", "output_hidden_states")
            if cfg.return_dict_in_generate and getattr(cfg, k)}
    state = _search.DecodeState(_search.decode_model(model, compile), ids, full_mask, positions, cache, offset,
                                prompt.past_len, want)
    return state, embeds


def _call_config(model: Any, generation_config: GenerationConfig | dict | None, input_ids: torch.Tensor | None,
                 inputs_embeds: torch.Tensor | None, kwargs: dict[str, Any]) -> GenerationConfig:
    """The settings of one generate call (`resolve_config`), adjusted for a prompt given as embeddings."""
    cfg = resolve_config(model, generation_config, **kwargs)
    if inputs_embeds is not None:
        cfg.use_cache = True  # as transformers: the embeddings are read once, by the prefill
        if (input_ids is None or input_ids.shape[1] == 0) and cfg.max_new_tokens is None and cfg.max_length:
            cfg.max_length -= inputs_embeds.shape[1]  # a max_length counts the embedded prompt too
    return cfg


def _call_processors(cfg: GenerationConfig, state: _search.DecodeState, prompt: Prompt, max_len: int,
                     eos: torch.Tensor | None, extra: Sequence[LogitsProcessor] | None) -> list[LogitsProcessor]:
    """The logits processors of one generate call: those its settings ask for, then the caller's `extra` ones."""
    # transformers' repetition penalty skips the left padding of each row.
    ignore_before = state.mask[:, :prompt.context].argmax(dim=1) \
        if state.mask is not None and cfg.repetition_penalty != 1.0 else None
    return build_logits_processors(cfg, prompt.ids.shape[1], max_len, eos, ignore_before, extra or ())


@ends_stream_on_error  # a streamer's reader gets the error, not a wait for text that never comes
@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             generation_config: GenerationConfig | dict | None = None, generator: torch.Generator | None = None,
             streamer: Any = None, logits_processor: Sequence[LogitsProcessor] | None = None,
             stopping_criteria: Sequence[StoppingCriterion] | None = None, tokenizer: Any = None,
             inputs_embeds: torch.Tensor | None = None, past_key_values: Any = None, logits_to_keep: Any = None,
             assistant_model: Any = None, compile: bool | dict = False,
             **kwargs: Any) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """Continue each prompt with greedy decoding, sampling or beam search, as transformers' `generate` does.

    Returns prompt + new tokens (B * num_return_sequences, T); rows that ended early are filled with pad_token_id.
    Generation stops when every row has produced an eos token, met a stopping criterion, or reached the length limit.

    Settings (keywords; any left out come from `generation_config`, then `model.generation_config`, then
    transformers' defaults, see `GenerationConfig`; all have transformers' meaning):
        lengths: max_new_tokens / max_length (default 20 new, within max_position_embeddings), min_new_tokens /
        min_length; search: do_sample (False), num_beams (1), num_return_sequences (1), length_penalty,
        early_stopping; sampling: temperature, top_k (50), top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff;
        token control: repetition_penalty, no_repeat_ngram_size, bad_words_ids, sequence_bias, suppress_tokens,
        begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id, exponential_decay_length_penalty,
        remove_invalid_values, renormalize_logits; stopping: eos_token_id (int or list), stop_strings (with
        `tokenizer=`), max_time; special tokens: pad_token_id, bos_token_id; cache: use_cache (True),
        cache_implementation ("static" or "dynamic"); outputs: return_dict_in_generate, output_scores,
        output_logits, output_attentions, output_hidden_states (False).
    Other arguments: `generator` draws the samples (reproducible sampling; default: torch's global generator),
    `streamer` receives the prompt then each new token through `put(ids)` and `end()` (greedy / sampling, one row),
    `logits_processor` / `stopping_criteria` are lists of extra `f(input_ids, scores)` (transformers' lists work),
    `inputs_embeds` replaces (or accompanies) the prompt's ids, `past_key_values` continues from an earlier call's
    cache (pass the whole sequence so far as input_ids), `logits_to_keep` is accepted as the model keyword (only the
    last position is ever read). `compile=True` (or a dict of `torch.compile` options) compiles the one-token decode
    step; it pays off on long generations and on GPUs.

    Example:
        >>> import torch
        >>> from optlite import OPTConfig, OPTForCausalLM
        >>> from optlite.generation import generate
        >>> model = OPTForCausalLM(OPTConfig.from_preset("opt-tiny")).eval()
        >>> generate(model, torch.tensor([[2, 31414, 6]]), max_new_tokens=4).shape
        torch.Size([1, 7])
    """
    cfg = _call_config(model, generation_config, input_ids, inputs_embeds, kwargs)
    eos_list = eos_ids(cfg.eos_token_id)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_list[0] if eos_list else None)
    prompt = _prompt(model, cfg, input_ids, attention_mask, inputs_embeds, past_key_values, pad, eos_list)
    model_config = getattr(model, "config", None)
    max_len = validate_config(cfg, prompt.ids.shape[1], getattr(model_config, "max_position_embeddings", None),
                              prompt.context - prompt.ids.shape[1])
    validate_processor_settings(cfg, getattr(model_config, "vocab_size", None))
    _check_call(cfg, prompt, streamer, compile, logits_to_keep)
    drafter = _drafter(model, cfg, prompt, assistant_model)
    criteria = stopping_criteria_for(cfg, tokenizer, stopping_criteria)

    state, embeds = _decode_state(model, cfg, prompt, max_len, compile)
    eos = torch.tensor(eos_list, dtype=torch.long, device=state.ids.device) if eos_list else None
    processors = _call_processors(cfg, state, prompt, max_len, eos, logits_processor)
    if streamer is not None:
        streamer.put(state.ids.cpu())
    search = _search.Search(cfg, max_len, processors, criteria, eos, pad, generator, streamer)
    if drafter is not None:
        return assisted_decode(state, search, drafter)
    return (_search.beam_search if cfg.num_beams > 1 else _search.sample)(state, search, embeds)


# ---------------------------------------------------------------------------------------------- strings in, strings out


def generate_text(model: Any, tokenizer: Any, prompt: str | Sequence[str],
                  **generate_kwargs: Any) -> str | list[str] | list[list[str]]:
    """Continue one prompt or a batch of prompts and return only the new text.

    The tokenizer adds OPT's one `</s>` (BOS) itself; batches are left-padded; the continuation is decoded with
    `skip_special_tokens=True`. A string gives a string (a list of strings with num_return_sequences > 1); a list
    of prompts gives a list (of lists with num_return_sequences > 1).

    Example:
        >>> text = generate_text(model, tokenizer, "Paris is the capital of", max_new_tokens=8)
        >>> texts = generate_text(model, tokenizer, ["Hello,", "A photo of"], do_sample=True, top_p=0.9,
        ...                       max_new_tokens=8, generator=torch.Generator().manual_seed(0))
        >>> type(text).__name__, len(texts)
        ('str', 2)
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
