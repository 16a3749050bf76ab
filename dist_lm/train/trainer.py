"""The training loop: `train(cfg)` builds a run (dist_lm.train.run) and steps it through named parts.

Each optimizer step: `optimizer_step` (forward/backward over the micro-batches, accumulate, clip, AdamW), then
`log_progress`, `evaluate_and_log` and `save_checkpoint_now` when their interval comes, and `should_stop` decides
whether another step follows. `finish` samples from the final model and releases the process group's users.

Design decisions:
- One `train(cfg)` for every topology: 1 process, DDP over gloo or NCCL, FSDP2, the coalesced sync; which one
  comes from the accelerate config the run was launched with (dist_lm.parallel), never from this file.
- The whole step runs inside `accelerator.accumulate(model)`, so gradients are synchronised only on the last
  micro-step and the loss is scaled by the accumulation count there.
- No host synchronisation inside a step: losses and grad norms stay on the device and are read once per log
  interval, for all steps of the interval at once (and once after the first step, so a run shows its start loss).
- A checkpoint step always reads the losses first: a non-finite loss stops the run before it can be saved (and
  before retention deletes the last good checkpoint).
- Only the main process writes (checkpoints, config, metrics, MLflow); the others wait at barriers.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from dist_lm.config import RunConfig, config_to_dict
from dist_lm.data import EvalBatches
from dist_lm.errors import StallError, StorageError, UserError
from dist_lm.model import TransformerLM, sample_text
from dist_lm.optim import clip_grad_norm, cosine_with_warmup
from dist_lm.parallel import ParallelModel
from dist_lm.train.checkpoint import (
    full_tensor,
    model_state_full,
    optimizer_to_tensors,
    remove_leftovers,
    rng_state,
    save_checkpoint,
)
from dist_lm.train.determinism import deterministic
from dist_lm.train.lock import RunDirLock
from dist_lm.train.logger import COMPILE_METRIC
from dist_lm.train.run import Run, build_run
from dist_lm.train.stop import reason_text
from dist_lm.train.tracking import view_command


@dataclass
class TrainResult:
    """What a finished run reports back (the numbers tests and benchmarks check)."""

    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each optimizer step run here (1-based step numbers), averaged over ranks."""
    val_losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    mlflow_run_id: str | None = None
    tokens_per_s: float = 0.0
    sample: str = ""
    stopped: str | None = None
    """Why the run stopped before train.max_steps ("SIGTERM", "the time limit ..."); None when it did not."""


def train(cfg: RunConfig) -> TrainResult:
    """Train as configured; resumes when cfg.train.resume says so."""
    # first, before any cuBLAS call of this process (train.deterministic sets cuBLAS's workspace through the env)
    with deterministic(cfg.train.deterministic):
        return _train(cfg)


def _train(cfg: RunConfig) -> TrainResult:
    # The main process locks the run directory before anything reads or writes it (RANK: the launch's rank, known
    # before the process group exists; absent when nothing launched several processes).
    lock = RunDirLock(cfg.output_dir(), cfg.name) if os.environ.get("RANK", "0") == "0" else None
    try:
        if lock is not None:
            lock.acquire()
            for leftover in remove_leftovers(cfg.output_dir()):  # under the lock: no save of another run is underway
                print(f"removed {leftover}, left by an interrupted save or prune", file=sys.stderr)
        run = build_run(cfg)
        result = TrainResult(run_dir=cfg.output_dir(), mlflow_run_id=run.logger.run_id)
        train_steps(run, result)
        finish(run, result)
        return result
    except RuntimeError as exc:
        if not _lost_peer(exc):
            raise
        raise StallError(f"a collective gave up waiting for the other processes after train.stall_timeout_s="
                         f"{cfg.train.stall_timeout_s} s ({_first_line(exc)}): a process stalled, stopped or died, "
                         "so this one ends the job; continue from the last checkpoint with train.resume=latest"
                         ) from exc
    finally:
        if lock is not None:
            lock.release()


def train_steps(run: Run, result: TrainResult) -> None:
    """The loop, until max_steps or an agreed early stop (then a checkpoint of the last step); the MLflow run and
    status.json end FINISHED, KILLED (stopped early) or FAILED."""
    cfg = run.cfg
    status, error = "FAILED", None
    run.stop.install()
    try:
        while not should_stop(run):
            optimizer_step(run)
            run.logger.advance()
            first_step_done(run)
            checkpoint_due = _due(run, cfg.checkpoint.interval)
            if _due(run, cfg.train.log_interval) or checkpoint_due or run.step == run.start_step + 1:
                log_progress(run, result)
            if _due(run, cfg.train.eval_interval):
                evaluate_and_log(run, result)
            if checkpoint_due:
                result.last_checkpoint = save_checkpoint_now(run)
        if run.stopped:
            stop_early(run, result)
        status = "KILLED" if run.stopped else "FINISHED"
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        run.stop.restore()
        run.logger.close(status, step=run.step, reason=reason_text(run.stopped) if run.stopped else None,
                         checkpoint=result.last_checkpoint, error=error)
        result.mlflow_run_id = run.logger.run_id  # known once the writer opened the run


def _due(run: Run, interval: int) -> bool:
    """Whether an every-`interval`-steps action falls on this step (always on the last one; never for 0)."""
    return bool(interval and run.step % interval == 0) or run.step == run.cfg.train.max_steps


def should_stop(run: Run) -> bool:
    """Whether the loop ends before another step: max_steps reached, or the ranks agree to stop early (a signal, the
    time limit: dist_lm.train.stop)."""
    if run.step >= run.cfg.train.max_steps:
        return True
    run.stopped = run.stop.due(run.step)
    return bool(run.stopped)


def stop_early(run: Run, result: TrainResult) -> None:
    """After an agreed stop: log the steps not logged yet, save this step's checkpoint (unless it is saved already,
    or no step ran), and say where the run stopped and how to continue it."""
    why = reason_text(run.stopped)
    if run.pending_losses:
        log_progress(run, result)
    if run.step > run.start_step and run.saved_step != run.step:
        result.last_checkpoint = save_checkpoint_now(run)
    result.stopped = why
    where = (f"after step {run.step}/{run.cfg.train.max_steps}" if run.step > run.start_step
             else f"before its first step (at step {run.step})")
    saved = f"checkpoint {result.last_checkpoint}" if result.last_checkpoint else "no new checkpoint"
    run.logger.say(f"stopped by {why} {where}; {saved}; the same command with train.resume=latest continues the run")


def optimizer_step(run: Run) -> None:
    """One optimizer step: forward/backward over the step's micro-batches (gradients synchronised on the last),
    clip, AdamW. The step's mean loss and grad norm stay on the device (run.pending_losses, run.grad_norm)."""
    cfg, acc, model = run.cfg, run.accelerator, run.model
    o, accum = cfg.optim, cfg.train.grad_accum_steps
    step = run.step  # 0-based index of the step about to run: the schedule's and the data's position
    run.lr = cosine_with_warmup(step, o.lr, o.min_lr, o.warmup_steps, o.cosine_steps)
    for group in model.optimizer.param_groups:
        group["lr"] = run.lr
    model.module.train()
    model.begin_step()
    step_loss = torch.zeros((), device=acc.device)
    for micro in range(accum):
        try:
            host_x, host_y = run.batches.batch(step, micro)
        except UserError as exc:  # damaged data that only this rank reads: it must speak, whichever rank it is
            exc.rank = acc.process_index
            raise
        x, y = to_device(host_x, acc.device), to_device(host_y, acc.device)
        with acc.accumulate(model.module):
            loss = model.forward(x, y, host_tokens=host_x, sync=acc.sync_gradients)
            acc.backward(loss)
            step_loss += loss.detach()
            if acc.sync_gradients:
                model.wait_for_gradients()
                acc.unscale_gradients()
                run.grad_norm = clip_grad_norm(model.module.parameters(), o.grad_clip)
                model.optimizer.step()
                model.optimizer.zero_grad(set_to_none=True)
    run.pending_losses.append(step_loss / accum)
    run.step = step + 1


def first_step_done(run: Run) -> None:
    """After a run's first step(s): how the gradient sync went, and the compile time (CUDA graphs are recorded on
    the second step, the first warms up, so that one counts as start-up too). Throughput counts from here."""
    graphs = run.model.cuda_graphs
    if run.step == run.start_step + 1:
        report = run.model.sync_report(run.cfg.model.vocab_size)
        if report:
            run.logger.say(report)
        if not run.cfg.train.compile:
            run.meter.reset(run.step)  # the first step's time is start-up (allocations, caches), not throughput
    if run.cfg.train.compile and run.step == min(run.start_step + (2 if graphs else 1), run.cfg.train.max_steps):
        if run.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # once, so the figure includes the compiled kernels' first run
        run.logger.log(run.step, {COMPILE_METRIC: time.perf_counter() - run.started_at})
        run.meter.reset(run.step)


def log_progress(run: Run, result: TrainResult) -> None:
    """Read the losses of the steps since the last log (one host sync), check they are finite, and log them with
    the learning rate, gradient norm and throughput."""
    losses = run.accelerator.reduce(torch.stack(run.pending_losses), reduction="mean").tolist()
    first = run.step - len(losses) + 1
    run.pending_losses.clear()
    norm = float(full_tensor(run.grad_norm))
    if not all(math.isfinite(v) for v in losses) or not math.isfinite(norm):
        raise FloatingPointError(f"training loss became {losses[-1]} (gradient norm {norm}) at step {run.step}; "
                                 "lower optim.lr, raise optim.warmup_steps, or use train.mixed_precision=bf16 over "
                                 "fp16")
    result.losses.update({first + i: v for i, v in enumerate(losses)})
    seq_len = run.cfg.model.seq_len
    # train/tokens: tokens trained on by all processes after the step, the x-axis on which runs of different world
    # sizes or batches compare (from the data position, so a resume on another world size still counts right)
    tokens = {first + i: run.batches.samples_consumed(first + i) * seq_len for i in range(len(losses))}
    metrics = {"train/loss": losses[-1], "train/tokens": tokens[run.step], "train/lr": run.lr,
               "train/grad_norm": norm, "epoch": run.batches.epoch_of(run.step)}
    # The first step's line has no throughput: its time is start-up (compilation, allocations, caches).
    speed = run.meter.measure(run.step) if run.step > run.start_step + 1 else {}
    if speed:
        result.tokens_per_s = speed["tokens_per_s"]
        metrics.update({f"perf/{k}": v for k, v in speed.items()})
    if run.system is not None:  # every rank takes part (a gather); the main process gets every node's figures
        metrics.update(run.system.collect())
    run.logger.log(run.step, metrics, earlier={first + i: {"train/loss": v, "train/tokens": tokens[first + i]}
                                               for i, v in enumerate(losses[:-1])})


def evaluate_and_log(run: Run, result: TrainResult) -> None:
    """Validation loss over the fixed eval windows, logged; its time is kept out of tokens/s."""
    val = evaluate(run.model, run.eval_batches, run.accelerator)
    result.val_losses[run.step] = val
    run.logger.log(run.step, {"val/loss": val})
    run.meter.reset(run.step)


@torch.no_grad()
def evaluate(model: ParallelModel, batches: EvalBatches, accelerator: Accelerator) -> float:
    """Mean validation loss over the fixed eval windows of all ranks."""
    model.module.eval()
    total = torch.zeros((), device=accelerator.device)
    for x, y in batches:
        if model.cuda_graphs:  # each batch's loss is added up before the next replay overwrites it
            torch.compiler.cudagraph_mark_step_begin()
        total += model.eval_loss(x.to(accelerator.device), y.to(accelerator.device)).float()
    model.module.train()
    return float(accelerator.reduce(total / batches.num_batches, reduction="mean"))


def save_checkpoint_now(run: Run) -> Path | None:
    """A consolidated checkpoint of this step, written by the main process (returns its path there, None
    elsewhere). Under FSDP2 every rank takes part in gathering the shards; every rank contributes its RNG state."""
    acc, model = run.accelerator, run.model
    started = time.perf_counter()
    rngs = gather_object([rng_state()])
    path = failure = None
    if model.fsdp is not None or acc.is_main_process:
        model_state = model_state_full(model.raw)
        tensors, groups = optimizer_to_tensors(model.optimizer.optimizer, run.param_names)
    if acc.is_main_process:
        b = run.batches
        state = {
            "schedule": {"step": run.step, "lr": run.lr},
            "data": {"samples_consumed": b.samples_consumed(run.step), "global_batch_size": b.global_batch(),
                     "epoch": b.epoch_of(run.step), "num_train_tokens": len(b.tokens)},
            "rng": rngs,
            "optimizer": groups,
            "config": config_to_dict(run.cfg),
            "tokenizer_fingerprint": run.tokenizer.fingerprint(),
            "mlflow_run_id": run.logger.run_id,
            "world_size": run.world,
        }
        try:
            path = save_checkpoint(run.cfg.output_dir(), run.step, model_state, tensors, state,
                                   keep_last=run.cfg.checkpoint.keep_last)
            run.logger.say(f"step {run.step:>6}/{run.cfg.train.max_steps} | saved {path}")
            run.logger.log_tags({f"checkpoint.step_{run.step}": str(path.resolve())})  # where each step's weights are
        except StorageError as exc:
            failure = exc
    # Every rank learns whether the save worked, so all stop together instead of the others waiting for the main
    # process in the next collective until train.stall_timeout_s.
    failed = broadcast_object_list([str(failure) if acc.is_main_process and failure else None])[0]
    if failed:
        raise failure if acc.is_main_process else StorageError(f"the main process could not save: {failed}")
    acc.wait_for_everyone()
    run.saved_step = run.step
    run.stop.note_save(time.perf_counter() - started)
    run.meter.reset(run.step)
    return path


def finish(run: Run, result: TrainResult) -> None:
    """The end-of-run sample and the MLflow hint, then release what holds the process group."""
    t, acc = run.cfg.train, run.accelerator
    if t.sample_tokens > 0 and not run.stopped:  # a stopped run is short of time: no sample
        # A sharded forward needs every rank in lockstep, so under FSDP2 rank 0 samples from a gathered copy.
        sampler = run.model.raw if run.model.fsdp is None else _gathered_copy(run.model.raw, run.cfg, acc)
        if acc.is_main_process:
            result.sample = sample_text(sampler, run.tokenizer, t.sample_prompt, t.sample_tokens, seed=t.seed)
            run.logger.say(f"\n--- sample ({t.sample_tokens} tokens, temperature 0.8, top-p 0.95) ---\n"
                           f"{result.sample}\n---")
        sampler = None
    tracker = run.logger.tracker
    if run.logger.run_id:
        run.logger.say(f"MLflow run {run.logger.run_id} in {tracker.uri}\nview it with: {view_command(tracker.uri)}")
    acc.wait_for_everyone()
    # Drop everything that holds the process group (the DDP module's reducer, FSDP2's mesh, the averager's groups)
    # before destroying it. Held in a reference cycle, they would be freed at interpreter exit, and a gloo group
    # freed then aborts a finished run now and then ("terminate called without an active exception").
    run.model = None
    acc.free_memory()  # Accelerate's references to them, then gc.collect()
    acc.end_training()


def _gathered_copy(model: TransformerLM, cfg: RunConfig, accelerator: Accelerator) -> TransformerLM | None:
    """An unsharded copy of an FSDP2 model on the main process (None elsewhere); every rank must call it."""
    full = model_state_full(model)  # collective
    if not accelerator.is_main_process:
        return None
    copy = TransformerLM(cfg.model).to(accelerator.device)
    copy.load_state_dict(full)
    return copy


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; through pinned memory on CUDA so the copy is asynchronous (no host sync)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# How a collective reports that another process is gone: NCCL's own error type; gloo's RuntimeError texts (a
# timeout waiting for a peer, a peer's socket closed).
_GLOO_LOST_PEER = re.compile(r"Timed out waiting|Connection closed by peer|Connection reset by peer")


def _lost_peer(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.distributed.DistBackendError) or bool(_GLOO_LOST_PEER.search(str(exc)))
