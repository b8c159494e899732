"""Prefill or training in fresh processes with and without optlite's malloc thresholds (`optlite/cpu_memory.py`).

Each process loads a saved opt-125m-shaped checkpoint, runs two 1x512 prefills (`logits_to_keep=1`) to settle, then
times seven; the two settings (`OPTLITE_TUNE_MALLOC=0` and the default) alternate. With `--scoring` each forward
returns the logits of all 512 positions (103 MB), as perplexity and lm-eval's loglikelihood need them; with `--train`
each timed call is a 4x256 training step with fused AdamW, as bench.py's (two to settle, five timed). Prints each
process's median, page faults a call and peak resident memory, then the medians and the median ratio of the pairs.
A fresh process is the point: glibc's own thresholds rise with what a process has freed, so a long-running one
(bench.py's) may have raised them already.

    python scripts/bench_malloc.py --pairs 5 --mode int8
    python scripts/bench_malloc.py --pairs 5 --mode float32 --scoring
    python scripts/bench_malloc.py --pairs 5 --mode float32 --train
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time
import torch
import optlite

torch.set_num_threads(int(sys.argv[3]))
kwargs = {"quantize": "int8"} if sys.argv[2] == "int8" else {}
model = optlite.OPTForCausalLM.from_pretrained(sys.argv[1], progress=False, **kwargs)
shape = (4, 256) if sys.argv[4] == "train" else (1, 512)
ids = torch.randint(4, 50000, shape, generator=torch.Generator().manual_seed(0))
if sys.argv[4] == "train":
    rounds = 5
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def call():
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
else:
    rounds, keep = 7, {"use_cache": False} if sys.argv[4] == "scoring" else {"use_cache": True, "logits_to_keep": 1}
    model.eval()

    def call():
        with torch.inference_mode():
            model(ids, **keep)
for _ in range(2):
    call()
times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(rounds):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ms": statistics.median(times) * 1e3, "faults": (usage.ru_minflt - faults) / rounds,
                  "peak_gib": usage.ru_maxrss / 2**20}))
"""


def run(folder: Path, mode: str, threads: int, tuned: bool, case: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=str(ROOT / "src"), OPTLITE_TUNE_MALLOC="1" if tuned else "0")
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode, str(threads),
                           case], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--mode", choices=("float32", "int8"), help="int8 by default; training is float32")
    parser.add_argument("--threads", type=int, default=2)
    cases = parser.add_mutually_exclusive_group()
    cases.add_argument("--scoring", action="store_true", help="every position's logits, not the last one's")
    cases.add_argument("--train", action="store_true", help="4x256 training steps instead of prefills")
    args = parser.parse_args()
    case = "train" if args.train else "scoring" if args.scoring else "prefill"
    if args.train and args.mode == "int8":
        parser.error("--train needs --mode float32: int8 models are for inference")
    args.mode = args.mode or ("float32" if args.train else "int8")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import optlite

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        optlite.OPTForCausalLM(optlite.OPTConfig.from_preset("opt-125m")).save_pretrained(tmp)
        pairs = []
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {tuned: run(Path(tmp), args.mode, args.threads, tuned, case) for tuned in order}
            pairs.append(got)
            print(f"pair {i + 1}: " + ", ".join(
                f"{name} {r['ms']:.1f} ms ({r['faults']:,.0f} faults, peak {r['peak_gib']:.2f} GiB)"
                for name, r in (("glibc's defaults", got[False]), ("thresholds raised", got[True]))))
    off = statistics.median(p[False]["ms"] for p in pairs)
    on = statistics.median(p[True]["ms"] for p in pairs)
    ratio = statistics.median(p[False]["ms"] / p[True]["ms"] for p in pairs)
    name = {"train": "training step 4x256", "scoring": "scoring 1x512 (all logits)", "prefill": "prefill 1x512"}
    print(f"{cpu_name()}: opt-125m {args.mode} {name[case]}, {args.threads} threads, {args.pairs} pairs of fresh "
          f"processes: glibc's defaults {off:.1f} ms, raised thresholds {on:.1f} ms, speed-up {ratio:.2f}x")


if __name__ == "__main__":
    main()
