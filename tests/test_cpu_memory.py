"""glibc's malloc thresholds after `import optlite` and after a forward, read through mallinfo2 in fresh processes
(glibc's state depends on everything a process freed before, so only a new one shows what optlite did)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optlite import cpu_memory

ROOT = Path(__file__).resolve().parents[1]

# Allocates three 6 MiB tensors (fc1's output at 512 tokens of opt-125m) and frees them, then one of 40 MiB (over
# glibc's own 32 MiB ceiling) and one 8 MiB over the threshold optlite set, and reports in MiB how much came as
# mappings of their own and how much of the heap stayed after the free, right after `import optlite` or after a
# tiny model's forward (one or the other: glibc's thresholds rise as blocks are freed).
PRELUDE = """
import ctypes, json, sys
import torch
import optlite

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
"""
CHILD = PRELUDE + """
def mapped_mib(n_mib):
    before = libc.mallinfo2().hblkhd
    block = torch.ones(n_mib << 18)
    return (libc.mallinfo2().hblkhd - before) / 2**20

def measure(threshold):
    before = libc.mallinfo2()
    xs = [torch.ones(6 << 18) for _ in range(3)]
    during = libc.mallinfo2()
    del xs
    after = libc.mallinfo2()
    return {"threshold": threshold >> 20, "mapped": (during.hblkhd - before.hblkhd) / 2**20,
            "kept": (after.arena - before.arena) / 2**20, "40_mapped": mapped_mib(40),
            "over_mapped": mapped_mib((threshold >> 20) + 8)}

threshold = 0
if sys.argv[1] == "forward":
    config = optlite.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    optlite.OPTForCausalLM(config)(torch.tensor([[2, 5, 7]]))
    threshold = optlite.cpu_memory.tune_malloc_once()
print(json.dumps(measure(threshold)))
"""

pytestmark = pytest.mark.skipif(not cpu_memory.glibc(), reason="glibc's malloc only")


def child(stage: str, script: str = CHILD, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", script, stage], capture_output=True, text=True, timeout=120,
                          env={**environ, "PYTHONPATH": str(ROOT / "src"), **env})
    if "mallinfo2" in done.stderr:
        pytest.skip("glibc older than 2.33: no mallinfo2")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_after_a_forward_activations_come_from_the_heap_and_stay_for_reuse():
    got = child("forward")
    assert got["threshold"] in (cpu_memory.MMAP_THRESHOLD >> 20, cpu_memory.GLIBC_CEILING >> 20), got
    assert got["mapped"] == 0, got
    assert got["kept"] >= 17, got  # 18 MiB freed, below the trim threshold: kept for the next forward
    # 40 MiB (opt-125m's logits for 200 tokens) from the heap too, where this glibc took the higher threshold
    assert (got["40_mapped"] == 0) if got["threshold"] > 40 else (got["40_mapped"] >= 40), got
    assert got["over_mapped"] >= got["threshold"] + 8, got  # above the threshold: a mapping of its own


def test_import_leaves_glibc_as_it_starts():
    got = child("import")
    assert got["mapped"] >= 18 and got["kept"] < 1, got  # glibc's starting 128 KiB threshold maps each tensor


def test_opting_out_leaves_glibc_as_it_starts():
    got = child("forward", OPTLITE_TUNE_MALLOC="0")
    assert got["mapped"] >= 18 and got["kept"] < 1, got


def test_a_threshold_the_user_set_stands():
    got = child("forward", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert got["mapped"] >= 18, got  # 6 MiB is over the user's 1 MiB: mapped, as they asked


def test_tune_malloc_returns_the_threshold_it_set(monkeypatch):
    monkeypatch.setenv("OPTLITE_TUNE_MALLOC", "off")
    assert cpu_memory.tune_malloc() == 0
    for name in ("OPTLITE_TUNE_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_memory.tune_malloc() in (cpu_memory.MMAP_THRESHOLD, cpu_memory.GLIBC_CEILING)


# Four 200 MiB tensors (each under the 256 MiB mmap threshold, so from the heap) freed together: 800 MiB free at the
# top of the heap, over the 512 MiB trim threshold of inference, under the one a training forward sets.
TRIM_CHILD = PRELUDE + """
config = optlite.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
model = optlite.OPTForCausalLM(config).train(sys.argv[1] == "train")
model(torch.tensor([[2, 5, 7]]), labels=torch.tensor([[2, 5, 7]])).loss.backward()
before = libc.mallinfo2().arena
xs = [torch.ones(200 << 18) for _ in range(4)]
del xs
print(json.dumps({"kept": (libc.mallinfo2().arena - before) / 2**20}))
"""


def test_after_a_training_forward_the_heap_keeps_a_steps_freed_memory():
    assert child("train", TRIM_CHILD)["kept"] >= 790  # the next step's 800 MiB, without page faults
    assert child("eval", TRIM_CHILD)["kept"] < 790  # inference trims as before: what lies free over 512 MiB goes back


def test_tune_malloc_for_training_is_nothing_where_the_user_opted_out(monkeypatch):
    monkeypatch.setattr(cpu_memory, "tune_malloc_once", lambda: 0)
    cpu_memory.tune_malloc_for_training_once.cache_clear()
    try:
        assert cpu_memory.tune_malloc_for_training_once() == 0
    finally:
        cpu_memory.tune_malloc_for_training_once.cache_clear()
