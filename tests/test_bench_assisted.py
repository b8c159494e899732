"""scripts/bench_assisted.py end to end, shrunk: a small corpus, tiny models, two training steps, short decodes.
Only its exit status, its identity check and its cache are tested; the timings it prints are not."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(path: Path) -> Path:
    recipe = json.loads((ROOT / "configs" / "assisted.json").read_text())
    recipe["corpus"]["max_chars"] = 100_000
    recipe["tokenizer"]["vocab_size"] = 300
    for name, layers in (("target", 2), ("draft", 1)):
        recipe[name]["model"].update(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=2)
        recipe[name]["train"].update(max_train_steps=2, num_warmup_steps=0, per_device_train_batch_size=4)
    recipe["measure"].update(prompts=2, prompt_tokens=16, max_new_tokens=8, repeats=1)
    path.write_text(json.dumps(recipe))
    return path


def test_bench_assisted_checks_identity_and_reuses_its_trained_models(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "bench_assisted.py"), "--recipe",
               str(tiny_recipe(tmp_path / "recipe.json")), "--output_dir", str(tmp_path / "models")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "identical to plain greedy decoding on every prompt" in first.stdout
    assert first.stdout.count(": training ") == 2, first.stdout
    rows = {line.split()[0]: line for line in first.stdout.splitlines() if line.startswith("   ")}
    assert " of " in rows["assisted"], first.stdout  # the acceptance count is printed
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("trained earlier") == 2 and ": training " not in again.stdout, again.stdout
