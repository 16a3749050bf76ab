"""AdamW as a pure multi-tensor step function plus a thin torch.optim.Optimizer around it.

Design decisions:
- `adamw_step` is the whole algorithm (Loshchilov & Hutter, decoupled weight decay, bias-corrected
  moments) over lists of tensors with `torch._foreach_*` ops: one kernel launch per op for the whole list
  instead of one per parameter, and a function that can be tested and swapped (e.g. for a fused Triton
  kernel) on its own. It follows torch.optim.AdamW's order of operations, so the two agree to rounding.
- `AdamW` only owns state: per parameter {"step": fp32 scalar tensor, "exp_avg", "exp_avg_sq"}, the same
  keys torch uses, so `state_dict()` holds only tensors and numbers (the checkpoint writer stores the
  tensors in safetensors) and `load_state_dict` round-trips. Parameters whose step counts differ (one
  that had no grad on some step) are stepped in separate calls so each gets its own bias correction.
- Works on DTensor parameters (FSDP2): zeros_like and the foreach ops keep the sharding (checked by hand
  over 2 gloo ranks with Shard(0) parameters; the state then holds DTensors).
- Fused path (`fused=None` auto, or True): one Triton launch per (param group, step count) over all its
  tensors (dist_lm.kernels.fused_adamw), when every tensor is fp32, contiguous, 16-byte aligned and on
  CUDA (or on the CPU under Triton's interpreter, TRITON_INTERPRET=1, which the tests use), and triton
  imports. DTensor (FSDP2) tensors go through their local shards. Anything else takes the foreach path;
  with fused=True that fallback warns once and says why. The state layout is the same on both paths.
- Host overhead matters as much as the kernel at ~100 tensors: step counts are bumped with one foreach
  op and read back with one stack().tolist(), not one scalar op and one .item() per parameter.
- `param_groups` decays matrices only: not norms (1-D) and not the token embedding, whose rows of rare
  tokens would otherwise be decayed towards zero between their rare gradient updates. Call it after any
  wrapping that replaces parameters (FSDP2's fully_shard does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from dist_lm.errors import UserError
from dist_lm.optim.clip import local_shard
from dist_lm.warn import warn_once


def _load_fused():
    """The fused-kernel module, or the reason it cannot be imported."""
    try:
        from dist_lm.kernels import fused_adamw
    except ImportError as exc:  # triton missing or broken
        return None, f"{type(exc).__name__}: {exc}"
    return fused_adamw, ""


def adamw_step(
    params: list[torch.Tensor],  # N tensors of any shapes, updated in place
    grads: list[torch.Tensor],  # N tensors, same shapes as params
    exp_avgs: list[torch.Tensor],  # N tensors, same shapes: first moment, updated in place
    exp_avg_sqs: list[torch.Tensor],  # N tensors, same shapes: second moment, updated in place
    step: int,  # the step being taken, counted from 1 (after incrementing), shared by all N tensors
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update of every tensor in `params`."""
    if not params:
        return
    # Decoupled weight decay: shrink the weights before the Adam update, independent of the gradient.
    if weight_decay != 0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    # m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    # Bias correction folded into two scalars: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bias_correction1)


class AdamW(torch.optim.Optimizer):
    """torch.optim.Optimizer wrapper of `adamw_step`; hyperparameters per param group, as in torch."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        fused: bool | None = None,
    ) -> None:
        """fused: True = Triton kernel (warn once and use foreach where it cannot run), False = foreach,
        None = the kernel where it can run, silently foreach elsewhere."""
        if lr < 0:
            raise UserError(f"AdamW lr={lr} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise UserError(f"AdamW betas={betas} must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        if eps <= 0:
            raise UserError(f"AdamW eps={eps} must be > 0, e.g. 1e-8")
        if weight_decay < 0:
            raise UserError(f"AdamW weight_decay={weight_decay} must be >= 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        # Not a param-group default: state_dict() stays exactly what it was before the fused path existed.
        self.fused = fused
        self._plans: dict[tuple[int, ...], Any] = {}  # plan_key -> FusedAdamWPlan (device pointer tables)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise UserError("AdamW does not support sparse gradients; use dense embeddings")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1.0)
            # (step, device, dtype) -> (params, grads, exp_avgs, exp_avg_sqs): foreach ops want uniform lists.
            buckets: dict[tuple, tuple[list, list, list, list]] = {}
            for p, step in zip(params, torch.stack(steps).tolist(), strict=True):
                state = self.state[p]
                bucket = buckets.setdefault((int(step), p.device, p.dtype), ([], [], [], []))
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state["exp_avg"])
                bucket[3].append(state["exp_avg_sq"])
            for (step, _, _), tensors in buckets.items():
                if not self._fused_step(tensors, step, hyper):
                    adamw_step(*tensors, step, **hyper)
        return loss

    def _fused_step(self, tensors: tuple[list, list, list, list], step: int, hyper: dict[str, float]) -> bool:
        """Update the bucket with the Triton kernel; False (nothing done) when the foreach path must run."""
        if self.fused is False:
            return False
        module, reason = _load_fused()
        params, grads, exp_avgs, exp_avg_sqs = ([local_shard(t) for t in ts] for ts in tensors) if module else tensors
        plan = None
        if module is not None:
            # A cached plan holds these very tensors (same addresses, kept alive by the plan), checked when it
            # was built: the per-tensor checks (~100 us of host time a step) run only for a new plan.
            key = module.plan_key(params, exp_avgs, exp_avg_sqs)
            plan = self._plans.get(key)
            if plan is None:
                interpreter = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch: kernels on CPU
                if not (params[0].is_cuda or interpreter):
                    reason = f"parameters are on {params[0].device}, the kernel needs CUDA"
                else:
                    reason = module.fused_adamw_supported(params + exp_avgs + exp_avg_sqs)
                if not reason:
                    if len(self._plans) >= 16:  # stale plans (moved or re-created states) hold memory: drop them
                        self._plans.clear()
                    plan = self._plans[key] = module.FusedAdamWPlan(params, exp_avgs, exp_avg_sqs)
            if plan is not None:
                reason = plan.set_grads(grads)
        if reason:
            if self.fused:
                warn_once(f"AdamW(fused=True) runs the foreach path instead of the Triton kernel: {reason}")
            return False
        plan.step(grads, step, **hyper)
        return True


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices (decayed) and the rest: norms, biases, the token embedding (not decayed).

    >>> groups = param_groups(nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 2)), weight_decay=0.1)
    >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
    [(1, 0.1), (2, 0.0)]
    """
    if weight_decay < 0:
        raise UserError(f"weight_decay={weight_decay} must be >= 0")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
