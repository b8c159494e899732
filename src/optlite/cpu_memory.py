"""glibc's malloc thresholds, raised at a model's first forward, so that large activations reuse freed memory.

glibc gives an allocation above its mmap threshold a mapping of its own, and hands the top of its heap back to the
system once more than its trim threshold lies free there. Both start low (128 KiB) and rise only as the program
frees large blocks, up to 32 MiB and 64 MiB. Until they have risen, every forward's large activations (fc1's
output is 6 MiB for 512 tokens of opt-125m) arrive as fresh pages that the kernel faults in and zeroes: an int8
1x512 prefill of opt-125m took 17,000-31,000 page faults in most fresh processes (scripts/bench_malloc.py), and at
the thresholds glibc had reached there, 1.12x as long as with them raised (one process, alternating, on an AMD
EPYC). Whether they had risen depended on what the process had freed first.

The first forward of an optlite model sets both to glibc's own ceiling (`tune_malloc_once`). That keeps at most
64 MiB of freed memory at the top of the heap for reuse; blocks over 32 MiB (the logits of long batches) still get
mappings of their own. Not at import: loading keeps glibc's defaults, which return each tensor read and freed on
the way (an int8 load of a 206 MB-in-fp32 model peaked at 0.62x its fp32 size so, 0.92x with the thresholds
raised before it). Nothing changes outside glibc (macOS, Windows, musl), when the user set either threshold
(MALLOC_*_THRESHOLD_ or GLIBC_TUNABLES), or with the environment variable `OPTLITE_TUNE_MALLOC=0`.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # where glibc's dynamic trim threshold ends: twice the mmap threshold


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
def tune_malloc_once() -> bool:
    """`tune_malloc()` the first time it is called in this process, its answer after (the model's forward calls it)."""
    return tune_malloc()


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds to their dynamic ceiling; True if they were set."""
    if not glibc() or user_chose_thresholds(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, glibc's among them
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
