"""OPTTokenizer: GPT-2 byte-level BPE with OPT's conventions, on the Rust `tokenizers` library.

OPT uses the GPT-2 merges with the fairseq id order (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3),
bos = eos = unk = `</s>`, pad = `<pad>`, prepends exactly one `</s>`, appends nothing and adds no
prefix space. Calls, outputs and saved files follow `transformers`' tokenizers, so
`AutoTokenizer.from_pretrained` reads what `save_pretrained` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .hub import Source

# The special-token layout of every OPT checkpoint (and of tokenizers made by `OPTTokenizer.train`).
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
_DEFAULT_NAMED = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
_NAMED_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
_PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
_TRUNCATION = {False: None, "do_not_truncate": None, True: "longest_first", "longest_first": "longest_first",
               "only_first": "only_first", "only_second": "only_second"}
_HUGE = int(1e29)  # transformers stores "no limit" as model_max_length = int(1e30)

TokenSpec = str | AddedToken


class BatchEncoding(dict):
    """The result of a tokenizer call: a dict with attribute access (`enc.input_ids`) and `.to(device)`.

    Example:
        >>> enc = tok(["Hello", "a longer text"], padding=True, return_tensors="pt")
        >>> enc.attention_mask
        tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
        >>> model(**enc.to("cpu")).logits.shape  # or .to("cuda"), the model's device
        torch.Size([2, 4, 50272])
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """Move every tensor to `device` (in place, like transformers) and return self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


class OPTTokenizer:
    """The OPT tokenizer (GPT-2 byte-level BPE, one `</s>` prepended), compatible with transformers'.

    Example:
        >>> tok = OPTTokenizer.from_pretrained("facebook/opt-125m")
        >>> tok("Hello, my dog is cute").input_ids
        [2, 31414, 6, 127, 2335, 16, 11962]
        >>> tok(["Hi", "Hello there"], padding=True, return_tensors="pt").attention_mask
        tensor([[1, 1, 0], [1, 1, 1]])
        >>> tok.decode([2, 31414, 6], skip_special_tokens=True)
        'Hello,'

    As in transformers, each call sets its padding/truncation on the shared Rust tokenizer: don't
    call one instance from several threads with different padding options at once.
    """

    model_input_names = ["input_ids", "attention_mask"]  # what pad() fills in and data collators read
    is_fast = True  # a Rust `tokenizers` backend, as transformers' fast tokenizers

    def __init__(self, backend: Tokenizer, *, bos_token: TokenSpec = "</s>", eos_token: TokenSpec = "</s>",
                 unk_token: TokenSpec = "</s>", pad_token: TokenSpec = "<pad>", mask_token: TokenSpec | None = None,
                 additional_special_tokens: Sequence[TokenSpec] = (), add_bos_token: bool | None = True,
                 add_eos_token: bool | None = False, padding_side: str = "right", truncation_side: str = "right",
                 model_max_length: int | None = None, clean_up_tokenization_spaces: bool = False,
                 name_or_path: str = "") -> None:
        self._backend = backend
        named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
                 "mask_token": mask_token}
        # Like transformers: the named special tokens become atomic added tokens; other vocab
        # entries such as OPT's `<s>`, `<unk>`, `<mask>` stay ordinary BPE pieces inside text.
        specials = [t for t in (*named.values(), *additional_special_tokens) if t is not None]
        added = {str(t) for t in backend.get_added_tokens_decoder().values()}
        backend.add_special_tokens([_added(t) for t in specials if str(t) not in added])
        for key, value in named.items():
            setattr(self, key, None if value is None else str(value))
        self.additional_special_tokens = [str(t) for t in additional_special_tokens]
        self._special_flags = {str(t): t for t in specials if isinstance(t, AddedToken)}
        self.add_bos_token: bool | None = None  # None: keep the post-processor of a loaded tokenizer.json
        self.add_eos_token: bool | None = None
        if backend.post_processor is None or add_bos_token is not None or add_eos_token is not None:
            self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
            self._set_post_processor(self.add_bos_token, self.add_eos_token)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length if model_max_length and model_max_length < _HUGE else None
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        # Per-call padding/truncation is set on the shared Rust tokenizer: one call at a time sets and uses it.
        self._lock = threading.RLock()
        # Start from a clean state.
        backend.no_padding()
        backend.no_truncation()

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # Same template as transformers' GPT2Tokenizer(add_bos_token=True): "</s> A" and "</s> A </s> B".
        bos, eos = self.bos_token, self.eos_token
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        ids = {tok: self._backend.token_to_id(tok) for tok in (bos if add_bos else None, eos if add_eos else None)
               if tok is not None}
        self._backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                     special_tokens=list(ids.items()))

    # ---------------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, **overrides: Any) -> OPTTokenizer:
        """Load from a local directory or a hub repo id (`tokenizer.json`, else `vocab.json` + `merges.txt`).

        `overrides` replace settings read from `tokenizer_config.json` (e.g. `padding_side="left"`).

        Example:
            >>> tok = OPTTokenizer.from_pretrained("facebook/opt-350m", padding_side="left")
            >>> tok.padding_side
            'left'
        """

        source = Source(name_or_path, revision, cache_dir, local_files_only, token)

        def find(filename: str, required: bool = False) -> Path | None:
            return source.file(filename, required)

        config = _read_json(find("tokenizer_config.json"))
        config.update(_read_json(find("special_tokens_map.json")))  # as in transformers, the map wins
        tokenizer_json = find("tokenizer.json")
        if tokenizer_json is not None:
            backend = Tokenizer.from_file(str(tokenizer_json))
            flags = {k: config.get(k) for k in ("add_bos_token", "add_eos_token")}  # None: keep the file's
        else:
            model = models.BPE.from_file(str(find("vocab.json", True)), str(find("merges.txt", True)), **_BPE_ARGS)
            backend = _byte_level(model, add_prefix_space=bool(config.get("add_prefix_space", False)))
            flags = {"add_bos_token": config.get("add_bos_token", True), "add_eos_token": config.get("add_eos_token")}
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        for entry in (config.get("added_tokens_decoder") or {}).values():  # tokens added after training
            token_obj = _added(entry)
            if token_obj.content not in added:
                (backend.add_special_tokens if token_obj.special else backend.add_tokens)([token_obj])
        kwargs: dict[str, Any] = {key: _token(config[key]) for key in _NAMED_KEYS if key in config}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        kwargs["additional_special_tokens"] = [_token(t) for t in extra] if isinstance(extra, list) else []
        for key in ("padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces"):
            if key in config:
                kwargs[key] = config[key]
        kwargs.update(flags)
        kwargs.update(overrides)
        return cls(backend, name_or_path=str(name_or_path), **{**_DEFAULT_NAMED, **kwargs})

    @classmethod
    def train(cls, files_or_iterator: str | os.PathLike | Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False, **kwargs: Any) -> OPTTokenizer:
        """Train a new byte-level BPE with OPT's layout (ids 0-3 = `<s>`, `<pad>`, `</s>`, `<unk>`).

        `files_or_iterator` is a file path, a list of file paths, or an iterable of texts.
        `kwargs` go to `OPTTokenizer(...)` (e.g. `padding_side`).

        Example:
            >>> tok = OPTTokenizer.train(["some text", "more text"], vocab_size=300)
            >>> tok.convert_ids_to_tokens([0, 1, 2, 3])
            ['<s>', '<pad>', '</s>', '<unk>']
        """
        if not isinstance(vocab_size, int) or vocab_size < len(OPT_SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab_size must be an int >= 260 (4 special tokens + 256 bytes), got {vocab_size!r}")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                      special_tokens=list(OPT_SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        scratch = _byte_level(models.BPE(**_BPE_ARGS))
        files = _as_files(files_or_iterator)
        if files is not None:
            scratch.train([str(f) for f in files], trainer)
        else:
            scratch.train_from_iterator(files_or_iterator, trainer)
        # Rebuild from the learned vocab/merges so the result is exactly what loading vocab.json +
        # merges.txt gives (the trainer would make `<s>`/`<unk>` atomic; OPT files do not).
        learned = json.loads(scratch.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
        backend = _byte_level(models.BPE(vocab=learned["vocab"], merges=merges, **_BPE_ARGS))
        return cls(backend, **{**_DEFAULT_NAMED, **kwargs})

    # --------------------------------------------------------------------------------------------------------- encoding

    def __call__(self, text: str | Sequence[str], text_pair: str | Sequence[str] | None = None, *,
                 add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True, stride: int = 0,
                 return_overflowing_tokens: bool = False) -> BatchEncoding:
        """Tokenize one text or a batch, transformers-style: `input_ids` and `attention_mask`.

        `padding`: False, True / "longest", or "max_length" (needs `max_length`). `truncation`: True
        (= "longest_first"), False, "only_first", "only_second"; None truncates only when `max_length`
        is given without padding (transformers' rule). `return_tensors="pt"` gives `torch.long` tensors.
        `return_overflowing_tokens=True` keeps what truncation cuts off as further rows (windows that overlap
        by `stride` tokens), with `overflow_to_sample_mapping` giving each row's input; as transformers does.
        Safe to call from several threads at once.

        Example:
            >>> enc = tok(["Hi", "Hello there"], padding=True, padding_side="left")
            >>> enc.input_ids
            [[1, 2, 30086], [2, 31414, 89]]
        """
        single = isinstance(text, str)
        texts = _check_texts(text, "text")
        if text_pair is not None:
            pairs = _check_texts(text_pair, "text_pair")
            if isinstance(text_pair, str) != single or len(pairs) != len(texts):
                raise ValueError(f"text_pair must match text: got {len(pairs)} pair(s) for {len(texts)} text(s)")
            inputs: list = list(zip(texts, pairs, strict=True))
        else:
            inputs = texts
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 0:
            raise ValueError(f"stride must be an int >= 0, got {stride!r}")
        with self._lock:
            self._configure(padding, truncation, max_length, pad_to_multiple_of, padding_side, stride)
            encodings = self._encode(inputs, add_special_tokens)
        out = BatchEncoding()
        if return_overflowing_tokens:  # each input gives its truncated rows, then the windows cut off from it
            mapping = [i for i, e in enumerate(encodings) for _ in range(1 + len(e.overflowing))]
            encodings = [piece for e in encodings for piece in (e, *e.overflowing)]
            single = False  # several windows of one text are a batch, as in transformers
        out["input_ids"] = [e.ids for e in encodings]
        if return_attention_mask:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = mapping
        for key, rows in out.items():
            if return_tensors == "pt":
                out[key] = torch.tensor(rows, dtype=torch.long) if key == "overflow_to_sample_mapping" \
                    else _to_tensor(rows, key)
            elif single:
                out[key] = rows[0]
        return out

    def _encode(self, inputs: list, add_special_tokens: bool) -> list:
        try:
            return self._backend.encode_batch_fast(inputs, add_special_tokens=add_special_tokens)
        except TypeError:
            _check_surrogates(inputs)  # the Rust side names neither the text nor the character
            raise

    def encode(self, text: str, text_pair: str | None = None, *, add_special_tokens: bool = True,
               padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
               return_tensors: str | None = None) -> list[int] | torch.Tensor:
        """Ids of one text (a `(1, T)` tensor with `return_tensors="pt"`).

        Example:
            >>> tok.encode("This is a test")
            [2, 713, 16, 10, 1296]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes one string, got {type(text).__name__}; call the tokenizer for batches")
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, return_tensors=return_tensors, return_attention_mask=False)["input_ids"]

    def _configure(self, padding: Any, truncation: Any, max_length: Any, multiple: Any, side: Any,
                   stride: int = 0) -> None:
        """Validate the call's options and set them on the Rust tokenizer (only when they change)."""
        _check_options(padding, truncation, max_length, multiple)
        side = self.padding_side if side is None else side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad_mode = _PADDING[padding]
        if truncation is None:  # transformers: max_length alone (no padding) switches truncation on
            truncation = max_length is not None and pad_mode is None
        strategy = _TRUNCATION[truncation]
        max_length = self._length_limit(max_length, pad_mode, strategy, multiple, stride)
        want_trunc = None
        if strategy and max_length is not None:
            want_trunc = {"max_length": max_length, "stride": stride, "strategy": strategy,
                          "direction": self.truncation_side}
        want_pad = None
        if pad_mode is not None:
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad_token, and this tokenizer has none")
            want_pad = {"length": max_length if pad_mode == "max_length" else None, "pad_to_multiple_of": multiple,
                        "pad_id": self.pad_token_id, "pad_token": self.pad_token, "pad_type_id": 0, "direction": side}
        backend = self._backend
        if backend.truncation != want_trunc:
            if want_trunc is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**want_trunc)
        if backend.padding != want_pad:
            if want_pad is None:
                backend.no_padding()
            else:
                backend.enable_padding(**want_pad)

    def _length_limit(self, max_length: int | None, pad_mode: str | None, strategy: str | None,
                      multiple: int | None, stride: int) -> int | None:
        """The max_length a call truncates or pads to: the given one, else model_max_length when needed."""
        if max_length is None and (strategy or pad_mode == "max_length"):
            max_length = self.model_max_length
            if max_length is None and pad_mode == "max_length":
                raise ValueError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
        if strategy and max_length is not None and stride >= max_length:
            raise ValueError(f"stride ({stride}) must be smaller than max_length ({max_length})")
        if strategy and pad_mode and multiple and max_length and max_length % multiple:
            raise ValueError(f"max_length ({max_length}) must be a multiple of pad_to_multiple_of ({multiple})")
        if pad_mode == "longest" and strategy is None:
            return None  # transformers ignores max_length for padding=True without truncation
        return max_length

    # --------------------------------------------------------------------------------------------------------- decoding

    def decode(self, token_ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of one sequence of ids (list, tuple or 1-D tensor).

        `clean_up_tokenization_spaces` defaults to the tokenizer's setting (False for OPT, as in
        transformers 5); True applies the classic " ." -> "." clean-up.

        Example:
            >>> tok.decode([2, 31414, 6, 127, 2335, 16, 11962], skip_special_tokens=True)
            'Hello, my dog is cute'
        """
        ids = _id_list(token_ids)
        ids = [ids] if isinstance(ids, int) else ids
        if ids and not isinstance(ids[0], int):
            raise ValueError("decode takes one sequence of ids; use batch_decode for several")
        try:
            text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError):
            _check_ids(ids, len(self))
            raise
        return self._clean(text, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Texts of several sequences of ids (list of lists or 2-D tensor).

        Example:
            >>> tok.batch_decode(tok(["Hi", "Hello there"], padding=True).input_ids, skip_special_tokens=True)
            ['Hi', 'Hello there']
        """
        rows = [_id_list(row) for row in _id_list(sequences)]
        try:
            texts = self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError):
            for row in rows:
                _check_ids(row, len(self))
            raise
        return [self._clean(t, clean_up_tokenization_spaces) for t in texts]

    def _clean(self, text: str, clean_up: bool | None) -> str:
        if not (self.clean_up_tokenization_spaces if clean_up is None else clean_up):
            return text
        text = text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        text = text.replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        return text.replace(" 've", "'ve").replace(" 're", "'re")  # transformers' clean_up_tokenization

    # ------------------------------------------------------------------------------------------------------- vocabulary

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token (or of each token); unknown tokens map to `unk_token_id`, as in transformers."""
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int] | torch.Tensor,
                              skip_special_tokens: bool = False) -> str | list[str]:
        """Token string of an id (or of each id), e.g. `5 -> "Ġthe"`."""
        ids = _id_list(ids)
        try:
            if isinstance(ids, int):
                return self._backend.id_to_token(ids)
            skip = set(self.all_special_ids) if skip_special_tokens else set()
            return [self._backend.id_to_token(i) for i in ids if i not in skip]
        except (OverflowError, TypeError):
            _check_ids([ids] if isinstance(ids, int) else list(ids), len(self))
            raise

    def get_vocab(self) -> dict[str, int]:
        """Token -> id for the whole vocabulary, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without added tokens (50265 for OPT)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (same name as in transformers)."""
        return self._backend

    bos_token_id = property(lambda self: self._id_of(self.bos_token))
    eos_token_id = property(lambda self: self._id_of(self.eos_token))
    unk_token_id = property(lambda self: self._id_of(self.unk_token))
    pad_token_id = property(lambda self: self._id_of(self.pad_token))
    mask_token_id = property(lambda self: self._id_of(self.mask_token))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens plus additional ones, without repeats (OPT: `['</s>', '<pad>']`)."""
        named = [getattr(self, key) for key in _NAMED_KEYS] + self.additional_special_tokens
        return list(dict.fromkeys(t for t in named if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        return [self._backend.token_to_id(t) for t in self.all_special_tokens]

    def __repr__(self) -> str:
        return (f"OPTTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"bos/eos={self.bos_token!r}, pad={self.pad_token!r}, padding_side={self.padding_side!r})")

    # ------------------------------------------------------------------------------------------- padding encoded inputs

    def pad(self, encoded_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]], padding: bool | str = True,
            max_length: int | None = None, pad_to_multiple_of: int | None = None, padding_side: str | None = None,
            return_attention_mask: bool | None = None, return_tensors: str | None = None,
            verbose: bool = True) -> BatchEncoding:
        """Pad already-encoded inputs, as transformers' `tokenizer.pad` (what its data collators call): a list of
        examples (`[{"input_ids": [...], ...}, ...]`) or one dict of lists. `input_ids` get the pad id, an
        `attention_mask` (made if absent) 0, `token_type_ids` 0 and `special_tokens_mask` 1; other keys are kept.

        Example:
            >>> batch = tok.pad([{"input_ids": [2, 100]}, {"input_ids": [2]}], return_tensors="pt")
            >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
            ([[2, 100], [2, 1]], [[1, 1], [1, 0]])
        """
        strategy = _PADDING.get(getattr(padding, "value", padding), "unknown")
        if strategy == "unknown":
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if strategy == "max_length":
            max_length = max_length if max_length is not None else self.model_max_length
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length= (the tokenizer has no model_max_length)")
        columns, single = _as_columns(encoded_inputs)
        if self.pad_token_id is None and strategy is not None:
            raise ValueError("pad() needs a pad token: set tokenizer.pad_token (OPT's is '<pad>')")
        if return_attention_mask is not False and "attention_mask" not in columns:
            columns["attention_mask"] = [[1] * len(row) for row in columns["input_ids"]]
        if strategy is not None and columns["input_ids"]:
            target = max(len(row) for row in columns["input_ids"]) if strategy == "longest" else max_length
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            _pad_columns(columns, target, side, self.pad_token_id)
        if single:
            columns = {key: values[0] for key, values in columns.items()}
        return BatchEncoding(_as_tensors(columns, return_tensors, single))

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 for a special token, 0 for a text token, as transformers' method (data collators call it)."""
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        mask = bos + [0] * len(token_ids_0)
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1)

    # ----------------------------------------------------------------------------------------------------------- saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[Path]:
        """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.

        transformers' `AutoTokenizer.from_pretrained(save_directory)` reads the result back identically.

        Example:
            >>> sorted(path.name for path in tok.save_pretrained("my-tokenizer"))
            ['merges.txt', 'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json', 'vocab.json']
        """
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._backend.no_padding()  # per-call settings must not end up in tokenizer.json
            self._backend.no_truncation()
            tokenizer_json = self._backend.to_str(pretty=True)
        named = {key: self._token_entry(getattr(self, key)) for key in _NAMED_KEYS if getattr(self, key)}
        if self.additional_special_tokens:
            named["additional_special_tokens"] = [self._token_entry(t) for t in self.additional_special_tokens]
        config: dict[str, Any] = {
            "tokenizer_class": "GPT2Tokenizer",  # transformers' class for OPT; no config.json needed
            "add_prefix_space": False,
            "errors": "replace",
            **({} if self.add_bos_token is None else {"add_bos_token": self.add_bos_token}),
            **({} if self.add_eos_token is None else {"add_eos_token": self.add_eos_token}),
            **{
                key: value["content"] if isinstance(value, dict) else [t["content"] for t in value]
                for key, value in named.items()
            },  # plain strings: their flags are in added_tokens_decoder
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **({"model_max_length": self.model_max_length} if self.model_max_length else {}),
            "added_tokens_decoder": {
                str(i): {**self._token_entry(t.content, t), "special": t.special}
                for i, t in sorted(self._backend.get_added_tokens_decoder().items())
            },
        }
        from .saving import atomic_write  # each file replaced whole: a failed save leaves the old one

        with tempfile.TemporaryDirectory(prefix=".tmp-", dir=target) as scratch:
            self._backend.model.save(scratch)  # vocab.json + merges.txt
            files: dict[str, Any] = {"tokenizer.json": tokenizer_json,
                                     "vocab.json": lambda p: shutil.copyfile(Path(scratch, "vocab.json"), p),
                                     "merges.txt": lambda p: shutil.copyfile(Path(scratch, "merges.txt"), p),
                                     "tokenizer_config.json": _json_text(config),
                                     "special_tokens_map.json": _json_text(named)}
            return [atomic_write(target / name, content) for name, content in files.items()]

    def _token_entry(self, content: str, token: AddedToken | None = None) -> dict[str, Any]:
        token = (token or self._special_flags.get(content)
                 or self._backend.get_added_tokens_decoder().get(self._backend.token_to_id(content))
                 or AddedToken(content, special=True, normalized=True))
        return {"content": content, "single_word": token.single_word, "lstrip": token.lstrip, "rstrip": token.rstrip,
                "normalized": token.normalized}


# -------------------------------------------------------------------------------------------------------------- helpers

# transformers' GPT2Tokenizer builds its BPE with exactly these options.
_BPE_ARGS: dict[str, Any] = {"dropout": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                             "fuse_unk": False}


def _byte_level(model: models.BPE, add_prefix_space: bool = False) -> Tokenizer:
    backend = Tokenizer(model)
    # OPT: add_prefix_space=False, so "Hello" at the start is one token without "Ġ".
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _added(spec: TokenSpec | dict) -> AddedToken:
    """An AddedToken from a string, an AddedToken, or a config entry {"content": ..., "lstrip": ...}."""
    if isinstance(spec, AddedToken):
        return spec
    if isinstance(spec, str):
        return AddedToken(spec, special=True, normalized=True)
    flags = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
    return AddedToken(spec["content"], **{"special": True, **flags})


def _token(value: Any) -> TokenSpec | None:
    """A config value for a special token (string or dict) as the init argument (keeps its flags)."""
    return _added(value) if isinstance(value, dict) else value


def _read_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path is not None else {}


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _check_surrogates(inputs: list) -> None:
    """A ValueError naming the text and position of a lone surrogate (a str that is not valid Unicode)."""
    for i, item in enumerate(inputs):
        for j, text in enumerate(item if isinstance(item, tuple) else (item,)):
            for k, char in enumerate(text):
                if "\ud800" <= char <= "\udfff":
                    name = f"text_pair[{i}]" if j else f"text[{i}]"
                    raise ValueError(f"{name} holds a lone surrogate {char!r} at character {k}, which is not valid "
                                     "Unicode: decode the bytes with errors='replace' (or remove it) first")


def _check_options(padding: Any, truncation: Any, max_length: Any, multiple: Any) -> None:
    """A ValueError naming the padding / truncation option a tokenizer call cannot take."""
    if not (isinstance(padding, (bool, str)) and padding in _PADDING):
        raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
    if truncation is not None and not (isinstance(truncation, (bool, str)) and truncation in _TRUNCATION):
        raise ValueError(f"truncation must be a bool, 'longest_first', 'only_first' or 'only_second', "
                         f"got {truncation!r}")
    for name, value in (("max_length", max_length), ("pad_to_multiple_of", multiple)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _check_ids(ids: list, vocab: int) -> None:
    """A ValueError naming a token id that cannot be decoded (negative, or too large for the Rust side)."""
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 2**32:
            raise ValueError(f"token ids must be ints in [0, {vocab}), got {i!r}")


def _check_texts(text: Any, name: str) -> list[str]:
    """The input as a list of strings; a clear TypeError naming the first bad item otherwise."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(text).__name__}")
    for i, item in enumerate(text):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] is {type(item).__name__}, expected str")
    return list(text)


def _as_files(source: Any) -> list[str | os.PathLike] | None:
    """File paths when `source` names files (a path, or a list of paths); None for an iterable of texts."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"training file {str(source)!r} not found (pass a list for texts)")
        return [source]
    if isinstance(source, (list, tuple)) and source and \
            all(isinstance(s, os.PathLike) or (isinstance(s, str) and os.path.isfile(s)) for s in source):
        return list(source)
    return None


def _id_list(ids: Any) -> Any:
    """Tensors and numpy arrays to plain Python ints/lists (the Rust side wants lists)."""
    return ids.tolist() if hasattr(ids, "tolist") else ids


def _to_tensor(rows: list[list[int]], key: str) -> torch.Tensor:
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"cannot make one tensor of {key} with lengths {sorted({len(r) for r in rows})}: "
                         "pass padding=True (or truncation with max_length) to get equal lengths")
    if not rows:
        return torch.zeros((0, 0), dtype=torch.long)
    try:  # numpy turns nested lists into an array ~3x faster than torch.tensor does
        import numpy as np

        return torch.from_numpy(np.array(rows, dtype=np.int64))
    except ImportError:
        return torch.tensor(rows, dtype=torch.long)


_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}  # input_ids: the pad id


def _as_columns(encoded: Any) -> tuple[dict[str, list], bool]:
    """{key: one value per example} from a list of example dicts or a dict; True when it held one example."""
    if isinstance(encoded, Sequence) and not isinstance(encoded, str) and encoded and isinstance(encoded[0], Mapping):
        encoded = {key: [example[key] for example in encoded] for key in encoded[0]}
    if not isinstance(encoded, Mapping) or "input_ids" not in encoded:
        got = list(encoded) if isinstance(encoded, Mapping) else type(encoded).__name__
        raise ValueError(f"pad() needs an encoding (a dict) or a list of encodings holding 'input_ids', got {got}")
    ids = _id_list(encoded["input_ids"])
    single = bool(ids) and not isinstance(_id_list(ids[0]), list)
    columns = {}
    for key, values in encoded.items():
        values = _id_list(values)
        columns[key] = [values] if single else [_id_list(v) for v in values]
    return columns, single


def _pad_columns(columns: dict[str, list], target: int, side: str, pad_id: int) -> None:
    """Pad, in place, every row of input_ids and of the keys that follow it to `target` tokens (longer rows stay)."""
    lengths = [len(row) for row in columns["input_ids"]]
    for key, value in [("input_ids", pad_id), *_PAD_VALUES.items()]:
        if key not in columns:
            continue
        rows = columns[key]
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            if len(row) != n:
                raise ValueError(f"pad(): example {i} has {n} input_ids but {len(row)} {key}")
            fill = [value] * max(0, target - n)
            rows[i] = fill + list(row) if side == "left" else list(row) + fill


def _as_tensors(columns: dict[str, Any], return_tensors: str | None, single: bool) -> dict[str, Any]:
    if return_tensors is None:
        return columns
    if return_tensors != "pt":
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    out = {}
    for key, values in columns.items():
        if key == "input_ids" or key in _PAD_VALUES:
            out[key] = _to_tensor([values] if single else values, key)[0 if single else slice(None)]
        else:
            try:
                out[key] = torch.tensor(values)
            except (TypeError, ValueError) as e:
                raise ValueError(f"pad(): cannot make a tensor of {key!r} ({e}); only input_ids, attention_mask, "
                                 "token_type_ids and special_tokens_mask are padded") from None
    return out
