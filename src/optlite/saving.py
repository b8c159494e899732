"""Writing checkpoints: safetensors (or .bin) shards with an index, config.json and generation_config.json, staged
in a temporary folder beside the target and swapped in whole, so a save that fails half-way (disk full, killed)
leaves the previous checkpoint readable.

Layout written: the model's own keys (`model.decoder.*` + head, or `decoder.*` for OPTModel), the tied
`lm_head.weight` left out, as transformers does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .checkpoint import (
    BIN_INDEX_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    SAFE_INDEX_NAME,
    CheckpointError,
    dtype_name,
    libc,
    parse_size,
)

# Files a save owns: replaced or removed by the next save, so no stale shard stays mixed with new ones.
_OWNED = re.compile(r"(config\.json|model\.safetensors(\.index\.json)?|pytorch_model\.bin(\.index\.json)?"
                    r"|(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin))")


class ShardWriter:
    """Collects tensors in order and writes a shard whenever the next tensor would pass `max_bytes`; `finish` gives
    the shards their final names (model-00001-of-00003.safetensors, or model.safetensors alone) and the index.
    Files are written under temporary names first, so no half-written file ever carries a checkpoint's name."""

    def __init__(self, folder: Path, max_bytes: int, safe: bool = True):
        self.folder, self.max_bytes, self.safe = folder, max_bytes, safe
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f"shard-{len(self.written) + 1:05d}.partial"
        tensors = {k: _storable(t, compact=not self.safe) for k, t in self.pending.items()}
        if self.safe:
            try:
                save_file(tensors, str(path), metadata={"format": "pt"})
            except SafetensorError as e:  # safetensors reports I/O failures (a full disk) as its own error type
                full = any(s in str(e) for s in ("No space left", "StorageFull", "os error 28"))
                raise OSError(errno.ENOSPC if full else errno.EIO, str(e)) from e
        else:
            torch.save(tensors, path)
        _fsync(path)
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        stem, ext = ("model", "safetensors") if self.safe else ("pytorch_model", "bin")
        n = len(self.written)
        if n == 0:
            raise CheckpointError("nothing to save: the model has no tensors")
        names = [f"{stem}.{ext}"] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]
        weight_map = {}
        for (path, keys), name in zip(self.written, names, strict=True):
            os.replace(path, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write(self.folder / (SAFE_INDEX_NAME if self.safe else BIN_INDEX_NAME),
                         json.dumps(index, indent=2) + "\n")
            names.append(SAFE_INDEX_NAME if self.safe else BIN_INDEX_NAME)
        return names


def _storable(t: torch.Tensor, compact: bool) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    if compact and t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # torch.save writes a view's whole storage: a memory-mapped file's worth
    return t


class SaveError(OSError):
    """Writing a file or folder failed (disk full, no permission, …); the message names the target."""

    reason: str = ""


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Replace the file `path` atomically: write `content` (text, bytes, or a function that writes the file at
    the path it is given) under a temporary name beside it, flush it to disk, then rename it into place. Readers
    see the old file or the new one, never a half-written one; a failure leaves the old file and names the target.

    Example:
        >>> atomic_write("config.json", "{}")
        PosixPath('config.json')
        >>> atomic_write("tokenizer.json", lambda p: tok.backend_tokenizer.save(str(p))).stat().st_size > 0
        True
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        if callable(content):
            content(partial)
        elif isinstance(content, bytes):
            partial.write_bytes(content)
        else:
            partial.write_text(content, encoding="utf-8")
        _fsync(partial)
        os.replace(partial, path)
    except OSError as e:
        raise save_error(e, path) from e
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_error(error: OSError, target: Path) -> SaveError:
    """`error` as a SaveError that names `target`, the file or folder being written."""
    if isinstance(error, SaveError):
        reason = error.reason
    elif error.errno == errno.ENOSPC:
        reason = os.strerror(errno.ENOSPC)
    else:
        reason = error.strerror or str(error)
    wrapped = SaveError(error.errno, f"could not save {target}: {reason}; its previous contents are unchanged")
    wrapped.reason = reason
    return wrapped


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike, keep_other_files: bool = True) -> Iterator[Path]:
    """Yield an empty folder beside `target` (same filesystem) to write a checkpoint into; on success swap it with
    `target` in one rename, carrying over the files a save does not own (tokenizer files, README, …) unless
    `keep_other_files` is False (training checkpoints: the new folder is the whole checkpoint). On failure
    (exception, disk full, kill) the folder is removed and `target` is untouched, so the old checkpoint stays
    readable; a folder left by a killed process is removed by the next save to the same target.

    Example:
        >>> with staged_directory("out/ckpt") as tmp:
        ...     _ = (tmp / "config.json").write_text("{}")
        >>> [p.name for p in Path("out/ckpt").iterdir()]
        ['config.json']
    """
    target = Path(target).resolve()
    stage = new_stage(target)
    try:
        yield stage
        commit_stage(stage, target, keep_other_files)
    except OSError as e:
        raise save_error(e, target) from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # on success it now holds the previous version


def new_stage(target: Path) -> Path:
    """An empty staging folder beside `target`, after removing those that dead processes left for it."""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_stages(target)
    stage = target.parent / f".{target.name}.optlite-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def _remove_abandoned_stages(target: Path) -> None:
    clear_abandoned(target.parent, target.name)


def clear_abandoned(folder: str | os.PathLike, name: str = "*") -> None:
    """Clear what saves killed mid-way left in `folder` (for the checkpoint `name`, or all): staging folders are
    removed; a previous version set aside for a swap that never happened is put back where it was.

    Example:
        >>> clear_abandoned("out")  # a save into out/ was killed: its staging folders go
    """
    for old in Path(folder).glob(f".{name}.optlite-*-*"):
        parts = old.name[1:].rsplit("-", 3)  # <name>.optlite, tmp|old, pid, random
        if len(parts) != 4 or not parts[0].endswith(".optlite") or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        kind, original = parts[1], old.with_name(parts[0].removesuffix(".optlite"))
        with contextlib.suppress(OSError):  # another process may be clearing the same folder
            if kind == "old" and not original.exists():
                os.rename(old, original)  # killed between the two renames of a swap: the old version is whole
            else:
                shutil.rmtree(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit_stage(stage: Path, target: Path, keep_other_files: bool = True) -> None:
    """Swap the finished `stage` in as `target` (the old `target`, if any, is left at `stage`'s path)."""
    for path in [*stage.rglob("*"), stage]:  # everything on disk before the rename makes it visible
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # folders cannot be opened for fsync on every platform
                _fsync(path)
        elif path.is_file() and not path.is_symlink():
            _fsync(path)  # files written by others too (accelerate's, in training checkpoints)
    if not target.exists():
        os.rename(stage, target)
        return
    for entry in target.iterdir():
        if keep_other_files and not _OWNED.fullmatch(entry.name) and not (stage / entry.name).exists():
            _carry(entry, stage / entry.name)
    os.chmod(stage, target.stat().st_mode & 0o7777)
    cwd = os.getcwd()
    if not _exchange(stage, target):
        aside = target.with_name(f".{target.name}.optlite-old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, aside)  # without an atomic exchange, two renames (target is absent only in between)
        os.rename(stage, target)
        os.rename(aside, stage)
    if cwd == str(target) or cwd.startswith(str(target) + os.sep):
        os.chdir(cwd)  # our working directory was the old folder, about to be deleted: follow the new one


def _carry(src: Path, dst: Path) -> None:
    # Hard links cost nothing and keep the old folder intact until the swap; copy where links are not possible.
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = libc().renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by checkpoint key: the tied lm_head left out, disk-offloaded ones read back."""
    # keep_vars: the tensors themselves; a plain state_dict() would copy the tied lm_head only to drop it here.
    state = {key: t.detach() for key, t in model.state_dict(keep_vars=True).items()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and model.config.tie_word_embeddings and _same_tensor(head.weight, embed.weight):
        state.pop("lm_head.weight", None)  # stored once, as transformers does; a head untied by hand is kept
    for key, t in state.items():
        if t.is_meta:
            state[key] = _offloaded_value(model, key)
    return state


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and a.data_ptr() == b.data_ptr())


def _offloaded_value(model: nn.Module, key: str) -> torch.Tensor:
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is not None:
            return weights[".".join(parts[i:])]
    raise CheckpointError(f"cannot save {key}: it is on the meta device and no offload hook holds its value")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    safe_serialization: bool = True) -> Path:
    """The body of `OPTPreTrainedModel.save_pretrained` (see its docstring)."""
    max_bytes = parse_size(max_shard_size)
    state = state_dict_to_save(model)
    floats = [t.dtype for t in state.values() if t.dtype.is_floating_point]
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = dtype_name(floats[0]) if floats else config.get("torch_dtype")
    with staged_directory(save_directory) as stage:
        writer = ShardWriter(stage, max_bytes, safe_serialization)
        for key, t in state.items():
            writer.add(key, t)
        writer.finish()
        atomic_write(stage / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            atomic_write(stage / GENERATION_CONFIG_NAME,
                         json.dumps(generation_config.to_dict(), indent=2, sort_keys=True) + "\n")
    return Path(save_directory)
