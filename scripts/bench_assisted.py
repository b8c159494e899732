"""What assisted decoding gains on models that have learned something: a target model and a much smaller draft,
trained on the same text, then plain greedy, assisted greedy and prompt-lookup decoding timed on held-out prompts.

    python scripts/bench_assisted.py                     # trains into runs/assisted once, then measures
    python scripts/bench_assisted.py --transformers      # transformers' generate on the same weights too
    python scripts/bench_assisted.py --recipe configs/assisted.json --repeats 5 --threads 2

Both models learn the demo's corpus (docstrings of Python's standard library) with one tokenizer, so that the
draft's guesses agree with the target's as often as two models of that text agree. The recipe
(configs/assisted.json) gives the shapes and the training budgets; the trained checkpoints stay in its output_dir,
each with the part of the recipe it was trained from, and a rerun skips the models whose recipe is unchanged.

Every mode decodes the same prompts to the same length (eos off), modes alternating, one figure the median of
`--repeats` runs over all prompts. Assisted decoding uses transformers' default draft schedule (up to 20 tokens a
round, constant; the draft stops early when its probability for its own token is below 0.4). The acceptance rate
(accepted draft tokens / proposed ones) is counted in a separate, untimed pass, which also checks that assisted and
prompt-lookup decoding give exactly the tokens of plain greedy decoding: exit status 1 if they do not. Above the
table, what a forward over 1, 2, 4 and 11 new tokens costs the target: a round of assisted decoding pays only when
it yields more tokens than its verifying forward costs in one-token forwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from bench import alternate
from demo import held_out, shown, stdlib_docstrings
from machine import cpu_name

import optlite.assisted
from optlite import OPTConfig, OPTForCausalLM, OPTTokenizer, perplexity
from optlite.train import CausalLMCollator, TokenBlocks, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
Decode = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# The trained pair, cached
# ---------------------------------------------------------------------------------------------------------------------


def cached(folder: Path, stamp: dict) -> bool:
    """Whether `folder` holds what a run with this part of the recipe wrote (the stamp is written last)."""
    path = folder / "recipe.json"
    return path.is_file() and json.loads(path.read_text()) == stamp


def tokenizer(recipe: dict, texts: list[str], folder: Path) -> OPTTokenizer:
    """The demo's byte-level BPE trained on the training texts, or the one an earlier run saved."""
    stamp = {"corpus": recipe["corpus"], "tokenizer": recipe["tokenizer"]}
    if not cached(folder, stamp):
        OPTTokenizer.train(texts, vocab_size=recipe["tokenizer"]["vocab_size"]).save_pretrained(folder)
        (folder / "recipe.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return OPTTokenizer.from_pretrained(folder)


def trained(name: str, recipe: dict, tok: OPTTokenizer, blocks: TokenBlocks, folder: Path) -> OPTForCausalLM:
    """recipe[name]'s model trained on the blocks (or read back from an earlier run with the same recipe)."""
    spec = recipe[name]
    stamp = {"corpus": recipe["corpus"], "tokenizer": recipe["tokenizer"], "block_size": recipe["block_size"], **spec}
    if cached(folder, stamp):
        print(f"   {name}: trained earlier, read from {shown(folder)}")
    else:
        model_spec = dict(spec["model"])
        config = OPTConfig.from_preset(model_spec.pop("preset"), vocab_size=len(tok), **model_spec)
        torch.manual_seed(spec["train"]["seed"])
        model = OPTForCausalLM(config)
        print(f"   {name}: training {model.num_parameters():,} parameters for {spec['train']['max_train_steps']} steps",
              flush=True)
        run = TrainConfig(str(folder), overwrite_output_dir=True, **spec["train"])
        train(model, blocks, CausalLMCollator(tok.pad_token_id), run, tokenizer=tok)
        (folder / "recipe.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return OPTForCausalLM.from_pretrained(folder).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Decoding modes and their measurements
# ---------------------------------------------------------------------------------------------------------------------


def held_out_prompts(tok: OPTTokenizer, texts: list[str], count: int, length: int) -> list[torch.Tensor]:
    """The first `length` tokens (with the leading </s>) of the first `count` held-out texts that are longer."""
    prompts = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        if ids.shape[1] > length:
            prompts.append(ids[:, :length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} held-out texts have more than {length} tokens; {count} prompts asked for")


def modes(target: torch.nn.Module, draft: torch.nn.Module, new_tokens: int, lookup: int) -> dict[str, Decode]:
    """Greedy decoding of `new_tokens` tokens, plain, with the draft as assistant, and with prompt lookup; works for
    optlite's and transformers' models alike. eos is off so that every mode decodes the same number of tokens."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=target.config.pad_token_id)

    def run(model: torch.nn.Module, **extra: object) -> Decode:
        return lambda ids: model.generate(ids, attention_mask=torch.ones_like(ids), **kw, **extra)[0, ids.shape[1]:]

    return {"greedy": run(target), "assisted": run(target, assistant_model=draft),
            "prompt lookup": run(target, prompt_lookup_num_tokens=lookup), "draft alone": run(draft)}


@contextlib.contextmanager
def counting_acceptance(counts: list[int]) -> Iterator[None]:
    """While inside, each round of optlite's assisted decoding adds [accepted, proposed] draft tokens to `counts`."""
    accept = optlite.assisted.accept

    def counted(draft: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        new = accept(draft, *args, **kwargs)
        counts[0] += len(new) - 1  # the model's own token after the accepted part is not a draft token
        counts[1] += len(draft)
        return new

    optlite.assisted.accept = counted  # assisted_decode looks the function up at each round
    try:
        yield
    finally:
        optlite.assisted.accept = accept


def untimed_pass(fns: dict[str, Decode], prompts: list[torch.Tensor]) -> tuple[dict, dict]:
    """Each mode's new tokens for every prompt, and its [accepted, proposed] draft tokens (optlite's modes only)."""
    outputs, acceptance = {}, {}
    for name, fn in fns.items():
        counts = [0, 0]
        with counting_acceptance(counts):
            outputs[name] = [fn(ids) for ids in prompts]
        if counts[1]:
            acceptance[name] = counts
    return outputs, acceptance


def hf_modes(folder: Path, new_tokens: int, lookup: int) -> dict[str, Decode]:
    """The same modes with transformers' OPTForCausalLM reading the same checkpoints."""
    import transformers

    hf_target, hf_draft = (transformers.OPTForCausalLM.from_pretrained(folder / name).eval()
                           for name in ("target", "draft"))
    return modes(hf_target, hf_draft, new_tokens, lookup)


def forward_cost(model: torch.nn.Module, context: torch.Tensor, widths: tuple[int, ...],
                 repeats: int) -> dict[int, float]:
    """Median seconds of one forward over `width` new tokens after a cached `context`: what a verify round costs
    against one plain decoding step."""
    cache = model(context, use_cache=True).past_key_values
    seen = context.shape[1]
    fed = context.repeat(1, max(widths))  # the tokens fed: any will do, there are enough of them

    def step(width: int) -> Callable[[], object]:
        def run() -> None:
            model(fed[:, :width], past_key_values=cache, use_cache=True, logits_to_keep=width)
            cache.crop(seen)
        return run

    return {int(name): s for name, s in alternate({str(w): step(w) for w in widths}, repeats, "cpu").items()}


def mismatches(outputs: dict[str, list[torch.Tensor]], prefix: str = "") -> list[str]:
    """The modes whose tokens differ from plain greedy decoding's, with the first prompt where they do."""
    bad = []
    for name in ("assisted", "prompt lookup"):
        for i, (got, want) in enumerate(zip(outputs[name], outputs["greedy"], strict=True)):
            if not torch.equal(got, want):
                bad.append(f"{prefix}{name} differs from {prefix}greedy on prompt {i}: {got.tolist()} != "
                           f"{want.tolist()}")
                break
    return bad


# ---------------------------------------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "assisted.json")
    parser.add_argument("--output_dir", type=Path, help="where the trained models are kept (default: the recipe's)")
    parser.add_argument("--repeats", type=int, help="timed runs of each mode (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and decoding")
    parser.add_argument("--transformers", action="store_true", help="also time transformers' generate")
    return parser.parse_args()


def report(name: str, seconds: float, tokens: int, base: float, acceptance: list[int] | None) -> None:
    accepted = ""
    if acceptance:  # each round adds the accepted draft tokens and one of the model's
        accepted = (f"{acceptance[0]:,} of {acceptance[1]:,} ({acceptance[0] / acceptance[1]:.0%}), "
                    f"{tokens / (tokens - acceptance[0]):.2f} tokens a round")
    print(f"   {name:<28} {tokens / seconds:>9.1f} {base / seconds:>7.2f}x   {accepted}")


def main() -> None:
    args = parse_args()
    recipe = json.loads(args.recipe.read_text())
    measure = recipe["measure"]
    repeats = args.repeats or measure["repeats"]
    out = args.output_dir or ROOT / recipe["output_dir"]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    texts, valid = held_out(stdlib_docstrings(recipe["corpus"]["max_chars"]), recipe["corpus"]["validation_fraction"])
    tok = tokenizer(recipe, texts, out / "tokenizer")
    print(f"1. {len(texts):,} docstrings of the standard library to train on, {len(valid):,} held out; "
          f"a tokenizer of {len(tok):,} tokens")
    blocks = TokenBlocks.from_texts(texts, tok, block_size=recipe["block_size"])
    target, draft = (trained(name, recipe, tok, blocks, out / name) for name in ("target", "draft"))
    valid_ids = tok("".join(valid)).input_ids[:4096]
    for name, model in (("target", target), ("draft", draft)):
        ppl = perplexity(model, valid_ids, max_length=recipe["block_size"], stride=recipe["block_size"] // 2)
        cfg = model.config
        print(f"2. {name}: {cfg.num_hidden_layers} layer(s) x hidden {cfg.hidden_size}, "
              f"{model.num_parameters():,} parameters, held-out perplexity {ppl:.1f}")

    prompts = held_out_prompts(tok, valid, measure["prompts"], measure["prompt_tokens"])
    new = measure["max_new_tokens"]
    with torch.no_grad():
        cost = forward_cost(target, prompts[0], (1, 2, 4, 11), 10 * repeats)
    print("   target forward over 1 / 2 / 4 / 11 new tokens: "
          + " / ".join(f"{cost[w] * 1e3:.1f}" for w in cost) + f" ms ({cost[2] / cost[1]:.2f}x / "
          f"{cost[4] / cost[1]:.2f}x / {cost[11] / cost[1]:.2f}x one token's)")
    fns = modes(target, draft, new, measure["prompt_lookup_num_tokens"])
    outputs, acceptance = untimed_pass(fns, prompts)
    bad = mismatches(outputs)
    if args.transformers:
        hf = hf_modes(out, new, measure["prompt_lookup_num_tokens"])
        hf_outputs, _ = untimed_pass(hf, prompts)
        bad += mismatches(hf_outputs, "transformers ")
        same = sum(torch.equal(a, b) for a, b in zip(hf_outputs["greedy"], outputs["greedy"], strict=True))
        print(f"   transformers' greedy tokens equal optlite's on {same} of {len(prompts)} prompts")
        fns.update({f"transformers {name}": fn for name, fn in hf.items()})

    print(f"3. {len(prompts)} held-out prompts of {measure['prompt_tokens']} tokens, {new} new tokens each, "
          f"median of {repeats}:\n   {'mode':<28} {'tokens/s':>9} {'speed-up':>8}   accepted draft tokens")
    seconds = alternate({name: lambda fn=fn: [fn(ids) for ids in prompts] for name, fn in fns.items()}, repeats,
                        "cpu")
    tokens = new * len(prompts)
    for name, s in seconds.items():
        base = seconds["transformers greedy" if name.startswith("transformers") else "greedy"]
        report(name, s, tokens, base, acceptance.get(name))
    print(f"   load average {os.getloadavg()[0]:.1f} after the runs")
    if bad:
        print("\n".join(bad), file=sys.stderr)
        sys.exit(1)
    print("assisted and prompt-lookup tokens are identical to plain greedy decoding on every prompt")


if __name__ == "__main__":
    main()
