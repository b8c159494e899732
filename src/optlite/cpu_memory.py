"""glibc's malloc thresholds, raised at a model's first forward, so that large activations reuse freed memory.

glibc gives an allocation above its mmap threshold a mapping of its own, and hands the top of its heap back to the
system once more than its trim threshold lies free there. Both start low (128 KiB) and rise only as the program
frees large blocks, up to 32 MiB and 64 MiB. Until they have risen, every forward's large activations (fc1's
output is 6 MiB for 512 tokens of opt-125m) arrive as fresh pages that the kernel faults in and zeroes: an int8
1x512 prefill of opt-125m took 17,000-31,000 page faults in most fresh processes (scripts/bench_malloc.py), and at
the thresholds glibc had reached there, 1.12x as long as with them raised (one process, alternating, on an AMD
EPYC). Whether they had risen depended on what the process had freed first.

The first forward of an optlite model sets them to 256 MiB and 512 MiB (`tune_malloc_once`), past glibc's own
ceiling, because a vocabulary-wide output is larger than that ceiling: the logits of 512 scored tokens take 103 MB
(opt-125m), those of a 4x256 training batch and their gradient 206 MB each. With the thresholds at 32 and 64 MiB
each came as a fresh mapping, 26,000 page faults per 103 MB: an int8 forward scoring 512 tokens took 44,000 faults
and 1.2-1.4x as long as with the thresholds here, a training step 250,000 faults (AMD EPYC, fresh processes). Where
a glibc refuses a threshold that high, they are set to its ceiling. The cost is memory held for reuse: up to 512 MiB
freed at the top of the heap stays with the process (a 4x256 opt-125m training step peaked 0.1-0.2 GiB higher), and
blocks over 256 MiB still get mappings of their own. Not at import: loading keeps glibc's defaults, which return
each tensor read and freed on the way (an int8 load of a 206 MB-in-fp32 model peaked at 0.62x its fp32 size so,
0.92x with raised thresholds before it). Nothing changes outside glibc (macOS, Windows, musl), when the user set
either threshold (MALLOC_*_THRESHOLD_ or GLIBC_TUNABLES), or with the environment variable `OPTLITE_TUNE_MALLOC=0`.

The first training forward (grad enabled, module in training mode) raises the trim threshold again, to the most
mallopt takes (2 GiB - 1), `tune_malloc_for_training_once`. A step frees more than 512 MiB at the top of the heap
(its activations, logits and their gradients) and the next step needs it back: at 512 MiB a 4x256 opt-125m step
took 31,000-65,000 page faults in fresh processes (each 206 MB buffer 50,272 of them), at 2 GiB 3,000-9,500
(scripts/bench_malloc.py --train, AMD EPYC). The peak resident memory is the same; what changes is that the process
keeps it between steps.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 256 << 20  # above a vocabulary-wide output of 4x256 tokens (206 MB at OPT's 50,272 words)
TRAINING_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt's value is a C int
GLIBC_CEILING = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems; some versions refuse more


def user_chose_thresholds(environ: dict[str, str]) -> bool:
    """Whether `environ` opts out or sets glibc's thresholds itself, which then stand.

    Example:
        >>> user_chose_thresholds({}), user_chose_thresholds({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
        (False, True)
    """
    return (environ.get("OPTLITE_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off")
            or "MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ
            or "malloc" in environ.get("GLIBC_TUNABLES", ""))


def glibc() -> bool:
    """Whether this process runs on glibc (its version string, as `getconf GNU_LIBC_VERSION` prints it)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (macOS, musl)
        return False


@functools.cache
def tune_malloc_once() -> int:
    """`tune_malloc()` the first time it is called in this process, its answer after (the model's forward calls it)."""
    return tune_malloc()


def tune_malloc() -> int:
    """Set glibc's mmap threshold to MMAP_THRESHOLD (where a glibc refuses that much, GLIBC_CEILING) and its trim
    threshold to twice that, as glibc's dynamic ones keep it; the mmap threshold set, 0 if none was."""
    if not glibc() or user_chose_thresholds(os.environ):
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, glibc's among them
    except (OSError, AttributeError):
        return 0
    for threshold in (MMAP_THRESHOLD, GLIBC_CEILING):
        if mallopt(M_MMAP_THRESHOLD, threshold):
            return threshold if mallopt(M_TRIM_THRESHOLD, 2 * threshold) else 0
    return 0


@functools.cache
def tune_malloc_for_training_once() -> int:
    """Once per process, after `tune_malloc_once`: the trim threshold raised to TRAINING_TRIM_THRESHOLD for training
    steps; the threshold set, 0 if none was (where `tune_malloc` set none either)."""
    if not tune_malloc_once():
        return 0
    return TRAINING_TRIM_THRESHOLD if ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD) else 0
