"""Loading checkpoints: find the files (local directory or hub repo), read safetensors / .bin shards into a model
built on the meta device, and place them (dtype, device, accelerate device_map). Writing is in saving.py.

Layouts read: `model.decoder.*` (+ `lm_head.weight`) as in opt-125m/1.3b/2.7b/66b, bare `decoder.*`
as in opt-350m/6.7b/13b/30b, and task checkpoints with `score.*` or `qa_outputs.*`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import mmap
import os
import pickle
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import OPTConfig
from .generation import CONFIG_FILE as GENERATION_CONFIG_NAME  # the name is GenerationConfig's
from .hub import Source

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
# Looked for in this order: safetensors first; TF / Flax / msgpack / h5 files are never fetched.
WEIGHT_CANDIDATES = [(SAFE_WEIGHTS_NAME, "safetensors", False), (SAFE_INDEX_NAME, "safetensors", True),
                     (BIN_WEIGHTS_NAME, "bin", False), (BIN_INDEX_NAME, "bin", True)]
HEAD_PREFIXES = ("lm_head.", "score.", "qa_outputs.")
IGNORED_KEYS = {"decoder.version"}  # a fairseq leftover in hub checkpoints

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written as asked; the message names the file, shard or key."""


# -------------------------------------------------------------------------------------------------------- small parsers


def parse_size(size: int | str) -> int:
    """Bytes in a shard-size limit: an int, or a string such as "5GB", "200MB", "10KB" (decimal) or "2GiB".

    Example:
        >>> parse_size("200MB"), parse_size("10KiB"), parse_size(4096)
        (200000000, 10240, 4096)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r} is not a size such as 5GB, 200MB, 10KB or a positive int")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a dtype or its name ("float16", "torch.bfloat16", "fp32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of float32, float16, bfloat16, 'auto' or a torch.dtype")
    return _DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------- finding the files


@dataclass
class CheckpointFiles:
    """The resolved files of one checkpoint: its config and the weight shards of one format, in order."""

    config: Path | None  # None when the caller read the config already
    format: str  # "safetensors" or "bin"
    shards: list[Path]
    index: Path | None = None
    tensors: dict[str, torch.Tensor] | None = None  # format "state_dict": the tensors themselves, one shard

    def open(self, i: int) -> SafetensorsShard | BinShard:
        """Shard number `i`, open for reading."""
        if self.tensors is not None:
            return StateDictShard(self.tensors)
        return open_shard(self.shards[i], self.format)


def find_checkpoint(source: Source, with_config: bool = True) -> CheckpointFiles:
    """Resolve config.json (unless `with_config=False`) and the weights of one format (safetensors preferred),
    fetching nothing else.

    Example:
        >>> files = find_checkpoint(Source("facebook/opt-125m", revision="refs/pr/35"))
        >>> files.format, [p.name for p in files.shards]
        ('safetensors', ['model.safetensors'])
    """
    config = source.file(CONFIG_NAME) if with_config else None
    for filename, fmt, is_index in WEIGHT_CANDIDATES:
        path = source.file(filename, required=False)
        if path is None:
            continue
        if not is_index:
            return CheckpointFiles(config, fmt, [path])
        shards = [_resolve_shard(source, name, path) for name in read_index(path)]
        return CheckpointFiles(config, fmt, shards, index=path)
    looked_for = ", ".join(name for name, _, _ in WEIGHT_CANDIDATES)
    raise FileNotFoundError(f"no weights file in {source}: looked for {looked_for}")


def read_index(path: Path) -> list[str]:
    """The shard file names of an index (`{"weight_map": {key: file}}`), in order of first appearance, each checked
    to stay inside the checkpoint folder."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid JSON index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: an index needs a non-empty \"weight_map\" object of key -> shard file")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        _check_shard_name(name, path)
    return names


def _check_shard_name(name: Any, index: Path) -> None:
    # A shard path must be relative and stay inside the checkpoint: an index must not make us read other files.
    parts = Path(name).parts if isinstance(name, str) else ()
    if not isinstance(name, str) or not name or Path(name).is_absolute() or name.startswith(("/", "\\")) \
            or ".." in parts or "\\" in name or ":" in name:
        raise CheckpointError(f"{index}: refusing shard path {name!r}: shard paths must be plain names inside the "
                              "checkpoint folder (no absolute paths, no '..')")


def _resolve_shard(source: Source, name: str, index: Path) -> Path:
    path = source.file(name, required=False)
    if path is None:
        raise FileNotFoundError(f"shard {name!r} named in {index.name} is missing from {source}")
    return path


# ------------------------------------------------------------------------------------------------------- reading shards


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, tuple[TensorInfo, int, int]]:
    """{name: (info, start, end)} with absolute byte offsets, checked against the file's size (truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (it declares {n} header bytes, "
                                  f"the file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base, entries = 8 + n, {}
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r} ({e!r})") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if end - start != nbytes or start < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name!r} {shape} {entry['dtype']} needs "
                                  f"{nbytes} bytes but spans [{start}, {end})")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: {name!r} ends at byte {base + end} but the "
                                  f"file has {size} bytes")
        entries[name] = (TensorInfo(dtype, shape), base + start, base + end)
    return entries


class SafetensorsShard:
    """One .safetensors file. Tensors kept as they are on the CPU are the file's own pages (zero copy, a private
    mapping); tensors cast or moved are read from a second mapping whose pages are released after each tensor, so
    only the final weights stay resident."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = read_safetensors_header(path)
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot open as safetensors ({e})") from None
        self._map: mmap.mmap | None = None

    def infos(self) -> dict[str, TensorInfo]:
        return {name: info for name, (info, _, _) in self.entries.items()}

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` as `dtype` on `device`; with `out` (a CPU tensor of that shape and dtype), read into it."""
        info, start, end = self.entries[name]
        if out is None and (dtype is None or dtype == info.dtype) and device.type == "cpu":
            return self._handle.get_tensor(name)  # shares the file's private mapping: nothing is copied
        if start % info.dtype.itemsize or not info.shape or 0 in info.shape:
            t = self._handle.get_tensor(name)
            return out.copy_(t) if out is not None else t.to(device=device, dtype=dtype or info.dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable views, no warning
        count = (end - start) // info.dtype.itemsize
        src = torch.frombuffer(self._map, dtype=info.dtype, count=count, offset=start).view(info.shape)
        if device.type == "cpu":
            # Plain torch.empty, as transformers allocates: a 2 MB-aligned huge-page mapping per tensor halved the
            # upcast on one Xeon VM and doubled it on an AMD EPYC VM, so the allocation is not where speed is won.
            out = (out if out is not None else torch.empty(info.shape, dtype=dtype or info.dtype)).copy_(src)
        else:
            out = src.to(device=device, dtype=dtype or info.dtype, copy=True)
        if hasattr(self._map, "madvise"):  # drop the source pages from our resident set (they stay in the page cache)
            lo = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return out

    def close(self) -> None:
        self._handle = None
        self._map = None  # closed when the last view of it is gone


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class BinShard:
    """One pytorch_model*.bin file, read only through `torch.load(weights_only=True)` and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        self.state = load_bin(path)

    def infos(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in self.state.items()}

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device,
               out: torch.Tensor | None = None) -> torch.Tensor:
        t = self.state[name]
        if out is not None:
            return out.copy_(t)
        if (dtype is None or dtype == t.dtype) and device.type == "cpu":
            return t
        return t.to(device=device, dtype=dtype or t.dtype)

    def close(self) -> None:
        self.state = {}


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict through the safe unpickler only; memory-mapped unless the file predates the zip format."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-1.6) format: no mmap
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a plain tensor dict: torch.load(weights_only=True) refused it, and "
                              f"optlite never unpickles arbitrary objects ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a plain tensor dict (it holds a {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: not a plain tensor dict: key {key!r} holds a {type(value).__name__}")
    return state


class StateDictShard(BinShard):
    """A state dict passed to `from_pretrained(state_dict=...)`, read like a .bin shard."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"state_dict must map str keys to tensors; {bad[0]!r} holds a "
                            f"{type(tensors[bad[0]]).__name__}")
        self.path = Path("state_dict")
        self.state = dict(tensors)


def open_shard(path: Path, fmt: str) -> SafetensorsShard | BinShard:
    return SafetensorsShard(path) if fmt == "safetensors" else BinShard(path)


# ---------------------------------------------------------------------------------------- key mapping and the load plan


def canonical_key(key: str) -> str:
    """A checkpoint key without the base-model prefix: "model.decoder.x" and "decoder.x" both give "decoder.x"."""
    return key.removeprefix("model.") if key.startswith("model.decoder.") else key


def ties_lm_head(model: nn.Module) -> bool:
    return model.get_output_embeddings() is not None and model.config.tie_word_embeddings


@dataclass
class LoadReport:
    """What a load did with each key, in transformers' `output_loading_info` terms plus two lists of our own."""

    missing_keys: list[str] = field(default_factory=list)  # model keys absent from the checkpoint (heads, re-init)
    unexpected_keys: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    newly_initialized_keys: list[str] = field(default_factory=list)  # missing heads + re-initialised mismatches
    dropped_head_keys: list[str] = field(default_factory=list)  # heads of another class (subset of unexpected)

    def as_dict(self) -> dict[str, set | list]:
        """transformers' loading info: sets of keys (mismatches as (key, stored shape, model shape)), a list of
        error messages, and our `newly_initialized_keys` set."""
        return {"missing_keys": set(self.missing_keys), "unexpected_keys": set(self.unexpected_keys),
                "mismatched_keys": set(self.mismatched_keys), "error_msgs": [],
                "newly_initialized_keys": set(self.newly_initialized_keys)}

    def log(self, cls_name: str, source: Source, what: str) -> None:
        logger.info("loaded %s from %s (%s)", cls_name, source, what)
        if self.newly_initialized_keys:
            logger.warning("%s: newly initialised (not in the checkpoint at %s; train before use): %s", cls_name,
                           source, ", ".join(self.newly_initialized_keys))
        for key, stored, wanted in self.mismatched_keys:
            logger.warning("%s: %s re-initialised: checkpoint shape %s, model shape %s "
                           "(ignore_mismatched_sizes=True)", cls_name, key, stored, wanted)
        if self.dropped_head_keys:
            logger.info("%s: dropped the head weights of another class: %s", cls_name,
                        ", ".join(self.dropped_head_keys))
        others = [k for k in self.unexpected_keys if k not in self.dropped_head_keys]
        if others:
            logger.warning("%s: unexpected keys in the checkpoint at %s (ignored): %s", cls_name, source,
                           ", ".join(others))


@dataclass
class LoadPlan:
    assign: dict[str, tuple[str, int]]  # model key -> (checkpoint key, shard number)
    init: list[str]  # model keys initialised by the model's own init
    report: LoadReport


def scan_shards(files: CheckpointFiles) -> dict[str, tuple[TensorInfo, int]]:
    """{checkpoint key: (info, shard number)} from every shard's header (safetensors) or mmap (bin): no data read."""
    stored: dict[str, tuple[TensorInfo, int]] = {}
    for i, path in enumerate(files.shards):
        shard = files.open(i)
        for key, info in shard.infos().items():
            if key in stored:
                raise CheckpointError(f"{path}: key {key!r} also appears in {files.shards[stored[key][1]].name}")
            stored[key] = (info, i)
        shard.close()
    return stored


def plan_load(model: nn.Module, stored: dict[str, tuple[TensorInfo, int]], files: CheckpointFiles,
              ignore_mismatched_sizes: bool = False) -> LoadPlan:
    """Match checkpoint keys to the model's, raising on anything that would leave the model silently wrong."""
    tensors = model.state_dict(keep_vars=True)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    tied = ties_lm_head(model)
    if tied:
        shapes.pop("lm_head.weight", None)
    by_canonical = {canonical_key(k): k for k in shapes}
    report, assign, init, seen = LoadReport(), {}, [], {}
    mismatches = []
    for skey, (info, shard) in stored.items():
        canon = canonical_key(skey)
        if canon in IGNORED_KEYS:
            continue
        if canon in seen:
            raise CheckpointError(f"checkpoint holds both {seen[canon]!r} and {skey!r}")
        seen[canon] = skey
        if canon == "lm_head.weight" and tied:
            continue  # the head is the embedding (build_on_meta checked that the stored copy equals it)
        mkey = by_canonical.get(canon)
        if mkey is None:
            report.unexpected_keys.append(skey)
            if canon.startswith(HEAD_PREFIXES):
                report.dropped_head_keys.append(skey)
            continue
        if info.shape != shapes[mkey]:
            mismatches.append((mkey, skey, shard, info.shape, shapes[mkey]))
            continue
        if tensors[mkey].dtype.is_floating_point and not info.dtype.is_floating_point:  # int8 etc.: quantized
            raise CheckpointError(f"{skey} in {files.shards[shard]}: stored as {dtype_name(info.dtype)}, expected a "
                                  "floating-point weight (float32, float16 or bfloat16); quantized checkpoints "
                                  "are not supported: load the unquantized weights")
        assign[mkey] = (skey, shard)
    for mkey, skey, shard, have, want in mismatches:
        if not ignore_mismatched_sizes:
            raise CheckpointError(f"{skey} in {files.shards[shard].name}: checkpoint shape {have} does not match the "
                                  f"model's {want} (from the config); pass ignore_mismatched_sizes=True to "
                                  "re-initialise it instead")
        report.mismatched_keys.append((mkey, have, want))
        init.append(mkey)
    missing = [k for k in shapes if k not in assign and k not in init]
    body = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if body:
        sample = ", ".join(list(stored)[:3])
        raise CheckpointError(f"{len(body)} weights the model needs are missing from the checkpoint at "
                              f"{files.shards[0].parent}: {', '.join(body[:5])}{' …' if len(body) > 5 else ''} "
                              f"(the checkpoint's keys look like: {sample})")
    report.missing_keys = missing
    init.extend(missing)
    report.newly_initialized_keys = list(init)
    return LoadPlan(assign, init, report)


# --------------------------------------------------------------------------------------- placing tensors into the model


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `key`, keeping its requires_grad."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        module._buffers[leaf] = value


@torch.no_grad()
def initialize(model: nn.Module, keys: list[str], device_of: Callable[[str], torch.device | str],
               dtype: torch.dtype) -> None:
    """Materialise `keys` on their device and dtype and fill them with the model's own `_init_weights`; other
    tensors of the same module keep their loaded values."""
    by_module: dict[str, list[str]] = {}
    for key in keys:
        by_module.setdefault(key.rpartition(".")[0], []).append(key.rpartition(".")[2])
    for module_name, leaves in by_module.items():
        module = model.get_submodule(module_name)
        device = device_of(f"{module_name}.{leaves[0]}")
        device = torch.device("cpu") if device == "disk" else device
        kept = {n: t for n, t in module.named_parameters(recurse=False) if n not in leaves and not t.is_meta}
        for leaf in leaves:
            old = module._parameters.get(leaf)
            shape = old.shape if old is not None else module._buffers[leaf].shape
            set_tensor(model, f"{module_name}.{leaf}", torch.empty(shape, dtype=dtype, device=device))
        for name, t in module.named_parameters(recurse=False):
            if t.is_meta:  # _init_weights fills the whole module: give its other tensors a place first
                set_tensor(model, f"{module_name}.{name}", torch.empty(t.shape, dtype=dtype, device=device))
        model._init_weights(module)
        for name, t in kept.items():
            module._parameters[name] = t


def check_no_meta(model: nn.Module, allowed: set[str]) -> None:
    """Raise naming every parameter or buffer still on the meta device (except disk-offloaded ones)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    left = [k for k, t in tensors if t.is_meta and k not in allowed]  # non-persistent buffers included
    if left:
        raise CheckpointError(f"after loading, {len(left)} tensors are still on the meta device (never loaded nor "
                              f"initialised): {', '.join(left[:10])}")


def _lm_head_matches(files: CheckpointFiles, lm_head: tuple[str, int], embed: tuple[str, int] | None) -> bool:
    if embed is None:
        return False
    shards = {i: files.open(i) for i in {lm_head[1], embed[1]}}
    cpu = torch.device("cpu")
    a = shards[lm_head[1]].tensor(lm_head[0], None, cpu)
    b = shards[embed[1]].tensor(embed[0], None, cpu)
    # A .bin saved from a tied model stores one storage for both: no need to read it.
    same_memory = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    equal = same_memory or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
    for shard in shards.values():
        shard.close()
    return equal


# -------------------------------------------------------------------------- device_map (accelerate, imported only here)


def plan_device_map(model: nn.Module, device_map: str | dict | int | torch.device, max_memory: dict | None,
                    dtype: torch.dtype) -> dict[str, Any]:
    """An explicit {module name: device | "disk"} map from "auto" / "balanced" / "sequential" (accelerate's
    planner, never splitting an OPTDecoderLayer), a single device, or a user dict (checked to cover every weight)."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(model._no_split_modules)
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        if device_map == "sequential":
            max_memory = get_max_memory(max_memory)
        else:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
    elif isinstance(device_map, (str, int, torch.device)):
        device_map = {"": device_map}
    elif not isinstance(device_map, dict):
        raise TypeError(f"device_map must be 'auto', 'balanced', 'sequential', a device or a dict, got {device_map!r}")
    device_map = dict(device_map)
    uncovered = [k for k in model.state_dict() if _device_in_map(k, device_map) is None]
    if uncovered:
        raise ValueError(f"device_map does not place {len(uncovered)} weights: {', '.join(uncovered[:5])} "
                         f"(map their modules, or '' for the rest)")
    return device_map


def _device_in_map(key: str, device_map: dict[str, Any]) -> Any:
    best = None
    for name, device in device_map.items():
        if name == "" or key == name or key.startswith(name + "."):
            if best is None or len(name) > len(best[0]):
                best = (name, device)
    return None if best is None else best[1]


def _as_device(device: Any) -> torch.device | str:
    if device == "disk":
        return "disk"
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


# ------------------------------------------------------------------------------------------------------ from_pretrained


def load_pretrained(cls: type[nn.Module], source: Source, *, dtype: str | torch.dtype | None = None,
                    device: str | int | torch.device | None = None,
                    device_map: str | dict | int | torch.device | None = None, max_memory: dict | None = None,
                    offload_folder: str | os.PathLike | None = None, ignore_mismatched_sizes: bool = False,
                    output_loading_info: bool = False, config: OPTConfig | None = None, progress: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    **config_overrides: Any) -> nn.Module | tuple[nn.Module, dict]:
    """The body of `OPTPreTrainedModel.from_pretrained` (see its docstring), for the checkpoint at `source`."""
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    config = _config_for_load(source, config, state_dict, config_overrides)
    if state_dict is not None:  # the weights are given: the folder, if any, supplies only the config
        files = CheckpointFiles(None, "state_dict", [Path("state_dict")], tensors=state_dict)
    else:
        files = find_checkpoint(source, with_config=False)
    stored = scan_shards(files)
    target = _target_dtype(dtype, config, stored)
    model = build_on_meta(cls, config, files, stored, source)
    plan = plan_load(model, stored, files, ignore_mismatched_sizes)
    if device_map is not None:
        device_map = plan_device_map(model, device_map, max_memory, target)
    device_of = _placement(device, device_map, offload_folder)
    offload_index = _load_tensors(model, files, plan, stored, target, device_of, offload_folder, progress)
    if plan.init:
        initialize(model, plan.init, device_of, target)
        for key in plan.init:
            if device_of(key) == "disk":
                _offload(model.get_parameter(key), key, offload_folder, offload_index)
    model.tie_weights()
    check_no_meta(model, set(offload_index))
    if device_map is None and not _file_mapped(files, stored, target, device_of("")):
        _stack_cpu_qkv(model)
    if device_map is not None:
        _dispatch(model, device_map, offload_folder, offload_index)
    model.eval()
    _read_generation_config(model, source)
    shards = f"{len(files.shards)} shard{'s' * (len(files.shards) > 1)}"
    plan.report.log(cls.__name__, source, f"{files.format}, {shards}, {dtype_name(target)}")
    return (model, plan.report.as_dict()) if output_loading_info else model


def _file_mapped(files: CheckpointFiles, stored: dict[str, tuple[TensorInfo, int]], dtype: torch.dtype,
                 device: torch.device | str) -> bool:
    """Whether the weights are the safetensors files' own pages: on the CPU, none of them cast (zero copy)."""
    return files.format == "safetensors" and torch.device(device).type == "cpu" and all(
        info.dtype == dtype for info, _ in stored.values() if info.dtype.is_floating_point)


def _qkv_buffers(model: nn.Module, plan: LoadPlan, stored: dict[str, tuple[TensorInfo, int]], dtype: torch.dtype,
                 device_of: Callable[[str], Any]) -> dict[str, torch.Tensor]:
    """For q/k/v tensors that are cast to fp32 on the CPU: the views of one buffer per layer (and per weight or
    bias) they are read into, stacked as the model builds them (`OPTAttention.share_qkv_storage`), so that
    `_stack_cpu_qkv` finds them in place and copies nothing."""
    if dtype is not torch.float32:
        return {}
    into = {}
    for name, m in model.named_modules():
        if not hasattr(m, "share_qkv_storage"):
            continue
        for leaf in ("weight", "bias"):
            keys = [f"{name}.{p}_proj.{leaf}" for p in "qkv"]
            if not all(k in plan.assign and device_of(k) != "disk" and torch.device(device_of(k)).type == "cpu"
                       and stored[plan.assign[k][0]][0].dtype != dtype for k in keys):
                continue
            shapes = [model.get_parameter(k).shape for k in keys]  # the meta parameters' shapes
            buf = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype)
            into.update(zip(keys, buf.split([s[0] for s in shapes]), strict=True))
    return into


def _stack_cpu_qkv(model: nn.Module) -> None:
    """On the CPU in fp32, where one q/k/v product instead of three pays, make sure each layer's q/k/v share one
    buffer as the model builds them (`OPTAttention.share_qkv_storage`). Upcast loads already read them into it
    (`_qkv_buffers`); tensors loaded as they are (a .bin file, a `state_dict=`) are copied there, a layer at a
    time. Not called for file-mapped weights, which stay zero copy."""
    for m in model.modules():
        w = getattr(getattr(m, "q_proj", None), "weight", None)
        if hasattr(m, "share_qkv_storage") and w is not None and w.is_cpu and w.dtype is torch.float32:
            m.share_qkv_storage()


def _placement(device: str | int | torch.device | None, device_map: dict[str, Any] | None,
               offload_folder: str | os.PathLike | None) -> Callable[[str], torch.device | str]:
    """Where each checkpoint key goes: its module's entry in the (resolved) device_map, else `device` (or the CPU)."""
    if device_map is None:
        home = torch.device(device if device is not None else "cpu")
        return lambda key: home
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map sends weights to 'disk': pass offload_folder= (a folder for them)")
    return lambda key: _as_device(_device_in_map(key, device_map))


def _read_generation_config(model: nn.Module, source: Source) -> None:
    """The checkpoint's decoding defaults, read by generate(), when it has a generation_config.json."""
    generation_file = source.file(GENERATION_CONFIG_NAME, required=False) if source.name_or_path is not None else None
    if generation_file is not None:
        from .generation import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(generation_file)


def _config_for_load(source: Source, config: OPTConfig | None, state_dict: dict | None,
                     overrides: dict[str, Any]) -> OPTConfig:
    """The config of the model to build: `config=`, or the checkpoint's with `overrides` applied; its
    `name_or_path` set to where the model comes from, as transformers sets it."""
    if config is not None and overrides:
        raise TypeError(f"pass config overrides ({', '.join(overrides)}) or config=, not both")
    if source.name_or_path is None:
        if config is None or state_dict is None:
            raise ValueError("from_pretrained(None, ...) needs both config= (an OPTConfig) and state_dict= (the "
                             "weights); pass a checkpoint directory or hub repo id otherwise")
        return config
    if config is None:
        return OPTConfig.from_source(source, **overrides)
    config.name_or_path = str(source.name_or_path)
    return config


def build_on_meta(cls: type[nn.Module], config: OPTConfig, files: CheckpointFiles,
                  stored: dict[str, tuple[TensorInfo, int]], source: Source) -> nn.Module:
    """The model on the meta device: no memory, no random init. A stored lm_head.weight that differs from the
    embedding unties them (config.tie_word_embeddings=False), as transformers does, so the stored head is used."""
    with torch.device("meta"), _skip_init():
        model = cls(config)
    if ties_lm_head(model):
        keys = {canonical_key(k): (k, shard) for k, (_, shard) in stored.items()}
        lm_head, embed = keys.get("lm_head.weight"), keys.get("decoder.embed_tokens.weight")
        if lm_head is not None and not _lm_head_matches(files, lm_head, embed):
            logger.warning("%s: the stored lm_head.weight differs from embed_tokens although the config ties them; "
                           "using the stored head, untied (config.tie_word_embeddings=False)", source)
            config = dataclasses.replace(config, tie_word_embeddings=False)
            with torch.device("meta"), _skip_init():
                model = cls(config)
    return model


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Skip nn.init while building on meta: it does nothing there, yet torch routes a meta normal_ through
    torch._refs, whose first use imports torch._dynamo (seconds)."""
    names = ["normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_"]
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _target_dtype(dtype: str | torch.dtype | None, config: OPTConfig,
                  stored: dict[str, tuple[TensorInfo, int]]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        if config.torch_dtype is not None:
            return parse_dtype(config.torch_dtype)
        floats = [info.dtype for info, _ in stored.values() if info.dtype.is_floating_point]
        return floats[0] if floats else torch.float32
    return parse_dtype(dtype)


def _load_tensors(model: nn.Module, files: CheckpointFiles, plan: LoadPlan, stored: dict[str, tuple[TensorInfo, int]],
                  dtype: torch.dtype, device_of: Callable[[str], Any], offload_folder: str | os.PathLike | None,
                  progress: bool) -> dict[str, dict]:
    """Read shard after shard, assigning each tensor (cast on the way if needed); returns accelerate's offload index
    of the tensors sent to disk."""
    by_shard: dict[int, list[tuple[str, str]]] = {}
    for mkey, (skey, shard) in plan.assign.items():
        by_shard.setdefault(shard, []).append((mkey, skey))
    # The tied lm_head has no tensor of its own, but accelerate places and offloads it by its own name.
    tied = {_embed_key(model): ["lm_head.weight"]} if ties_lm_head(model) else {}
    offload_index: dict[str, dict] = {}
    stacked_into = _qkv_buffers(model, plan, stored, dtype, device_of)
    # Casting is mostly first-touch page faults on the new memory: a few threads overlap them (copy_ frees the GIL).
    # Not when offloading to disk, where the point is to hold little: one tensor at a time.
    workers = 1 if any(device_of(k) == "disk" for k in plan.assign) else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in progress_bar(range(len(files.shards)), progress, len(files.shards)):
            shard = files.open(i)

            def read(item: tuple[str, str], shard: SafetensorsShard | BinShard = shard) -> tuple[str, Any, dict]:
                mkey, skey = item
                cast = dtype if stored[skey][0].dtype.is_floating_point else None
                devices = {name: device_of(name) for name in [mkey, *tied.get(mkey, [])]}
                live = [d for d in devices.values() if d != "disk"]
                device = live[0] if live else torch.device("cpu")
                return mkey, shard.tensor(skey, cast, device, out=stacked_into.get(mkey)), devices

            for mkey, value, devices in pool.map(read, by_shard.get(i, [])):
                for name, device in devices.items():
                    if device == "disk":
                        _offload(value, name, offload_folder, offload_index)
                if any(d != "disk" for d in devices.values()):
                    set_tensor(model, mkey, value)
            shard.close()
    return offload_index


def _embed_key(model: nn.Module) -> str:
    return "model.decoder.embed_tokens.weight" if hasattr(model, "model") else "decoder.embed_tokens.weight"


def _offload(value: torch.Tensor, name: str, folder: str | os.PathLike, index: dict[str, dict]) -> None:
    from accelerate.utils import offload_weight

    os.makedirs(folder, exist_ok=True)
    offload_weight(value, name, str(folder), index=index)


def _dispatch(model: nn.Module, device_map: dict[str, Any], offload_folder: Any, index: dict[str, dict]) -> None:
    from accelerate import dispatch_model
    from accelerate.utils import save_offload_index

    if index:
        save_offload_index(index, str(offload_folder))
    dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if index else None,
                   offload_index=index or None)


def progress_bar(it: Any, enabled: bool, total: int) -> Any:
    if not enabled or total < 2:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc="Loading checkpoint shards", unit="shard")
