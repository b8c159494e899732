"""Find a file in a local directory or a Hugging Face Hub repository (downloaded or from the cache)."""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
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

    A hub repo is read through `huggingface_hub`, so the cache and `HF_HUB_OFFLINE=1` work as usual. When the hub
    cannot be reached the cache is used at once (no retries); a file absent from it is reported with the cache
    folder and how to load a local folder instead.

    Example:
        >>> resolve_file("facebook/opt-125m", "config.json")  # doctest: +ELLIPSIS
        PosixPath('.../models--facebook--opt-125m/snapshots/.../config.json')
    """
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{filename!r} not found in directory {str(name_or_path)!r}")
        return None
    offline = local_files_only or constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    try:
        found = hf_hub_download(
            str(name_or_path),
            filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            token=token,
        )
    except HFValidationError as err:  # neither an existing directory nor a valid "org/name" repo id
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is not a directory and not a valid hub repo id ({err})"
        ) from None
    except LocalEntryNotFoundError:  # not in the cache, and the hub is not used or did not answer
        if not required:
            return None
        raise FileNotFoundError(_not_cached(name_or_path, filename, revision, cache_dir, local_files_only)) from None
    except EntryNotFoundError as err:  # absent on the hub
        if required:
            where = f"hub repo {str(name_or_path)!r} (revision {revision or 'main'})"
            raise FileNotFoundError(f"{filename!r} not found in {where}: {err}") from err
        return None
    return Path(found)


def _not_cached(name_or_path: str | os.PathLike, filename: str, revision: str | None,
                cache_dir: str | os.PathLike | None, local_files_only: bool) -> str:
    if local_files_only:
        why = "local_files_only=True was given"
    elif constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        why = f"the hub ({constants.ENDPOINT}) cannot be reached"
    return (f"{filename!r} of hub repo {str(name_or_path)!r} (revision {revision or 'main'}) is not in the Hugging "
            f"Face cache {cache_dir or constants.HF_HUB_CACHE}, and {why}. Pass a local folder instead of the repo "
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
