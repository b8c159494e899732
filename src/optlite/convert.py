"""`convert`: rewrite any loadable OPT checkpoint (the hub's pickled `.bin` shards, another layout, another dtype)
as safetensors in optlite's layout, streaming shard by shard. Reading is checkpoint.py's, writing saving.py's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import (
    CONFIG_NAME,
    build_on_meta,
    dtype_name,
    find_checkpoint,
    open_shard,
    parse_dtype,
    parse_size,
    plan_load,
    progress_bar,
    scan_shards,
)
from .config import OPTConfig
from .hub import Source
from .saving import ShardWriter, atomic_write, staged_directory

# Files besides the weights that convert() copies along when the source has them.
SIDE_FILES = ["generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "tokenizer.json"]


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
            max_shard_size: int | str = "5GB", revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False, token: str | bool | None = None, progress: bool = True) -> Path:
    """Rewrite any loadable OPT checkpoint (e.g. the hub's pickled `.bin` shards) as safetensors in optlite's layout:
    `model.decoder.*` keys, no `lm_head.weight` when tied, config.json (+ tokenizer files when present), optionally
    in another dtype and shard size. Streams shard by shard; the destination is replaced atomically.

    Example:
        >>> import optlite
        >>> optlite.convert("facebook/opt-1.3b", "opt-1.3b-st", dtype="float16")
        PosixPath('opt-1.3b-st')
    """
    from .heads import OPTForCausalLM, OPTForQuestionAnswering, OPTForSequenceClassification
    from .modeling import OPTModel

    source = Source(src, revision, cache_dir, local_files_only, token)
    config = OPTConfig.from_source(source)
    files = find_checkpoint(source, with_config=False)
    stored = scan_shards(files)
    classes = {c.__name__: c for c in (OPTModel, OPTForCausalLM, OPTForSequenceClassification,
                                       OPTForQuestionAnswering)}
    arch = (config.extra.get("architectures") or ["OPTForCausalLM"])[0]
    cls = classes.get(arch, OPTForCausalLM)
    model = build_on_meta(cls, config, files, stored, source)
    plan = plan_load(model, stored, files)
    cast = parse_dtype(dtype) if dtype is not None else None
    by_shard: dict[int, list[tuple[str, str]]] = {}
    for mkey, (skey, shard) in plan.assign.items():
        by_shard.setdefault(shard, []).append((mkey, skey))
    out_config = config.to_dict()
    out_config.setdefault("architectures", [cls.__name__])
    with staged_directory(dst) as stage:
        writer = ShardWriter(stage, parse_size(max_shard_size))
        for i in progress_bar(range(len(files.shards)), progress, len(files.shards)):
            shard = open_shard(files.shards[i], files.format)
            for mkey, skey in by_shard.get(i, []):
                t = shard.tensor(skey, cast if stored[skey][0].dtype.is_floating_point else None, torch.device("cpu"))
                writer.add(mkey, t)
                out_config["torch_dtype"] = dtype_name(t.dtype) if t.is_floating_point() else out_config["torch_dtype"]
            shard.close()
        writer.finish()
        atomic_write(stage / CONFIG_NAME, json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        for name in SIDE_FILES:
            path = source.file(name, required=False)
            if path is not None:
                shutil.copyfile(path, stage / name)
    plan.report.newly_initialized_keys = []  # convert writes what is there and initialises nothing
    plan.report.log("convert", source, f"{files.format} -> safetensors")
    return Path(dst)
