"""The `optlite` command on a tiny checkpoint with the real OPT tokenizer: its `main()` in this process, and as a
subprocess for what only a process shows (the exit status, stdin, log handlers, environment read at import)."""

import logging
import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from optlite import OPTForCausalLM, OPTTokenizer

ROOT = Path(__file__).resolve().parents[1]


def optlite(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "optlite.cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def cli(capsys, one_thread, hf_offline):
    """Runs `main(args)` as the console script does, here (a subprocess pays seconds of imports): the exit status,
    stdout and stderr, as `optlite(...)` gives them."""
    from optlite.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        log = logging.getLogger("optlite")
        level = log.level
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code
        finally:  # main() sets the level and adds a handler bound to this test's captured stderr: undo both
            log.setLevel(level)
            for handler in [h for h in log.handlers if getattr(h, "_optlite_cli", False)]:
                log.removeHandler(handler)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def test_console_script_is_declared():
    assert any(ep.name == "optlite" and ep.value == "optlite.cli:main" for ep in entry_points(group="console_scripts"))


def test_generate_streams_each_prompt(cli, checkpoint):
    done = cli("generate", str(checkpoint), "Hello there", "A photo of", "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Hello there") and lines[1].startswith("A photo of")
    assert all(len(line) > len(prompt) for line, prompt in zip(lines, ["Hello there", "A photo of"], strict=True))


def test_generate_reads_stdin_and_matches_the_library(checkpoint):
    from optlite import generate_text

    done = optlite("generate", str(checkpoint), "--max-new-tokens", "6", "--no-stream", stdin="In the city of\n")
    assert done.returncode == 0, done.stderr
    model, tok = OPTForCausalLM.from_pretrained(checkpoint), OPTTokenizer.from_pretrained(checkpoint)
    assert done.stdout == "In the city of" + generate_text(model, tok, "In the city of", max_new_tokens=6) + "\n"


def test_sampling_with_a_seed_is_reproducible(cli, checkpoint):
    args = ["generate", str(checkpoint), "Once", "--temperature", "0.9", "--top-p", "0.8", "--max-new-tokens", "8"]
    a, b, c = cli(*args, "--seed", "1"), cli(*args, "--seed", "1"), cli(*args, "--seed", "2")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_score_prints_the_perplexity_transformers_gives(cli, checkpoint, tmp_path):
    import transformers

    text = "The quick brown fox jumps over the lazy dog. " * 4
    (tmp_path / "t.txt").write_text(text)
    done = cli("score", str(checkpoint), str(tmp_path / "t.txt"), "--max-length", "64", "--stride", "60")
    assert done.returncode == 0, done.stderr
    ids = OPTTokenizer.from_pretrained(checkpoint)(text, return_tensors="pt").input_ids
    assert ids.shape[1] <= 60  # one window: the perplexity is exp of transformers' loss on the whole text
    ref = transformers.OPTForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        expected = math.exp(ref(ids, labels=ids).loss.item())
    printed = float(done.stdout.split()[1])
    assert abs(printed - expected) / expected < 1e-3, (printed, expected)


def test_info_on_a_checkpoint_and_a_preset(cli, checkpoint):
    import transformers

    done = cli("info", str(checkpoint))
    assert done.returncode == 0, done.stderr
    n = transformers.OPTForCausalLM.from_pretrained(checkpoint).num_parameters()
    assert f"parameters  {n:,}" in done.stdout
    assert "safetensors, 1 shard(s)" in done.stdout and "model.decoder.*" in done.stdout
    preset = cli("info", "opt-350m")
    assert preset.returncode == 0, preset.stderr
    assert "parameters  331,196,416" in preset.stdout and "post-LayerNorm" in preset.stdout


def test_convert_writes_what_transformers_reads(cli, checkpoint, tmp_path):
    import transformers

    done = cli("convert", str(checkpoint), str(tmp_path / "fp16"), "--dtype", "float16")
    assert done.returncode == 0, done.stderr
    ref = transformers.OPTForCausalLM.from_pretrained(tmp_path / "fp16", dtype="auto")
    assert ref.dtype == torch.float16
    original = OPTForCausalLM.from_pretrained(checkpoint)
    fc1 = original.model.decoder.layers[0].fc1.weight
    torch.testing.assert_close(ref.model.decoder.layers[0].fc1.weight, fc1.half())


@pytest.mark.parametrize("args,code,message", [
    (["generate", "/no/such/model", "hi"], 1, "optlite: error: "),
    (["score", "opt-tiny", "/no/such/file.txt"], 1, "optlite: error: no such file: /no/such/file.txt"),
    (["generate", "opt-tiny", "hi", "--max-new-tokens", "0"], 1, "optlite: error: --max-new-tokens must be at least 1"),
    (["generate", "opt-tiny", "hi", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["info"], 2, "the following arguments are required: MODEL"),
    (["score", "opt-tiny", "/no/such/file.txt", "--stride", "0"], 1, "optlite: error: --stride must be at least 1"),
    (["score", "opt-tiny", "/no/such/file.txt", "--max-length", "0"], 1, "--max-length must be at least 2, got 0"),
    (["generate", "opt-tiny", "hi", "--device", "cuda"], 1, "optlite: error: --device cuda: "),
    (["generate", "opt-tiny", "hi", "--device", "gpu"], 1, "optlite: error: --device 'gpu' is not a device"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_errors_are_one_line_without_traceback(cli, args, code, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done = cli(*args)
    assert done.returncode == code
    assert message in done.stderr and "Traceback" not in done.stderr
    if code == 1:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("args,code", [(["generate", "/no/such/model", "hi"], 1), (["frobnicate"], 2)])
def test_the_process_exits_with_the_error_status(args, code):
    done = optlite(*args)
    assert done.returncode == code and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == (1 if code == 1 else 2), done.stderr  # argparse: usage + error


@pytest.mark.parametrize("command,options", [
    ("generate", ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--num-beams", "--repetition-penalty",
                  "--seed", "--dtype", "--device", "--no-stream"]),
    ("score", ["--stride", "--max-length", "--dtype", "--device"]),
    ("info", ["MODEL"]),
    ("convert", ["--dtype", "--max-shard-size", "SRC", "DST"]),
])
def test_help_lists_every_option(cli, command, options):
    done = cli(command, "--help")
    assert done.returncode == 0
    for option in options:
        assert option in done.stdout, option


def test_info_shows_small_sizes_in_small_units(cli, checkpoint):
    done = cli("info", str(checkpoint))
    assert done.returncode == 0, done.stderr
    assert "0.00 GiB" not in done.stdout
    n = int(done.stdout.split("parameters  ")[1].split()[0].replace(",", ""))
    assert 2**20 < n * 4 < 2**30 and f"float32 {n * 4 / 2**20:.2f} MiB" in done.stdout  # MiB, not "0.00 GiB"
    assert "MiB:" in done.stdout.split("files")[1]
    from optlite.cli import human_size

    assert (human_size(1_315_758_080 * 4), human_size(3 * 2**10), human_size(512)) == ("4.90 GiB", "3.00 KiB", "512 B")


def test_library_log_lines_print_once():
    # huggingface_hub logs through a handler of its own; the command must not add a second one at the root.
    code = ("import sys; from huggingface_hub.utils import logging as hub; from optlite import cli; "
            "cli.run_info = lambda args: hub.get_logger('huggingface_hub.x').warning('once'); "
            "sys.exit(cli.main(['info', 'opt-tiny']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines().count("once") == 1, done.stderr


@pytest.mark.parametrize("offline", [True, False])
def test_a_model_missing_from_the_cache_is_reported_once_without_retries(tmp_path, offline):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9: an unreachable hub
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-m", "optlite.cli", "generate", "facebook/opt-125m", "hi"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # no retry warnings, no doubled lines
    assert f"not in the Hugging Face cache {tmp_path / 'hf' / 'hub'}" in lines[0]
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached") in lines[0]
    assert "Pass a local folder instead of the repo id" in lines[0]
