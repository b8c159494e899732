"""The optlite demo, offline, in about two minutes on 2 CPU cores (`make demo`).

It builds a small OPT from a preset, trains a tokenizer and the model on the docstrings of Python's standard
library (text every machine has), saves with save_pretrained, reloads with from_pretrained, and prints the
perplexity before and after training and a few continuations. The recipe is configs/demo.json.

    python scripts/demo.py [--recipe configs/demo.json] [--steps N]
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sysconfig
import time
from pathlib import Path

import torch

from optlite import OPTConfig, OPTForCausalLM, OPTTokenizer, generate_text, perplexity
from optlite.train import CausalLMCollator, TokenBlocks, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def stdlib_docstrings(max_chars: int) -> list[str]:
    """Module, class and function docstrings of the standard library, read with `ast` (nothing is imported)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    texts.append(doc.strip() + "\n")
                    total += len(doc)
        if total >= max_chars:
            break
    return texts


def held_out(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): every k-th text is held out, k = 1 / fraction (at least 2)."""
    every = max(2, round(1 / fraction))
    return [t for i, t in enumerate(texts) if i % every], texts[::every]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "demo.json")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    args = parser.parse_args()
    recipe = json.loads(args.recipe.read_text())
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.manual_seed(recipe["train"]["seed"])
    out = ROOT / recipe["output_dir"]
    start = time.perf_counter()

    texts = stdlib_docstrings(recipe["corpus"]["max_chars"])
    texts, valid = held_out(texts, recipe["corpus"]["validation_fraction"])
    print(f"1. corpus: {len(texts):,} docstrings of the standard library for training, {len(valid):,} held out")

    tok = OPTTokenizer.train(texts, vocab_size=recipe["tokenizer"]["vocab_size"])
    print(f"2. tokenizer: byte-level BPE with {len(tok):,} tokens, OPT's special tokens "
          f"(</s>={tok.bos_token_id}, <pad>={tok.pad_token_id})")

    spec = dict(recipe["model"])
    config = OPTConfig.from_preset(spec.pop("preset"), vocab_size=len(tok), **spec)
    model = OPTForCausalLM(config)
    print(f"3. model: OPT with {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{model.num_parameters():,} parameters")

    valid_ids = tok("".join(valid)).input_ids[:20_000]
    block = recipe["train"]["block_size"]
    before = perplexity(model.eval(), valid_ids, max_length=block, stride=block // 2)
    print(f"4. perplexity on held-out docstrings before training: {before:,.1f}")

    train_cfg = {k: v for k, v in recipe["train"].items() if k != "block_size"}
    if args.steps:
        train_cfg["max_train_steps"] = args.steps
    blocks = TokenBlocks.from_texts(texts, tok, block_size=block)
    print(f"5. training on {len(blocks):,} blocks of {block} tokens:")
    run_config = TrainConfig(str(out), overwrite_output_dir=True, **train_cfg)  # each `make demo` starts over
    train(model, blocks, CausalLMCollator(tok.pad_token_id), run_config, tokenizer=tok)

    model = OPTForCausalLM.from_pretrained(out)  # what save_pretrained wrote, read back as a user would
    tok = OPTTokenizer.from_pretrained(out)
    after = perplexity(model, valid_ids, max_length=block, stride=block // 2)
    print(f"6. saved to {shown(out)} and reloaded; perplexity after training: {after:,.1f} "
          f"(was {before:,.1f})")

    gen = dict(recipe["generate"])
    prompts = gen.pop("prompts")
    gen["generator"] = torch.Generator().manual_seed(gen.pop("seed"))
    print("7. continuations (sampled; the prompt ends at |):")
    for prompt, text in zip(prompts, generate_text(model, tok, prompts, **gen), strict=True):
        print(f"   {prompt}|{' '.join(text.split())}")
    print(f"\nDone in {time.perf_counter() - start:.0f} s. The same with a real model from the Hugging Face Hub:\n"
          f'    optlite generate facebook/opt-125m "The capital of France is"')


if __name__ == "__main__":
    main()
