"""Find a file in a local directory or a Hugging Face Hub repository (downloaded or from the cache)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    required: bool = True,
) -> Path | None:
    """Return the path of `filename` in a local directory or a hub repo; None if optional and absent.

    A hub repo is read through `huggingface_hub`, so the cache and `HF_HUB_OFFLINE=1` work as usual.

    Example:
        >>> resolve_file("facebook/opt-125m", "config.json")  # doctest: +SKIP
        PosixPath('.../snapshots/<commit>/config.json')
    """
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{filename!r} not found in directory {str(name_or_path)!r}")
        return None
    try:
        found = hf_hub_download(
            str(name_or_path),
            filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
    except HFValidationError as err:  # neither an existing directory nor a valid "org/name" repo id
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is not a directory and not a valid hub repo id ({err})"
        ) from None
    except (EntryNotFoundError, LocalEntryNotFoundError) as err:  # absent on the hub, or not cached offline
        if required:
            where = f"hub repo {str(name_or_path)!r} (revision {revision or 'main'})"
            raise FileNotFoundError(f"{filename!r} not found in {where}: {err}") from err
        return None
    return Path(found)


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` is an existing local directory (which always wins over a hub repo id of that name)."""
    return Path(name_or_path).is_dir()


def describe(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """How error messages name a checkpoint location: "directory '/x'" or "hub repo 'org/name' (revision main)"."""
    if is_local(name_or_path):
        return f"directory {str(name_or_path)!r}"
    return f"hub repo {str(name_or_path)!r} (revision {revision or 'main'})"
