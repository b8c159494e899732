"""The peak memory of one `OPTForCausalLM.from_pretrained` in a fresh process, for the tests that bound it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import optlite

LOAD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import optlite

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

torch.ops.quantized.linear_dynamic  # kernels that load lazily are loaded before the baseline
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current RSS
base = kib("VmRSS")
model = optlite.OPTForCausalLM.from_pretrained(sys.argv[1], progress=False, **json.loads(sys.argv[3]))
print((kib("VmHWM") - base) * 1024)
"""


def load_peak(path: Path, **kwargs: str) -> int:
    """Bytes the process grew by, at its peak, while loading `path` with these from_pretrained keywords (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs is not writable here: the peak cannot be reset")
    src = str(Path(optlite.__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", LOAD, str(path), src, json.dumps(kwargs)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])
