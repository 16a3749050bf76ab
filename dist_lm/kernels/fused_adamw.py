"""Multi-tensor AdamW in one Triton launch per (param group, step count): fp32 params, grads and moments.

AdamW is memory-bound: per element it reads param, grad, exp_avg, exp_avg_sq (16 bytes) and writes
param, exp_avg, exp_avg_sq (12 bytes), ~30 flops. At 72M parameters that is 2.0 GB, ~0.65 ms at the
H100's ~3 TB/s; the floor is bandwidth, and the enemies are launch count and host overhead.

Design decisions:
- One launch over every tensor of a bucket through pointer tables (the grouped-GEMM idea of Triton's
  tutorial 08): int64 device tables of the tensors' addresses, and a tile table that maps each program
  to (tensor index, element offset). The grid is the total number of BLOCK-sized tiles, so a 5M-element
  embedding and a 512-element norm gain share one launch with no padding between them.
- Tables are built on the host and cached: params and moments never move, so their table is built once;
  grads are reallocated by zero_grad(set_to_none=True), so their table is keyed by the tuple of grad
  addresses and rebuilt (one small host-to-device copy) only when an address changed. The caching
  allocator usually hands back the same blocks each step, so steady state has no copies at all.
- Scalars that change every step (lr through the schedule, the bias corrections) are runtime fp32
  kernel arguments, never constexpr: Triton does not specialise float arguments on their value, so a new
  lr never recompiles. Folded on the host in double, exactly as `dist_lm.optim.adamw_step` folds them:
  decay = 1 - lr*wd, step_size = -lr/bc1, and bc2_sqrt by which sqrt(v) is divided.
- Same order of operations as `adamw_step` (torch's foreach AdamW): decay the weight, lerp the first
  moment (torch's lerp form for weight < 0.5), v*beta2 + (1-beta2)*g*g, sqrt / bc2_sqrt + eps, then
  p + step_size * m / denom. sqrt and division are IEEE round-to-nearest (sqrt_rn, div_rn), not the
  approximate instructions, so results match the foreach path to an ulp or so (fma contraction aside).
- 16-byte vector access: full tiles take an unmasked path with alignment hints (tensor addresses are
  checked 16-byte aligned on the host; BLOCK is a multiple of 4 elements), only each tensor's last
  partial tile is masked; otherwise the unknown tail length would force scalar 4-byte accesses.
- Only fp32, contiguous, 16-byte-aligned, same-device tensors; `fused_adamw_supported` says why not,
  and the optimizer falls back to the foreach path then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 16 KiB per tensor stream; 8 warps -> 16 elements (4 x 16 B) per thread
NUM_WARPS = 8


def fused_adamw_supported(tensors: list[torch.Tensor]) -> str:
    """'' if the kernel can update these tensors, else the reason it cannot."""
    for t in tensors:
        if t.dtype != torch.float32:
            return f"a tensor is {t.dtype}; the fused kernel takes fp32 params, grads and moments only"
        if not t.is_contiguous():
            return "a tensor is not contiguous"
        if t.data_ptr() % 16:
            return "a tensor is not 16-byte aligned (a view at an odd offset)"
        if t.device != tensors[0].device:
            return "tensors are on different devices"
    return ""


@triton.jit
def _adamw_update(p, g, m, v, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size,
                  bc2_sqrt):
    p = p * decay
    m = m + one_minus_beta1 * (g - m)  # torch lerp(m, g, w) for w < 0.5
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _adamw_kernel(
    TILE_TENSOR,  # (num_tiles,) int32: which tensor each program updates
    TILE_START,  # (num_tiles,) int64: first element of the program's tile within that tensor
    NUMEL,  # (num_tensors,) int64
    PARAM_PTRS, GRAD_PTRS, EXP_AVG_PTRS, EXP_AVG_SQ_PTRS,  # (num_tensors,) int64 addresses of fp32 data
    decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, bc2_sqrt,  # runtime fp32 scalars
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(TILE_TENSOR + pid)
    start = tl.multiple_of(tl.load(TILE_START + pid), BLOCK)
    numel = tl.load(NUMEL + t)
    p_ptr = tl.multiple_of(tl.load(PARAM_PTRS + t).to(tl.pointer_type(tl.float32)), 16)
    g_ptr = tl.multiple_of(tl.load(GRAD_PTRS + t).to(tl.pointer_type(tl.float32)), 16)
    m_ptr = tl.multiple_of(tl.load(EXP_AVG_PTRS + t).to(tl.pointer_type(tl.float32)), 16)
    v_ptr = tl.multiple_of(tl.load(EXP_AVG_SQ_PTRS + t).to(tl.pointer_type(tl.float32)), 16)
    # 16-byte aligned addresses (checked on the host) + BLOCK-aligned contiguous offsets -> 16-byte vectors.
    # The hint must sit on the pointer, after the int->pointer cast: on the int it does not reach the loads
    # (checked in the sm_90 PTX with triton 3.9: scalar ld.global.b32 otherwise, ld.global.v4 with it).
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # full tile: unmasked, vectorised
        p = tl.load(p_ptr + offs)
        g = tl.load(g_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
        p, m, v = _adamw_update(p, g, m, v, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                step_size, bc2_sqrt)
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
    else:  # the tensor's last, partial tile
        mask = offs < numel
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        p, m, v = _adamw_update(p, g, m, v, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                step_size, bc2_sqrt)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def plan_key(params: list[torch.Tensor], exp_avgs: list[torch.Tensor],
             exp_avg_sqs: list[torch.Tensor]) -> tuple:
    """The addresses a plan bakes in: equal keys mean a cached plan is valid for these tensors."""
    # the dtype too: a tensor re-viewed in place (same address, other dtype) must not reuse a checked plan
    return tuple(t.data_ptr() for t in params) + tuple(t.data_ptr() for t in exp_avgs) + tuple(
        t.data_ptr() for t in exp_avg_sqs) + tuple(t.numel() for t in params) + (params[0].dtype, exp_avgs[0].dtype)


def _addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


class FusedAdamWPlan:
    """Device tables for one fixed list of (param, exp_avg, exp_avg_sq); grads may move between steps.

    Keeps references to the tensors whose addresses it holds, so they cannot be freed under it. The
    optimizer keys its plans by those addresses (`plan_key`), so a moved parameter gets a new plan.
    """

    def __init__(self, params: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor]) -> None:
        reason = fused_adamw_supported(params + exp_avgs + exp_avg_sqs)
        if reason:
            raise ValueError(f"fused AdamW cannot take these tensors: {reason}")
        device = params[0].device
        self.tensors = (list(params), list(exp_avgs), list(exp_avg_sqs))
        self.device = device
        numels = [p.numel() for p in params]
        tile_tensor, tile_start = [], []
        for i, n in enumerate(numels):
            starts = range(0, n, BLOCK)
            tile_tensor.extend([i] * len(starts))
            tile_start.extend(starts)
        self.num_tiles = len(tile_tensor)
        self.tile_tensor = torch.tensor(tile_tensor, dtype=torch.int32).to(device)
        self.tile_start = torch.tensor(tile_start, dtype=torch.int64).to(device)
        self.numel = torch.tensor(numels, dtype=torch.int64).to(device)
        self.param_ptrs = _addresses(params, device)
        self.exp_avg_ptrs = _addresses(exp_avgs, device)
        self.exp_avg_sq_ptrs = _addresses(exp_avg_sqs, device)
        self._grad_key: tuple[int, ...] = ()
        # Grads are not kept alive: a freed grad's memory is reused only by work queued after this launch on
        # the same stream (the caching allocator is stream-ordered), and a stale table is never used because
        # the key compares the live grads' addresses first.
        self._grad_ptrs: torch.Tensor | None = None

    def set_grads(self, grads: list[torch.Tensor]) -> str:
        """Point the grad table at `grads` (same order as the params); '' or why the kernel cannot take them."""
        key = tuple(g.data_ptr() for g in grads)
        if key != self._grad_key or self._grad_ptrs is None:
            reason = fused_adamw_supported(grads)
            if not reason and any(g.shape != p.shape or g.device != self.device
                                  for g, p in zip(grads, self.tensors[0], strict=True)):
                reason = "a gradient's shape or device differs from its parameter's"
            if reason:
                return reason
            self._grad_ptrs = _addresses(grads, self.device)
            self._grad_key = key
        return ""

    def step(self, grads: list[torch.Tensor], step: int, *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float) -> None:
        """One AdamW update of every tensor of the plan, with the grads given (same order as the params)."""
        if self.num_tiles == 0:
            return
        reason = self.set_grads(grads)
        if reason:
            raise ValueError(f"fused AdamW cannot take these gradients: {reason}")
        # Folded in double precision on the host, as adamw_step does; cast to fp32 at the launch.
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
        _adamw_kernel[(self.num_tiles,)](
            self.tile_tensor, self.tile_start, self.numel,
            self.param_ptrs, self._grad_ptrs, self.exp_avg_ptrs, self.exp_avg_sq_ptrs,
            1.0 - lr * weight_decay, beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, -lr / bias_correction1,
            bias_correction2_sqrt,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )


def fused_adamw_step(
    params: list[torch.Tensor],  # N fp32 tensors, updated in place
    grads: list[torch.Tensor],  # N fp32 tensors, same shapes
    exp_avgs: list[torch.Tensor],  # N fp32 first moments, updated in place
    exp_avg_sqs: list[torch.Tensor],  # N fp32 second moments, updated in place
    step: int,  # the step being taken, counted from 1, shared by all N tensors
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """`dist_lm.optim.adamw_step` in one Triton launch (builds the tables each call; the optimizer caches a plan)."""
    if not params:
        return
    FusedAdamWPlan(params, exp_avgs, exp_avg_sqs).step(grads, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                       weight_decay=weight_decay)


__all__ = ["BLOCK", "FusedAdamWPlan", "fused_adamw_step", "fused_adamw_supported", "plan_key"]
