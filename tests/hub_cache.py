"""Build a Hugging Face cache folder by hand, laid out exactly as huggingface_hub writes it, so hub code paths run
offline (with HF_HUB_OFFLINE=1 or local_files_only=True).

    <cache_dir>/models--<org>--<name>/
        blobs/<sha256 of the content>
        snapshots/<40-hex commit>/<filename> -> ../../blobs/<sha256>
        refs/<revision>          the commit hash; a revision "refs/pr/35" is stored at refs/refs/pr/35
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def make_hub_cache(cache_dir: str | os.PathLike, repo_id: str, files: dict[str, Path | bytes],
                   revision: str = "main") -> Path:
    """Put `files` ({name in the repo: a file to copy, or the bytes}) in the cache as revision `revision` of the
    model repo `repo_id`; returns the snapshot folder. Several calls with other revisions add snapshots side by side.

    Example:
        >>> tmp_path = getfixture("tmp_path")
        >>> snap = make_hub_cache(tmp_path, "facebook/opt-125m", {"config.json": b"{}"}, revision="refs/pr/35")
        >>> (snap / "config.json").read_bytes()
        b'{}'
    """
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()  # any 40-hex string is a valid commit id
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # the hub names LFS blobs by their sha256
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = repo / "refs" / revision  # huggingface_hub reads refs/<revision>, so "refs/pr/35" nests two folders
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot
