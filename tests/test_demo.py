"""`make demo` end to end, shortened: a smaller corpus and vocabulary, three training steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_saves_reloads_and_generates(tmp_path):
    recipe = json.loads((ROOT / "configs" / "demo.json").read_text())
    recipe["output_dir"] = str(tmp_path / "demo")
    recipe["corpus"]["max_chars"] = 200_000
    recipe["tokenizer"]["vocab_size"] = 400
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--recipe", str(tmp_path / "recipe.json"),
                           "--steps", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for step in range(1, 8):
        assert any(line.startswith(f"{step}. ") for line in lines), f"step {step} missing:\n{done.stdout}"
    assert sum(line.startswith("   ") and "|" in line for line in lines) == len(recipe["generate"]["prompts"])
    assert 'optlite generate facebook/opt-125m "The capital of France is"' in done.stdout
    assert "train:" in done.stderr  # the progress bar
    saved = transformers.OPTForCausalLM.from_pretrained(tmp_path / "demo")  # readable by transformers too
    assert saved.config.vocab_size == 400
    hidden = recipe["model"]["hidden_size"]  # the preset's embedding width follows it: no projections added
    assert f"hidden {hidden}," in done.stdout and saved.config.word_embed_proj_dim == hidden
