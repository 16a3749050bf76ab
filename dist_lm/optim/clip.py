"""Global gradient-norm clipping.

Design decisions:
- One L2 norm over all gradients, per-tensor norms from `torch._foreach_norm` accumulated in fp32 (bf16
  gradients would lose the small contributions otherwise), then scaled in place by
  min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does.
- No host sync: the scale is multiplied in unconditionally (1.0 below the threshold) rather than
  branched on, and the norm comes back as a tensor; a non-finite norm propagates into the grads, and the
  trainer stops at the next log or checkpoint step (before saving) when it reads it.
- max_norm == 0 only measures (config: `optim.grad_clip: 0` disables clipping, the norm is still logged).
- DTensor gradients (FSDP2): the foreach norms of shards are partial sums and DTensor's reductions turn
  them into the global norm, the same mechanism torch's clip_grad_norm_ relies on; the returned norm is
  then a replicated DTensor (call `.full_tensor()` to log it). Checked by hand against plain tensors with
  Shard(0) grads over 2 gloo ranks; the unit tests cover plain tensors only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; return the norm before clipping (fp32)."""
    if max_norm < 0:
        raise ValueError(f"max_norm={max_norm} must be >= 0 (0 measures the norm without clipping)")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_device.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    if not by_device:
        return torch.tensor(0.0)
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
