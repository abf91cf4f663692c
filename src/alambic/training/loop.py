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


def _run_distillation(config: DistillConfig, overwrite: bool, resume: bool, print_config: bool) -> RunResult:
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
    student, teacher, tokenizer = setup.student, setup.teacher, setup.tokenizer
    train_data, eval_data = build_datasets(config.data, tokenizer, config.task, config.train.seed)
    check_class_labels(config, student, train_data, eval_data)  # before anything is written (preflight.py)
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

    plan = BatchPlan(len(train_data), config.train.batch_size, accelerator.num_processes, config.train.grad_accum, config.train.seed)
    progress = TrainingProgress(config.train.max_steps, start_step, enabled=config.train.progress and is_main,
                                task=config.task)
    pad_id = tokenizer.pad_token_id
    last_eval: dict = {}
    guard = NonFiniteGuard(config.train.nonfinite_skips, run_dir, accelerator)
    student.train()
    for step in range(start_step + 1, config.train.max_steps + 1):
        started = time.perf_counter()
        # Rollouts (on-policy sampling, teacher samples) may replace completions, so the
        # loss tokens of the step are counted on the final batches, over all ranks.
        batches = [
            setup.rollout(_load_batch(train_data, plan.rank_slice(g, accelerator.process_index), pad_id, accelerator.device), step)
            for g in plan.step_indices(step - 1)
        ]
        if hasattr(teacher, "prefetch"):  # a served teacher: requests for this and the next micro-batches go out now
            teacher.prefetch(batches, lambda s: [plan.rank_slice(g, accelerator.process_index) for g in plan.step_indices(s - 1)], step)
        step_loss_tokens = _count_across_ranks(accelerator, sum(loss_positions(b, config.task) for b in batches))
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        input_tokens = 0
        for micro, batch in enumerate(batches):
            input_tokens += int(batch["attention_mask"].sum())
            last_micro = micro == len(batches) - 1
            with strategy.micro_step(student, last_micro):
                sums = loss_sums(student, batch, teacher, config.loss, config.task, setup.extra_terms)
                # Divide by the loss tokens of the whole step on all ranks; DDP averages over ranks.
                scaled = sums["loss"] * accelerator.num_processes / max(step_loss_tokens, 1)
                strategy.backward(scaled)
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
        grad_norm = None
        if config.train.max_grad_norm is not None:
            grad_norm = strategy.clip_grad_norm(student, config.train.max_grad_norm)
        if not guard.step_ok(step, totals["loss"], grad_norm, student):  # NaN/inf: skip, or stop (exit 3)
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for hook in setup.after_step:  # e.g. an EMA teacher follows the student
            hook(strategy.unwrap(student), step)

        record = _step_record(accelerator, step, totals, step_loss_tokens, input_tokens, started, scheduler, grad_norm)
        if teacher is None and not totals["kd"]:  # supervised: there is no KD term to log
            record.pop("kd")
        if _due(step, config.train.eval_every, config.train.max_steps) and eval_data is not None:
            last_eval = evaluate(
                strategy.unwrap(student), teacher if setup.teacher_evaluable else None, eval_data,
                config.task, pad_id, config.train.batch_size, accelerator.device, config.train.eval_batches,
            )
            record.update(last_eval)
        if is_main and (step % config.train.log_every == 0 or "eval_ce" in record):
            _append_jsonl(run_dir / "metrics.jsonl", record)
        if config.train.trackers:
            accelerator.log(record, step=step)
        progress.update(step, record)
        if _DEBUG_STEP_SLEEP:  # lets kill/resume tests stop a run between steps reliably
            time.sleep(_DEBUG_STEP_SLEEP)
        if config.train.save_every and step % config.train.save_every == 0:
            strategy.save_checkpoint(run_dir, step, student, optimizer, scheduler, {"loss": record["loss"]}, config.train.keep_last)
    progress.close()

    if not last_eval and eval_data is not None:  # resumed with no step left: the export still gets its metrics
        last_eval = evaluate(
            strategy.unwrap(student), teacher if setup.teacher_evaluable else None, eval_data,
            config.task, pad_id, config.train.batch_size, accelerator.device, config.train.eval_batches,
        )
    accelerator.wait_for_everyone()
    history = _read_history(run_dir / "metrics.jsonl")
    strategy.export(student, tokenizer, run_dir, last_eval, setup.teacher_name)
    if is_main:
        for hook in setup.after_train:  # e.g. co-distillation saves its peers
            hook(strategy.unwrap(student), run_dir)
    accelerator.wait_for_everyone()
    if config.train.trackers:
        accelerator.end_training()
    strategy.close()
    return RunResult(run_dir, last_eval, history, strategy.unwrap(student))


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
