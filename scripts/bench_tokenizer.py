"""Batch-encode throughput: optlite's OPTTokenizer vs transformers' AutoTokenizer on the same files.

    python scripts/bench_tokenizer.py                      # ../shared/opt_tokenizer next to the repo
    python scripts/bench_tokenizer.py --tokenizer DIR --n 4000 --runs 7

Prints strings/s and tokens/s (median of --runs timed runs after one warm-up) for plain lists and for
padded "pt" tensors, and the optlite / transformers ratio. Both sides share the Rust `tokenizers` core.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from optlite.tokenizer import OPTTokenizer

DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "opt_tokenizer"
WORDS = (
    "the of and to in is that for it as with was on be by at this from or an are not have which "
    "model language token training data results performance we our paper show large small "
    "café naïve straße Привет мир Ελληνικά 中文 你好世界 日本語 مرحبا नमस्ते 😀 👨‍👩‍👧‍👦 "
    "def return import print() {x: 1} 42 3.14 2024-01-31 1,000,000 http://example.com </s> <pad>"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n varied strings of 1 to ~200 words, with punctuation, newlines and tabs."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(int(rng.paretovariate(1.2) * 8) % 200 + 1)]
        seps = [rng.choice([" "] * 12 + [", ", ". ", "\n", "\t", "  "]) for _ in words]
        texts.append("".join(w + s for w, s in zip(words, seps, strict=True)).strip())
    return texts


def reference_folder(folder: Path, scratch: Path) -> Path:
    """AutoTokenizer picks the class from config.json (as on the hub); add one when the folder has none."""
    if (folder / "config.json").is_file():
        return folder
    for item in folder.iterdir():
        (scratch / item.name).symlink_to(item.resolve())
    (scratch / "config.json").write_text(json.dumps({"model_type": "opt"}))
    return scratch


def median_seconds(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time of each function; runs are interleaved so background load hits both alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_DIR, help="folder with the tokenizer files")
    parser.add_argument("--n", type=int, default=4000, help="number of strings")
    parser.add_argument("--runs", type=int, default=7, help="timed runs (median reported)")
    args = parser.parse_args()

    from transformers import AutoTokenizer  # the reference; optlite never imports it

    texts = make_texts(args.n)
    ours = OPTTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        theirs = AutoTokenizer.from_pretrained(reference_folder(args.tokenizer, Path(scratch)))
    ids = ours(texts).input_ids
    assert ids == theirs(texts).input_ids, "the two tokenizers disagree"
    n_tokens = sum(map(len, ids))
    print(
        f"{len(texts)} strings, {sum(map(len, texts)):,} characters, {n_tokens:,} tokens; "
        f"median of {args.runs} interleaved runs; transformers: {type(theirs).__name__}; "
        "tokens/s counts unpadded tokens"
    )
    print(f"{'case':<20}{'tokenizer':<14}{'strings/s':>12}{'tokens/s':>14}{'ms':>9}")
    tokenizers = {"optlite": ours, "transformers": theirs}
    cases = {
        "lists": {},
        "padded pt tensors": {"padding": True, "return_tensors": "pt"},
    }
    for case, kwargs in cases.items():
        calls = {name: (lambda tok=tok, kw=kwargs: tok(texts, **kw)) for name, tok in tokenizers.items()}
        seconds = median_seconds(calls, args.runs)
        for name, sec in seconds.items():
            print(f"{case:<20}{name:<14}{len(texts) / sec:>12,.0f}{n_tokens / sec:>14,.0f}{sec * 1e3:>9.1f}")
        ratio = seconds["transformers"] / seconds["optlite"]
        print(f"{case:<20}{'ratio':<14}{ratio:>11.2f}x  (transformers time / optlite time)")


if __name__ == "__main__":
    main()
