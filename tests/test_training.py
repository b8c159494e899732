"""Training: data readers and collators, the loop's arithmetic (gradient accumulation, checkpointing, exact resume),
the three scripts end to end (one process, two processes with torchrun, FSDP through accelerate), and bad input.

Everything runs offline on tiny models (hidden 32, 2 layers, a 300-token tokenizer trained here) with one thread.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import optlite
from optlite.train import loop as training
from optlite.train.config import TrainConfig
from optlite.train.data import CausalLMCollator, InputError, LabelMap, TokenBlocks, count_loss_items, group_texts
from optlite.train.loop import WarmupSchedule, epoch_batches, eval_shard, train, train_step
from optlite.train.qa import QAExample, best_span, exact_match, f1_score, normalize_answer, qa_features, read_squad

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64)
ADJ = "red big small old new green happy quiet".split()
NOUN = "cat dog bird fish horse mouse tree house".split()
VERB = "sees likes chases finds hears".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its Accelerator anew


def sentence(rng: random.Random) -> tuple[str, str, str]:
    subject, obj = rng.choice(NOUN), rng.choice(NOUN)
    return f"the {rng.choice(ADJ)} {subject} {rng.choice(VERB)} the {obj}.", subject, obj


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng)[0] for _ in range(rng.randint(1, 3))) + "\n" for _ in range(n)]


def save_tiny(directory: Path, tok: optlite.OPTTokenizer, **overrides) -> Path:
    torch.manual_seed(0)
    model = optlite.OPTForCausalLM(optlite.OPTConfig(vocab_size=len(tok), **{**TINY, "dropout": 0.0, **overrides}))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("data")
    texts = lines(400, seed=0)
    (d / "train.txt").write_text("".join(texts[:360]))
    (d / "valid.txt").write_text("".join(texts[360:]))
    (d / "small.txt").write_text("".join(texts[:20]))  # ~15 blocks of 32: epochs of a few steps
    tok = optlite.OPTTokenizer.train(texts, vocab_size=300)
    return SimpleNamespace(dir=d, tok=tok, ckpt=save_tiny(d / "ckpt", tok),
                           ckpt_dropout=save_tiny(d / "ckpt_dropout", tok, dropout=0.1))


def run_script(name: str, *args: object) -> int:
    return runpy.run_path(str(ROOT / "scripts" / f"{name}.py"))["main"]([str(a) for a in args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*cmd: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        del env[key]
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def clm_args(files: SimpleNamespace, out: Path, *extra: object, ckpt: Path | None = None) -> list[object]:
    return ["--model_name_or_path", ckpt or files.ckpt, "--train_file", files.dir / "train.txt",
            "--validation_file", files.dir / "valid.txt", "--block_size", 32, "--learning_rate", 3e-3,
            "--logging_steps", 1, "--output_dir", out, *extra]


@torch.no_grad()
def assert_transformers_agrees(out: Path, cls_name: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The saved folder loads in transformers' class and gives optlite's outputs on a padded batch."""
    import transformers

    ref = getattr(transformers, cls_name).from_pretrained(out).eval()
    ours = getattr(optlite, cls_name).from_pretrained(out).eval()
    a, b = ref(input_ids=ids, attention_mask=mask), ours(input_ids=ids, attention_mask=mask)
    for key in ("logits", "start_logits", "end_logits"):
        if getattr(b, key, None) is not None:
            torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=1e-5, rtol=1e-5)


def padded_batch(tok: optlite.OPTTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(["the red cat sees the dog.", "the bird likes the old horse. the fish hears"], padding=True,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


# ---------------------------------------------------------------------------------------------------- units


def test_group_texts_and_blocks(files):
    assert group_texts([[2, 10, 11], [2, 12, 13, 14]], 3).tolist() == [[2, 10, 11], [2, 12, 13]]
    blocks = TokenBlocks.from_texts(lines(20, seed=1), files.tok, block_size=16)
    assert blocks[0]["input_ids"].shape == (16,) and blocks[0]["input_ids"][0] == files.tok.bos_token_id
    with pytest.raises(InputError, match="fewer than one block of block_size=64"):
        TokenBlocks.from_texts(["the cat.\n"], files.tok, block_size=64)


def test_collator_masks_padding_and_counts_label_tokens():
    batch = CausalLMCollator(pad_token_id=1)([{"input_ids": [2, 7, 8, 9]}, {"input_ids": [2, 5]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[2, 7, 8, 9], [2, 5, -100, -100]]
    assert count_loss_items(batch) == 3 + 1  # next-token targets: 7 8 9 and 5
    assert count_loss_items({"labels": torch.tensor([0, 2, 1])}) == 3
    assert count_loss_items({"start_positions": torch.tensor([4, 0])}) == 2


def test_epoch_batches_deal_one_global_batch_across_processes():
    one = epoch_batches(23, 8, 1, 0, seed=3, epoch=1)
    two = [epoch_batches(23, 4, 2, r, seed=3, epoch=1) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 3  # 23 wrapped to 24, 12 each
    for step in range(2):  # process batches together are the one-process batch of twice the size
        assert sorted(two[0][step] + two[1][step]) == sorted(one[step])
    assert epoch_batches(23, 8, 1, 0, seed=3, epoch=1) == one != epoch_batches(23, 8, 1, 0, seed=3, epoch=2)
    assert eval_shard(5, 2, 0) == ([0, 2, 4], [1, 1, 1]) and eval_shard(5, 2, 1) == ([1, 3, 0], [1, 1, 0])


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_match_transformers(kind):
    import transformers

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = transformers.get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=11)
    ours = WarmupSchedule(kind, warmup=3, total=11)
    for step in range(12):
        assert ours(step) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-12)


def test_squad_normalisation_metrics_and_span_decoding():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert exact_match("the Broncos", "Broncos.") == 1.0 and exact_match("Broncos", "Panthers") == 0.0
    assert f1_score("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0
    start, end = torch.tensor([0.0, 5.0, 1.0, 9.0]), torch.tensor([1.0, 0.0, 2.0, -9.0])
    assert best_span(start, end, max_answer_length=2) == (1, 2, 7.0)  # (3, 0) scores 10 but ends before it starts
    assert best_span(start, end, max_answer_length=1) == (1, 1, 5.0)


def test_qa_features_point_at_the_answer_in_every_window(files):
    context = " ".join(sentence(random.Random(i))[0] for i in range(12))
    answer = "house"
    start = context.index(f" {answer}", 40) + 1
    ex = QAExample("q1", "what does it see?", context, [{"text": answer, "answer_start": start}])
    feats = qa_features([ex], files.tok, max_length=40, doc_stride=10, max_question_length=12)
    assert len(feats) > 2  # the context needs several windows
    hits = [f for f in feats.items if f["start_positions"] > 0]
    assert hits, "no window holds the answer"
    for f in hits:
        span = f["input_ids"][f["start_positions"] : f["end_positions"] + 1]
        assert files.tok.decode(span).strip() == answer
        i = f["feature_index"]
        lo = feats.context_start[i]
        chars = feats.offsets[i][f["start_positions"] - lo][0], feats.offsets[i][f["end_positions"] - lo][1]
        assert context[chars[0] : chars[1]].strip() == answer


def test_label_map():
    assert LabelMap.infer(["pos", "neg", "pos"]).names == ["neg", "pos"]
    numeric = LabelMap.infer(["0", "2", 1])
    assert numeric.numeric and numeric.names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert LabelMap.infer(["b", "a"], known_names=["b", "a"]).encode("a", "x") == 1
    with pytest.raises(InputError, match=r"f\.csv line 3: label '7' is outside 0\.\.2"):
        LabelMap.infer(["0", "1", "7"], ["f.csv line 1", "f.csv line 2", "f.csv line 3"], num_labels=3)


# ---------------------------------------------------------------------------------------------------- loop arithmetic


def _tiny_model(seed: int = 0, **overrides) -> optlite.OPTForCausalLM:
    torch.manual_seed(seed)
    return optlite.OPTForCausalLM(optlite.OPTConfig(vocab_size=300, **{**TINY, "dropout": 0.0, **overrides}))


def _grads(micro_batches: list[dict], checkpointing: bool = False) -> dict[str, torch.Tensor]:
    """The gradient train_step applies, read back through SGD with lr=1 (new = old - grad)."""
    from accelerate import Accelerator

    model = _tiny_model()
    if checkpointing:
        model.gradient_checkpointing_enable()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model.train(), torch.optim.SGD(model.parameters(), lr=1.0))
    train_step(acc, model, opt, micro_batches, max_grad_norm=0.0)
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}


def test_accumulation_and_checkpointing_give_the_batch_gradient():
    # Rows of different lengths, so the two micro-batches hold different numbers of label tokens (11 vs 35 here).
    # HF-style mean losses averaged over micro-batches would then weight their tokens unequally; train_step weights
    # each micro-batch's mean by its share of the step's label tokens, which equals the loss of the whole batch.
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 4, 5, 3, 9, 10, 8, 12)]
    collate = CausalLMCollator(pad_token_id=1)
    whole = collate([{"input_ids": r} for r in rows])
    micro = [collate([{"input_ids": r} for r in rows[:4]]), collate([{"input_ids": r} for r in rows[4:]])]
    assert count_loss_items(micro[0]) != count_loss_items(micro[1])
    ref = _grads([whole])
    for got in (_grads(micro), _grads([whole], checkpointing=True), _grads(micro, checkpointing=True)):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)
    # The naive normalisation (mean of the micro-batch means) is measurably different: the test can tell.
    model = _tiny_model()
    sum(model(**b).loss for b in micro).div(2).backward()
    naive = {k: p.grad for k, p in model.named_parameters()}
    assert max((naive[k] - ref[k]).abs().max().item() for k in ref) > 1e-4


def test_train_accumulation_and_checkpointing_match_plain_run(files, tmp_path):
    blocks = TokenBlocks.from_texts(lines(60, seed=2), files.tok, block_size=32)
    runs = {}
    for name, kw in {"plain": dict(per_device_train_batch_size=4),
                     "accumulated": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
                     "checkpointed": dict(per_device_train_batch_size=4, gradient_checkpointing=True)}.items():
        cfg = TrainConfig(str(tmp_path / name), max_train_steps=5, learning_rate=3e-3, logging_steps=1, **kw)
        result = train(_tiny_model(), blocks, CausalLMCollator(1), cfg, save=False)
        runs[name] = ([r["loss"] for r in result.history], dict(result.model.named_parameters()))
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    for name in ("accumulated", "checkpointed"):
        assert runs[name][0] == pytest.approx(runs["plain"][0], abs=1e-6)
        for k, v in runs["plain"][1].items():  # Adam divides by sqrt(v): float rounding in tiny gradients grows a bit
            torch.testing.assert_close(runs[name][1][k], v, atol=1e-5, rtol=1e-4)


def test_bf16_mixed_precision_trains_fp32_weights(files, tmp_path):
    blocks = TokenBlocks.from_texts(lines(30, seed=4), files.tok, block_size=32)
    cfg = TrainConfig(str(tmp_path), max_train_steps=4, learning_rate=3e-3, logging_steps=1, mixed_precision="bf16",
                      per_device_train_batch_size=4)
    result = train(_tiny_model(), blocks, CausalLMCollator(1), cfg, save=False)
    assert result.accelerator.mixed_precision == "bf16"
    loss = [r["loss"] for r in result.history]
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast: master weights stay fp32


# ---------------------------------------------------------------------------------------------------- scripts


def test_clm_resume_continues_exactly(files, tmp_path):
    # N steps vs N/2, then resume for N/2: with dropout (RNG state matters), accumulation (a partial last group),
    # a checkpoint mid-epoch and an epoch boundary after it (4 steps an epoch).
    args = ["--train_file", files.dir / "small.txt", "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", 2, "--max_train_steps", 6, "--checkpointing_steps", 3]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_script("train_clm", *clm_args(files, full, *args, ckpt=files.ckpt_dropout)) == 0
    state_3 = json.loads((full / "step_3" / "trainer_state.json").read_text())
    state_6 = json.loads((full / "step_6" / "trainer_state.json").read_text())
    assert (state_3["epoch"], state_6["epoch"]) == (0, 1) and state_3["batches_in_epoch"] > 0  # crosses an epoch
    resumed.mkdir()
    shutil.copytree(full / "step_3", resumed / "step_3")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert run_script("train_clm", *clm_args(files, resumed, *args, "--resume_from_checkpoint", "latest",
                                             ckpt=files.ckpt_dropout)) == 0
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [b[s] for s in b] == [a[s] for s in b]  # bit-identical
    evals_a = [r for r in records(full) if "eval_loss" in r and r["step"] > 3]
    assert evals_a and evals_a == [r for r in records(resumed) if "eval_loss" in r]
    wa, wb = weights(full), weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------------- kill -9

KILL_ARGS = ["--train_file", "small.txt", "--per_device_train_batch_size", 2, "--max_train_steps", 8,
             "--checkpointing_steps", 2]


def kill_args(files: SimpleNamespace, out: Path, *extra: object) -> list[object]:
    args = [files.dir / a if a == "small.txt" else a for a in KILL_ARGS]
    return clm_args(files, out, *args, *extra, ckpt=files.ckpt_dropout)


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert run_script("train_clm", *kill_args(files, out)) == 0
    return out


def killed_run(files: SimpleNamespace, out: Path, checkpoint: str, moment: str, *extra: object) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "KILL_CHECKPOINT": checkpoint,
           "KILL_MOMENT": moment}
    proc = subprocess.run([sys.executable, ROOT / "tests" / "kill_driver.py", *map(str, kill_args(files, out, *extra))],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-3000:]  # it really died during that write


# What "latest" finds after each kill while step_6 (which existed) is rewritten: the old step_6 intact, the new one
# complete, or (killed between two renames) the old one, put back from where it was set aside.
KILL_MOMENTS = ["mid_file", "before_state", "after_swap", "between_renames"]


@pytest.mark.parametrize("moment", KILL_MOMENTS)
def test_kill_while_rewriting_a_checkpoint_then_resume_exactly(files, uninterrupted, tmp_path, moment, caplog):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("step_4", "step_6"):
        shutil.copytree(uninterrupted / name, out / name)
    before = {p.name: p.read_bytes() for p in (out / "step_6").iterdir()}
    killed_run(files, out, "step_6", moment, "--resume_from_checkpoint", out / "step_4")
    if moment in ("mid_file", "before_state"):
        assert {p.name: p.read_bytes() for p in (out / "step_6").iterdir()} == before  # untouched by the dead write
    if moment == "between_renames":
        assert not (out / "step_6").exists()
    with caplog.at_level("INFO"):
        assert run_script("train_clm", *kill_args(files, out, "--resume_from_checkpoint", "latest")) == 0
    assert f"resumed from {out / 'step_6'} at step 6" in caplog.text
    full, resumed = weights(uninterrupted), weights(out)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)  # bit-identical
    assert not [p for p in out.iterdir() if ".optlite-" in p.name]  # what the dead write left is cleared


def test_kill_during_a_first_checkpoint_write_then_resume_exactly(files, uninterrupted, tmp_path, caplog):
    out = tmp_path / "out"
    killed_run(files, out, "step_4", "mid_file")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.jsonl", "step_2"]
    with caplog.at_level("INFO"):
        assert run_script("train_clm", *kill_args(files, out, "--resume_from_checkpoint", "latest")) == 0
    assert f"resumed from {out / 'step_2'} at step 2" in caplog.text
    full, resumed = weights(uninterrupted), weights(out)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, 9)) and losses(out) == losses(uninterrupted)  # steps 3, 4 redone, not repeated


def test_latest_skips_a_damaged_checkpoint_and_names_it(files, uninterrupted, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("step_4", "step_6", "step_8"):
        shutil.copytree(uninterrupted / name, out / name)
    optimizer = out / "step_8" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # damaged in place, as an older version's rewrite did
    (out / "step_6" / "trainer_state.json").unlink()  # a write that never finished
    assert training.checkpoint_problem(out / "step_8") == f"optimizer.bin has 100 bytes, " \
        f"{(uninterrupted / 'step_8' / 'optimizer.bin').stat().st_size} were written"
    with pytest.raises(SystemExit, match=r"step_8.*not a checkpoint, or an incomplete one \(optimizer.bin has 100"):
        run_script("train_clm", *kill_args(files, out, "--resume_from_checkpoint", out / "step_8"))
    with caplog.at_level("INFO"):
        assert run_script("train_clm", *kill_args(files, out, "--resume_from_checkpoint", "latest")) == 0
    assert f"skipping checkpoint {out / 'step_8'} (optimizer.bin has 100 bytes" in caplog.text
    assert f"skipping checkpoint {out / 'step_6'} (no trainer_state.json" in caplog.text
    assert f"resuming from {out / 'step_4'}, the newest complete checkpoint" in caplog.text


def test_a_damaged_checkpoint_without_sizes_is_named_when_read(files, uninterrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "step_4", out / "step_4")
    state = json.loads((out / "step_4" / "trainer_state.json").read_text())
    del state["files"]  # as written by earlier versions
    (out / "step_4" / "trainer_state.json").write_text(json.dumps(state))
    optimizer = out / "step_4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"checkpoint .*step_4 cannot be read, it is damaged"):
        run_script("train_clm", *kill_args(files, out, "--resume_from_checkpoint", "latest"))


def test_a_second_run_into_the_same_output_dir_needs_overwrite(files, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = clm_args(files, out, "--train_file", files.dir / "small.txt", "--max_train_steps", 2)
    assert run_script("train_clm", *args) == 0
    before = [(r["step"], r.get("loss")) for r in records(out)]
    with pytest.raises(SystemExit,
                       match=r"output_dir .*out already holds files \(config.json, .*\): pass --overwrite_output_dir"):
        run_script("train_clm", *args)
    assert [(r["step"], r.get("loss")) for r in records(out)] == before
    assert run_script("train_clm", *args, "--overwrite_output_dir") == 0
    assert [(r["step"], r.get("loss")) for r in records(out)] == before  # started over, not appended


def test_clm_holds_out_a_validation_split_without_a_validation_file(files, tmp_path):
    out = tmp_path / "out"
    assert run_script("train_clm", "--model_name_or_path", files.ckpt, "--train_file", files.dir / "small.txt",
                      "--validation_split_percentage", 25, "--block_size", 32, "--per_device_train_batch_size", 4,
                      "--max_train_steps", 2, "--output_dir", out) == 0
    assert json.loads((out / "eval_results.json").read_text())["eval_tokens"] > 0


@pytest.fixture(scope="module")
def ddp_run(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "out"
    launch(BIN / "torchrun", "--nproc_per_node", 2, "--master_port", free_port(), ROOT / "scripts" / "train_clm.py",
           *clm_args(files, out, "--per_device_train_batch_size", 4, "--max_train_steps", 8,
                     "--checkpointing_steps", 4, "--write_rank_digests"))
    return out


def test_torchrun_two_processes(files, ddp_run, tmp_path):
    out = ddp_run
    loss = losses(out)
    assert sorted(loss) == list(range(1, 9)) and loss[8] < loss[1] - 0.2
    digests = [(out / f"param_digest_rank{r}.txt").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    # Resume both processes from the step-4 checkpoint: the same losses and the same weights, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "step_4", resumed / "step_4")
    launch(BIN / "torchrun", "--nproc_per_node", 2, "--master_port", free_port(), ROOT / "scripts" / "train_clm.py",
           *clm_args(files, resumed, "--per_device_train_batch_size", 4, "--max_train_steps", 8,
                     "--resume_from_checkpoint", resumed / "step_4", "--write_rank_digests"))
    assert losses(resumed) == {s: loss[s] for s in range(5, 9)}
    assert [(resumed / f"param_digest_rank{r}.txt").read_text() for r in range(2)] == digests
    for step in (4, 8):
        ckpt = out / f"step_{step}"
        assert json.loads((ckpt / "trainer_state.json").read_text())["completed_steps"] == step
        assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert_transformers_agrees(out, "OPTForCausalLM", *padded_batch(files.tok))
    import transformers

    text = "the happy fish chases the tree."
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == files.tok(text)["input_ids"]
    # Data parallelism is one global batch: a one-process run of batch 8 trains the same weights.
    single = tmp_path / "single"
    run_script("train_clm", *clm_args(files, single, "--per_device_train_batch_size", 8, "--max_train_steps", 8))
    assert losses(single) == pytest.approx(loss, abs=1e-5)
    for k, v in weights(out).items():
        torch.testing.assert_close(weights(single)[k], v, atol=1e-5, rtol=1e-4)


def test_fsdp_on_cpu_through_accelerate(files, ddp_run, tmp_path):
    out = tmp_path / "fsdp"
    launch(BIN / "accelerate", "launch", "--config_file", ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml",
           "--num_processes", 2, "--main_process_port", free_port(), ROOT / "scripts" / "train_clm.py",
           *clm_args(files, out, "--per_device_train_batch_size", 4, "--max_train_steps", 8,
                     "--checkpointing_steps", 4))
    assert (out / "step_4" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoints: FSDP really ran
    assert losses(out) == pytest.approx(losses(ddp_run), abs=1e-5)
    for k, v in weights(ddp_run).items():
        torch.testing.assert_close(weights(out)[k], v, atol=1e-5, rtol=1e-4)
    assert_transformers_agrees(out, "OPTForCausalLM", *padded_batch(files.tok))
    resumed = tmp_path / "resumed"  # sharded checkpoints resume too
    shutil.copytree(out / "step_4", resumed / "step_4")
    launch(BIN / "accelerate", "launch", "--config_file", ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml",
           "--num_processes", 2, "--main_process_port", free_port(), ROOT / "scripts" / "train_clm.py",
           *clm_args(files, resumed, "--per_device_train_batch_size", 4, "--max_train_steps", 8,
                     "--resume_from_checkpoint", "latest"))
    assert losses(resumed) == {s: v for s, v in losses(out).items() if s > 4}


def _classification_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text, subject, _ = sentence(rng)
        rows.append({"text": text, "label": "animal" if subject not in ("tree", "house") else "thing"})
    return rows


def test_classifier_script(files, tmp_path):
    import csv

    for name, n in (("train.csv", 48), ("valid.csv", 16)):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, ["text", "label"])
            writer.writeheader()
            writer.writerows(_classification_rows(n, seed=len(name)))
    out = tmp_path / "out"
    assert run_script("train_classifier", "--model_name_or_path", files.ckpt, "--train_file", tmp_path / "train.csv",
                      "--validation_file", tmp_path / "valid.csv", "--per_device_train_batch_size", 8,
                      "--max_train_steps", 6, "--learning_rate", 3e-3, "--checkpointing_steps", "epoch",
                      "--output_dir", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "animal", "1": "thing"} and config["label2id"] == {"animal": 0, "thing": 1}
    assert (out / "epoch_0" / "trainer_state.json").is_file()
    assert 0.0 <= json.loads((out / "eval_results.json").read_text())["accuracy"] <= 1.0
    assert_transformers_agrees(out, "OPTForSequenceClassification", *padded_batch(files.tok))


def _squad(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n):
        said = [sentence(rng) for _ in range(3)]
        context = " ".join(s for s, _, _ in said)
        _, subject, obj = said[1]
        start = context.index(said[1][0]) + len(said[1][0]) - len(obj) - 1
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": f"what does the {subject} see?",
                                                        "answers": [{"text": obj, "answer_start": start}]}]})
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def test_qa_script(files, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(_squad(24, seed=1)))
    (tmp_path / "dev.json").write_text(json.dumps(_squad(8, seed=2)))
    assert len(read_squad(tmp_path / "dev.json")) == 8
    out = tmp_path / "out"
    assert run_script("train_qa", "--model_name_or_path", files.ckpt, "--train_file", tmp_path / "train.json",
                      "--validation_file", tmp_path / "dev.json", "--max_seq_length", 48, "--doc_stride", 8,
                      "--max_question_length", 12, "--per_device_train_batch_size", 8, "--max_train_steps", 4,
                      "--learning_rate", 3e-3, "--output_dir", out) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_examples"] == 8 and 0.0 <= results["exact_match"] <= results["f1"] <= 100.0
    assert_transformers_agrees(out, "OPTForQuestionAnswering", *padded_batch(files.tok))


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_parse_with_their_script(recipe, tmp_path):
    script = {"clm": "train_clm", "classifier": "train_classifier", "qa": "train_qa"}[recipe.stem.rsplit("-", 1)[1]]
    parse = runpy.run_path(str(ROOT / "scripts" / f"{script}.py"))["parse_args"]
    args = parse(["--config", str(recipe), "--seed", "7"])
    assert args.seed == 7 and args.model_name_or_path.startswith("facebook/opt-")  # flags win over the recipe
    TrainConfig.from_args(args)  # the values are valid loop settings
    (tmp_path / "bad.yaml").write_text("learning_rate: 1.0e-4\nlearnig_rate: 2\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "bad.yaml")])


# ---------------------------------------------------------------------------------------------------- bad input


def _bad_inputs(d: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """case: (script, extra args, fragments the one-line error must hold)."""
    (d / "empty.txt").write_text("")
    (d / "labels.csv").write_text("text,label\nthe cat.,0\nthe dog.,1\nthe bird.,5\n")
    (d / "nolabel.csv").write_text("text,sentiment\nthe cat.,0\n")
    (d / "rows.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    (d / "good.csv").write_text("text,label\nthe cat.,pos\nthe dog.,neg\n")
    (d / "unseen.csv").write_text("text,label\nthe cat.,meh\n")
    bad = _squad(2, seed=3)
    bad["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 1
    (d / "bad_squad.json").write_text(json.dumps(bad))
    return {
        "missing train file": ("train_clm", ["--train_file", d / "nope.txt"], ["nope.txt", "does not exist"]),
        "empty train file": ("train_clm", ["--train_file", d / "empty.txt"], ["empty.txt", "is empty"]),
        "block_size too large": ("train_clm", ["--block_size", 128], ["block_size 128", "max_position_embeddings 64"]),
        "resume from nothing": ("train_clm", ["--resume_from_checkpoint", d / "nowhere"],
                                ["nowhere", "not a checkpoint"]),
        "label outside num_labels": ("train_classifier", ["--train_file", d / "labels.csv", "--num_labels", 3],
                                     ["labels.csv line 4", "label '5'", "num_labels=3"]),
        "missing column": ("train_classifier", ["--train_file", d / "nolabel.csv"], ["nolabel.csv", "column 'label'"]),
        "missing key in a row": ("train_classifier", ["--train_file", d / "rows.jsonl"],
                                 ["rows.jsonl line 2", "column 'label'"]),
        "unseen validation label": ("train_classifier", ["--train_file", d / "good.csv", "--validation_file",
                                                         d / "unseen.csv"], ["unseen.csv line 2", "'meh'"]),
        "answer not at answer_start": ("train_qa", ["--train_file", d / "bad_squad.json"],
                                       ["bad_squad.json", "q1", "answer_start"]),
    }


BAD_CASES = ["missing train file", "empty train file", "block_size too large", "resume from nothing",
             "label outside num_labels", "missing column", "missing key in a row", "unseen validation label",
             "answer not at answer_start"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_before_training_with_one_line(files, tmp_path, case):
    script, extra, fragments = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    base = {"train_clm": clm_args(files, out),
            "train_classifier": ["--model_name_or_path", files.ckpt, "--train_file", tmp_path / "good.csv",
                                 "--output_dir", out],
            "train_qa": ["--model_name_or_path", files.ckpt, "--train_file", tmp_path / "bad_squad.json",
                         "--max_seq_length", 48, "--doc_stride", 8, "--max_question_length", 12, "--output_dir", out]}
    with pytest.raises(SystemExit) as err:
        run_script(script, *base[script], *extra)
    message = str(err.value.code)
    assert "\n" not in message and message.startswith(f"{script}.py: error: ")
    for fragment in fragments:
        assert fragment in message
    assert not (out / "metrics.jsonl").exists()


def test_preset_needs_a_tokenizer(tmp_path):
    with pytest.raises(SystemExit, match="preset.*--tokenizer_name"):
        run_script("train_clm", "--model_name_or_path", "opt-tiny", "--train_file", tmp_path / "x.txt",
                   "--output_dir", tmp_path / "out")


def test_build_optimizer_is_fused_and_steps_as_the_plain_loop():
    from optlite.train.loop import build_optimizer

    torch.manual_seed(0)
    a = optlite.OPTForCausalLM(optlite.OPTConfig.from_preset("opt-tiny")).eval()  # no dropout: same losses
    b = optlite.OPTForCausalLM(optlite.OPTConfig.from_preset("opt-tiny")).eval()
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a, 1e-3, weight_decay=0.1)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in build_optimizer(b, 1e-3, weight_decay=0.1).param_groups], lr=1e-3)
    ids = torch.randint(3, 1000, (2, 16))
    # One step: the key bias's gradient is rounding noise (softmax ignores it), which Adam's normalisation would
    # amplify to lr-sized differences once the two models' weights differ by rounding.
    for model, opt in ((a, fused), (b, plain)):
        model(ids, labels=ids).loss.backward()
        opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
