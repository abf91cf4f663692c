"""THE training loop: one recipe for every distillation mode, read top to bottom.

What a run does is chosen by its config: which teacher signal (none for plain
supervised training, a live model, an offline logit cache), which loss terms,
and which data. The loop itself never changes.

    alambic distill configs/tiny_kd.yaml
    accelerate launch --multi_gpu --num_processes 2 -m alambic.cli distill configs/tiny_kd.yaml train.cpu=true
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from alambic.compat import check_compatible
from alambic.config import DistillConfig
from alambic.output import describe_config
from alambic.data import build_datasets, collate
from alambic.data.transfer import drop_unlabelled_without_teacher
from alambic.evaluate.heldout import evaluate
from alambic.training.batches import BatchPlan
from alambic.training.distributed import check_launcher, make_strategy
from alambic.training.optim import build_optimizer, build_scheduler
from alambic.training.progress import TrainingProgress
from alambic.training.nonfinite import NonFiniteGuard
from alambic.training.preflight import check_class_labels
from alambic.training.run_dir import create_run_dir, inspect_run_dir
from alambic.training.run_lock import hold_run_folder
from alambic.training.setup import build_models
from alambic.training.step_loss import loss_positions, loss_sums


_DEBUG_STEP_SLEEP = float(os.environ.get("ALAMBIC_DEBUG_STEP_SLEEP", "0") or 0)


@dataclass
class RunResult:
    output_dir: Path
    final_metrics: dict
    history: list[dict] = field(default_factory=list)
    student: object = field(default=None, repr=False)  # the trained StudentModule (every rank)


def make_accelerator(config: DistillConfig, run_dir: Path) -> Accelerator:
    trackers = list(config.train.trackers) or None
    return Accelerator(
        cpu=config.train.cpu,
        mixed_precision=config.train.mixed_precision,
        log_with=trackers,
        project_dir=str(run_dir),
    )


def run_distillation(
    config: DistillConfig, overwrite: bool = False, resume: bool = False, print_config: bool = False
) -> RunResult:
    with hold_run_folder(config.train.output_dir):  # one run per folder, for the whole run (run_lock.py)
        return _run_distillation(config, overwrite, resume, print_config)


@dataclass
class _Run:
    """What every step of a run uses: built once by `_start_run`."""

    config: DistillConfig
    run_dir: Path
    accelerator: Accelerator
    strategy: object  # DDPStrategy | FSDPStrategy (training/distributed.py)
    setup: object  # ModelSetup (training/setup.py)
    teacher: object
    train_data: object
    eval_data: object
    student: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_step: int
    plan: BatchPlan
    guard: NonFiniteGuard

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def _run_distillation(config: DistillConfig, overwrite: bool, resume: bool, print_config: bool) -> RunResult:
    run = _start_run(config, overwrite, resume, print_config)
    progress = TrainingProgress(config.train.max_steps, run.start_step, enabled=config.train.progress and run.is_main,
                                task=config.task)
    last_eval: dict = {}
    run.student.train()
    for step in range(run.start_step + 1, config.train.max_steps + 1):
        started = time.perf_counter()
        record = _train_step(run, step, started)
        if record is None:  # a non-finite step was skipped (NonFiniteGuard)
            continue
        if _due(step, config.train.eval_every, config.train.max_steps) and run.eval_data is not None:
            last_eval = _evaluate(run)
            record.update(last_eval)
        _log_step(run, step, record, progress)
    progress.close()
    if not last_eval and run.eval_data is not None:  # resumed with no step left: the export still gets its metrics
        last_eval = _evaluate(run)
    return _finish_run(run, last_eval)


def _start_run(config: DistillConfig, overwrite: bool, resume: bool, print_config: bool) -> _Run:
    """Checks, models, data, the run folder and the resumed state, in that order."""
    run_dir = Path(config.train.output_dir)
    # Check everything that can fail on bad input before writing anything.
    check_compatible(config)
    checkpoint = inspect_run_dir(config, overwrite, resume)
    check_launcher()  # before any process group or model: Accelerate's FSDP / DeepSpeed plugins are refused
    accelerator = make_accelerator(config, run_dir)
    is_main = accelerator.is_main_process
    if print_config and is_main:
        print(describe_config(config))  # one line; the full config with --verbose
    set_seed(config.train.seed)
    strategy = make_strategy(config, accelerator)  # ddp or fsdp (training/distributed.py)

    # Models and data: the student is what trains; the teacher source is what it learns from.
    setup = build_models(config, strategy.build_device)
    train_data, eval_data = build_datasets(config.data, setup.tokenizer, config.task, config.train.seed)
    check_class_labels(config, setup.student, train_data, eval_data)  # before anything is written (preflight.py)
    teacher = setup.bind_teacher(train_data)
    train_data = drop_unlabelled_without_teacher(train_data, teacher, print if is_main else (lambda _: None))
    accelerator.wait_for_everyone()  # every rank has checked the folder before the main rank writes it
    if is_main:
        create_run_dir(config, overwrite and checkpoint is None)
    accelerator.wait_for_everyone()

    student, optimizer = strategy.prepare(setup, lambda module: build_optimizer(module, config.train))
    # The scheduler is stepped by hand once per optimiser step: accelerate would step it once per process.
    scheduler = build_scheduler(optimizer, config.train)
    start_step = 0
    if checkpoint is not None:
        start_step = strategy.load_checkpoint(checkpoint, student, optimizer, scheduler)["step"]
        if is_main:
            print(f"resuming from {checkpoint} (step {start_step})")
    _truncate_history(run_dir / "metrics.jsonl", start_step, is_main)
    if config.train.trackers:
        accelerator.init_trackers("alambic", config=_flat(config.model_dump(mode="json")))
    plan = BatchPlan(len(train_data), config.train.batch_size, accelerator.num_processes, config.train.grad_accum,
                     config.train.seed)
    guard = NonFiniteGuard(config.train.nonfinite_skips, run_dir, accelerator)
    return _Run(config, run_dir, accelerator, strategy, setup, teacher, train_data, eval_data, student, optimizer,
                scheduler, start_step, plan, guard)


def _train_step(run: _Run, step: int, started: float) -> dict | None:
    """One optimiser step over every micro-batch; its metrics record, or None when it was skipped."""
    config, accelerator, strategy, student = run.config, run.accelerator, run.strategy, run.student
    rank = accelerator.process_index
    pad_id = run.setup.tokenizer.pad_token_id
    # Rollouts (on-policy sampling, teacher samples) may replace completions, so the
    # loss tokens of the step are counted on the final batches, over all ranks.
    batches = [
        run.setup.rollout(_load_batch(run.train_data, run.plan.rank_slice(g, rank), pad_id, accelerator.device), step)
        for g in run.plan.step_indices(step - 1)
    ]
    if hasattr(run.teacher, "prefetch"):  # a served teacher: requests for this and the next micro-batches go out now
        run.teacher.prefetch(batches, lambda s: [run.plan.rank_slice(g, rank) for g in run.plan.step_indices(s - 1)], step)
    step_loss_tokens = _count_across_ranks(accelerator, sum(loss_positions(b, config.task) for b in batches))
    totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    input_tokens = 0
    for micro, batch in enumerate(batches):
        input_tokens += int(batch["attention_mask"].sum())
        with strategy.micro_step(student, micro == len(batches) - 1):
            sums = loss_sums(student, batch, run.teacher, config.loss, config.task, run.setup.extra_terms)
            # Divide by the loss tokens of the whole step on all ranks; DDP averages over ranks.
            strategy.backward(sums["loss"] * accelerator.num_processes / max(step_loss_tokens, 1))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
    grad_norm = None
    if config.train.max_grad_norm is not None:
        grad_norm = strategy.clip_grad_norm(student, config.train.max_grad_norm)
    if not run.guard.step_ok(step, totals["loss"], grad_norm, student):  # NaN/inf: skip, or stop (exit 3)
        run.optimizer.zero_grad(set_to_none=True)
        return None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    for hook in run.setup.after_step:  # e.g. an EMA teacher follows the student
        hook(strategy.unwrap(student), step)
    record = _step_record(accelerator, step, totals, step_loss_tokens, input_tokens, started, run.scheduler, grad_norm)
    if run.teacher is None and not totals["kd"]:  # supervised: there is no KD term to log
        record.pop("kd")
    return record


def _evaluate(run: _Run) -> dict:
    config = run.config
    return evaluate(
        run.strategy.unwrap(run.student), run.teacher if run.setup.teacher_evaluable else None, run.eval_data,
        config.task, run.setup.tokenizer.pad_token_id, config.train.batch_size, run.accelerator.device,
        config.train.eval_batches,
    )


def _log_step(run: _Run, step: int, record: dict, progress: TrainingProgress) -> None:
    """metrics.jsonl, trackers, the progress line, and a checkpoint when one is due."""
    train = run.config.train
    if run.is_main and (step % train.log_every == 0 or "eval_ce" in record):
        _append_jsonl(run.run_dir / "metrics.jsonl", record)
    if train.trackers:
        run.accelerator.log(record, step=step)
    progress.update(step, record)
    if _DEBUG_STEP_SLEEP:  # lets kill/resume tests stop a run between steps reliably
        time.sleep(_DEBUG_STEP_SLEEP)
    if train.save_every and step % train.save_every == 0:
        run.strategy.save_checkpoint(run.run_dir, step, run.student, run.optimizer, run.scheduler,
                                     {"loss": record["loss"]}, train.keep_last)


def _finish_run(run: _Run, last_eval: dict) -> RunResult:
    """Export `final/` (one folder, written once), run the after-train hooks, close the process group."""
    accelerator, strategy = run.accelerator, run.strategy
    accelerator.wait_for_everyone()
    history = _read_history(run.run_dir / "metrics.jsonl")
    strategy.export(run.student, run.setup.tokenizer, run.run_dir, last_eval, run.setup.teacher_name)
    if run.is_main:
        for hook in run.setup.after_train:  # e.g. co-distillation saves its peers
            hook(strategy.unwrap(run.student), run.run_dir)
    accelerator.wait_for_everyone()
    if run.config.train.trackers:
        accelerator.end_training()
    strategy.close()
    return RunResult(run.run_dir, last_eval, history, strategy.unwrap(run.student))


def _load_batch(dataset, indices: list[int], pad_id: int, device) -> dict:
    batch = collate([dataset[i] for i in indices], pad_id, indices)
    return {k: v.to(device) for k, v in batch.items()}


def _count_across_ranks(accelerator, local_count: int) -> int:
    if accelerator.num_processes == 1:
        return int(local_count)
    total = accelerator.reduce(torch.tensor([float(local_count)], device=accelerator.device), reduction="sum")
    return int(total.item())


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _step_record(accelerator, step, totals, loss_tokens, input_tokens, started, scheduler, grad_norm) -> dict:
    """Step metrics averaged over all ranks' loss tokens."""
    values = torch.tensor([totals["loss"], totals["kd"], totals["ce"], float(input_tokens)], device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum")
    elapsed = max(time.perf_counter() - started, 1e-9)
    denominator = max(loss_tokens, 1)
    record = {
        "step": step,
        "loss": float(values[0]) / denominator,
        "kd": float(values[1]) / denominator,
        "ce": float(values[2]) / denominator,
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": float(values[3]) / elapsed,
    }
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    return record


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_history(path: Path, step: int, is_main: bool) -> None:
    """After a resume, drop records logged after the checkpoint: those steps run again."""
    if not is_main or not path.exists():
        return
    kept = [r for r in _read_history(path) if r.get("step", 0) <= step]
    from alambic.durable import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
