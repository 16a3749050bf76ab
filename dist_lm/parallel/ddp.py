"""DDP as the trainer sets it up: bucket settings, the compiled graph's pieces aligned with the buckets, no per-forward
buffer broadcast; and the mean all-reduce hook the benchmarks compare against.

Design decisions:
- DDP itself comes from `accelerator.prepare` (the accelerate config says the launch is DDP); `ddp_kwargs` is the
  handler that gives it our settings, and `prepare_data_parallel` does what must happen around prepare().
- The averaging is DDP's reducer's own (fp32 gradients; it divides each gradient by the world size in the copy
  into its bucket, at no extra cost). `mean_allreduce_hook` (the mean inside NCCL's all-reduce, optionally bf16 on
  the wire) is the benchmarks' alternative; it measured slower (see use_mean_allreduce).
- When compiled, the compiled graph's pieces are aligned with DDP's buckets (`align_compiled_pieces_with_buckets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.nn.parallel import DistributedDataParallel

from dist_lm.config import RunConfig


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
    compiled model given that bucket size, align_compiled_pieces_with_buckets); after, with `mean_hook`
    (benchmarks), the mean all-reduce hook (use_mean_allreduce, on the wire in `wire_dtype`) and, unless
    `sync_buffers`, no broadcast of rank 0's buffers before each forward (stop_forward_buffer_sync: the
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
