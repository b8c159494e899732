"""Training steps of optlite and transformers, each library in fresh processes of its own.

bench.py times both libraries in one process, where they share whatever the process has set: optlite raises
glibc's malloc thresholds at its first forward (`optlite/cpu_memory.py`), and transformers' steps in that process
then reuse freed memory too. A user runs one library per process, so here each process loads the same saved
checkpoint with one library, trains it (4x256 tokens, labels = inputs, fused AdamW, dropout on) for two steps to
settle, then times `--steps` more. The libraries alternate, in a new order each pair. Prints each process's median
step, page faults a step and peak resident memory, then the medians and their ratio. The two libraries' first
losses must agree (same weights, same dropout masks) before the summary is printed.

    python scripts/bench_train.py --shapes opt-125m opt-350m --pairs 3
    OPTLITE_ONEDNN_LINEAR=0 python scripts/bench_train.py   # F.linear's (MKL's) products, as on an Intel CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("optlite", "transformers")

CHILD = r"""
import json, resource, statistics, sys, time
import torch

library, folder, threads, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
if library == "optlite":
    import optlite
    model = optlite.OPTForCausalLM.from_pretrained(folder, progress=False)
else:
    import transformers
    model = transformers.OPTForCausalLM.from_pretrained(folder, dtype=torch.float32)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
ids = torch.randint(4, 50000, (4, 256), generator=torch.Generator().manual_seed(0))
torch.manual_seed(0)
times = []
for i in range(2 + steps):
    if i == 2:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    if i == 0:
        first_loss = loss.item()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"s": statistics.median(times[2:]), "faults": (usage.ru_minflt - faults) / steps,
                  "peak_gib": usage.ru_maxrss / 2**20, "loss": first_loss}))
"""


def save_checkpoint(preset: str, folder: str) -> None:
    """Random weights of optlite's preset of that name; transformers reads the files optlite writes."""
    import torch

    import optlite

    torch.manual_seed(0)
    optlite.OPTForCausalLM(optlite.OPTConfig.from_preset(preset)).save_pretrained(folder)


def run(library: str, folder: str, threads: int, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, library, folder, str(threads), str(steps)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {library} process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["opt-125m"], help="presets to build")
    parser.add_argument("--pairs", type=int, default=3, help="fresh processes per library")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, after two to settle")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    print(f"{cpu_name()}, {args.threads} threads, 4x256 training steps, fused AdamW, medians of {args.steps} steps "
          f"per process, {args.pairs} processes per library")
    for preset in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(preset, tmp)
            got: dict[str, list[dict]] = {name: [] for name in LIBRARIES}
            for i in range(args.pairs):
                for name in LIBRARIES if i % 2 == 0 else LIBRARIES[::-1]:
                    r = run(name, tmp, args.threads, args.steps)
                    got[name].append(r)
                    print(f"{preset} {name}: {r['s'] * 1e3:.0f} ms a step, {r['faults']:,.0f} faults a step, "
                          f"peak {r['peak_gib']:.2f} GiB")
        first = {name: got[name][0]["loss"] for name in LIBRARIES}
        if not math.isclose(first["optlite"], first["transformers"], rel_tol=1e-4):
            raise SystemExit(f"{preset}: the first losses differ: {first}")
        med = {name: statistics.median(r["s"] for r in got[name]) for name in LIBRARIES}
        print(f"{preset}: optlite {med['optlite'] * 1e3:.0f} ms, transformers {med['transformers'] * 1e3:.0f} ms a "
              f"step: {med['transformers'] / med['optlite']:.2f}x transformers")


if __name__ == "__main__":
    main()
