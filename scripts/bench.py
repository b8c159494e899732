"""Side-by-side speed of optlite and transformers' OPT: same random weights, one process, alternating runs.

    python scripts/bench.py                      # opt-125m and opt-350m shapes, fp32, 2 threads
    python scripts/bench.py --shapes opt-125m --bf16 --repeats 7
    python scripts/bench.py --device cuda --compile

Cases: prefill 1x512; greedy decode batch 1 (32-token prompt, 128 new) and batch 8 (64 new); one training
step 4x256 (forward, backward, AdamW); decode speed at context 64 vs 1536. Each figure is the median of
`--repeats` runs; optlite and transformers alternate so that machine noise hits both alike. Before timing,
both must produce the same greedy tokens.

Below the table, two ceilings: the time of the matrix products alone (one token's matrix-vector products for
decode b1; a step's forward and backward matrix products plus the AdamW update for training), run through
F.linear as both libraries run them. An fp32 implementation that computes the same products with the same BLAS
does at least this work, so transformers' time divided by it bounds the speed-up such an implementation can get.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

import optlite

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
    """Median seconds of each function, running them in turn `repeats` times after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (read + write), the memory-bandwidth yardstick for decoding."""
    src = torch.empty(128 * 1024 * 1024, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Every weight is read once per decoded token, except the position table (one row)."""
    positions = model.model.decoder.embed_positions.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()) - positions.numel() * positions.element_size()


def gen_kwargs(new_tokens: int, compile_: bool) -> dict:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {**kw, "compile": True, "cache_implementation": "static"} if compile_ else kw


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    bw = copy_bandwidth(args.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"{args.threads} threads, {str(dtype).removeprefix('torch.')}, copy bandwidth {bw / 1e9:.1f} GB/s, "
          f"median of {args.repeats}")
    rows, ceilings = [], []
    for preset in args.shapes:
        rows_, ceilings_ = bench_shape(preset, dtype, bw, args)
        rows += rows_
        ceilings += ceilings_
    print("\n| shape | case | optlite | transformers | ratio |\n|---|---|---:|---:|---:|")
    for preset, case, ours_v, ref_v in rows:
        print(f"| {preset} | {case} | {ours_v:.2f} | {ref_v:.2f} | {ours_v / ref_v:.2f}x |")
    if ceilings:
        print("\nCeilings (the matrix products alone through F.linear, no other work):")
        for preset, case, floor_s, ref_s in ceilings:
            print(f"  {preset} {case}: {floor_s * 1e3:.1f} ms vs transformers {ref_s * 1e3:.1f} ms: at most "
                  f"{ref_s / floor_s:.2f}x transformers with these products")


def bench_shape(preset: str, dtype: torch.dtype, bw: float, args: argparse.Namespace) -> tuple[list, list]:
    ref, ours = build_pair(preset, dtype, args.device)
    prompt = torch.randint(3, 50000, (8, 1536), generator=torch.Generator().manual_seed(1)).to(args.device)
    with torch.no_grad():
        a = ref.generate(prompt[:2, :32], max_new_tokens=16, do_sample=False)
        b = ours.generate(prompt[:2, :32], **gen_kwargs(16, args.compile))
    if not torch.equal(a, b):
        raise SystemExit(f"{preset}: greedy tokens differ between optlite and transformers; not timing")

    def both(fn: Callable[[torch.nn.Module], object]) -> dict[str, float]:
        with torch.no_grad():
            return alternate({"optlite": lambda: fn(ours), "transformers": lambda: fn(ref)}, args.repeats,
                             args.device)

    def decode(m: torch.nn.Module, batch: int, ctx: int, new: int) -> torch.Tensor:
        ids = prompt[:batch, :ctx]
        return m.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs(new, args.compile and m is ours))

    rows, ceilings = [], []
    if "prefill" in args.cases:
        t = both(lambda m: m(prompt[:1, :512], use_cache=True, logits_to_keep=1))
        rows.append((preset, "prefill 1x512 (tok/s)", 512 / t["optlite"], 512 / t["transformers"]))
    if "b1" in args.cases:
        t = both(lambda m: decode(m, 1, 32, 128))
        b1 = (128 / t["optlite"], 128 / t["transformers"])
        rows.append((preset, "decode b1, 32+128 (tok/s)", *b1))
        bound = bw / weight_bytes_per_token(ours)
        rows.append((preset, "decode b1 as % of bandwidth bound", 100 * b1[0] / bound, 100 * b1[1] / bound))
        ceilings.append((preset, "decode b1, one token", gemv_floor(ref, args), 1 / b1[1]))
    if "b8" in args.cases:
        t = both(lambda m: decode(m, 8, 32, 64))
        rows.append((preset, "decode b8, 32+64 (tok/s)", 8 * 64 / t["optlite"], 8 * 64 / t["transformers"]))
    if "context" in args.cases:
        for ctx in (64, 1536):
            # Decode-only rate: the difference between 33 and 1 new tokens removes the prefill.
            t33, t1 = both(lambda m, c=ctx: decode(m, 1, c, 33)), both(lambda m, c=ctx: decode(m, 1, c, 1))
            rows.append((preset, f"decode b1 at context {ctx} (tok/s)",
                         32 / (t33["optlite"] - t1["optlite"]), 32 / (t33["transformers"] - t1["transformers"])))
    if "train" in args.cases:
        ours_steps, ref_steps = train_steps(ref, ours, prompt, args)
        rows.append((preset, "train step 4x256 (steps/s)", ours_steps, ref_steps))
        ceilings.append((preset, "train step 4x256", train_floor(ref, 4 * 256, args), 1 / ref_steps))
    return rows, ceilings


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
    opt = torch.optim.AdamW(params, lr=1e-5)

    def products_and_update():
        for w, b in mats:
            y = F.linear(xs[w.shape[1]], w, b)
            torch.autograd.grad(y, [xs[w.shape[1]], w], torch.ones_like(y))
        opt.step()

    return alternate({"floor": products_and_update}, args.repeats, args.device)["floor"]


def train_steps(ref, ours, prompt, args) -> tuple[float, float]:
    ids = prompt[:4, :256]
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ref, ours)}

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
    parser.add_argument("--bf16", action="store_true", help="run both models in bfloat16")
    parser.add_argument("--compile", action="store_true", help="optlite decodes with the static cache + torch.compile")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which cases to run")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
