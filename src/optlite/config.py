"""OPTConfig: the hyper-parameters of an OPT model, under transformers' names, read from and written to config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from .activations import ACTIVATIONS
from .hub import Source


@dataclass
class OPTConfig:
    """Configuration of an OPT model; field names and defaults are transformers' `OPTConfig`'s.

    The defaults describe facebook/opt-125m. Keys of a config.json this class does not know are kept in
    `extra` and written back by `to_dict`, so a hub config survives a load/save round trip. `num_labels`,
    `id2label` and `label2id` stay consistent whichever is set, also after construction, as in transformers.

    Example:
        >>> cfg = OPTConfig.from_preset("opt-350m")
        >>> cfg.hidden_size, cfg.word_embed_proj_dim, cfg.do_layer_norm_before
        (1024, 512, False)
        >>> OPTConfig(hidden_size=64, num_attention_heads=4, ffn_dim=128, num_hidden_layers=2).head_dim
        16
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None  # None means hidden_size; 350m embeds in 512 and projects
    dropout: float = 0.1
    attention_dropout: float = 0.0
    num_attention_heads: int = 12
    activation_function: str = "relu"
    layerdrop: float = 0.0
    init_std: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    # What the task heads need.
    num_labels: int | None = None  # None means len(id2label), or 2 when that is absent too
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    torch_dtype: str | None = None  # the dtype the weights were saved in ("float16", ...)
    # transformers' model-level output switches: kept so a config.json round-trips and tools can read them.
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True
    architectures: list[str] | None = None  # written by save_pretrained: the class that saved the checkpoint
    # Where from_pretrained read it (a hub id or a folder); written as "_name_or_path", as transformers does.
    name_or_path: str = field(default="", repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type: ClassVar[str] = "opt"
    is_encoder_decoder: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        if self.num_labels is None:
            self.num_labels = len(self.id2label) if self.id2label else 2
        if self.id2label is None or len(self.id2label) != self.num_labels:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or len(self.label2id) != self.num_labels:
            self.label2id = {v: k for k, v in self.id2label.items()}
        if self.torch_dtype is not None:
            self.torch_dtype = str(self.torch_dtype).removeprefix("torch.")
        self.name_or_path = str(self.name_or_path)
        self.validate()
        object.__setattr__(self, "_ready", True)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if not self.__dict__.get("_ready"):
            return
        # transformers derives num_labels from id2label; mirror it so `config.num_labels = 3` resizes the label maps
        # (else a save and reload would build a 2-row score head for a 3-label checkpoint).
        if name == "num_labels" and len(self.id2label) != value:
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
        elif name == "id2label":
            labels = {int(k): v for k, v in (value or {}).items()}
            object.__setattr__(self, "id2label", labels)
            object.__setattr__(self, "num_labels", len(labels))
            if set(self.label2id or {}) != set(labels.values()):
                object.__setattr__(self, "label2id", {v: k for k, v in labels.items()})

    @property
    def use_return_dict(self) -> bool:
        """transformers' older name for `return_dict`, still read by some tools."""
        return self.return_dict

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> OPTConfig:
        """The config of the text model: OPT is text only, so this config itself (as in transformers)."""
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        # Checkpoints fine-tuned before transformers 4.20 were saved without it (`_remove_final_layer_norm`).
        return self.do_layer_norm_before and not self._remove_final_layer_norm

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot describe a working model."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "max_position_embeddings",
                     "num_attention_heads", "word_embed_proj_dim", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_hidden_layers"
                                                                                 else 1):
                raise ValueError(f"OPTConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"OPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        for name in ("dropout", "attention_dropout", "layerdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"OPTConfig.{name} is a probability and must be in [0, 1], got {value!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"OPTConfig.activation_function {self.activation_function!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"OPTConfig.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size="
                             f"{self.vocab_size})")
        if self.problem_type not in (None, "regression", "single_label_classification",
                                     "multi_label_classification"):
            raise ValueError(f"OPTConfig.problem_type {self.problem_type!r} is not one of regression, "
                             "single_label_classification, multi_label_classification")

    # ------------------------------------------------------------------------------------------------------ dict / JSON

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> OPTConfig:
        """Build from a config.json dict (any hub OPT config); unknown keys are kept in `extra`. A field derived
        from another (word_embed_proj_dim, equal to hidden_size in every OPT but 350m) follows an overridden
        source unless it is overridden too.

        Example:
            >>> data = {"hidden_size": 64, "num_attention_heads": 4, "word_embed_proj_dim": 64}
            >>> OPTConfig.from_dict(data, hidden_size=128).word_embed_proj_dim
            128
        """
        if ("hidden_size" in overrides and "word_embed_proj_dim" not in overrides
                and data.get("word_embed_proj_dim") == data.get("hidden_size", cls.hidden_size)):
            data = {k: v for k, v in data.items() if k != "word_embed_proj_dim"}  # None: hidden_size
        data = {**data, **overrides}
        model_type = data.pop("model_type", "opt")
        if model_type != "opt":
            raise ValueError(f"config has model_type {model_type!r}; optlite loads OPT models (model_type 'opt')")
        if "dtype" in data:  # transformers 5 writes "dtype", earlier versions "torch_dtype"
            data.setdefault("torch_dtype", data.pop("dtype"))
        if "_name_or_path" in data:
            data.setdefault("name_or_path", data.pop("_name_or_path"))
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {**data.get("extra", {}), **{k: v for k, v in data.items() if k not in names and k != "extra"}}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: transformers' field names plus any unknown keys read earlier."""
        out: dict[str, Any] = {**self.extra, "model_type": "opt"}
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "num_labels", "name_or_path"):  # num_labels is implied by id2label
                out[f.name] = getattr(self, f.name)
        if out["architectures"] is None:
            del out["architectures"]
        if self.name_or_path:
            out["_name_or_path"] = self.name_or_path
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    def to_json_string(self) -> str:
        """config.json's text: `to_dict()` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> OPTConfig:
        data = read_json_object(path, "config file")
        try:
            return cls.from_dict(data, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json_file(self, path: str | os.PathLike) -> None:
        from .saving import atomic_write  # saving imports checkpoint, which imports this module

        atomic_write(path, self.to_json_string())

    # --------------------------------------------------------------------------- config.json in a directory or hub repo

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, subfolder: str = "", **overrides: Any) -> OPTConfig:
        """Read config.json from a local directory or a hub repo (in its `subfolder`, if given); `overrides` replace
        its values. The result's `name_or_path` is `name_or_path`.

        Preset names are not checkpoints: "opt-125m" here means a directory or a hub repo of that name, never the
        preset (use `from_preset` for that), so a typo never silently yields a config without weights.

        Example:
            >>> cfg = OPTConfig.from_pretrained("facebook/opt-350m", num_labels=3)
            >>> cfg.word_embed_proj_dim, cfg.num_labels
            (512, 3)
        """
        return cls.from_source(Source(name_or_path, revision, cache_dir, local_files_only, token, subfolder),
                               **overrides)

    @classmethod
    def from_source(cls, source: Source, **overrides: Any) -> OPTConfig:
        """`from_pretrained` for a caller that holds a `Source` (the checkpoint's location and hub options).

        Example:
            >>> OPTConfig.from_source(Source("facebook/opt-350m")).do_layer_norm_before
            False
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"extra"})
        if unknown:
            raise TypeError(f"unknown OPTConfig field(s) {', '.join(map(repr, unknown))} passed as config overrides")
        name_or_path = source.name_or_path
        try:
            path = source.file("config.json")
        except FileNotFoundError as e:
            short = str(name_or_path).removeprefix("facebook/")
            if str(name_or_path) == short and short in cls.preset_names():
                raise FileNotFoundError(f"{e}. {short!r} is a preset name, not a checkpoint: for the published "
                                        f"weights load 'facebook/{short}'; for a random model use "
                                        f"OPTForCausalLM(OPTConfig.from_preset({short!r}))") from e
            raise
        config = cls.from_json_file(path, **overrides)
        config.name_or_path = str(name_or_path)
        return config

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write config.json into `save_directory` (created if needed), replacing any previous one atomically."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        self.to_json_file(path)
        return path

    # ---------------------------------------------------------------------------------------------------------- presets

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by `from_preset`, e.g. "opt-125m" … "opt-66b" and "opt-tiny"."""
        return sorted(p.name.removesuffix(".json") for p in resources.files("optlite").joinpath("presets").iterdir()
                      if p.name.endswith(".json"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> OPTConfig:
        """The config of a published OPT size by name ("opt-1.3b" or "facebook/opt-1.3b"); no network needed."""
        short = name.removeprefix("facebook/")
        preset = resources.files("optlite").joinpath("presets").joinpath(f"{short}.json")
        if not preset.is_file():
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(cls.preset_names())}")
        return cls.from_dict(json.loads(preset.read_text(encoding="utf-8")), **overrides)


def preset_name(name_or_path: str | os.PathLike) -> str | None:
    """`name_or_path` when it is a bare preset name ("opt-125m") that is not also a local path, else None: a local
    folder or file of that name wins, and hub ids such as facebook/opt-125m are checkpoints.

    Example:
        >>> preset_name("opt-125m"), preset_name("facebook/opt-125m")
        ('opt-125m', None)
    """
    name = str(name_or_path)
    return name if name in OPTConfig.preset_names() and not Path(name).exists() else None


def read_json_object(path: str | os.PathLike, name: str) -> dict[str, Any]:
    """The JSON object a config file holds; FileNotFoundError / ValueError naming the file (`name` when it is absent)
    when it is missing, not JSON, or not an object.

    Example:
        >>> _ = Path("config.json").write_text("[1, 2]")
        >>> read_json_object("config.json", "config file")
        Traceback (most recent call last):
        ValueError: config.json must hold a JSON object, got list
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {name} at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
