"""What the reduced-precision modes cost in quality: the demo's model (`make demo` first) read in fp32, bf16
(`dtype="bfloat16"`) and the int8 mode (`quantize="int8"`), scored on the demo's held-out docstrings.

    python scripts/demo.py && python scripts/bench_quality.py [--run runs/demo]

Prints each mode's perplexity and its logits against fp32's on the same tokens: the largest difference, the
difference's norm relative to the logits' norm, and how often the top-1 token agrees. The bytes each mode's
weights take (`optlite.quantize.model_nbytes`) and the peak RSS of the process after each load are printed too
(the int8 mode reads bf16 and quantizes layer by layer).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch
from demo import ROOT, stdlib_docstrings

from optlite import OPTForCausalLM, OPTTokenizer, perplexity
from optlite.quantize import model_nbytes

MODES = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


def held_out_ids(recipe: dict, tok: OPTTokenizer) -> list[int]:
    """The demo's held-out text: every k-th standard-library docstring, the first 20,000 tokens."""
    texts = stdlib_docstrings(recipe["corpus"]["max_chars"])
    every = max(2, round(1 / recipe["corpus"]["validation_fraction"]))
    return tok("".join(texts[::every])).input_ids[:20_000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "demo.json")
    parser.add_argument("--run", type=Path, help="the saved model (default: the recipe's output_dir)")
    args = parser.parse_args()
    recipe = json.loads(args.recipe.read_text())
    run = args.run or ROOT / recipe["output_dir"]
    if not (run / "config.json").exists():
        raise SystemExit(f"no model in {run}: run `python scripts/demo.py` first")
    tok = OPTTokenizer.from_pretrained(run)
    ids = held_out_ids(recipe, tok)
    block = recipe["train"]["block_size"]
    sample = torch.tensor(ids[: 8 * block]).view(8, block)  # logits compared on 8 blocks of held-out text
    print(f"{run}: {len(ids):,} held-out tokens, block {block}\n")
    print("| mode | perplexity | max logit diff | relative diff | top-1 agreement | weights | peak RSS so far |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = None
    for name, kwargs in MODES.items():
        model = OPTForCausalLM.from_pretrained(run, progress=False, **kwargs).eval()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB -> MB
        ppl = perplexity(model, ids, max_length=block, stride=block // 2)
        with torch.no_grad():
            logits = model(sample).logits.float()
        reference = logits if reference is None else reference
        diff = (logits - reference).abs().max().item()
        rel = ((logits - reference).norm() / reference.norm()).item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        size = model_nbytes(model) / 2**20
        print(f"| {name} | {ppl:.2f} | {diff:.3f} | {rel:.4f} | {100 * agree:.1f}% | {size:.1f} MB | {peak:.0f} MB |")


if __name__ == "__main__":
    main()
