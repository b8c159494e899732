"""The `optlite` command: generate, score, info and convert, on a checkpoint folder, a hub id or a preset.

    optlite generate facebook/opt-125m "The capital of France is"
    echo "Once upon a time" | optlite generate ./my-model --max-new-tokens 40 --temperature 0.8
    optlite score facebook/opt-125m notes.txt --max-length 1024 --stride 512
    optlite info facebook/opt-6.7b
    optlite convert facebook/opt-1.3b ./opt-1.3b-fp16 --dtype float16 --max-shard-size 2GB
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

DTYPES = ("float32", "float16", "bfloat16", "auto")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"optlite: error: {message}", file=sys.stderr)
        return 1
    return 0


def _log_to_stderr() -> None:
    # optlite's own warnings only: huggingface_hub has its own handler, and a root handler would print its lines twice.
    log = logging.getLogger("optlite")
    if not any(getattr(h, "_optlite_cli", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._optlite_cli = True
        log.addHandler(handler)
    log.setLevel(logging.WARNING)


def check_device(spec: str) -> torch.device:
    """The torch.device of `--device`, refused early when this machine or torch build cannot use it."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"--device {spec}: {why}; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    return device


def human_size(nbytes: float) -> str:
    """A byte count in the largest binary unit that keeps it at least 1, e.g. "1.50 GiB", "312.00 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optlite", description="OPT language models in plain PyTorch.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    model_help = "checkpoint folder, hub id (e.g. facebook/opt-125m) or preset name (e.g. opt-125m: random weights)"

    gen = sub.add_parser("generate", help="continue prompts, streaming the text as it is produced",
                         description="Continue each PROMPT (or each line of standard input when none is given).")
    gen.add_argument("model", metavar="MODEL", help=model_help)
    gen.add_argument("prompts", metavar="PROMPT", nargs="*", help="prompts; read from stdin, one per line, if absent")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add to each prompt (default 50)")
    gen.add_argument("--temperature", type=float, help="sample with this temperature (turns sampling on)")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens (turns sampling on)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (turns sampling on)")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise repeated tokens (> 1)")
    gen.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    add_load_options(gen)
    gen.add_argument("--no-stream", action="store_true", help="print each completion at the end, not as it grows")
    gen.set_defaults(run=run_generate)

    score = sub.add_parser("score", help="perplexity of a text file (sliding window)",
                           description="Perplexity of FILE under MODEL, scoring every token once with a sliding "
                                       "window of --max-length tokens that moves --stride tokens at a time.")
    score.add_argument("model", metavar="MODEL", help=model_help)
    score.add_argument("file", metavar="FILE", type=Path, help="a UTF-8 text file")
    score.add_argument("--max-length", type=int, help="window length (default: the model's context, 2048)")
    score.add_argument("--stride", type=int, help="tokens scored per window (default: half the window)")
    add_load_options(score)
    score.set_defaults(run=run_score)

    info = sub.add_parser("info", help="config, size and files of a model",
                          description="Print the config, parameter count, memory per dtype, and the checkpoint "
                                      "files and key layout found (nothing is loaded).")
    info.add_argument("model", metavar="MODEL", help=model_help)
    info.set_defaults(run=run_info)

    conv = sub.add_parser("convert", help="rewrite a checkpoint as safetensors",
                          description="Rewrite the checkpoint SRC (e.g. the hub's pickled .bin files) as safetensors "
                                      "in DST, optionally in another dtype and shard size.")
    conv.add_argument("src", metavar="SRC", help="checkpoint folder or hub id")
    conv.add_argument("dst", metavar="DST", type=Path, help="folder to write (replaced atomically)")
    conv.add_argument("--dtype", choices=DTYPES[:3], help="cast floating-point weights to this dtype")
    conv.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    conv.set_defaults(run=run_convert)
    return parser


def add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights dtype (default float32; auto: as stored)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: MODEL; for a preset facebook/NAME)")


# -------------------------------------------------------------------------------------------------------------- loading


def load(args: argparse.Namespace):
    from .config import OPTConfig, preset_name
    from .heads import OPTForCausalLM
    from .tokenizer import OPTTokenizer

    check_device(args.device)
    preset = preset_name(args.model)
    dtype = None if args.dtype == "float32" else args.dtype
    if preset:
        logging.getLogger("optlite").warning("%s is a preset: the model has random weights", preset)
        torch_dtype = torch.float32 if dtype in (None, "auto") else getattr(torch, dtype)
        model = OPTForCausalLM(OPTConfig.from_preset(preset)).to(args.device, torch_dtype).eval()
    else:
        model = OPTForCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    tokenizer = OPTTokenizer.from_pretrained(args.tokenizer or (f"facebook/{preset}" if preset else args.model))
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------------- commands


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        return args.prompts
    if sys.stdin.isatty():
        print("Reading prompts from standard input, one per line (Ctrl-D to finish).", file=sys.stderr)
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt given: pass PROMPT arguments or lines on standard input")
    return prompts


def run_generate(args: argparse.Namespace) -> None:
    from .generation import generate_text
    from .streaming import TextStreamer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    prompts = read_prompts(args)
    model, tokenizer = load(args)
    sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=sample,
                  repetition_penalty=args.repetition_penalty)
    kwargs.update({k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                     ("top_p", args.top_p)) if v is not None})
    if args.seed is not None:
        torch.manual_seed(args.seed)
        kwargs["generator"] = torch.Generator(device=model.device).manual_seed(args.seed)
    stream = not args.no_stream and args.num_beams == 1
    for prompt in prompts:
        if stream:
            print(prompt, end="", flush=True)
            generate_text(model, tokenizer, prompt, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                          skip_special_tokens=True), **kwargs)
        else:
            print(prompt + generate_text(model, tokenizer, prompt, **kwargs), flush=True)


def run_score(args: argparse.Namespace) -> None:
    from .perplexity import perplexity

    for flag, value, least in (("--stride", args.stride, 1), ("--max-length", args.max_length, 2)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")  # 0 must not mean "the default"
    if not args.file.is_file():
        raise FileNotFoundError(f"no such file: {args.file}")
    text = args.file.read_text(encoding="utf-8")
    model, tokenizer = load(args)
    ids = tokenizer(text).input_ids
    ppl = perplexity(model, ids, max_length=args.max_length, stride=args.stride, progress=True)
    print(f"perplexity {ppl:.4f} over {len(ids) - 1} tokens of {args.file}")


def run_info(args: argparse.Namespace) -> None:
    from .checkpoint import find_checkpoint, scan_shards
    from .config import OPTConfig, preset_name
    from .heads import OPTForCausalLM
    from .hub import Source

    preset = preset_name(args.model)
    config = OPTConfig.from_preset(preset) if preset else OPTConfig.from_pretrained(args.model)
    with torch.device("meta"):
        n_params = OPTForCausalLM(config).num_parameters()
    print(f"model       {args.model}{' (preset)' if preset else ''}")
    print(f"shape       {config.num_hidden_layers} layers, hidden {config.hidden_size}, ffn {config.ffn_dim}, "
          f"{config.num_attention_heads} heads, embeddings {config.word_embed_proj_dim}, vocab {config.vocab_size}, "
          f"context {config.max_position_embeddings}")
    print(f"layout      {'pre' if config.do_layer_norm_before else 'post'}-LayerNorm, "
          f"activation {config.activation_function}, stored dtype {config.torch_dtype or 'unknown'}")
    print(f"parameters  {n_params:,}")
    print("memory      " + ", ".join(f"{name} {human_size(n_params * size)}"
                                      for name, size in (("float32", 4), ("float16/bfloat16", 2))))
    if preset:
        return
    files = find_checkpoint(Source(args.model), with_config=False)
    stored = scan_shards(files)
    nbytes = sum(math.prod(info.shape) * info.dtype.itemsize for info, _ in stored.values())
    prefix = "model.decoder.*" if any(k.startswith("model.decoder.") for k in stored) else "decoder.*"
    heads = [k for k in ("lm_head.weight", "score.weight", "qa_outputs.weight") if k in stored]
    print(f"files       {files.format}, {len(files.shards)} shard(s), {human_size(nbytes)}: "
          + ", ".join(p.name for p in files.shards))
    print(f"keys        {len(stored)} tensors, {prefix}, head: {', '.join(heads) or 'none (lm_head tied)'}")


def run_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    out = convert(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
