"""Global gradient-norm clipping.

Design decisions:
- One L2 norm over all gradients, per-tensor norms from `torch._foreach_norm` accumulated in fp32 (bf16
  gradients would lose the small contributions otherwise), then scaled in place by
  min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does.
- No host sync: the scale is multiplied in unconditionally (1.0 below the threshold) rather than
  branched on, and the norm comes back as a tensor; a non-finite norm propagates into the grads, and the
  trainer stops at the next log or checkpoint step (before saving) when it reads it.
- max_norm == 0 only measures (config: `optim.grad_clip: 0` disables clipping, the norm is still logged).
- DTensor gradients sharded over one 1-D mesh (FSDP2): the norm is computed on the local shards, whose
  squared norms add up across ranks to the global one, with one all-reduce of a scalar, and the local
  shards are scaled in place. Going through DTensor's own dispatch instead (foreach norm of Partial
  DTensors, stack, redistribute, foreach mul) costs ~100 dispatches of host time per step, which left the
  GPU idle between steps at the 124M shape on 2 GPUs. Any other DTensor layout (replicated, 2-D meshes)
  takes DTensor's path, whose norm comes back as a replicated DTensor (`.full_tensor()` to log it).
  tests/integration/test_fsdp.py checks the norms over 2 gloo ranks against one process.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dist_lm.errors import UserError


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm before clipping (fp32)."""
    if max_norm < 0:
        raise UserError(f"max_norm={max_norm} must be >= 0 (0 measures the norm without clipping)")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_device.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not by_device:
        return torch.tensor(0.0)
    if len(by_device) == 1:
        (grads,) = by_device.values()
        group = _shard_group(grads)
        if group is not None:
            return _clip_local_shards(grads, max_norm, group)
    first_device = next(iter(by_device))[0]
    norms = []
    for grads in by_device.values():
        norms.extend(torch._foreach_norm(grads, 2, dtype=torch.float32))
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), 2)  # fp32 scalar
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for (device, _), grads in by_device.items():
            torch._foreach_mul_(grads, scale.to(device))
    return total


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise: what a kernel can address.

    Under no_grad, DTensor.to_local() is the `_local_tensor` attribute plus an autograd Function call, ~5 us
    each; at 4 tensors per parameter every step that was milliseconds of host time, so read the attribute."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        return local
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _shard_group(grads: list[torch.Tensor]):
    """The process group when every gradient is a DTensor sharded (no replicated dim) over the same 1-D mesh."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:
        return None
    mesh = getattr(grads[0], "device_mesh", None)
    if mesh is None or mesh.ndim != 1:
        return None
    for g in grads:
        if not (isinstance(g, DTensor) and g.device_mesh == mesh and isinstance(g.placements[0], Shard)):
            return None
    return mesh.get_group()


def _clip_local_shards(grads: list[torch.Tensor], max_norm: float, group) -> torch.Tensor:
    import torch.distributed as dist

    local = [local_shard(g) for g in grads]
    squares = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)).square().sum()
    dist.all_reduce(squares, group=group)  # sum over ranks of the shards' squared norms
    total = squares.sqrt()
    if max_norm > 0:
        torch._foreach_mul_(local, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total
