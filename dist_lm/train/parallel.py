"""Parallelism and compilation applied over the single-device model, in a fixed order.

Order (torchtitan's): activation checkpointing -> torch.compile -> data parallelism. Each step wraps
what the previous produced. The launch topology (the accelerate config) alone decides how the model is
replicated or sharded: DDP comes from `accelerator.prepare` in the trainer; FSDP2 is applied here
(`apply_fsdp`), because we choose what to shard (each TransformerBlock, the class itself, then the
root) and the mixed-precision policy, instead of Accelerate's string-matched auto-wrap.

Design decisions:
- Checkpointing before compile: dynamo turns torch.utils.checkpoint regions into its checkpoint
  higher-order op and the partitioner recomputes them; wrapping a compiled module instead would
  recompute through an opaque compiled function.
- Checkpointing replaces each block's `forward` on the instance instead of wrapping the module
  (checkpoint_wrapper), so parameter names, state_dict keys, checkpoints and export stay unchanged.
  Non-reentrant checkpointing (use_reentrant=False): works with torch.compile, FSDP2 and inputs
  that do not require grad; it is skipped when grad is off (eval, generation with a KV cache).
- Compile granularity (train.compile_mode): "model" compiles the whole forward, loss included, as one graph,
  so inductor also fuses the chunked cross-entropy's elementwise work (dist_lm.kernels.cross_entropy) and
  the embedding/final-norm glue. "cudagraphs" (the default) is that graph replayed as CUDA graphs: the host
  launches one graph instead of hundreds of kernels (each Triton attention call alone costs tens of
  microseconds of Python), which measured +8% at the 124M shape on one H200 (same machine, same call), and took the
  seed model at batch 32, where the GPU otherwise waits for the host, from 0.78x to 1.45x HF compiled
  (benchmarks/README.md). "blocks" compiles each TransformerBlock in place (module.compile()):
  one graph reused by all blocks (same code, same shapes: one compile, not num_layers), so compile time
  stops growing with depth, and a graph break in the head cannot split a block; the loss then runs
  eagerly with its own compiled elementwise helper. benchmarks/bench_train.py --compile-mode measures both.
  Under FSDP2 with block units the compile is per block, before sharding (torchtitan's recipe): a whole-model
  graph would have to trace through FSDP's hooks, and per-block graphs keep each block's all-gather outside
  them; group units too (dynamo cannot trace FSDP2's hooks, and a hook inside the loop over the blocks makes it
  skip the whole forward frame). With one unit (unit "model") there are no hooks inside the model: the whole
  forward is compiled after sharding and the root's hooks run around it (one graph, as on one GPU; never CUDA
  graphs, whose fixed addresses the re-gathered weights do not keep).
- FSDP2: `fully_shard` on every block, then on the root (embedding, final norm, LM head), so each block's
  parameters are all-gathered just before it runs and freed after (reshard_after_forward=True) or kept until
  the backward (False: more memory, one all-gather fewer per block). Unit "group" shards runs of
  `group_blocks` consecutive blocks as one unit each (fully_shard of a list of modules: one all-gather, one
  reduce-scatter per run). With unit "model" only the root is
  sharded: the bf16 weights are gathered once per step and kept until the backward ends, the fp32 master
  weights, gradients and optimizer state stay sharded (fewer hooks and collectives for small models).
  MixedPrecisionPolicy: params in the compute dtype for the matmuls, gradients reduced in fp32 (reduce_dtype)
  so the sum over ranks does not lose bits; the optimizer keeps fp32 master shards.
- DDP: the trainer leaves the averaging to DDP's reducer (fp32 gradients; it divides each gradient by the world
  size in the copy into its bucket, at no extra cost), turns the per-forward buffer broadcast off and, when
  compiled, aligns the compiled graph's pieces with DDP's buckets (`align_compiled_pieces_with_buckets`).
  `mean_allreduce_hook` (the mean inside NCCL's all-reduce, optionally bf16 on the wire) is the benchmarks'
  alternative; it measured slower (see use_mean_allreduce).
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dist_lm.config import CompileMode, FSDPUnit, RunConfig
from dist_lm.errors import UserError
from dist_lm.model.transformer import TransformerBlock

COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
FSDP_UNITS: tuple[str, ...] = typing.get_args(FSDPUnit)


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each of `model.blocks` in the backward instead of storing its activations; in place."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; activation checkpointing wraps each block")
    for block in blocks:
        if getattr(block.forward, "_dist_lm_checkpointed", False):
            continue  # applying twice would nest two recomputations
        block.forward = _checkpointed(block.forward)
        block.forward._dist_lm_checkpointed = True
    return model


def apply_compile(model: torch.nn.Module, mode: CompileMode = "model") -> torch.nn.Module:
    """Compile the whole model (returns a wrapper sharing its parameters) or each block in place.

    "cudagraphs" is the whole model with inductor's CUDA graphs (torch.compile mode="reduce-overhead"): the
    forward and backward replay as graphs, without per-kernel host launches (the trainer's default). Callers call
    torch.compiler.cudagraph_mark_step_begin() once per optimizer step, not per micro-step: the gradients of
    an accumulation's first micro-step live in the graphs' memory, and a new step would let the next replay
    overwrite them; inside one step the graph trees see them alive and record a second path instead. The
    graphs' outputs (the loss) are overwritten at the next step too: keep a copy (`loss.detach()` into a sum),
    never the tensor. On the CPU, inductor skips the graphs and it is the "model" mode."""
    if mode == "model":
        return torch.compile(model)
    if mode == "cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    if mode == "blocks":
        for block in model.blocks:
            block.compile()
        return model
    raise UserError(f"compile mode {mode!r} is unknown; use one of {COMPILE_MODES}")


@dataclass(frozen=True)
class FSDPOptions:
    """How to shard: the data-parallel process group's mesh, compute dtype, resharding."""

    param_dtype: torch.dtype | None = None
    """Dtype of the all-gathered parameters the matmuls see (bf16 for mixed precision); None keeps fp32."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (gather again in the backward)."""
    mesh: object | None = None
    """A 1-D DeviceMesh over the ranks; None builds one over the default process group."""
    unit: str = "block"
    """"block": fully_shard each TransformerBlock, then the root; "group": runs of `group_blocks` consecutive blocks
    as one unit each, then the root; "model": the root only (one unit)."""
    group_blocks: int = 4
    """Blocks per unit when unit is "group"."""
    explicit_prefetch: bool = False
    """Block units: each block's forward (backward) issues the next block's all-gather itself, instead of
    FSDP2's implicit prefetch, which is issued only when the host reaches the next block; for a host that
    runs behind the GPU. Experimental: benchmarks/bench_scaling.py --fsdp-prefetch, not in the config yet."""


def apply_fsdp(model: torch.nn.Module, options: FSDPOptions) -> torch.nn.Module:
    """FSDP2 over `model`: fully_shard each TransformerBlock, then the root; in place (returns the model)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise UserError("FSDP needs an initialised process group; launch with accelerate launch or torchrun")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7):
        # public fully_shard (2.6) and distribute_tensor(src_data_rank=None), used to reload shards (2.7)
        raise UserError(f"FSDP2 in dist_lm needs torch >= 2.7, this is {torch.__version__}; upgrade torch or "
                        "train with DDP (configs/accelerate/ddp.yaml)")
    mesh = options.mesh
    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=torch.float32)
    if options.unit not in FSDP_UNITS:
        raise UserError(f"FSDP unit {options.unit!r} is unknown; use one of {FSDP_UNITS} (train.fsdp_unit)")
    if options.unit == "group" and options.group_blocks < 1:
        raise UserError(f"FSDP group units need group_blocks >= 1, got {options.group_blocks} "
                        "(train.fsdp_group_blocks)")
    if options.explicit_prefetch and options.unit != "block":
        raise UserError(f"explicit prefetch is for block units, not {options.unit!r} units")
    if options.unit == "model":
        # One unit: a single all-gather of the bf16 weights before the forward, kept through the backward (a
        # reshard would gather them all again; newer torch honours an explicit True on the root), then one
        # reduce-scatter of the gradients. reshard_after_forward only concerns block units.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no TransformerBlock to shard")
    size = options.group_blocks
    units = [blocks[i:i + size] for i in range(0, len(blocks), size)] if options.unit == "group" else blocks
    for unit in units:  # a list of blocks is one unit: fully_shard gathers and reduces them together
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    # The root's parameters (embedding, final norm, head) are gathered for the whole step anyway.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if options.explicit_prefetch:
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):
                block.set_modules_to_forward_prefetch([blocks[i + 1]])
            if i > 0:  # the backward runs the blocks in reverse
                block.set_modules_to_backward_prefetch([blocks[i - 1]])
    return model


@dataclass(frozen=True)
class _MeanAllReduce:
    """State of `mean_allreduce_hook`: the process group, whether it reduces CUDA tensors with NCCL (which averages
    inside the all-reduce), its size, and the dtype the gradients travel in (None: their own, fp32)."""

    group: object
    nccl: bool
    world_size: int
    wire_dtype: torch.dtype | None = None


def mean_allreduce_hook(state: _MeanAllReduce, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce one gradient bucket (a dist.GradBucket) to the mean over ranks, in place.

    On NCCL the 1/world factor is applied inside the reduction (ReduceOp.AVG); gloo has no AVG, so the bucket is
    divided first, in one kernel for the whole bucket. With a wire dtype the bucket travels cast to it and the
    mean is copied back into it. The bucket's own buffer comes back, so gradients that are views of the buckets
    (gradient_as_bucket_view) need no copy afterwards. For DDP's C++ reducer: the experimental Python one
    (torch._dynamo.config.optimize_ddp="python_reducer") calls hooks with other arguments and is not used here."""
    import torch.distributed as dist

    bucket_buffer = bucket.buffer()
    wire = bucket_buffer if state.wire_dtype in (None, bucket_buffer.dtype) else bucket_buffer.to(state.wire_dtype)
    if state.nccl and wire.is_cuda:
        work = dist.all_reduce(wire, op=dist.ReduceOp.AVG, group=state.group, async_op=True)
    else:
        wire.div_(state.world_size)
        work = dist.all_reduce(wire, group=state.group, async_op=True)

    def result(fut: torch.futures.Future) -> torch.Tensor:
        if wire is not bucket_buffer:
            bucket_buffer.copy_(fut.value()[0])
        return bucket_buffer

    return work.get_future().then(result)


# register_comm_hook compares the return annotation with the object itself, and `from __future__ import annotations`
# made it a string (for the same reason `bucket` carries no annotation: a string would fail that check too).
mean_allreduce_hook.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def use_mean_allreduce(ddp_model: torch.nn.parallel.DistributedDataParallel,
                       wire_dtype: torch.dtype | None = None) -> None:
    """Register `mean_allreduce_hook` on a DDP module (before its first backward): the benchmarks'
    `--comm-hook mean|mean-bf16`, not the trainer's setting.

    The hook takes the mean inside NCCL's reduction (ReduceOp.AVG). It was the trainer's default on the belief that
    DDP's reducer otherwise divides every gradient in a kernel of its own; it does so only for a gradient that is
    already a view of its bucket. The trainer's gradients never are (a compiled backward's outputs are new
    tensors, and zero_grad sets them to None), and for those the reducer divides while copying them into the
    bucket (at::mul_out), a copy the hook needs too. What the hook adds is Python on the backward's path: on one
    H100 with DDP on a one-rank group, 34.53 ms a step with it against 33.98 ms without at 124M, 21.44 against
    21.15 ms at TinyStories (benchmarks/README.md, Scaling). `wire_dtype` (bf16) halves the bytes of each
    all-reduce at the price of a cast each way; it measured slower at both benchmark shapes."""
    import torch.distributed as dist

    group = ddp_model.process_group
    # "nccl", or a per-device list such as "cpu:gloo,cuda:nccl" (CUDA buckets then go to NCCL)
    state = _MeanAllReduce(group=group, nccl="nccl" in str(dist.get_backend(group)),
                           world_size=dist.get_world_size(group), wire_dtype=wire_dtype)
    ddp_model.register_comm_hook(state, mean_allreduce_hook)


def stop_forward_buffer_sync(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Stop a DDP module from broadcasting rank 0's buffers before every forward.

    Why: dist_lm's only buffers are the RoPE tables, computed the same way on every rank, and the broadcast would
    be one more collective (and meeting point of the ranks) per step. Set on the built module rather than passed
    to the constructor: torch 2.13 deprecates the constructor's `broadcast_buffers` (a FutureWarning at every
    launch) for `forward_sync_buffers`, which torch 2.11 does not know; both read the attribute at each forward.
    The buffers are still broadcast once when DDP is built (harmless here: they are equal)."""
    name = "forward_sync_buffers" if hasattr(ddp_model, "forward_sync_buffers") else "broadcast_buffers"
    setattr(ddp_model, name, False)


def align_compiled_pieces_with_buckets(bucket_cap_mb: float) -> None:
    """Make torch.compile cut a DDP model's graph where DDP cuts its gradient buckets, for DDP given
    `bucket_cap_mb`. Call before DDP wraps the model (accelerator.prepare).

    Why: under DDP, dynamo's DDPOptimizer splits the compiled graph into pieces of about one bucket each, so that
    a bucket's all-reduce can start as soon as the backward of its piece ends. It sizes the first piece (the LM
    head's side, the first to finish in the backward) by torch.distributed._DEFAULT_FIRST_BUCKET_BYTES (1 MiB),
    while DDP, given a bucket size, makes its first bucket that size (recent torch; older DDP read the constant
    too). Every later boundary is then shifted, and the last buckets mix gradients of the last two pieces: their
    all-reduces wait for the end of the backward. At the 124M shape with 125 MiB buckets that is 258 MiB
    all-reduced after the backward; with the first sizes equal, 132 MiB (the buckets and pieces, printed on the
    CPU: benchmarks/README.md, Scaling). Setting the constant (which torch's DDP names as the knob for its first
    bucket) to the bucket size before DDP is built gives DDP, whichever way it reads it, and DDPOptimizer, which
    reads it at each compile, the same first size. Measured on 2 H200s, the two layouts run at the same speed
    (489.9k vs 491.1k tokens/s per GPU at 124M: an overlapped all-reduce still costs the backward about half its
    time there); the alignment stays so that the pieces are the ones the design assumes. (With per-block
    compilation, compile mode "blocks", each block's graph is small; the setting then only keeps dynamo from
    splitting a block.)
    A process-wide setting: a DDP model built afterwards in the same process with PyTorch's default bucket size
    would get this first bucket too (and, compiled, could fail dynamo's check that the first bucket is not larger
    than the others); pass that model an explicit bucket_cap_mb."""
    import torch.distributed as dist

    dist._DEFAULT_FIRST_BUCKET_BYTES = int(bucket_cap_mb * 1024 * 1024)  # as DDP turns MiB into bytes


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
