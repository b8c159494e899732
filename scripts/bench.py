"""Side-by-side speed of optlite, transformers' OPT and CTranslate2: same random weights, one process, alternating.

    python scripts/bench.py                      # opt-125m and opt-350m shapes, fp32, 2 threads
    python scripts/bench.py --shapes opt-125m --dtype bfloat16 --repeats 7
    python scripts/bench.py --device cuda --dtype float16 --compile
    python scripts/bench.py --packed --modes bf16       # optlite on packed weight copies (use_onednn(packed=True))

Cases: prefill 1x512; greedy decode batch 1 (32-token prompt, 128 new) and batch 8 (64 new); one training
step 4x256 (forward, backward, fused AdamW); decode speed at context 64 vs 1536. Each figure is the median of
`--repeats` runs; the engines alternate, in a new order each round, so that machine noise hits all alike. Before
timing, every fp32 engine must produce transformers' greedy tokens (the int8 engine's agreement is printed).

CTranslate2 (`pip install -e ".[bench]"`, CPU only) converts the checkpoint transformers saved, with its own
`TransformersConverter`, and runs it in float32 and in int8 (weights quantized when it loads them).

Below the table, two ceilings: the time of the matrix products alone (one token's matrix-vector products for
decode b1; a step's forward and backward matrix products plus the AdamW update for training), run through
F.linear as transformers runs them. An fp32 implementation that computes the same products with the same BLAS
does at least this work, so transformers' time divided by it bounds the speed-up such an implementation can get.
optlite's products run on oneDNN where `optlite/cpu_linear.py` chooses it (AMD CPUs; training where they have
AVX-512), so there it can pass the bound.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Before torch: imported after it, CTranslate2's OpenMP calls bind to torch's libgomp (loaded globally), so one
# runtime manages both engines' threads; with more threads than cores it stops spinning between parallel regions
# and every engine, torch's included, ran 10-25% slower (thousands of extra context switches per decode).
try:
    import ctranslate2  # noqa: F401
except ImportError:
    pass
import torch
import torch.nn.functional as F
import transformers
from machine import copy_bandwidth, cpu_features, cpu_name

import optlite
from optlite.cpu_linear import use_onednn
from optlite.quantize import quantize_

CASES = ("prefill", "b1", "b8", "context", "train")


def build_pair(preset: str, dtype: torch.dtype, device: str, seed: int = 0):
    cfg = optlite.OPTConfig.from_preset(preset)
    ref_cfg = transformers.OPTConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("extra", "torch_dtype")})
    ref_cfg.eos_token_id = None  # random weights must not stop early: every run decodes the same number of tokens
    torch.manual_seed(seed)
    ref = transformers.OPTForCausalLM(ref_cfg)
    ref.generation_config.eos_token_id = None
    ours = optlite.OPTForCausalLM(optlite.OPTConfig.from_preset(preset, eos_token_id=None))
    ours.load_state_dict(ref.state_dict())
    return ref.to(device, dtype).eval(), ours.to(device, dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, running each once per round for `repeats` rounds after one warm-up each.
    Each round takes them in a new order (seeded), so no engine always follows the same one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    rng = random.Random(0)
    for _ in range(repeats):
        for name, fn in rng.sample(list(fns.items()), len(fns)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Every weight is read once per decoded token, except the position table (one row)."""
    positions = model.model.decoder.embed_positions.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - positions.numel() * positions.element_size()


def gen_kwargs(new_tokens: int, compile_: bool) -> dict:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {**kw, "compile": True, "cache_implementation": "static"} if compile_ else kw


@dataclass
class Engine:
    """One way of running the model: `prefill(ids)` scores a prompt, `decode(ids, n)` returns n greedy tokens."""

    prefill: Callable[[torch.Tensor], object]
    decode: Callable[[torch.Tensor, int], torch.Tensor]


def torch_engine(model: torch.nn.Module, compile_: bool = False) -> Engine:
    def decode(ids: torch.Tensor, new: int) -> torch.Tensor:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs(new, compile_))
        return out[:, ids.shape[1]:]

    return Engine(lambda ids: model(ids, use_cache=True, logits_to_keep=1), decode)


def ct2_engines(ref: torch.nn.Module, folder: Path, threads: int) -> dict[str, Engine]:
    """CTranslate2 float32 and int8 generators converted from `ref` as transformers saves it; {} if not installed."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        print('ctranslate2 is not installed (pip install -e ".[bench]"): no CTranslate2 columns')
        return {}
    ref.save_pretrained(folder)
    # The converter reads a tokenizer for the vocabulary; ids are all the benchmark needs, so one name per id.
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, ref.config.vocab_size)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
        "pad_token": "<pad>"}))
    TransformersConverter(str(folder)).convert(str(folder / "ct2"), force=True)
    engines = {}
    for compute_type in ("float32", "int8"):
        gen = ctranslate2.Generator(str(folder / "ct2"), device="cpu", compute_type=compute_type,
                                    intra_threads=threads, inter_threads=1)

        def decode(ids: torch.Tensor, new: int, gen=gen) -> torch.Tensor:
            prompts = [[vocab[i] for i in row] for row in ids.tolist()]
            results = gen.generate_batch(prompts, max_length=new, min_length=new, sampling_topk=1, beam_size=1,
                                         include_prompt_in_result=False)
            return torch.tensor([r.sequences_ids[0] for r in results])

        # max_length=1: the prompt runs through the decoder and only the last position gets logits, as in prefill.
        engines[f"CT2 {'fp32' if compute_type == 'float32' else compute_type}"] = Engine(
            lambda ids, d=decode: d(ids, 1), decode)
    return engines


def reduced_precision_engines(ours: torch.nn.Module, modes: list[str]) -> dict[str, Engine]:
    """optlite's reduced-precision modes on copies of the fp32 model: bf16 (`dtype="bfloat16"`) and the int8 mode
    (`quantize="int8"`)."""
    engines = {}
    if "bf16" in modes:
        engines["optlite bf16"] = torch_engine(copy.deepcopy(ours).to(torch.bfloat16))
    if "int8" in modes:
        engines["optlite int8"] = torch_engine(quantize_(copy.deepcopy(ours)))
    return engines


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.packed:  # only then: use_onednn(True) would also override OPTLITE_ONEDNN_LINEAR=0
        use_onednn(True, packed=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    bw = copy_bandwidth(args.device, sync)
    print(f"{cpu_name()} ({' '.join(cpu_features()) or 'no AVX'}), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, device {args.device}, {args.threads} threads, "
          f"{str(dtype).removeprefix('torch.')}, copy bandwidth {bw / 1e9:.1f} GB/s, median of {args.repeats}"
          f"{', optlite with packed weights' if args.packed else ''}")
    rows, ceilings, names = [], [], []
    for preset in args.shapes:
        rows_, ceilings_, names_ = bench_shape(preset, dtype, bw, args)
        rows += rows_
        ceilings += ceilings_
        names += [n for n in names_ if n not in names]
    print_table(rows, names)
    if ceilings:
        print("\nCeilings (the matrix products alone through F.linear, no other work):")
        for preset, case, floor_s, ref_s in ceilings:
            print(f"  {preset} {case}: {floor_s * 1e3:.1f} ms vs transformers {ref_s * 1e3:.1f} ms: at most "
                  f"{ref_s / floor_s:.2f}x transformers with these products")


def print_table(rows: list[tuple[str, str, dict[str, float]]], names: list[str]) -> None:
    ratios = [("optlite", "transformers")] + [("optlite", n) for n in names if n == "CT2 fp32"]
    ratios += [(n, "CT2 int8") for n in names if n.startswith("optlite ") and "CT2 int8" in names]
    print("\n| shape | case | " + " | ".join(names) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
    print("|---|---|" + "---:|" * (len(names) + len(ratios)))
    for preset, case, values in rows:
        cells = [f"{values[n]:.2f}" if n in values else "-" for n in names]
        cells += [f"{values[a] / values[b]:.2f}x" if a in values and b in values else "-" for a, b in ratios]
        print(f"| {preset} | {case} | " + " | ".join(cells) + " |")


def check_tokens(engines: dict[str, Engine], prompt: torch.Tensor, preset: str) -> None:
    """Every fp32 engine must give transformers' greedy tokens; the others' agreement is printed."""
    with torch.no_grad():
        tokens = {name: e.decode(prompt[:2, :32], 16) for name, e in engines.items()}
    reference = tokens["transformers"]
    for name, t in tokens.items():
        agree = int((t == reference).sum())
        print(f"{preset}: {name} greedy tokens agree with transformers' on {agree} of {reference.numel()}")
        if agree < reference.numel() and "int8" not in name and "bf16" not in name:
            raise SystemExit(f"{preset}: greedy tokens of {name} differ from transformers'; not timing")


def bench_shape(preset: str, dtype: torch.dtype, bw: float, args: argparse.Namespace) -> tuple[list, list, list]:
    ref, ours = build_pair(preset, dtype, args.device)
    prompt = torch.randint(3, 50000, (8, 1536), generator=torch.Generator().manual_seed(1)).to(args.device)
    engines = {"optlite": torch_engine(ours, args.compile), "transformers": torch_engine(ref)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.ct2 and args.device == "cpu" and dtype == torch.float32:
            engines.update(ct2_engines(ref, Path(tmp), args.threads))
        if args.modes and args.device == "cpu" and dtype == torch.float32:
            engines.update(reduced_precision_engines(ours, args.modes))
        check_tokens(engines, prompt, preset)
        rows = time_cases(preset, engines, prompt, bw / weight_bytes_per_token(ours), args)
    ceilings = []
    if "b1" in args.cases:
        b1_ref = next(v for _, c, v in rows if c.startswith("decode b1,"))["transformers"]
        ceilings.append((preset, "decode b1, one token", gemv_floor(ref, args), 1 / b1_ref))
    if "train" in args.cases:
        ours_steps, ref_steps = train_steps(ref, ours, prompt, args)
        rows.append((preset, "train step 4x256 (steps/s)", {"optlite": ours_steps, "transformers": ref_steps}))
        ceilings.append((preset, "train step 4x256", train_floor(ref, 4 * 256, args), 1 / ref_steps))
    return rows, ceilings, list(engines)


def time_cases(preset: str, engines: dict[str, Engine], prompt: torch.Tensor, bound: float,
               args: argparse.Namespace) -> list:
    """The rows of every inference case; `bound` is decode b1's tokens/s if reading the weights (in the run's dtype)
    were all."""
    def each(fn: Callable[[Engine], object], work: float) -> dict[str, float]:
        """Work per second (tokens) of every engine, from the median time of `fn`."""
        with torch.no_grad():
            t = alternate({n: (lambda e=e: fn(e)) for n, e in engines.items()}, args.repeats, args.device)
        return {n: work / s for n, s in t.items()}

    rows = []
    if "prefill" in args.cases:
        rows.append((preset, "prefill 1x512 (tok/s)", each(lambda e: e.prefill(prompt[:1, :512]), 512)))
    if "b1" in args.cases:
        b1 = each(lambda e: e.decode(prompt[:1, :32], 128), 128)
        rows.append((preset, "decode b1, 32+128 (tok/s)", b1))
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
        share = {n: 100 * v / bound for n, v in b1.items()}
        rows.append((preset, f"decode b1, % of the {dtype} bandwidth bound", share))
    if "b8" in args.cases:
        rows.append((preset, "decode b8, 32+64 (tok/s)", each(lambda e: e.decode(prompt[:8, :32], 64), 8 * 64)))
    if "context" in args.cases:
        for ctx in (64, 1536):
            # Decode-only rate: the difference between 33 and 1 new tokens removes the prefill.
            t33 = each(lambda e, c=ctx: e.decode(prompt[:1, :c], 33), 1)
            t1 = each(lambda e, c=ctx: e.decode(prompt[:1, :c], 1), 1)
            rate = {n: 32 / (1 / t33[n] - 1 / t1[n]) for n in t33}
            rows.append((preset, f"decode b1 at context {ctx} (tok/s)", rate))
    return rows


def linears(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def gemv_floor(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Seconds of one decoded token's matrix-vector products: every Linear, the LM head included, on one row."""
    mats = linears(model)
    xs = {w.shape[1]: torch.randn(1, w.shape[1], device=args.device, dtype=w.dtype) for w, _ in mats}

    def products():
        with torch.no_grad():
            for w, b in mats:
                F.linear(xs[w.shape[1]], w, b)

    return alternate({"floor": products}, args.repeats, args.device)["floor"]


def train_floor(model: torch.nn.Module, rows: int, args: argparse.Namespace) -> float:
    """Seconds of a training step's matrix products (forward, and both backward products of every Linear on
    `rows` rows) plus one AdamW update of copies of all parameters."""
    mats = linears(model)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], device=args.device, dtype=w.dtype, requires_grad=True)
          for w, _ in mats}
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def products_and_update():
        for w, b in mats:
            y = F.linear(xs[w.shape[1]], w, b)
            torch.autograd.grad(y, [xs[w.shape[1]], w], torch.ones_like(y))
        opt.step()

    return alternate({"floor": products_and_update}, args.repeats, args.device)["floor"]


def train_steps(ref, ours, prompt, args) -> tuple[float, float]:
    ids = prompt[:4, :256]
    # Fused AdamW on both sides: transformers' Trainer default with torch >= 2.8, and optlite's build_optimizer.
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for m in (ref, ours)}

    def step(m):
        m.train()
        m(ids, labels=ids).loss.backward()
        opts[id(m)].step()
        opts[id(m)].zero_grad(set_to_none=True)
        m.eval()

    t = alternate({"optlite": lambda: step(ours), "transformers": lambda: step(ref)}, args.repeats, args.device)
    return 1 / t["optlite"], 1 / t["transformers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["opt-125m", "opt-350m"], help="presets to build")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the dtype both models run in")
    parser.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", help="--dtype bfloat16")
    parser.add_argument("--compile", action="store_true", help="optlite decodes with the static cache + torch.compile")
    parser.add_argument("--no-ct2", dest="ct2", action="store_false", help="leave CTranslate2 out")
    parser.add_argument("--modes", nargs="*", default=["bf16", "int8"], choices=("bf16", "int8"),
                        help="optlite's reduced-precision modes to add as columns (fp32 runs only)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which cases to run")
    parser.add_argument("--packed", action="store_true",
                        help="optlite's projections run on packed copies of the weights (use_onednn(packed=True))")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
