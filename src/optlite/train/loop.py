"""The reusable parts of a training loop on accelerate: optimizer and LR schedules, the data order of each
process, one optimizer step with gradient accumulation, evaluation, checkpoints that resume exactly, the final
save, a progress bar and JSONL metrics. Its settings (and flags) are in config.py, the launch in launch.py.

    from optlite import OPTForCausalLM
    from optlite.train import CausalLMCollator, ModelSource, TokenBlocks, TrainConfig, read_texts, train

    source = ModelSource.resolve("facebook/opt-125m")
    tok = source.tokenizer()
    blocks = TokenBlocks.from_texts(read_texts("corpus.txt"), tok, block_size=512)
    model = source.load(OPTForCausalLM, tok)
    train(model, blocks, CausalLMCollator(tok.pad_token_id), TrainConfig("out", max_train_steps=1000), tokenizer=tok)

Multi-process runs (torchrun, `accelerate launch`) need no change: the loop reads the process layout from
accelerate, deals each process its own batches and keeps their weights identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from ..saving import atomic_write, clear_abandoned, commit_stage, new_stage, save_error
from ..tokenizer import OPTTokenizer
from .config import TrainConfig
from .data import InputError, count_loss_items, model_inputs
from .launch import make_accelerator
from .metrics import EvalMetric

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------------------------ optimizer


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights (run_clm's grouping); fused on CPU and CUDA.

    Example:
        >>> opt = build_optimizer(model, 1e-4, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)  # 1-D: biases and LayerNorm weights
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (transformers' Trainer default with torch >= 2.8) updates all tensors in one pass per group:
    # the same arithmetic as the per-tensor loop, several times faster on CPU.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, fused=fused)


@dataclass
class WarmupSchedule:
    """LR multiplier at a step: linear warm-up over `warmup` steps, then constant, or linear / cosine decay to 0
    at `total` ("constant" has no warm-up); the formulas of transformers' get_scheduler.

    Example:
        >>> s = WarmupSchedule("linear", warmup=2, total=10)
        >>> [round(s(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    kind: str
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------- data order


def epoch_batches(num_examples: int, batch_size: int, num_processes: int, process_index: int, seed: int,
                  epoch: int, shuffle: bool = True) -> list[list[int]]:
    """This process's batches of dataset indices in one epoch: a permutation seeded by seed + epoch (the same on
    every process), wrapped around to a multiple of the process count (as DistributedSampler) and dealt out
    round-robin, so process p's batch i together with the others' is batch i of a one-process run of
    batch_size x num_processes.

    Example:
        >>> epoch_batches(5, 2, num_processes=2, process_index=1, seed=0, epoch=0, shuffle=False)
        [[1, 3], [0]]
    """
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist() \
        if shuffle else list(range(num_examples))
    total = math.ceil(num_examples / num_processes) * num_processes
    order = (order * math.ceil(total / num_examples))[:total]
    mine = order[process_index::num_processes]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _groups(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ------------------------------------------------------------------------------------------------------------- one step


@dataclass
class StepStats:
    loss: float  # mean over every loss item of the step, on all processes
    items: int  # loss items (label tokens, examples) of the step, all processes
    tokens: int  # input tokens (non-padding) of the step, all processes
    grad_norm: float | None
    micro_batches: int


def train_step(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[dict[str, torch.Tensor]], max_grad_norm: float = 1.0) -> StepStats:
    """One optimizer step over micro-batches (gradient accumulation) already on the device.

    The loss is the mean over all loss items of the step (label tokens for causal LM) on all processes: each
    micro-batch's mean loss is weighted by its item count over the step's total. So accumulating k micro-batches
    equals one batch k times larger even when they hold different numbers of label tokens, which averaging the
    k means (what `loss / k` does) gets wrong.

    Example:
        >>> from optlite.train import CausalLMCollator
        >>> batch_a, batch_b = (CausalLMCollator(1)([{"input_ids": tok(t).input_ids}]) for t in ("Hello there", "Hi"))
        >>> stats = train_step(accelerator, model, build_optimizer(model, 1e-4), [batch_a, batch_b])
        >>> stats.items, stats.micro_batches  # label tokens: 2 + 1
        (3, 2)
    """
    counts = torch.tensor([[count_loss_items(b), _num_tokens(b)] for b in micro_batches], dtype=torch.float64)
    totals = counts.sum(0).to(accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    total_items = max(float(totals[0]), 1.0)
    # DDP and FSDP average gradients over processes: multiply back by their number to get a sum over all items.
    scale = accelerator.num_processes / total_items
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        n = float(counts[i, 0])
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):  # all-reduce once per step
            out = model(**model_inputs(batch))
            # A micro-batch without label tokens has a NaN mean loss; it must still run backward (DDP expects it).
            loss = out.loss * (n * scale) if n else _first_tensor(out).sum() * 0.0
            accelerator.backward(loss)
        if n:
            loss_sum += out.loss.detach().double() * n
    grad_norm = None
    if max_grad_norm and max_grad_norm > 0:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    return StepStats(float(loss_sum) / total_items, int(totals[0]), int(totals[1]), grad_norm, len(micro_batches))


def _num_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _first_tensor(out: Any) -> torch.Tensor:
    return next(v for k, v in out.items() if k != "loss" and isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------------------------------------- evaluation


def eval_shard(num_examples: int, num_processes: int, process_index: int) -> tuple[list[int], list[int]]:
    """(indices, real_rows) of this process's share of an evaluation set: every process gets the same number of rows
    (so collective ops such as FSDP's gathers line up), the filler rows having real_rows = 0.

    Example:
        >>> eval_shard(5, num_processes=2, process_index=1)
        ([1, 3, 0], [1, 1, 0])
    """
    rows = list(range(process_index, num_examples, num_processes))
    pad = math.ceil(num_examples / num_processes) - len(rows)
    return rows + [0] * pad, [1] * len(rows) + [0] * pad


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, dataset: Any, collate_fn: Callable, batch_size: int,
             metric: EvalMetric) -> dict[str, float]:
    """Run `model` over `dataset` (split across processes) and return `metric`'s values, reduced over processes.

    Example:
        >>> from optlite.train import CausalLMCollator, TokenBlocks
        >>> from optlite.train.metrics import Perplexity
        >>> eval_blocks = TokenBlocks.from_texts(["Hello there.\\n"] * 20, tok, block_size=16)
        >>> sorted(evaluate(accelerator, model, eval_blocks, CausalLMCollator(1), 8, Perplexity()))
        ['eval_loss', 'eval_tokens', 'perplexity']
    """
    was_training = model.training
    model.eval()
    rows, real_rows = eval_shard(len(dataset), accelerator.num_processes, accelerator.process_index)
    for i in range(0, len(rows), batch_size):
        batch = collate_fn([dataset[j] for j in rows[i : i + batch_size]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = model(**model_inputs(batch))
        metric.update(batch, out, torch.tensor(real_rows[i : i + batch_size], device=accelerator.device))
    model.train(was_training)
    return metric.compute(accelerator)


# -------------------------------------------------------------------------------------------------------- state, saving


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint (with model, optimizer, scheduler and RNG states)."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` this process has trained on
    tokens_seen: int = 0
    num_examples: int = 0
    num_processes: int = 1

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def check_output_dir(config: TrainConfig) -> None:
    """Refuse to train anew into an output_dir that holds files (an earlier run's model, checkpoints, metrics)
    unless the run resumes or config.overwrite_output_dir is set; with it, metrics.jsonl starts over.

    Example:
        >>> Path("out").mkdir()
        >>> _ = Path("out/metrics.jsonl").write_text("{}\\n")
        >>> check_output_dir(TrainConfig("out"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        optlite.train.data.InputError: output_dir out already holds files (metrics.jsonl): pass ...
    """
    out = Path(config.output_dir)
    if config.resume_from_checkpoint or not out.is_dir():
        return
    if config.overwrite_output_dir:
        (out / METRICS_FILE).unlink(missing_ok=True)  # the new run's records only, not appended to the old ones
        return
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise InputError(f"output_dir {out} already holds files ({shown}): pass --overwrite_output_dir to train "
                         "into it anew, or --resume_from_checkpoint to continue its run")


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """The checkpoint folder `spec` names: a path, or "latest" (the most advanced complete one in output_dir; an
    incomplete or corrupt one, such as a write cut short, is skipped with a warning that names it).

    Example:
        >>> for step in (200, 400):
        ...     Path(f"out/step_{step}").mkdir(parents=True)
        ...     _ = Path(f"out/step_{step}/trainer_state.json").write_text(f'{{"completed_steps": {step}}}')
        >>> resolve_checkpoint("latest", "out")
        PosixPath('out/step_400')
    """
    if spec != "latest":
        problem = checkpoint_problem(Path(spec))
        if problem is not None:
            raise InputError(f"resume_from_checkpoint {spec!r}: not a checkpoint, or an incomplete one ({problem})")
        return Path(spec)
    out = Path(output_dir)
    good, bad = [], []
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        if not d.is_dir() or d.name.startswith(".") or not ((d / STATE_FILE).exists() or _CKPT_NAME.fullmatch(d.name)):
            continue
        problem = checkpoint_problem(d)
        if problem is None:
            good.append((json.loads((d / STATE_FILE).read_text())["completed_steps"], d.name))
        else:
            bad.append(f"{d} ({problem})")
    for entry in bad:
        logger.warning("skipping checkpoint %s", entry)
    if not good:
        found = f"; found only incomplete or corrupt ones: {', '.join(bad)}" if bad else ""
        raise InputError(f"resume_from_checkpoint 'latest': no complete checkpoint in {out}{found}")
    chosen = out / max(good)[1]
    if bad:
        logger.warning("resuming from %s, the newest complete checkpoint", chosen)
    return chosen


_CKPT_NAME = re.compile(r"(step|epoch)_\d+")


def checkpoint_problem(path: Path) -> str | None:
    """None when `path` is a complete training checkpoint, else what is wrong with it: no trainer_state.json (its
    write did not finish), or a file missing or of another size than when it was written.

    Example:
        >>> Path("out/step_6").mkdir(parents=True)
        >>> _ = Path("out/step_6/optimizer.bin").write_bytes(bytes(1024))
        >>> state = {"completed_steps": 6, "files": {"optimizer.bin": 5187}}
        >>> _ = Path("out/step_6/trainer_state.json").write_text(json.dumps(state))
        >>> checkpoint_problem(Path("out/step_6"))
        'optimizer.bin has 1024 bytes, 5187 were written'
    """
    if not path.is_dir():
        return "no such folder"
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {STATE_FILE} (its write did not finish)"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    if not isinstance(state, dict) or "completed_steps" not in state or not isinstance(state.get("files", {}), dict):
        return f"{STATE_FILE} is not one this library wrote (no completed_steps, or files not a mapping)"
    for name, size in state.get("files", {}).items():  # absent in checkpoints of earlier versions
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def save_model(accelerator: Any, model: nn.Module, output_dir: str | Path, tokenizer: OPTTokenizer | None = None,
               model_cls: type[nn.Module] | None = None) -> None:
    """Write the trained model with `save_pretrained` (config.json + safetensors, readable by transformers) and
    the tokenizer into output_dir, from the main process. Collective: every process must call it.

    Example:
        >>> save_model(accelerator, model, "out", tok)  # after train(): result.accelerator, result.model
        >>> sorted(p.name for p in Path("out").iterdir())
        ['config.json', 'generation_config.json', 'merges.txt', 'model.safetensors', 'special_tokens_map.json',
         'tokenizer.json', 'tokenizer_config.json', 'vocab.json']
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "FSDP":
        state = accelerator.get_state_dict(model)  # gathers the shards (collective), full tensors on the main process
        if accelerator.is_main_process:
            # fully_shard turned the modules into DTensor holders: save a plain copy of the gathered weights.
            unwrapped = (model_cls or type(unwrapped))(unwrapped.config)
            unwrapped.load_state_dict(state)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def param_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's name and bytes: equal digests mean bit-identical weights.

    Example:
        >>> import copy
        >>> param_digest(model) == param_digest(copy.deepcopy(model))
        True
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    # accelerate warns on every save that it dropped the tied lm_head copy, which is intended (it is re-tied).
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ------------------------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    model: nn.Module  # as prepared by accelerate (DDP / FSDP wrapped); unwrap with accelerator.unwrap_model
    accelerator: Any
    state: TrainerState
    eval_metrics: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records of this run


def train(model: nn.Module, train_dataset: Any, collate_fn: Callable, config: TrainConfig, *,
          eval_dataset: Any = None, metric_factory: Callable[[], EvalMetric] | None = None,
          tokenizer: OPTTokenizer | None = None, accelerator: Any = None, save: bool = True) -> TrainResult:
    """Train `model` on `train_dataset` (items batched by `collate_fn`) with AdamW, a warm-up schedule, gradient
    accumulation and clipping, mixed precision, periodic evaluation (`metric_factory()` on `eval_dataset`),
    checkpoints that resume exactly, a progress bar and output_dir/metrics.jsonl; then save the model and
    tokenizer into output_dir. One Accelerator per call (accelerate keeps what each one prepared).

    Example:
        >>> from optlite.train import CausalLMCollator, TokenBlocks
        >>> from optlite.train.metrics import Perplexity
        >>> blocks = TokenBlocks.from_texts(["Hello there.\\n"] * 40, tok, block_size=16)
        >>> eval_blocks = TokenBlocks.from_texts(["Hi there.\\n"] * 20, tok, block_size=16)
        >>> cfg = TrainConfig("out", max_train_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2,
        ...                   per_device_train_batch_size=4)
        >>> result = train(model, blocks, CausalLMCollator(1), cfg, eval_dataset=eval_blocks,
        ...                metric_factory=Perplexity, tokenizer=tok)  # doctest: +ELLIPSIS
        step 2: eval_loss ..., eval_tokens 90
        step 4: eval_loss ..., eval_tokens 90
        >>> result.state.completed_steps, sorted(p.name for p in Path("out").glob("step_*"))
        (4, ['step_2', 'step_4'])
    """
    if len(train_dataset) == 0:
        raise InputError("the training set is empty")
    if eval_dataset is not None and len(eval_dataset) == 0:
        raise InputError("the evaluation set is empty")
    check_output_dir(config)
    if Path(config.output_dir).is_dir():
        clear_abandoned(config.output_dir)  # checkpoint writes of a run that was killed
    resume = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir) \
        if config.resume_from_checkpoint else None
    accelerator = accelerator or make_accelerator(config.mixed_precision)
    loop = _Loop(accelerator, model, train_dataset, collate_fn, config, eval_dataset, metric_factory)
    if resume is not None:
        loop.resume(resume)
    loop.run()
    if save:
        save_model(accelerator, loop.model, config.output_dir, tokenizer, loop.model_cls)
    if loop.eval_metrics is not None and accelerator.is_main_process:
        atomic_write(Path(config.output_dir, "eval_results.json"), json.dumps(loop.eval_metrics, indent=2) + "\n")
    if config.write_rank_digests:
        digest = param_digest(accelerator.unwrap_model(loop.model))
        atomic_write(Path(config.output_dir, f"param_digest_rank{accelerator.process_index}.txt"), digest + "\n")
    return TrainResult(loop.model, accelerator, loop.state, loop.eval_metrics, loop.history)


class _Loop:
    """The state of one training run; `run` is the loop, the other methods what happens between steps."""

    def __init__(self, accelerator: Any, model: nn.Module, dataset: Any, collate_fn: Callable, config: TrainConfig,
                 eval_dataset: Any, metric_factory: Callable[[], EvalMetric] | None):
        from accelerate.utils import set_seed

        self.acc, self.dataset, self.collate_fn, self.config = accelerator, dataset, collate_fn, config
        self.eval_dataset, self.metric_factory = eval_dataset, metric_factory
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model_cls = type(model)
        n_batches = len(epoch_batches(len(dataset), config.per_device_train_batch_size, accelerator.num_processes,
                                      accelerator.process_index, config.seed, 0, shuffle=False))
        self.steps_per_epoch = math.ceil(n_batches / config.gradient_accumulation_steps)
        self.max_steps = config.max_train_steps or config.num_train_epochs * self.steps_per_epoch
        set_seed(config.seed, device_specific=True)  # dropout differs between processes, as their data does
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        optimizer = build_optimizer(model, config.learning_rate, config.weight_decay)
        # Built on the raw optimizer and stepped by hand: accelerate's wrapper would step it once per process.
        self.scheduler = LambdaLR(optimizer, WarmupSchedule(config.lr_scheduler_type, config.num_warmup_steps,
                                                            self.max_steps))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.state = TrainerState(num_examples=len(dataset), num_processes=accelerator.num_processes)
        accelerator.register_for_checkpointing(self.scheduler, self.state)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.history: list[dict[str, Any]] = []
        self.eval_metrics: dict[str, float] | None = None
        self._window: list[StepStats] = []
        self._window_start = 0.0

    def resume(self, path: Path) -> None:
        try:
            self.acc.load_state(str(path))  # model, optimizer, scheduler, TrainerState and every RNG
        except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            raise InputError(f"checkpoint {path} cannot be read, it is damaged: {type(e).__name__}: {e}") from e
        if self.state.num_examples != len(self.dataset):
            raise InputError(f"checkpoint {path} was trained on {self.state.num_examples} examples, this run has "
                             f"{len(self.dataset)}: resume on the same data and block size")
        if self.state.num_processes != self.acc.num_processes:
            logger.warning("checkpoint %s was written by %d processes, this run has %d: the data order will differ",
                           path, self.state.num_processes, self.acc.num_processes)
            self.state.num_processes = self.acc.num_processes
        self._info(f"resumed from {path} at step {self.state.completed_steps}")
        if self.acc.is_main_process and self.metrics_path.is_file():
            self._drop_records_after(self.state.completed_steps)

    def _drop_records_after(self, step: int) -> None:
        # Records of the steps this run redoes (written by the run that was interrupted) would appear twice.
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # a line cut short by the interruption
                continue
        if len(kept) != len(lines):
            atomic_write(self.metrics_path, "".join(kept))

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        self.bar = tqdm(total=self.max_steps, initial=self.state.completed_steps, desc="train", unit="step",
                        disable=not self.acc.is_local_main_process, dynamic_ncols=True)
        self._window_start = time.perf_counter()  # tokens/s counts training time only (not loading or resuming)
        while self.state.completed_steps < self.max_steps:
            batches = epoch_batches(len(self.dataset), cfg.per_device_train_batch_size, self.acc.num_processes,
                                    self.acc.process_index, cfg.seed, self.state.epoch)
            n_batches = len(batches)
            # A generator of its own keeps the DataLoader from drawing from the global RNG (dropout's).
            loader = DataLoader(self.dataset, batch_sampler=batches[self.state.batches_in_epoch :],
                                collate_fn=self.collate_fn, num_workers=cfg.dataloader_num_workers,
                                generator=torch.Generator())
            for group in _groups(loader, cfg.gradient_accumulation_steps):
                lr = self.scheduler.get_last_lr()[0]
                group = [{k: v.to(self.acc.device) for k, v in b.items()} for b in group]
                stats = train_step(self.acc, self.model, self.optimizer, group, cfg.max_grad_norm)
                self.scheduler.step()
                self._after_step(stats, lr, n_batches)
                if self.state.completed_steps >= self.max_steps:
                    break
        self.bar.close()

    def _after_step(self, stats: StepStats, lr: float, n_batches: int) -> None:
        cfg, state = self.config, self.state
        state.completed_steps += 1
        state.batches_in_epoch += stats.micro_batches
        state.tokens_seen += stats.tokens
        self._log_step(stats, lr, n_batches)
        epoch_done = state.batches_in_epoch >= n_batches
        if epoch_done:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        last = state.completed_steps >= self.max_steps
        if self.eval_dataset is not None and (epoch_done or last or (cfg.eval_steps and
                                                                      state.completed_steps % cfg.eval_steps == 0)):
            self._evaluate()
        if isinstance(cfg.checkpointing_steps, int) and state.completed_steps % cfg.checkpointing_steps == 0:
            self._save_checkpoint(f"step_{state.completed_steps}")
        if cfg.checkpointing_steps == "epoch" and epoch_done:
            self._save_checkpoint(f"epoch_{state.epoch - 1}")

    def _log_step(self, stats: StepStats, lr: float, n_batches: int) -> None:
        self._window.append(stats)
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        tokens_per_s = sum(s.tokens for s in self._window) / elapsed
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        state = self.state
        if state.completed_steps % self.config.logging_steps and state.completed_steps < self.max_steps:
            return
        norms = [s.grad_norm for s in self._window if s.grad_norm is not None]
        self._write({"step": state.completed_steps, "epoch": round(state.epoch + state.batches_in_epoch / n_batches, 4),
                     "loss": sum(s.loss for s in self._window) / len(self._window), "learning_rate": lr,
                     "grad_norm": norms[-1] if norms else None, "tokens_per_s": round(tokens_per_s, 1),
                     "tokens": state.tokens_seen})
        self._window, self._window_start = [], time.perf_counter()

    def _evaluate(self) -> None:
        start = time.perf_counter()
        metric = self.metric_factory() if self.metric_factory is not None else _default_metric()
        self.eval_metrics = evaluate(self.acc, self.model, self.eval_dataset, self.collate_fn,
                                     self.config.per_device_eval_batch_size, metric)
        self._write({"step": self.state.completed_steps, **self.eval_metrics})
        self._info(f"step {self.state.completed_steps}: " + ", ".join(f"{k} {v:.4g}"
                                                                       for k, v in self.eval_metrics.items()))
        self._window_start += time.perf_counter() - start  # evaluation time does not count against tokens/s

    def _save_checkpoint(self, name: str) -> None:
        # Written as save_pretrained writes a model: into a staging folder (one for all processes) that replaces
        # output_dir/name in one rename once complete, so a write cut short never damages an earlier checkpoint.
        path = (self.output_dir / name).resolve()
        stage = [str(new_stage(path)) if self.acc.is_main_process else ""]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(stage, from_process=0)
        stage_dir = Path(stage[0])
        try:
            with _quiet("accelerate.utils.other"):
                self.acc.save_state(str(stage_dir))
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                sizes = {str(f.relative_to(stage_dir)): f.stat().st_size
                         for f in sorted(stage_dir.rglob("*")) if f.is_file()}
                # Written last: its presence marks a complete checkpoint, and the sizes reveal a damaged one.
                atomic_write(stage_dir / STATE_FILE, json.dumps({**self.state.state_dict(), "files": sizes},
                                                                indent=2) + "\n")
                commit_stage(stage_dir, path, keep_other_files=False)
        except OSError as e:
            raise save_error(e, path) from e
        finally:
            if self.acc.is_main_process:
                shutil.rmtree(stage_dir, ignore_errors=True)  # after the swap it holds the replaced checkpoint
        self.acc.wait_for_everyone()

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.acc.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as f:  # reopened each time: saves swap the folder
                f.write(json.dumps(record) + "\n")

    def _info(self, message: str) -> None:
        if not self.acc.is_main_process:
            return
        if getattr(self, "bar", None) is not None:
            self.bar.write(message)  # above the progress bar, not through it
        else:
            logger.info(message)


def _default_metric() -> EvalMetric:
    from .metrics import Perplexity

    return Perplexity()
