"""The training loop: Accelerator -> model, AdamW, schedule, batches -> steps -> eval, log, checkpoint.

Design decisions:
- One `train(cfg)` for every topology: 1 process, DDP over gloo or NCCL, FSDP; which one comes
  from the accelerate config the run was launched with, never from this file. (train.grad_sync=coalesced
  replaces the DDP module by dist_lm.train.grad_sync's in-place all-reduces, on the same launch.)
- The whole step runs inside `accelerator.accumulate(model)`, so gradients are synchronised only
  on the last micro-step and the loss is scaled by the accumulation count there.
- The learning rate is a pure function of the step (set on the param groups before each step),
  and the data position is the step too: a checkpoint needs only the step to resume exactly.
- No host synchronisation inside a step: losses and grad norms stay on the device and are read
  once per log interval, for all steps of the interval at once.
- Only the main process writes (checkpoints, config, MLflow); others wait at barriers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    gather_object,
    set_seed,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dist_lm.config import RunConfig, TrainConfig, config_to_dict, flatten_config, save_config
from dist_lm.data import EvalBatches, ShardedTokens, TrainBatches, check_tokenizer, load_manifest, prepare_shards
from dist_lm.errors import UserError
from dist_lm.model import TransformerLM, generate
from dist_lm.optim import AdamW, clip_grad_norm, cosine_with_warmup, param_groups
from dist_lm.tokenizer import load_tokenizer
from dist_lm.train.checkpoint import (
    RESUME_KEYS,
    full_tensor,
    load_checkpoint,
    load_model_weights,
    model_state_full,
    optimizer_from_tensors,
    optimizer_param_names,
    optimizer_to_tensors,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dist_lm.train.determinism import deterministic
from dist_lm.train.grad_sync import replicate
from dist_lm.train.metrics import Throughput, flops_per_token, peak_flops
from dist_lm.train.parallel import (
    FSDPOptions,
    align_compiled_pieces_with_buckets,
    apply_parallelism,
    stop_forward_buffer_sync,
    use_mean_allreduce,
)
from dist_lm.train.tracking import make_tracker, resolve_tracking_uri

METRICS_FILE = "metrics.jsonl"


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


def train(cfg: RunConfig) -> TrainResult:
    """Train as configured; resumes when cfg.train.resume says so."""
    # first, before any cuBLAS call of this process (train.deterministic sets cuBLAS's workspace through the env)
    with deterministic(cfg.train.deterministic):
        return _train(cfg)


def _train(cfg: RunConfig) -> TrainResult:
    t = cfg.train
    run_dir = cfg.output_dir()
    resume_from = resolve_resume(run_dir, t.resume)  # checks before anything is written
    plugin = GradientAccumulationPlugin(num_steps=t.grad_accum_steps, sync_with_dataloader=False)
    accelerator = Accelerator(
        # Without CUDA, force the CPU path: Accelerate then joins the processes that torchrun started
        # over gloo, where it would otherwise run each one as a separate single-process job.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_plugin=plugin,
        mixed_precision=None if t.mixed_precision == "launcher" else t.mixed_precision,
        kwargs_handlers=[ddp_kwargs(cfg)],  # read only when the launch is DDP
    )
    is_main = accelerator.is_main_process
    say = tqdm.write if is_main else (lambda *_: None)

    tokenizer, train_tokens, val_tokens = _open_data(cfg, accelerator)
    world = accelerator.num_processes
    batches = TrainBatches(train_tokens, seq_len=cfg.model.seq_len, micro_batch=t.batch_size,
                           grad_accum=t.grad_accum_steps, rank=accelerator.process_index, world_size=world,
                           seed=t.seed)
    eval_batches = EvalBatches(val_tokens, seq_len=cfg.model.seq_len, micro_batch=t.batch_size,
                               num_batches=t.eval_batches, rank=accelerator.process_index, world_size=world)

    set_seed(t.seed)  # same init on every rank
    model = TransformerLM(cfg.model)
    start_step, run_id, ckpt = 0, None, None
    if resume_from is not None:  # full weights into the unsharded model, before any wrapping
        ckpt = load_checkpoint(resume_from, RESUME_KEYS)
        _check_resumable(cfg, ckpt.state, resume_from, tokenizer.fingerprint(), len(train_tokens))
        load_model_weights(model, ckpt.model_state, resume_from)
        start_step = ckpt.state["step"]
        if start_step >= t.max_steps:
            raise UserError(f"checkpoint {resume_from} is at step {start_step}, not before train.max_steps="
                            f"{t.max_steps}: nothing to train; raise train.max_steps to continue the run")
        run_id = ckpt.state.get("mlflow_run_id")
        batches.resume_at(start_step, ckpt.state["data"]["samples_consumed"])

    raw_model = model  # parameters by their plain names; FSDP2 shards it in place
    fsdp = _fsdp_options(accelerator, unit=t.fsdp_unit, group_blocks=t.fsdp_group_blocks)
    averager = None  # train.grad_sync=coalesced: data parallelism without a DDP module
    if fsdp is None and world > 1 and t.grad_sync == "coalesced":
        model, averager = replicate(model, cfg, accelerator.device)
    else:
        model = apply_parallelism(model, cfg, fsdp=fsdp)
    # The optimizer comes after sharding: under FSDP2 it must hold the sharded (DTensor) parameters.
    optimizer = AdamW(param_groups(raw_model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                      eps=cfg.optim.eps, fused=None if cfg.optim.fused else False)
    param_names = optimizer_param_names(optimizer, raw_model)
    # prepare(model) would wrap the model in DDP and its forward in the autocast; without a DDP module the
    # forward runs under accelerator.autocast() instead (`amp`), and only the optimizer is prepared (registered
    # with the fp16 gradient scaler, made a no-op on accumulation micro-steps).
    amp = averager is not None
    if averager is not None:
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    elif fsdp is None:
        model, optimizer = prepare_data_parallel(accelerator, model, optimizer,
                                                 align_bucket_mb=t.ddp_bucket_mb if t.compile else None)
    else:
        # Already sharded by apply_fsdp. Accelerate's prepare() under FSDP2 insists on re-preparing model and
        # optimizer together (and swaps the optimizer's parameters), so we wrap the optimizer ourselves: the
        # wrapper is what makes optimizer.step() a no-op on accumulation micro-steps.
        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
    if ckpt is not None:
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer_from_tensors(optimizer.optimizer, param_names, ckpt.optimizer_tensors, ckpt.state["optimizer"],
                               resume_from)
        for group, values in zip(optimizer.param_groups, configured):
            group.update(values)  # the config's betas/eps/weight decay apply from here on, as config.yaml says
        set_rng_state(ckpt.state["rng"][min(accelerator.process_index, len(ckpt.state["rng"]) - 1)])
        del ckpt

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _truncate_metrics(run_dir / METRICS_FILE, start_step)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracker = make_tracker(cfg.tracking.enabled, is_main, uri=uri, experiment=cfg.tracking.experiment,
                           run_name=cfg.name, run_id=run_id, system_metrics=cfg.tracking.system_metrics)
    num_params = raw_model.num_parameters()
    if start_step == 0:
        tracker.log_params({**flatten_config(cfg), "num_parameters": num_params, "num_processes": world,
                            "global_batch_size": cfg.global_batch_size(world)})
        tracker.log_artifact(str(run_dir / "config.yaml"))
    compiled = compiled_as(cfg, fsdp, accelerator.device)
    graphs = compiled == "cudagraphs"
    if fsdp is None:
        topology = "1 process" if world == 1 else "DDP" if averager is None else "data parallel, coalesced all-reduce"
    elif fsdp.unit == "group":
        topology = f"FSDP2, groups of {fsdp.group_blocks} blocks"
    else:
        topology = f"FSDP2, {fsdp.unit} units"
    if t.compile:
        topology += f", compiled ({compiled})"
    if t.deterministic:
        topology += ", deterministic"
    say(f"dist_lm | {num_params:,} parameters | {world} process(es) on {accelerator.device} ({topology}) | "
        f"global batch {cfg.global_batch_size(world)} x {cfg.model.seq_len} tokens | "
        f"{'resuming at step ' + str(start_step) if start_step else 'fresh start'} | run_dir {run_dir}")

    tokens_per_step = cfg.tokens_per_step(world)
    meter = Throughput(tokens_per_step, flops_per_token(cfg.model), peak_flops(accelerator.device), world)
    result = TrainResult(run_dir=run_dir, mlflow_run_id=tracker.run_id)
    pending_loss: list[torch.Tensor] = []  # per-step losses on the device, read at log intervals
    grad_norm = torch.zeros((), device=accelerator.device)
    # The bar is for people at a terminal; logs and CI get the periodic log lines instead.
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not (is_main and sys.stderr.isatty()), unit="step",
               dynamic_ncols=True, mininterval=1.0)
    meter.reset(start_step)
    run_start = time.perf_counter()
    status = "FAILED"
    try:
        for step in range(start_step, t.max_steps):
            lr = cosine_with_warmup(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps,
                                    cfg.optim.cosine_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            if graphs:  # once per optimizer step, never per micro-step (apply_compile says why)
                torch.compiler.cudagraph_mark_step_begin()
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(t.grad_accum_steps):
                host_x, host_y = batches.batch(step, micro)
                x, y = _to_device(host_x, accelerator.device), _to_device(host_y, accelerator.device)
                with accelerator.accumulate(model):
                    if averager is not None:  # all-reduce in this micro-step's backward, or accumulate locally
                        averager.enabled = accelerator.sync_gradients
                        averager.note_tokens(host_x)  # the embedding rows to all-reduce
                    with accelerator.autocast() if amp else contextlib.nullcontext():
                        loss = model(x, y)
                    accelerator.backward(loss)
                    step_loss += loss.detach()
                    if accelerator.sync_gradients:
                        if averager is not None:
                            averager.wait()  # every rank's gradients now hold the mean
                        accelerator.unscale_gradients()
                        grad_norm = clip_grad_norm(model.parameters(), cfg.optim.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            pending_loss.append(step_loss / t.grad_accum_steps)
            done = step + 1
            bar.update(1)
            if averager is not None and done == start_step + 1:  # how the gradients went (the same every step)
                rows = averager.embedding_rows
                say(f"gradient sync: {len(averager.launched)} coalesced all-reduce(s) per step, "
                    + ("one per compiled piece" if averager.grouped_by_pieces else "in order of arrival")
                    + (f"; embedding gradient as the {rows:,} rows seen (of {cfg.model.vocab_size:,})"
                       if rows is not None else ""))
            # CUDA graphs are recorded on the second step (the first warms up), so that one counts as start-up too.
            if t.compile and done == min(start_step + (2 if graphs else 1), t.max_steps):
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()  # once, so the figure includes the compiled kernels' first run
                first_step_s = time.perf_counter() - run_start
                tracker.log_metrics({"perf/compile_and_first_step_s": first_step_s}, step=done)
                if is_main:
                    log_jsonl(run_dir / METRICS_FILE, [{"step": done, "perf/compile_and_first_step_s": first_step_s}])
                say(f"torch.compile + first {done - start_step} step(s): {first_step_s:.1f} s")
                meter.reset(done)

            interval = cfg.checkpoint.interval
            checkpoint_due = (interval and done % interval == 0) or done == t.max_steps
            # A checkpoint step always reads the losses first: a non-finite loss stops the run before it can be
            # saved (and before retention deletes the last good checkpoint).
            if done % t.log_interval == 0 or checkpoint_due:
                losses = accelerator.reduce(torch.stack(pending_loss), reduction="mean").tolist()
                first = done - len(pending_loss) + 1
                pending_loss.clear()
                norm = float(full_tensor(grad_norm))
                if not all(math.isfinite(v) for v in losses) or not math.isfinite(norm):
                    raise FloatingPointError(f"training loss became {losses[-1]} (gradient norm {norm}) at step "
                                             f"{done}; lower optim.lr, raise optim.warmup_steps, or use "
                                             "train.mixed_precision=bf16 over fp16")
                result.losses.update({first + i: v for i, v in enumerate(losses)})
                speed = meter.measure(done)
                result.tokens_per_s = speed["tokens_per_s"]
                for i, v in enumerate(losses):
                    tracker.log_metrics({"train/loss": v}, step=first + i)
                metrics = {"train/lr": lr, "train/grad_norm": norm, "epoch": batches.epoch_of(done),
                           **{f"perf/{k}": v for k, v in speed.items()}}
                tracker.log_metrics(metrics, step=done)
                if is_main:
                    log_jsonl(run_dir / METRICS_FILE, [{"step": first + i, "train/loss": v} for i, v in
                                                       enumerate(losses)] + [{"step": done, **metrics}])
                mfu = f" | mfu {speed['mfu']:.1%}" if "mfu" in speed else ""
                bar.set_postfix_str(f"loss {losses[-1]:.3f} | {speed['tokens_per_s']:,.0f} tok/s", refresh=False)
                say(f"step {done:>6}/{t.max_steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | "
                    f"{speed['tokens_per_s']:,.0f} tok/s{mfu}")

            if done % t.eval_interval == 0 or done == t.max_steps:
                val = evaluate(model, eval_batches, accelerator, cuda_graphs=graphs, amp=amp)
                result.val_losses[done] = val
                tracker.log_metrics({"val/loss": val}, step=done)
                if is_main:
                    log_jsonl(run_dir / METRICS_FILE, [{"step": done, "val/loss": val}])
                say(f"step {done:>6}/{t.max_steps} | val loss {val:.4f}")
                meter.reset(done)  # keep eval time out of tokens/s

            if checkpoint_due:
                result.last_checkpoint = _save(cfg, accelerator, raw_model, optimizer.optimizer, param_names,
                                               batches, done, lr, tokenizer.fingerprint(), tracker.run_id, world,
                                               sharded=fsdp is not None)
                if is_main:
                    say(f"step {done:>6}/{t.max_steps} | saved {result.last_checkpoint}")
                meter.reset(done)
        status = "FINISHED"
    finally:
        bar.close()
        tracker.close(status)

    if t.sample_tokens > 0:
        # A sharded forward needs every rank in lockstep, so under FSDP2 rank 0 samples from a gathered copy.
        sampler = raw_model if fsdp is None else _gathered_copy(raw_model, cfg, accelerator)
    if t.sample_tokens > 0 and is_main:
        result.sample = sample_text(sampler, tokenizer, t.sample_prompt, t.sample_tokens, seed=t.seed)
        say(f"\n--- sample ({t.sample_tokens} tokens, temperature 0.8, top-p 0.95) ---\n{result.sample}\n---")
    if is_main and tracker.run_id:
        say(f"MLflow run {tracker.run_id} in {uri}\nview it with: mlflow ui --backend-store-uri {uri}")
    accelerator.wait_for_everyone()
    # Drop everything that holds the process group (the DDP module's reducer, FSDP2's mesh, the averager's groups)
    # before destroying it. Held in a reference cycle, they would be freed at interpreter exit, and a gloo group
    # freed then aborts a finished run now and then ("terminate called without an active exception").
    model = raw_model = sampler = optimizer = averager = None
    accelerator.free_memory()  # Accelerate's references to them, then gc.collect()
    accelerator.end_training()
    return result


def _gathered_copy(model: TransformerLM, cfg: RunConfig, accelerator: Accelerator) -> TransformerLM | None:
    """An unsharded copy of an FSDP2 model on the main process (None elsewhere); every rank must call it."""
    full = model_state_full(model)  # collective
    if not accelerator.is_main_process:
        return None
    copy = TransformerLM(cfg.model).to(accelerator.device)
    copy.load_state_dict(full)
    return copy


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> device; through pinned memory on CUDA so the copy is asynchronous (no host sync)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def log_jsonl(path: Path, rows: list[dict]) -> None:
    """Append metric rows to the run's local log (readable without MLflow; tests read it too)."""
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step`: a run that died after its last checkpoint redoes those steps."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the crash being recovered from
            warnings.warn(f"dropping an unreadable line of {path}: {line[:80]!r}", RuntimeWarning, stacklevel=2)
    path.write_text("".join(line + "\n" for line in kept))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: EvalBatches, accelerator: Accelerator, *,
             cuda_graphs: bool = False, amp: bool = False) -> float:
    """Mean validation loss over the fixed eval windows of all ranks; `amp`: the forward under
    accelerator.autocast() (a model that prepare() did not wrap)."""
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    for x, y in batches:
        if cuda_graphs:  # each batch's loss is added up before the next replay overwrites it
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.autocast() if amp else contextlib.nullcontext():
            total += model(x.to(accelerator.device), y.to(accelerator.device)).float()
    model.train()
    return float(accelerator.reduce(total / batches.num_batches, reduction="mean"))


def sample_text(model: TransformerLM, tokenizer, prompt: str, num_tokens: int, *, seed: int,
                temperature: float = 0.8, top_p: float = 0.95) -> str:
    """Prompt + a seeded sample from the model."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = generate(model, tokenizer.encode(prompt), num_tokens, temperature=temperature, top_p=top_p,
                   eos_id=tokenizer.eot_id, generator=generator, num_valid_ids=tokenizer.vocab_size)
    return prompt + tokenizer.decode(ids)


def _open_data(cfg: RunConfig, accelerator: Accelerator):
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
                tqdm.write(f"preparing token shards of {d.source} in {data_dir} ...")
                prepare_shards(d.source, d.tokenizer_dir, data_dir, text_field=d.text_field,
                               val_fraction=d.val_fraction, log=tqdm.write)
    manifest = load_manifest(data_dir)
    check_tokenizer(manifest, tokenizer.fingerprint(), data_dir)
    return tokenizer, ShardedTokens.open(data_dir, "train", manifest), ShardedTokens.open(data_dir, "val", manifest)


# Model fields that change the weights or the function; backends and kernels may change across a resume.
_SHAPE_FIELDS = ("vocab_size", "seq_len", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta", "norm_eps")


def _check_resumable(cfg: RunConfig, state: dict, path: Path, fingerprint: str, num_train_tokens: int) -> None:
    """Refuse a resume that would not continue the same run: another model, tokenizer, seed or data."""
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


def ddp_kwargs(cfg: RunConfig) -> DistributedDataParallelKwargs:
    """How DDP is set up when the launch is DDP (benchmarks/bench_scaling.py measures the same settings).

    Accelerate's defaults differ in three places: 25 MB buckets, which cut a compiled model into ~20 graphs (dynamo
    splits at bucket boundaries so that the all-reduces can overlap the backward), gradients copied into the
    buckets, and rank 0's buffers broadcast at every forward. We use train.ddp_bucket_mb (125) and gradients as
    views of the buckets here; around prepare() the trainer also aligns a compiled graph's pieces with these
    buckets and turns the buffer broadcast off (`prepare_data_parallel`). The averaging stays DDP's own."""
    return DistributedDataParallelKwargs(bucket_cap_mb=cfg.train.ddp_bucket_mb, gradient_as_bucket_view=True)


def prepare_data_parallel(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                          align_bucket_mb: float | None, mean_hook: bool = False,
                          wire_dtype: torch.dtype | None = None,
                          sync_buffers: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """accelerator.prepare with the trainer's DDP setup around it (under FSDP, plain prepare): before DDP
    is built, the compiled graph's pieces aligned with buckets of `align_bucket_mb` (None: left to torch; for a
    compiled model given that bucket size, parallel.align_compiled_pieces_with_buckets); after, with `mean_hook`
    (benchmarks), the mean all-reduce hook (parallel.use_mean_allreduce, on the wire in `wire_dtype`) and, unless
    `sync_buffers`, no broadcast of rank 0's buffers before each forward (parallel.stop_forward_buffer_sync: the
    RoPE tables are equal on every rank). The benchmarks call it with their knobs, so that they measure what the
    trainer runs."""
    if align_bucket_mb is not None and accelerator.num_processes > 1:
        align_compiled_pieces_with_buckets(align_bucket_mb)
    model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(model, DistributedDataParallel):
        configure_ddp(model, mean_hook=mean_hook, wire_dtype=wire_dtype, sync_buffers=sync_buffers)
    return model, optimizer


def configure_ddp(model: DistributedDataParallel, *, mean_hook: bool = False, wire_dtype: torch.dtype | None = None,
                  sync_buffers: bool = False) -> None:
    """What the trainer sets on a built DDP module (prepare_data_parallel's part after prepare): no per-forward
    broadcast of rank 0's buffers unless `sync_buffers`; with `mean_hook` (benchmarks), the mean all-reduce hook."""
    if mean_hook:
        use_mean_allreduce(model, wire_dtype)  # the 1/world factor inside the all-reduce
    if not sync_buffers:
        stop_forward_buffer_sync(model)


def compiled_as(cfg: RunConfig, fsdp: FSDPOptions | None, device: torch.device) -> str:
    """How apply_parallelism compiles under this topology (for the start line and the benchmarks' rows)."""
    if not cfg.train.compile:
        return "eager"
    if fsdp is not None:
        return "model" if fsdp.unit == "model" else "blocks"
    if cfg.train.compile_mode == "cudagraphs" and device.type != "cuda":
        return "model"  # inductor makes no CUDA graphs without CUDA
    return cfg.train.compile_mode


def cuda_graphs(cfg: RunConfig, device: torch.device, fsdp: FSDPOptions | None) -> bool:
    """Whether the compiled step replays as CUDA graphs (so the loop must mark each step's start)."""
    return compiled_as(cfg, fsdp, device) == "cudagraphs"


def _fsdp_options(accelerator: Accelerator, unit: str = TrainConfig.fsdp_unit,
                  group_blocks: int = TrainConfig.fsdp_group_blocks) -> FSDPOptions | None:
    """FSDP2 settings from the accelerate config when launched with distributed_type FSDP, else None."""
    if accelerator.distributed_type != DistributedType.FSDP:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # set by accelerate launch
            warnings.warn("the accelerate config asks for FSDP, which Accelerate does not run on the CPU; "
                          "training with plain data parallelism instead", RuntimeWarning, stacklevel=2)
        return None
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise UserError("the accelerate config asks for FSDP version 1; dist_lm shards with FSDP2: set "
                        "fsdp_config.fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    if accelerator.mixed_precision == "fp16":
        raise UserError("FSDP2 with fp16 needs a sharded gradient scaler, which dist_lm does not have; use "
                        "mixed_precision bf16")
    dtype = {"bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    return FSDPOptions(param_dtype=dtype, reshard_after_forward=bool(plugin.reshard_after_forward), unit=unit,
                       group_blocks=group_blocks)


def _save(cfg: RunConfig, accelerator: Accelerator, raw_model: TransformerLM, optimizer: torch.optim.Optimizer,
          param_names: list[str], batches: TrainBatches, step: int, lr: float, fingerprint: str,
          run_id: str | None, world: int, *, sharded: bool) -> Path | None:
    """Main process writes a consolidated checkpoint; under FSDP2 every rank takes part in gathering the
    shards, and every rank contributes its RNG state."""
    rngs = gather_object([rng_state()])
    path = None
    if sharded or accelerator.is_main_process:
        model_state = model_state_full(raw_model)
        tensors, groups = optimizer_to_tensors(optimizer, param_names)
    if accelerator.is_main_process:
        state = {
            "schedule": {"step": step, "lr": lr},
            "data": {"samples_consumed": batches.samples_consumed(step), "global_batch_size": batches.global_batch(),
                     "epoch": batches.epoch_of(step), "num_train_tokens": len(batches.tokens)},
            "rng": rngs,
            "optimizer": groups,
            "config": config_to_dict(cfg),
            "tokenizer_fingerprint": fingerprint,
            "mlflow_run_id": run_id,
            "world_size": world,
        }
        path = save_checkpoint(cfg.output_dir(), step, model_state, tensors, state,
                               keep_last=cfg.checkpoint.keep_last)
    accelerator.wait_for_everyone()
    return path
