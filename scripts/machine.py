"""What a benchmark ran on: the CPU's name and the machine's memory bandwidth, printed above every table."""

from __future__ import annotations

import platform
import subprocess
import time


def cpu_name() -> str:
    """The CPU model as lscpu names it ("AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C"), else /proc/cpuinfo's.

    Example:
        >>> isinstance(cpu_name(), str)
        True
    """
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={"LC_ALL": "C"}).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The CPU flags that decide which kernels run: AVX-512, its BF16 and VNNI extensions, AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]


def copy_bandwidth(device: str = "cpu", sync=lambda: None) -> float:
    """Bytes/s of a 512 MB tensor copy (read + write, best of 5): the memory-bandwidth yardstick for decoding."""
    import torch

    src = torch.empty(128 * 1024 * 1024, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: the page faults are not bandwidth
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best
