"""One command for a CUDA machine: the CUDA tests, bench.py in float16 and bfloat16, and decoding with the static
cache compiled into CUDA graphs against transformers' eager decoding. About 5-8 minutes; each part has a time limit.

    python scripts/gpu_check.py          # or: make gpu-check
    python scripts/gpu_check.py --skip-bench

On a machine without CUDA it says so and exits with status 2, running nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, cmd: list[str], limit_s: int) -> bool:
    """Run one part as a subprocess with a time limit; True when it exited 0."""
    print(f"\n== {title}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        ok = subprocess.run(cmd, cwd=ROOT, timeout=limit_s, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"   stopped after {limit_s} s")
        ok = False
    print(f"== {title}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return ok


def cuda_graph_decode(preset: str, new_tokens: int, repeats: int) -> bool:
    """Greedy batch-1 decoding: optlite with the static cache and torch.compile(mode="reduce-overhead") (CUDA
    graphs) against transformers eager, same fp16 weights; the tokens must agree before the times are printed."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import alternate, build_pair

    ref, ours = build_pair(preset, torch.float16, "cuda")
    ids = torch.randint(3, 50000, (1, 32), generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False)
    graphs = dict(kw, cache_implementation="static", compile={"mode": "reduce-overhead", "dynamic": False})
    runs = {"optlite static + CUDA graphs": lambda: ours.generate(ids, **graphs),
            "optlite eager": lambda: ours.generate(ids, **kw),
            "transformers eager": lambda: ref.generate(ids, **kw)}
    with torch.no_grad():
        t0 = time.perf_counter()
        tokens = {name: fn() for name, fn in runs.items()}  # also the compilation, not timed below
        print(f"   first runs (compilation included): {time.perf_counter() - t0:.0f} s")
        agree = all(torch.equal(t, tokens["transformers eager"]) for t in tokens.values())
        print(f"   greedy tokens {'agree' if agree else 'DIFFER'} across the three")
        times = alternate(runs, repeats, "cuda")
    base = times["transformers eager"]
    for name, s in times.items():
        print(f"   {preset} fp16 decode b1, 32+{new_tokens}: {name}: {new_tokens / s:.1f} tok/s ({base / s:.2f}x)")
    return agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-bench", action="store_true", help="only the tests and the CUDA-graph decode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "nothing was run. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
        sys.exit(2)
    print(f"gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    py = sys.executable
    results = {"CUDA tests": step("CUDA tests", [py, "-m", "pytest", "-q", "-x", "-k", "cuda", "tests"], 180)}
    if not args.skip_bench:
        for dtype in ("float16", "bfloat16"):
            results[f"bench {dtype}"] = step(f"bench.py on CUDA, {dtype}", [
                py, "scripts/bench.py", "--device", "cuda", "--dtype", dtype, "--shapes", "opt-125m", "opt-350m",
                "--cases", "prefill", "b1", "b8", "--repeats", "3", "--no-ct2"], 90)
    print("\n== static cache + CUDA graphs vs transformers eager", flush=True)
    try:
        results["CUDA graphs decode"] = cuda_graph_decode("opt-125m", 128, 3)
    except Exception as e:  # one failing part must not hide the others' results
        print(f"   failed: {type(e).__name__}: {e}")
        results["CUDA graphs decode"] = False
    print("\n" + "\n".join(f"{'ok    ' if ok else 'FAILED'} {name}" for name, ok in results.items()))
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
