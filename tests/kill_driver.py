"""Runs scripts/train_clm.py with the given flags and kills itself (SIGKILL) at one moment of one checkpoint write,
for the kill -9 tests of test_training.py. KILL_CHECKPOINT names the checkpoint (e.g. step_6), KILL_MOMENT the
moment: "mid_file" (a file of the checkpoint half written), "before_state" (every file written but
trainer_state.json), "after_swap" (the new folder swapped in, the old one not yet removed) or "between_renames"
(no atomic exchange: the old folder moved aside, the new one not yet in place).
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

from optlite import saving
from optlite.train import loop as training

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT, MOMENT = os.environ["KILL_CHECKPOINT"], os.environ["KILL_MOMENT"]
active = False


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


real_save_checkpoint = training._Loop._save_checkpoint


def save_checkpoint(self: training._Loop, name: str) -> None:
    global active
    active = name == CHECKPOINT
    real_save_checkpoint(self, name)


real_torch_save, real_atomic_write, real_exchange, real_rename = torch.save, training.atomic_write, \
    saving._exchange, os.rename


def torch_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
    if not (active and MOMENT == "mid_file" and isinstance(f, (str, os.PathLike))):
        return real_torch_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_torch_save(obj, buffer, *args, **kwargs)
    Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    die()


def atomic_write(path: Path, content: object) -> Path:
    if active and MOMENT == "before_state":
        die()
    return real_atomic_write(path, content)


def exchange(a: Path, b: Path) -> bool:
    if active and MOMENT == "between_renames":
        return False
    done = real_exchange(a, b)
    if active and MOMENT == "after_swap":
        die()
    return done


def rename(src: object, dst: object) -> None:
    real_rename(src, dst)
    if active and MOMENT == "between_renames" and ".optlite-old-" in str(dst):
        die()


training._Loop._save_checkpoint = save_checkpoint
torch.save = torch_save
training.atomic_write = atomic_write
saving._exchange = exchange
os.rename = rename
sys.exit(runpy.run_path(str(ROOT / "scripts" / "train_clm.py"))["main"](sys.argv[1:]))
