"""Builds a run: Accelerator, data, model, resume, parallel wrapping, optimizer, logger -> a `Run` the loop steps.

Design decisions:
- Everything that can refuse the run is checked before anything is written: the resume target, the tokenizer
  against the shards and the checkpoint, the model shape, the seed and the data. Only then does the run directory
  get its config.yaml and its logger.
- The model is built with the same seed on every rank and, when resuming, loaded with the checkpoint's full
  weights on one device before any wrapping: one consolidated checkpoint resumes on any topology.
- The optimizer is built after the parallel wrapping (dist_lm.parallel.parallelize): under FSDP2 it must hold
  the sharded parameters. Its state is restored after that, by parameter name.
- The learning rate is a pure function of the step and the data position is the step too, so a checkpoint's
  step (plus RNG states) is all the loop needs to continue the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)
from tqdm import tqdm

from dist_lm.config import RunConfig, config_to_dict, flatten_config, save_config
from dist_lm.data import EvalBatches, ShardedTokens, TrainBatches, check_tokenizer, load_manifest, prepare_shards
from dist_lm.errors import UserError
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, param_groups
from dist_lm.parallel import ParallelModel, ddp_kwargs, parallelize
from dist_lm.tokenizer import Tokenizer, load_tokenizer
from dist_lm.train import slurm
from dist_lm.train.checkpoint import (
    RESUME_KEYS,
    Checkpoint,
    load_checkpoint,
    load_model_weights,
    optimizer_from_tensors,
    optimizer_param_names,
    resolve_resume,
    set_rng_state,
)
from dist_lm.train.lock import take_turns
from dist_lm.train.logger import RunLogger
from dist_lm.train.metrics import Throughput, flops_per_token, peak_flops
from dist_lm.train.provenance import code_tags, device_tags, processes_per_machine
from dist_lm.train.stop import StopCheck, host_group, parse_duration
from dist_lm.train.system_metrics import SystemMetrics
from dist_lm.train.tracking import RUN_FILE, MlflowTracker, NullTracker, read_run_id, resolve_tracking_uri
from dist_lm.warn import warn_once


@dataclass
class Run:
    """What the loop works with: built once by `build_run`, then stepped by dist_lm.train.trainer."""

    cfg: RunConfig
    accelerator: Accelerator
    tokenizer: Tokenizer
    batches: TrainBatches
    eval_batches: EvalBatches
    model: ParallelModel
    param_names: list[str]
    """The optimizer's parameters by model name, in its order (checkpoints key optimizer state by name)."""
    logger: RunLogger
    meter: Throughput
    stop: StopCheck
    """Signals, the time limit and the agreement between ranks on when to stop early."""
    start_step: int
    """Optimizer steps done before this process started (the resumed checkpoint's step; 0 for a fresh run)."""
    step: int = 0
    """Optimizer steps done so far (1-based number of the last step run)."""
    lr: float = 0.0
    """The learning rate of the last step."""
    pending_losses: list[torch.Tensor] = field(default_factory=list)
    """Per-step losses on the device since the last log, read at the next one (no host sync inside a step)."""
    grad_norm: torch.Tensor | None = None
    """The last step's gradient norm, on the device."""
    saved_step: int | None = None
    """The step of the last checkpoint this process saved (None: none yet)."""
    stopped: int = 0
    """Why the run stopped before train.max_steps (a dist_lm.train.stop reason code; 0: it did not)."""
    started_at: float = field(default_factory=time.perf_counter)
    system: SystemMetrics | None = None
    """Every node's CPU, memory and GPU figures at each log step (tracking.system_metrics), else None."""

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def build_run(cfg: RunConfig) -> Run:
    """Check, build and (when resuming) restore everything a run needs; see the module docstring for the order."""
    t = cfg.train
    resume_from = resolve_resume(cfg.output_dir(), t.resume)  # checks before anything is written
    accelerator = make_accelerator(cfg)
    tokenizer, train_tokens, val_tokens = open_data(cfg, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = TrainBatches(train_tokens, seq_len=cfg.model.seq_len, micro_batch=t.batch_size,
                           grad_accum=t.grad_accum_steps, rank=rank, world_size=world, seed=t.seed)
    eval_batches = EvalBatches(val_tokens, seq_len=cfg.model.seq_len, micro_batch=t.batch_size,
                               num_batches=t.eval_batches, rank=rank, world_size=world)
    set_seed(t.seed)  # same init on every rank
    model = TransformerLM(cfg.model)
    ckpt = None
    if resume_from is not None:  # full weights into the unsharded model, before any wrapping
        ckpt = load_checkpoint(resume_from, RESUME_KEYS)
        check_resumable(cfg, ckpt.state, resume_from, tokenizer.fingerprint(), len(train_tokens))
        load_model_weights(model, ckpt.model_state, resume_from)
        batches.resume_at(ckpt.state["step"], ckpt.state["data"]["samples_consumed"])
    parallel = parallelize(model, cfg, accelerator, lambda m: make_optimizer(cfg, m))
    param_names = optimizer_param_names(parallel.optimizer.optimizer, model)
    start_step, run_id = 0, None
    if ckpt is not None:
        restore_training_state(parallel, param_names, ckpt, resume_from, rank)
        start_step, run_id = ckpt.state["step"], ckpt.state.get("mlflow_run_id")
    logger = open_logger(cfg, accelerator, start_step, run_id, model.num_parameters())
    try:  # from here the logger holds an MLflow run: a failure ends it FAILED, with the error
        meter = Throughput(cfg.tokens_per_step(world), flops_per_token(cfg.model), peak_flops(accelerator.device),
                           world)
        meter.reset(start_step)
        stop = StopCheck(time_limit_s=time_limit_s(t.time_limit, accelerator), check_every=t.stop_check_steps,
                         group=host_group(t.stall_timeout_s), world_size=world,
                         first_save_bytes=12 * model.num_parameters())  # fp32 weights and two AdamW moments
        run = Run(cfg=cfg, accelerator=accelerator, tokenizer=tokenizer, batches=batches, eval_batches=eval_batches,
                  model=parallel, param_names=param_names, logger=logger, meter=meter, stop=stop,
                  start_step=start_step, step=start_step, system=system_metrics(cfg, accelerator, stop.group))
    except BaseException as exc:
        logger.close("FAILED", step=start_step, error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    logger.say(start_line(run))
    run.started_at = time.perf_counter()
    return run


def time_limit_s(setting: str, accelerator: Accelerator) -> float | None:
    """train.time_limit in seconds; '' inside a SLURM job: the time to the job's end, which the main process reads
    and every rank receives (one query to SLURM, and one deadline for all)."""
    if setting:
        return parse_duration(setting)
    left = slurm.seconds_left() if accelerator.is_main_process else None
    return broadcast_object_list([left])[0] if accelerator.num_processes > 1 else left


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """The Accelerator: the launch's topology and precision, the config's accumulation and DDP settings."""
    t = cfg.train
    return Accelerator(
        # Without CUDA, force the CPU path: Accelerate then joins the processes that torchrun started over gloo,
        # where it would otherwise run each one as a separate single-process job.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum_steps,
                                                                sync_with_dataloader=False),
        mixed_precision=None if t.mixed_precision == "launcher" else t.mixed_precision,
        kwargs_handlers=[
            ddp_kwargs(cfg),  # read only when the launch is DDP
            # every collective of the default group gives up after this, instead of gloo's and NCCL's 30 minutes
            InitProcessGroupKwargs(timeout=timedelta(seconds=t.stall_timeout_s)),
        ],
    )


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> AdamW:
    """AdamW over the model's parameters (decay on matrices only: dist_lm.optim.param_groups)."""
    o = cfg.optim
    return AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                 fused=None if o.fused else False)


def open_data(cfg: RunConfig, accelerator: Accelerator) -> tuple[Tokenizer, ShardedTokens, ShardedTokens]:
    """Tokenizer + train/val token views; prepares the bundled sample's shards on first use."""
    d = cfg.data
    data_dir = Path(d.data_dir)
    tokenizer = load_tokenizer(d.tokenizer_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"config key model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} ids ({d.tokenizer_dir}); set model.vocab_size >= "
                        f"{tokenizer.vocab_size}")
    if not (data_dir / "manifest.json").exists():
        if not d.source.startswith("bundled:"):
            raise FileNotFoundError(f"no token shards in {data_dir}; make them first with `python "
                                    f"launch/prepare_data.py --config <this config>` (source {d.source})")
        with accelerator.main_process_first():  # one process tokenizes, the others then find the shards
            if accelerator.is_main_process:
                prepare_bundled(cfg, data_dir)
    manifest = load_manifest(data_dir)
    check_tokenizer(manifest, tokenizer.fingerprint(), data_dir)
    # ids at or above the tokenizer's vocabulary are refused at open; checksums as data.verify_shards says
    splits = [ShardedTokens.open(data_dir, split, manifest, vocab_size=tokenizer.vocab_size, verify=d.verify_shards)
              for split in ("train", "val")]
    return tokenizer, *splits


def prepare_bundled(cfg: RunConfig, data_dir: Path) -> None:
    """Shards of the bundled sample in data_dir, unless another run made them meanwhile: two runs started at once
    on one data_dir (a sweep, two jobs) take turns through a lock file beside it, and the second finds the shards."""
    d = cfg.data
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with take_turns(data_dir.with_name(f".{data_dir.name}.prepare.lock")):
        if (data_dir / "manifest.json").exists():
            return
        tqdm.write(f"preparing token shards of {d.source} in {data_dir} ...")
        prepare_shards(d.source, d.tokenizer_dir, data_dir, text_field=d.text_field, val_fraction=d.val_fraction,
                       log=tqdm.write)


# Model fields that change the weights or the function; backends and kernels may change across a resume.
_SHAPE_FIELDS = ("vocab_size", "seq_len", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "norm_eps")


def check_resumable(cfg: RunConfig, state: dict, path: Path, fingerprint: str, num_train_tokens: int) -> None:
    """Refuse a resume that would not continue the same run: another model, tokenizer, seed or data, or no step
    left to train."""
    saved = state["config"]
    ours = config_to_dict(cfg)
    diff = [k for k in _SHAPE_FIELDS if ours["model"][k] != saved["model"].get(k)]
    if diff:
        raise UserError(f"checkpoint {path} was trained with model.{diff[0]}={saved['model'].get(diff[0])!r}, the "
                        f"config says {ours['model'][diff[0]]!r}; resume with the same model config")
    if state.get("tokenizer_fingerprint") != fingerprint:
        raise UserError(f"checkpoint {path} was trained with another tokenizer than data.tokenizer_dir="
                        f"{cfg.data.tokenizer_dir}; point data.tokenizer_dir at the original tokenizer")
    if saved["train"]["seed"] != cfg.train.seed:
        raise UserError(f"checkpoint {path} was trained with train.seed={saved['train']['seed']}, the config says "
                        f"{cfg.train.seed}; the seed fixes the data order, so resume with the same seed")
    saved_tokens = state["data"].get("num_train_tokens")
    if saved_tokens is not None and saved_tokens != num_train_tokens:
        raise UserError(f"checkpoint {path} was trained on {saved_tokens:,} training tokens, data.data_dir="
                        f"{cfg.data.data_dir} holds {num_train_tokens:,}; resume on the same token shards")
    if state["step"] >= cfg.train.max_steps:
        raise UserError(f"checkpoint {path} is at step {state['step']}, not before train.max_steps="
                        f"{cfg.train.max_steps}: nothing to train; raise train.max_steps to continue the run")


def restore_training_state(parallel: ParallelModel, param_names: list[str], ckpt: Checkpoint, path: Path,
                           rank: int) -> None:
    """The checkpoint's optimizer state (by parameter name) and this rank's RNG state; the config's betas, eps and
    weight decay apply from here on, as config.yaml says."""
    optimizer = parallel.optimizer
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer_from_tensors(optimizer.optimizer, param_names, ckpt.optimizer_tensors, ckpt.state["optimizer"], path)
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    rngs = ckpt.state["rng"]
    set_rng_state(rngs[min(rank, len(rngs) - 1)])  # a run resumed on more ranks than it had: the last one's


def open_logger(cfg: RunConfig, accelerator: Accelerator, start_step: int, run_id: str | None,
                num_params: int) -> RunLogger:
    """The run directory's config.yaml (main process) and the run's logger; a fresh run logs its parameters."""
    run_dir = cfg.output_dir()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if start_step == 0:  # a fresh start is a new MLflow run: an earlier attempt's mlflow.json must not name it
            (run_dir / RUN_FILE).unlink(missing_ok=True)
    tracker = make_tracker(cfg, accelerator.is_main_process, run_id, resumed=start_step > 0)
    logger = RunLogger(run_dir, tracker=tracker, is_main=accelerator.is_main_process, start_step=start_step,
                       max_steps=cfg.train.max_steps)
    # This attempt's job, code and devices (a resumed run may run elsewhere, on other code: the tags follow it)
    if isinstance(tracker, MlflowTracker):  # only the process that tracks asks git
        logger.log_tags({**slurm.job_tags(), **code_tags(),
                         **device_tags(accelerator.device, accelerator.num_processes)})
    if start_step == 0:
        world = accelerator.num_processes
        logger.log_params({**flatten_config(cfg), "num_parameters": num_params, "num_processes": world,
                           "global_batch_size": cfg.global_batch_size(world)}, artifact=run_dir / "config.yaml")
    return logger


def make_tracker(cfg: RunConfig, is_main: bool, run_id: str | None, resumed: bool = False) -> NullTracker:
    """The main process's MLflow run (opened later, by the logger's writer process), or a NullTracker: on the other
    ranks, with tracking off, or when MLflow cannot even be set up here (not installed, a malformed URI)."""
    tracking = cfg.tracking
    if not (tracking.enabled and is_main):
        return NullTracker()
    uri = resolve_tracking_uri(tracking.tracking_uri)
    if run_id is None and resumed:
        run_id = read_run_id(cfg.output_dir(), uri)
    try:
        return MlflowTracker(uri, tracking.experiment, cfg.name, run_id, open_now=False)
    except Exception as exc:  # a tracking problem must not stop training: say it once, train without
        warn_once(f"MLflow cannot be set up for {uri} ({type(exc).__name__}: {exc}); training without tracking")
        return NullTracker()


def system_metrics(cfg: RunConfig, accelerator: Accelerator, group: object | None) -> SystemMetrics | None:
    """The system-metrics collector when tracking and tracking.system_metrics are on (the same on every rank)."""
    if not (cfg.tracking.enabled and cfg.tracking.system_metrics):
        return None
    return SystemMetrics(group=group, is_main=accelerator.is_main_process,
                         is_local_main=accelerator.is_local_main_process,
                         machine_rank=accelerator.process_index // processes_per_machine(accelerator.num_processes),
                         local_index=accelerator.local_process_index, device=accelerator.device)


def start_line(run: Run) -> str:
    """The first line a run prints: size, topology, batch, fresh or resumed, where it writes."""
    cfg, acc = run.cfg, run.accelerator
    topology = run.model.topology() + (", deterministic" if cfg.train.deterministic else "")
    return (f"dist_lm | {run.model.raw.num_parameters():,} parameters | {run.world} process(es) on {acc.device} "
            f"({topology}) | global batch {cfg.global_batch_size(run.world)} x {cfg.model.seq_len} tokens | "
            f"{'resuming at step ' + str(run.start_step) if run.start_step else 'fresh start'} | "
            f"run_dir {cfg.output_dir()}")
