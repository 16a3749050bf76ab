"""Data-parallel gradient averaging without DistributedDataParallel's buckets (experimental, benchmark-only).

Why: torch's DDP reducer copies every gradient the backward produces into a flat bucket before all-reducing
it, because a compiled backward's outputs are never views of its buckets: 114 copies a step at the 124M shape,
0.43 ms of copy kernels and 0.15 ms of gaps on an H200 (benchmarks/README.md, Scaling), a third of what DDP
costs there over one GPU. `GradientAverager` all-reduces the gradients where the backward left them: a
post-accumulate hook on every parameter collects the gradients as they arrive, and once `bucket_mb` of them
are ready they go to NCCL as one coalesced call (one ncclGroupStart/End over the tensors, no flat copy) with
the mean taken inside the reduction (ReduceOp.AVG); gloo has no AVG, so there each gradient is divided first.
For the all-reduces to overlap the backward, the compiled graph must be cut into pieces whose backward ends
early: `split_compile` cuts it as DDP's dynamo optimizer does, by parameter bytes, without a DDP module.

Not yet used by the trainer: `benchmarks/bench_scaling.py --grad-sync coalesced` measures it against DDP
first. What it does not do (DDP does): find unused parameters (every parameter must get a gradient in each
synchronised backward; `wait` says which did not), or broadcast the initial weights (`broadcast_parameters`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


class GradientAverager:
    """Averages the gradients of `parameters` over `group` during the backward (see the module docstring).

    Use: `averager.enabled = True` before the backward of a micro-step whose gradients are to be synchronised
    (the last of an accumulation), `averager.wait()` after it and before reading the gradients (clipping, the
    optimizer); with enabled False the backward only accumulates locally."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None,
                 bucket_mb: float = 125.0) -> None:
        self.params = [p for p in parameters if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group)
        # "nccl", or a per-device list such as "cpu:gloo,cuda:nccl" (CUDA gradients then go to NCCL)
        self.nccl = "nccl" in str(dist.get_backend(group))
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.enabled = False
        self._pending: list[torch.Tensor] = []
        self._pending_bytes = 0
        self._ready: set[int] = set()
        self._works: list = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self.enabled:
            return
        if id(param) in self._ready:
            raise RuntimeError("a parameter received two gradients in one synchronised backward (a module used "
                               "twice, or a second backward before wait()): the all-reduce already started")
        self._ready.add(id(param))
        self._pending.append(param.grad)
        self._pending_bytes += param.grad.numel() * param.grad.element_size()
        if self._pending_bytes >= self.bucket_bytes:
            self._launch()

    def _launch(self) -> None:
        grads, self._pending, self._pending_bytes = self._pending, [], 0
        if not grads:
            return
        if self.nccl and grads[0].is_cuda:
            with dist._coalescing_manager(group=self.group, async_ops=True) as coalesced:
                for grad in grads:
                    dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=self.group)
            self._works.extend(coalesced.works)
        else:
            torch._foreach_div_(grads, self.world)
            self._works.extend(dist.all_reduce(grad, group=self.group, async_op=True) for grad in grads)

    def wait(self) -> None:
        """Start the all-reduce of the gradients still pending and wait (on the current stream) for all of them."""
        missing = [i for i, p in enumerate(self.params) if id(p) not in self._ready]
        if missing:
            raise RuntimeError(f"{len(missing)} parameter(s) got no gradient in this synchronised backward (e.g. "
                               f"index {missing[0]}); GradientAverager needs every parameter to take part")
        self._launch()
        for work in self._works:
            work.wait()
        self._works.clear()
        self._ready.clear()

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for handle in self._handles:
            handle.remove()


def broadcast_parameters(module: torch.nn.Module, group: dist.ProcessGroup | None = None, src: int = 0) -> None:
    """Give every rank rank `src`'s weights and buffers (what DDP does when it wraps a module)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=dist.get_global_rank(group, src) if group is not None else src, group=group)


def split_compile(model: torch.nn.Module, bucket_mb: float, mode: str = "reduce-overhead",
                  backend=None) -> torch.nn.Module:
    """torch.compile with inductor (`mode`, "reduce-overhead": CUDA graphs), the graph cut into pieces of about
    `bucket_mb` of parameters in backward order, as dynamo cuts it for a DDP module (its DDPOptimizer), so that
    a piece's gradients are complete when its part of the backward ends instead of at the end of the whole
    backward. Uses two private torch classes (torch._dynamo.backends.distributed.DDPOptimizer, the wrapper
    torch.compile builds for inductor): torch has no public way to cut a graph by parameter size. `backend`
    (a dynamo backend: graph module, example inputs -> callable) replaces inductor for each piece (tests)."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    cap = int(bucket_mb * 2**20)
    piece_backend = backend if backend is not None else torch._TorchCompileInductorWrapper(mode, None, None)
    return torch.compile(model, backend=DDPOptimizer(cap, piece_backend, first_bucket_cap=cap).compile_fn)
