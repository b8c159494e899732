"""Every code block of the README runs. Hub ids (facebook/opt-*) are replaced by a tiny local checkpoint with the
real OPT tokenizer, and step counts / block sizes of the training commands by small ones; nothing else changes.
`make demo` is run by test_demo.py and `make test` is what runs this file."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SMALLER = [(r"facebook/opt-[\w.]+", None), (r"--max_train_steps \d+", "--max_train_steps 2"),
           (r"--block_size \d+", "--block_size 32"), (r"--max-length \d+", "--max-length 64"),
           (r"--stride \d+", "--stride 32")]


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def localize(code: str, checkpoint: Path) -> str:
    for pattern, replacement in SMALLER:
        code = re.sub(pattern, replacement or str(checkpoint), code)
    return code



@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The files the README's commands name, with a little content."""
    monkeypatch.chdir(tmp_path)
    lines = [f"Line {i} of a small corpus, about the city of Paris and its {i % 7} bridges." for i in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "notes.txt").write_text(" ".join(lines[:60]))
    rows = [f'"{"a fine film" if i % 2 else "two hours I will not get back"} {i}",{i % 2}' for i in range(40)]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    context = "Jim Henson was a nice puppet maker who lived in New York."
    qas = [{"id": str(i), "question": "Who was Jim Henson?",
            "answers": [{"text": "a nice puppet maker", "answer_start": context.index("a nice")}]} for i in range(8)]
    (tmp_path / "squad.json").write_text(
        json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    return tmp_path


def test_the_setup_block_is_the_two_make_commands():
    assert [line.split("#")[0].strip() for line in code_blocks("bash")[0].splitlines()] == ["make demo", "make test"]


def test_python_blocks_run_in_order(checkpoint, workdir):
    namespace: dict = {}
    for i, block in enumerate(code_blocks("python")):
        try:
            exec(compile(localize(block, checkpoint), f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{block}") from e


def commands(block: str) -> list[list[str]]:
    """The commands of a bash block (continuation lines joined), as argv lists run with this interpreter."""
    launchers = {"python": [sys.executable], "optlite": [sys.executable, "-m", "optlite.cli"],
                 "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    argvs = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line.split("  #")[0])
        if argv and argv[0] != "make":
            argvs.append(launchers[argv[0]] + argv[1:])
    return argvs


@pytest.mark.parametrize("block", range(1, len(code_blocks("bash"))))
def test_shell_blocks_run(block, checkpoint, workdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for argv in commands(localize(code_blocks("bash")[block], checkpoint)):
        argv = [str(ROOT / a) if a.startswith("scripts/") else a for a in argv]
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}"
