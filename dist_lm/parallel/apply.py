"""The single-device model made into what the training loop runs, in a fixed order.

Order (torchtitan's): activation checkpointing -> torch.compile (CUDA graphs) -> data parallelism. Each step wraps
what the previous produced. The launch topology (the accelerate config) alone decides how the model is replicated
or sharded: DDP comes from `accelerator.prepare` (dist_lm.parallel.ddp sets it up), FSDP2 is applied here
(dist_lm.parallel.fsdp), and train.grad_sync=coalesced replaces the DDP module by in-place all-reduces
(dist_lm.parallel.grad_sync) on the same launch.

`parallelize` is the trainer's one entry point: it returns a `ParallelModel`, which holds the wrapped module and the
prepared optimizer and does the few things the loop must do around them (mark a CUDA-graph step, the forward under
autocast where no DDP module does it, wait for the coalesced all-reduces), so that the loop holds no parallelism
of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from dist_lm.config import CompileMode, RunConfig
from dist_lm.parallel.activation_checkpointing import apply_activation_checkpointing
from dist_lm.parallel.compile import apply_compile, compiled_as
from dist_lm.parallel.ddp import prepare_data_parallel
from dist_lm.parallel.fsdp import FSDPOptions, apply_fsdp, fsdp_options
from dist_lm.parallel.grad_sync import GradientAverager, replicate


def apply_parallelism(model: torch.nn.Module, cfg: RunConfig, compile_mode: CompileMode | None = None,
                      fsdp: FSDPOptions | None = None) -> torch.nn.Module:
    """The single-device model with the configured wrappers applied, in the fixed order
    checkpointing -> compile -> FSDP2 (when `fsdp` is given; DDP is left to accelerator.prepare).
    `compile_mode` overrides cfg.train.compile_mode (benchmarks). Under FSDP2 the compile follows the unit: each
    block before sharding (block and group units), or the whole forward inside the root's hooks after sharding
    (unit "model")."""
    if cfg.train.activation_checkpointing:
        model = apply_activation_checkpointing(model)
    whole_under_fsdp = fsdp is not None and fsdp.unit == "model"
    if cfg.train.compile and not whole_under_fsdp:
        model = apply_compile(model, "blocks" if fsdp is not None else compile_mode or cfg.train.compile_mode)
    if fsdp is not None:
        model = apply_fsdp(model, fsdp)
    if cfg.train.compile and whole_under_fsdp:
        # One FSDP2 unit: its hooks (all-gather before the forward, reduce-scatter after the backward) run eagerly
        # around one compiled forward, which sees plain gathered parameters. Not as CUDA graphs: the gathered
        # weights are freed and re-allocated every step, so their addresses are not fixed.
        model.forward = torch.compile(model.forward)
    return model


@dataclass
class ParallelModel:
    """The model and optimizer as the loop runs them, after `parallelize`."""

    module: torch.nn.Module
    """What the loop calls: the model compiled, wrapped in DDP, sharded by FSDP2, or as it was."""
    raw: torch.nn.Module
    """The single-device model, parameters under their plain names (checkpoints, sampling); FSDP2 shards it in
    place, so under FSDP2 its parameters are the sharded ones."""
    optimizer: AcceleratedOptimizer
    """The optimizer, prepared: a no-op on accumulation micro-steps, registered with the fp16 gradient scaler."""
    accelerator: Accelerator
    fsdp: FSDPOptions | None = None
    """FSDP2's settings when the launch is FSDP, else None."""
    averager: GradientAverager | None = None
    """train.grad_sync=coalesced on several processes: the in-place gradient all-reduces (no DDP module)."""
    compiled: str = "eager"
    """How the model was compiled (dist_lm.parallel.compile.compiled_as)."""

    @property
    def cuda_graphs(self) -> bool:
        """The compiled step replays as CUDA graphs: each optimizer step must be marked (`begin_step`)."""
        return self.compiled == "cudagraphs"

    def topology(self) -> str:
        """The start line's words for how the model runs, e.g. "DDP, compiled (cudagraphs)"."""
        world = self.accelerator.num_processes
        if self.fsdp is None:
            words = "1 process" if world == 1 else "DDP" if self.averager is None else \
                "data parallel, coalesced all-reduce"
        elif self.fsdp.unit == "group":
            words = f"FSDP2, groups of {self.fsdp.group_blocks} blocks"
        else:
            words = f"FSDP2, {self.fsdp.unit} units"
        return words if self.compiled == "eager" else f"{words}, compiled ({self.compiled})"

    def begin_step(self) -> None:
        """Once per optimizer step, never per micro-step (apply_compile says why)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _autocast(self):
        # prepare() wraps a DDP module's (or the plain model's) forward in the autocast; the model it did not wrap
        # (train.grad_sync=coalesced) runs its forward under accelerator.autocast() instead.
        return self.accelerator.autocast() if self.averager is not None else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, host_tokens: torch.Tensor, sync: bool) -> torch.Tensor:
        """The training loss of one micro-step. `sync`: this micro-step's backward synchronises the gradients
        (the last of an accumulation); `host_tokens`: its input ids on the host (the coalesced sync all-reduces
        only the embedding rows seen)."""
        if self.averager is not None:  # all-reduce in this micro-step's backward, or accumulate locally
            self.averager.enabled = sync
            self.averager.note_tokens(host_tokens)
        with self._autocast():
            return self.module(x, y)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one batch, without gradients (the caller sets eval mode and no_grad)."""
        with self._autocast():
            return self.module(x, y)

    def wait_for_gradients(self) -> None:
        """After a synchronising backward: every rank's gradients now hold the mean (the coalesced sync's
        all-reduces are asynchronous; DDP's reducer has already waited for its own)."""
        if self.averager is not None:
            self.averager.wait()

    def sync_report(self, vocab_size: int) -> str | None:
        """How the coalesced sync went in the last step (the same every step), for the console; None without it."""
        if self.averager is None:
            return None
        rows = self.averager.embedding_rows
        return (f"gradient sync: {len(self.averager.launched)} coalesced all-reduce(s) per step, "
                + ("one per compiled piece" if self.averager.grouped_by_pieces else "in order of arrival")
                + (f"; embedding gradient as the {rows:,} rows seen (of {vocab_size:,})" if rows is not None else ""))


def parallelize(model: torch.nn.Module, cfg: RunConfig, accelerator: Accelerator,
                make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> ParallelModel:
    """Wrap the single-device `model` for the launch's topology, in apply_parallelism's order, and prepare the
    optimizer that `make_optimizer(model)` builds over its parameters (after sharding: under FSDP2 the optimizer
    must hold the sharded DTensor parameters).

    - 1 process or DDP: apply_parallelism, then accelerator.prepare with the trainer's DDP setup around it
      (dist_lm.parallel.ddp.prepare_data_parallel); a compiled DDP model's graph pieces align with DDP's buckets.
    - FSDP2 (the accelerate config's distributed_type): apply_parallelism shards it. Accelerate's prepare() under
      FSDP2 insists on re-preparing model and optimizer together (and swaps the optimizer's parameters), so only
      the optimizer is wrapped, which is what makes its step a no-op on accumulation micro-steps.
    - train.grad_sync=coalesced on several processes: no DDP module (dist_lm.parallel.grad_sync.replicate); only
      the optimizer is prepared, and the forward runs under accelerator.autocast() (ParallelModel.forward)."""
    t = cfg.train
    fsdp = fsdp_options(accelerator, unit=t.fsdp_unit, group_blocks=t.fsdp_group_blocks)
    averager = None
    if fsdp is None and accelerator.num_processes > 1 and t.grad_sync == "coalesced":
        module, averager = replicate(model, cfg, accelerator.device)
    else:
        module = apply_parallelism(model, cfg, fsdp=fsdp)
    optimizer = make_optimizer(model)
    if averager is not None:
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    elif fsdp is None:
        module, optimizer = prepare_data_parallel(accelerator, module, optimizer,
                                                  align_bucket_mb=t.ddp_bucket_mb if t.compile else None)
    else:
        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
    return ParallelModel(module=module, raw=model, optimizer=optimizer, accelerator=accelerator, fsdp=fsdp,
                         averager=averager, compiled=compiled_as(cfg, fsdp, accelerator.device))
