"""Load-time benchmark: optlite vs transformers `from_pretrained` on a 1.3b-shaped fp16 safetensors checkpoint.

Each load runs in a fresh subprocess (optlite and transformers alternating, several repeats, medians) and reports
the wall time of `from_pretrained` and the peak resident memory above the post-import baseline (VmHWM, reset through
/proc/self/clear_refs where allowed). Two modes: keep fp16, and upcast to fp32.

    python scripts/bench_load.py                # creates ~2.6 GB of random weights in a temp dir, deletes them after
    python scripts/bench_load.py --keep --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
import torch

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(field)

which, dtype, path = sys.argv[1:]
if which == "optlite":
    sys.path.insert(0, os.environ["OPTLITE_SRC"])
    import optlite
    cls, kwargs = optlite.OPTForCausalLM, {"progress": False}
else:
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cls, kwargs = transformers.OPTForCausalLM, {}
try:  # "5" resets the peak (VmHWM) to the current RSS, so the peak below is the load's own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads: the work done, whatever else the machine runs
    return r.ru_utime + r.ru_stime

base = status("VmRSS")
c0, t0 = cpu(), time.perf_counter()
model = cls.from_pretrained(path, dtype=getattr(torch, dtype))
seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
peak = status("VmHWM")
assert next(model.parameters()).dtype == getattr(torch, dtype)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak - base, "reset": reset}))
"""


def make_checkpoint(folder: Path) -> None:
    """A 1.3b-shaped checkpoint (optlite's preset) of random fp16 weights, written tensor by tensor."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from safetensors.torch import save_file

    import optlite

    config = optlite.OPTConfig.from_preset("opt-1.3b")
    with torch.device("meta"):
        model = optlite.OPTForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":  # tied: stored once, as transformers' save_pretrained does
            continue
        tensors[key] = (torch.randn(t.shape, generator=g) * 0.02).to(torch.float16)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    data = config.to_dict()
    data.update(torch_dtype="float16", architectures=["OPTForCausalLM"])
    (tmp / "config.json").write_text(json.dumps(data, indent=2))
    tmp.rename(folder)


def run_one(which: str, dtype: str, folder: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "OPTLITE_SRC": str(ROOT / "src"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", CHILD, which, dtype, str(folder)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{which} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "optlite-bench-opt-1.3b-fp16")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="float16,float32")
    args = parser.parse_args()

    free = shutil.disk_usage(args.dir.parent if args.dir.parent.exists() else "/").free
    if not args.dir.exists():
        if free < 4e9:
            sys.exit(f"only {free / 1e9:.1f} GB free under {args.dir.parent}; need about 3 GB")
        t0 = time.perf_counter()
        make_checkpoint(args.dir)
        print(f"created {args.dir} ({sum(p.stat().st_size for p in args.dir.iterdir()) / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t0:.0f} s")
    try:
        results: dict[tuple[str, str], list[dict]] = {}
        for dtype in args.modes.split(","):
            previous = None
            for i in range(args.repeats):
                order = ("optlite", "transformers") if i % 2 == 0 else ("transformers", "optlite")
                for which in order:
                    r = run_one(which, dtype, args.dir)
                    r["after"], previous = previous, which
                    results.setdefault((which, dtype), []).append(r)
                    print(f"  {dtype:8} {which:12} {r['seconds']:6.2f} s  cpu {r['cpu_seconds']:6.2f} s  "
                          f"{r['peak_bytes'] / 2**30:6.2f} GiB", flush=True)
        print_table(results, args.modes.split(","), args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def print_table(results: dict, modes: list[str], repeats: int) -> None:
    def med(which: str, dtype: str, field: str) -> float:
        return statistics.median(r[field] for r in results[(which, dtype)])

    reset = all(r["reset"] for rs in results.values() for r in rs)
    print(f"\n{cpu_name()}: from_pretrained of a 1.3b-shaped fp16 safetensors checkpoint, medians of {repeats} "
          f"fresh processes "
          f"(peak RSS above the post-import baseline{'' if reset else '; VmHWM could not be reset'}):\n")
    print("| load as | optlite wall | transformers wall | speed-up | optlite CPU | transformers CPU "
          "| optlite peak | transformers peak | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in modes:
        ot, tt = med("optlite", dtype, "seconds"), med("transformers", dtype, "seconds")
        oc, tc = med("optlite", dtype, "cpu_seconds"), med("transformers", dtype, "cpu_seconds")
        om, tm = med("optlite", dtype, "peak_bytes"), med("transformers", dtype, "peak_bytes")
        print(f"| {dtype} | {ot:.2f} s | {tt:.2f} s | {tt / ot:.1f}x | {oc:.2f} s | {tc:.2f} s "
              f"| {om / 2**30:.2f} GiB | {tm / 2**30:.2f} GiB | {tm / max(om, 1):.1f}x |")
    # On a virtual machine the cost of fresh memory can depend on what the previous process did with it, so the
    # alternating order gives each library the same predecessors; this split shows how much that matters.
    print("\nwall-time medians split by the library of the preceding load:\n")
    for dtype in modes:
        cells = []
        for which in ("optlite", "transformers"):
            for after in ("optlite", "transformers"):
                times = [r["seconds"] for r in results[(which, dtype)] if r["after"] == after]
                cells.append(f"{which} after {after}: {statistics.median(times):.2f} s (n={len(times)})" if times
                             else f"{which} after {after}: -")
        print(f"  {dtype}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
