"""Where a checkpoint lives (`Source`) and how its files are found: a local directory or a Hugging Face Hub
repository, downloaded or from the cache."""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError


@dataclass(frozen=True)
class Source:
    """Where a checkpoint's files live (a local directory or a hub repo id, in its `subfolder`) and how to reach the
    hub: the `revision`, `cache_dir`, `local_files_only` and `token` keywords of transformers' `from_pretrained`.

    A hub repo is read through `huggingface_hub`, so the cache and `HF_HUB_OFFLINE=1` work as usual. When the hub
    cannot be reached the cache is used at once (no retries); a file absent from it is reported with the cache
    folder and how to load a local folder instead.

    Example:
        >>> Source("facebook/opt-125m").file("config.json")  # doctest: +ELLIPSIS
        PosixPath('.../models--facebook--opt-125m/snapshots/.../config.json')
        >>> str(Source("facebook/opt-125m", revision="refs/pr/35"))
        "hub repo 'facebook/opt-125m' (revision refs/pr/35)"
    """

    name_or_path: str | os.PathLike | None  # None: the weights come as a state_dict
    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    subfolder: str = ""  # the checkpoint sits in this folder of the directory or repo

    def file(self, filename: str, required: bool = True) -> Path | None:
        """The path of `filename` (in the subfolder); None if optional and absent."""
        filename = subfolder_file(self.subfolder, filename)
        if is_local(self.name_or_path):
            path = Path(self.name_or_path) / filename
            if path.is_file():
                return path
            if required:
                raise FileNotFoundError(f"{filename!r} not found in directory {str(self.name_or_path)!r}")
            return None
        return self._hub_file(filename, required)

    def _hub_file(self, filename: str, required: bool) -> Path | None:
        offline = self.local_files_only or constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
        try:
            found = hf_hub_download(str(self.name_or_path), filename, revision=self.revision, cache_dir=self.cache_dir,
                                    local_files_only=offline, token=self.token)
        except HFValidationError as err:  # neither an existing directory nor a valid "org/name" repo id
            raise FileNotFoundError(f"{str(self.name_or_path)!r} is not a directory and not a valid hub repo id "
                                    f"({err})") from None
        except LocalEntryNotFoundError:  # not in the cache, and the hub is not used or did not answer
            if not required:
                return None
            raise FileNotFoundError(_not_cached(self, filename)) from None
        except EntryNotFoundError as err:  # absent on the hub
            if not required:
                return None
            where = describe(self.name_or_path, self.revision)
            raise FileNotFoundError(f"{filename!r} not found in {where}: {err}") from err
        return Path(found)

    def __str__(self) -> str:
        if self.name_or_path is None:
            return "the state_dict passed"
        where = describe(self.name_or_path, self.revision)
        return f"{where}, subfolder {self.subfolder!r}" if self.subfolder else where


def subfolder_file(subfolder: str | None, filename: str) -> str:
    """`filename` inside `subfolder` of a checkpoint ("" or None: at its top), as a path relative to its root."""
    if not subfolder:
        return filename
    parts = Path(subfolder).parts
    if Path(subfolder).is_absolute() or ".." in parts:
        raise ValueError(f"subfolder must be a relative path inside the checkpoint, got {subfolder!r}")
    return "/".join([*parts, filename])


def _not_cached(source: Source, filename: str) -> str:
    if source.local_files_only:
        why = "local_files_only=True was given"
    elif constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        why = f"the hub ({constants.ENDPOINT}) cannot be reached"
    return (f"{filename!r} of {describe(source.name_or_path, source.revision)} is not in the Hugging Face cache "
            f"{source.cache_dir or constants.HF_HUB_CACHE}, and {why}. Pass a local folder instead of the repo "
            "id (one that holds config.json and model.safetensors, as save_pretrained writes it), or download the "
            "model once where the hub is reachable")


@functools.cache
def hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub's host opens within 3 s (checked once per process). Behind a proxy the
    answer is left to huggingface_hub (True)."""
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(name) for name in proxies):
        return True
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except (OSError, ValueError):
        return False
    return True


def is_local(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` is an existing local directory (which always wins over a hub repo id of that name)."""
    return Path(name_or_path).is_dir()


def describe(name_or_path: str | os.PathLike, revision: str | None = None) -> str:
    """How error messages name a checkpoint location: "directory '/x'" or "hub repo 'org/name' (revision main)"."""
    if is_local(name_or_path):
        return f"directory {str(name_or_path)!r}"
    return f"hub repo {str(name_or_path)!r} (revision {revision or 'main'})"
