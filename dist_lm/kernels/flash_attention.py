"""FlashAttention-2 in Triton: forward and backward, causal or not, exact softmax attention.

Design decisions:
- Layout (batch, heads, seq, head_dim), any strides; a tensor whose last dim is not contiguous is
  copied once so that every tile load is a run of 16-byte vectors. Outputs and gradients are contiguous.
- Forward (FA2): one program per (query block, batch*head); online softmax in fp32 in base 2 with
  log2(e) folded into the score scale, so each score costs one multiply and one exp2. The logsumexp
  (base 2) is saved for the backward. Key blocks are walked in two passes: fully visible blocks with
  no mask at all, then the blocks that need one (causal diagonal, key tail); blocks above the
  diagonal are never visited.
- Causal alignment is bottom-right: query i sees keys j <= i + (seq_k - seq_q), so a block of new
  queries against a longer KV cache is aligned to the end of the keys. seq_q > seq_k with causal=True
  would leave query rows with no key and is refused.
- Backward (FA2), two kernels, no atomics, so gradients are bitwise deterministic:
  1) dq kernel, one program per query block: computes delta = rowsum(dO*O) for its rows, stores it,
     and accumulates dQ over key blocks.
  2) dk/dv kernel, one program per key block: accumulates dK and dV over query blocks, reading the
     delta of kernel 1. Folding the delta pass into the dq kernel saves a launch and a read of dO.
- head_dim: any value 1..128; non powers of two (and < 16) are padded in registers to the next
  power of two >= 16 by masked loads, costing the padded FLOPs. head_dim > 128 is refused (tiles no
  longer fit the register file with the block sizes that keep the tensor cores busy).
- dtypes: bf16 and fp16 on CUDA at full speed; fp32 is accepted and runs its dots as tf32 on the GPU
  (error near 3e-4, like torch's default matmul on Ampere+ with tf32 on), exact fp32 in the
  interpreter. Under autocast the inputs are cast to the autocast dtype first, as SDPA does.
- Block sizes, warps and stages autotuned per (head_dim, causal, dtype) over a short list per kernel
  (3-4 configs) so a first call compiles in seconds, not minutes. Autotuning picks by timing, so two
  processes can run different configs, whose blocks sum in another order: not bitwise the same
  results. `set_autotune(False)` (train.deterministic) runs the first config of each list instead.
- Exposed to PyTorch as two torch.library custom ops with fake (meta) kernels and a registered
  autograd rule (the custom-op form of an autograd.Function), so torch.compile keeps the call in one
  graph instead of breaking around an opaque Triton launch.
- Pointer-based loads only (no TMA tensor descriptors): their API changed between Triton 3.6 and 3.9,
  and the pointer path is what the CPU interpreter runs.
"""


import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from dist_lm.errors import UserError

__all__ = ["flash_attention", "attention_reference"]

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * log2(e)) and exp2 is the cheaper instruction
MAX_HEAD_DIM = 128
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Reference


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, sm_scale: float | None = None
) -> torch.Tensor:
    """Plain softmax attention with the same causal alignment (bottom-right); O(seq^2) memory.

    Computes in the dtype of its inputs: pass float64 tensors for an oracle.

    >>> q = k = v = torch.ones(1, 1, 2, 4, dtype=torch.float64)
    >>> attention_reference(q, k, v).shape
    torch.Size([1, 1, 2, 4])
    """
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Sq, Sk)
    if causal:
        rows = torch.arange(seq_q, device=q.device)[:, None]
        cols = torch.arange(seq_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (seq_k - seq_q), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# ----------------------------------------------------------------------------------------------
# JIT helpers


@triton.jit
def _load_tile(base, offs_rows, offs_d, stride_row, num_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks only what can be out of range, so inner loops stay unmasked."""
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_rows[:, None] < num_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(base, tile, offs_rows, offs_d, stride_row, num_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, tile, mask=offs_rows[:, None] < num_rows)
    else:
        tl.store(ptrs, tile, mask=(offs_rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_bounds(start_m, seq_k, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For a query block: (end of the key blocks every row sees in full, end of the keys any row sees)."""
    if CAUSAL:
        # row i sees keys j <= i + offset: the first row bounds the unmasked part, the last row the rest
        visible_to_all = tl.minimum(start_m + offset + 1, seq_k)
        end = tl.minimum(start_m + BLOCK_M + offset, seq_k)
    else:
        visible_to_all = seq_k
        end = seq_k
    return (visible_to_all // BLOCK_N) * BLOCK_N, end


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, lo, hi, seq_k, offset, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    MASKED: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, seq_k, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, seq_k, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = offs_n[None, :] < seq_k
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            s = tl.where(keep, s, float("-inf"))
        # online softmax: every row already saw a finite score (key 0 is in its first block), so no -inf - -inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, LSE,
              stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_om,
              num_heads, seq_q, seq_k, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, SEQ_BUCKET: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one flat grid: consecutive programs share a head, so its K and V stay in L2 while they run
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m  # longest (last) query blocks first: a shorter tail wave
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh
    lse_base = LSE + bh.to(tl.int64) * seq_q
    offset = seq_k - seq_q  # causal diagonal shift: the queries are the last seq_q positions

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base, offs_m, offs_d, stride_qm, seq_q, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, end = _key_bounds(start_m, seq_k, offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, 0, full_hi,
                                    seq_k, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, full_hi, end,
                                    seq_k, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True)

    acc = acc / l_i[:, None]
    _store_tile(o_base, acc.to(Out.dtype.element_ty), offs_m, offs_d, stride_om, seq_q, HEAD_DIM, BLOCK_D)
    tl.store(lse_base + offs_m, m_i + tl.log2(l_i), mask=offs_m < seq_q)  # base-2 logsumexp of scaled scores


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, lo, hi, seq_k, offset,
                       qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, seq_k, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, seq_k, HEAD_DIM, BLOCK_D, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N), softmax recomputed
        if MASKED:
            keep = offs_n[None, :] < seq_k
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + offset)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, Out, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_ob, stride_oh, stride_om,
                 stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 num_heads, seq_q, seq_k, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, SEQ_BUCKET: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    row_base = bh.to(tl.int64) * seq_q
    offset = seq_k - seq_q

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q = _load_tile(q_base, offs_m, offs_d, stride_qm, seq_q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_base, offs_m, offs_d, stride_dom, seq_q, HEAD_DIM, BLOCK_D, True)
    o = _load_tile(o_base, offs_m, offs_d, stride_om, seq_q, HEAD_DIM, BLOCK_D, True)
    # FA2's delta = rowsum(dO * O) = rowsum(P * dP): the softmax-Jacobian term, one number per query row
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, end = _key_bounds(start_m, seq_k, offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, 0, full_hi, seq_k,
                            offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, full_hi, end, seq_k,
                            offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True)
    dq = dq * sm_scale  # d(scores)/dq carries the unscaled softmax scale; log2(e) lives only in the exponent
    _store_tile(dq_base, dq.to(DQ.dtype.element_ty), offs_m, offs_d, stride_dqm, seq_q, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n, lo, hi,
                         seq_q, offset, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, offs_d, stride_qm, seq_q, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_tile(do_base, offs_m, offs_d, stride_dom, seq_q, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < seq_q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seq_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # transposed scores (keys x queries): dK and dV rows are this program's keys, no transposes in the dots
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            keep = offs_m[None, :] < seq_q
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + offset)
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   num_heads, seq_q, seq_k, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, SEQ_BUCKET: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # causal: key block 0 is seen by every query, so ascending program order already runs the longest first
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(seq_k, BLOCK_N)
    bh = pid // num_n_blocks
    start_n = (pid % num_n_blocks) * BLOCK_N
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_dob + h * stride_doh
    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    lse_base = LSE + bh.to(tl.int64) * seq_q
    delta_base = DELTA + bh.to(tl.int64) * seq_q
    offset = seq_k - seq_q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_base, offs_n, offs_d, stride_kn, seq_k, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(v_base, offs_n, offs_d, stride_vn, seq_k, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query blocks in three runs: [lo, mid_lo) cut by the diagonal, [mid_lo, mid_hi) unmasked,
    # [mid_hi, q_end) the partial last block. Query i sees key j iff i >= j - offset.
    if CAUSAL:
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    q_end = tl.cdiv(seq_q, BLOCK_M) * BLOCK_M
    mid_lo = tl.minimum(full_lo, q_end)
    mid_hi = tl.maximum(mid_lo, (seq_q // BLOCK_M) * BLOCK_M)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                                  lo, mid_lo, seq_q, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                                  mid_lo, mid_hi, seq_q, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, False)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, offs_n,
                                  mid_hi, q_end, seq_q, offset, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True)

    dk = dk * sm_scale
    _store_tile(dk_base, dk.to(DK.dtype.element_ty), offs_n, offs_d, stride_dkn, seq_k, HEAD_DIM, BLOCK_D)
    _store_tile(dv_base, dv.to(DV.dtype.element_ty), offs_n, offs_d, stride_dvn, seq_k, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# Launch: autotuned configs, fixed configs for the interpreter and for tests

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; BLOCK_M always indexes queries, BLOCK_N keys.
# Hopper's wgmma wants >= 64 rows per warpgroup on the left operand: queries (fwd, dq) or keys (dk/dv).
_CONFIGS: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    # all spill-free for sm_90 with Triton 3.9 (ptxas register report, no local memory)
    "fwd": {
        "small_d": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
        "large_d": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3)],
        "fp32": [(64, 64, 4, 2), (64, 32, 4, 2)],
    },
    "dq": {
        "small_d": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        "large_d": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
        "fp32": [(64, 32, 4, 2), (64, 64, 4, 1)],
    },
    "dkdv": {
        "small_d": [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
        "large_d": [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3)],
        "fp32": [(32, 64, 4, 2), (64, 64, 4, 1)],
    },
}
_ALL_SHAPES = {name: sorted({c for group in lists.values() for c in group}) for name, lists in _CONFIGS.items()}


def _config_group(named_args: dict) -> str:
    if named_args["Q"].dtype == torch.float32:
        return "fp32"
    return "small_d" if named_args["BLOCK_D"] <= 64 else "large_d"


def _make_pruner(name: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        wanted = set(_CONFIGS[name][_config_group({**named_args, **kwargs})])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

    return prune


def _autotuned(kernel, name: str):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _ALL_SHAPES[name]]
    # the dtype of every tensor argument is part of Triton's autotune key already
    # SEQ_BUCKET (unused in the kernels) makes short and long sequences tune separately without
    # retuning for every new length, which generation's varying prompt lengths would trigger.
    return triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"],
                           prune_configs_by={"early_config_prune": _make_pruner(name)})(kernel)


_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}
_TUNED = {name: _autotuned(kernel, name) for name, kernel in _KERNELS.items()}
_INTERPRETED = type(_attn_fwd).__name__ == "InterpretedFunction"  # decided by TRITON_INTERPRET at import
# The interpreter runs one config (autotuning there would only multiply the run time); small blocks
# cross many block edges at small sequence lengths.
_INTERPRETER_CONFIGS = {"fwd": (16, 16, 1, 1), "dq": (16, 16, 1, 1), "dkdv": (16, 16, 1, 1)}
_forced_configs: dict[str, tuple[int, int, int, int]] = dict(_INTERPRETER_CONFIGS) if _INTERPRETED else {}
_autotune = True


def set_autotune(enabled: bool) -> bool:
    """Autotune the block sizes (the default), or run each kernel with the first config of its list, the same in
    every process and every run, so the same inputs give the same bits. Returns the previous setting."""
    global _autotune
    previous, _autotune = _autotune, enabled
    return previous


# (kernel, config group) -> index of the first config of its list that this GPU can run (autotuning off)
_first_fitting: dict[tuple[str, str], int] = {}


def _fixed_config(name: str, args: tuple, meta: dict) -> tuple[int, int, int, int] | None:
    """The config kernel `name` runs with, or None to autotune: forced (interpreter, tests) first, then, when
    autotuning is off, the first of its list that fits this GPU (the same choice in every run on it).
    args[0] is Q in all three kernels."""
    if name in _forced_configs:
        return _forced_configs[name]
    if _autotune:
        return None
    group = _config_group({"Q": args[0], **meta})
    return _CONFIGS[name][group][_first_fitting.get((name, group), 0)]


def _next_fitting(name: str, args: tuple, meta: dict) -> tuple[int, int, int, int] | None:
    """After an out-of-resources launch of the fixed config: the next config of the list (remembered), or None."""
    if name in _forced_configs or _autotune:
        return None
    group = _config_group({"Q": args[0], **meta})
    index = _first_fitting.get((name, group), 0) + 1
    if index >= len(_CONFIGS[name][group]):
        return None
    _first_fitting[(name, group)] = index
    return _CONFIGS[name][group][index]


@contextmanager
def _force_configs(**configs: tuple[int, int, int, int]) -> Iterator[None]:
    """Run given kernels with a fixed (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of autotuning (tests)."""
    global _forced_configs
    saved = _forced_configs
    _forced_configs = {**saved, **configs}
    try:
        yield
    finally:
        _forced_configs = saved


def _launch(name: str, rows: int, num_bh: int, args: tuple, meta: dict) -> None:
    """Launch kernel `name` over num_bh heads times the blocks of `rows` (queries, or keys for dkdv)."""
    block_key = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
    config = _fixed_config(name, args, meta)
    if config is None:
        _TUNED[name][lambda cfg: (triton.cdiv(rows, cfg[block_key]) * num_bh,)](*args, **meta)
        return
    while True:
        block_m, block_n, num_warps, num_stages = config
        block = block_n if name == "dkdv" else block_m
        try:
            _KERNELS[name][(triton.cdiv(rows, block) * num_bh,)](
                *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
            return
        except OutOfResources:  # too much shared memory for this GPU (the lists are sized for Hopper): raised
            config = _next_fitting(name, args, meta)  # before the kernel runs, so the next config starts clean
            if config is None:
                raise


def _contiguous_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seq_bucket(seq: int) -> int:
    """0: up to 512 tokens, 1: up to 2048, 2: longer (the best blocks differ between these)."""
    return 0 if seq <= 512 else 1 if seq <= 2048 else 2


def _meta(head_dim: int, causal: bool, seq: int) -> dict:
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "CAUSAL": causal,
            "SEQ_BUCKET": _seq_bucket(seq)}


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_contiguous_last_dim(t) for t in (q, k, v))
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    args = (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            heads, seq_q, seq_k, sm_scale * LOG2E)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        _launch("fwd", seq_q, batch * heads, args, _meta(head_dim, causal, max(seq_q, seq_k)))
    return o, lse


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v, o = (_contiguous_last_dim(t) for t in (do, q, k, v, o))
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    meta = _meta(head_dim, causal, max(seq_q, seq_k))
    scales = (heads, seq_q, seq_k, sm_scale, sm_scale * LOG2E)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        # the dq kernel writes delta, which the dk/dv kernel reads: this order is required
        _launch("dq", seq_q, batch * heads,
                (q, k, v, o, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                 *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *scales), meta)
        _launch("dkdv", seq_k, batch * heads,
                (q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                 *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *scales), meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd: custom ops with fake kernels and an autograd rule, so torch.compile does not break the graph


@torch.library.custom_op("dist_lm::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, sm_scale)


@torch.library.custom_op("dist_lm::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, causal: bool,
                         sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, sm_scale)


@_flash_attention_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
      sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq_q), dtype=torch.float32)


@_flash_attention_bwd.register_fake
def _(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
      causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal
    ctx.sm_scale = sm_scale


def _backward_rule(ctx, grad_o: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
    # lse is an internal output: it never reaches user code, so grad_lse is always zero or None
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.dist_lm.flash_attention_bwd(grad_o, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


_flash_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, sm_scale: float | None = None
) -> torch.Tensor:
    """Exact softmax attention softmax(q k^T * sm_scale) v with FlashAttention-2 kernels.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim). causal=True lets query i
    see keys j <= i + seq_k - seq_q (aligned to the end of the keys, as with a KV cache). sm_scale
    defaults to 1/sqrt(head_dim). Returns (batch, heads, seq_q, head_dim) in the input dtype.
    Raises ValueError for inputs it cannot handle (see the module docstring).
    """
    if isinstance(q, torch.Tensor) and q.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(q.device.type):
        # mirror SDPA: attention runs in the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = _check_inputs(q, k, v, causal, sm_scale)
    o, _ = torch.ops.dist_lm.flash_attention_fwd(q, k, v, bool(causal), scale)
    return o


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float | None) -> float:
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
        raise UserError(f"flash_attention: sm_scale must be a finite positive float, got {sm_scale!r}")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise UserError("flash_attention: q, k and v must be torch.Tensor")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UserError(f"flash_attention: expected 4-D (batch, heads, seq, head_dim) tensors, got "
                        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise UserError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UserError(f"flash_attention: dtype {q.dtype} is not supported; use bfloat16, float16 or float32 (tf32)")
    if not (q.device == k.device == v.device):
        raise UserError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    batch, heads, seq_q, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise UserError(f"flash_attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                        f"v {tuple(v.shape)}; k and v need q's batch, heads and head_dim (repeat kv heads for GQA)")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise UserError(f"flash_attention: head_dim {head_dim} is not supported; use 1..{MAX_HEAD_DIM}")
    seq_k = k.shape[2]
    if seq_k == 0 and seq_q > 0:
        raise UserError("flash_attention: k and v have no keys (seq_k = 0); softmax over nothing is undefined")
    if causal and seq_q > seq_k:
        raise UserError(f"flash_attention: causal with seq_q {seq_q} > seq_k {seq_k} leaves the first "
                        f"{seq_q - seq_k} query rows without keys; pass causal=False or more keys")
    for name, t in (("q", q), ("k", k), ("v", v)):
        # offsets inside one head are int32 in the kernels; the (batch, head) base offset is int64
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] > _INT32_MAX:
            raise UserError(f"flash_attention: {name} is too long for int32 offsets within a head "
                            f"(seq {t.shape[2]}, stride {t.stride(2)})")
    if _INTERPRETED:
        if q.device.type != "cpu":
            raise UserError(f"flash_attention: with TRITON_INTERPRET=1 the tensors must be on the CPU, got {q.device}")
    elif q.device.type != "cuda":
        raise UserError(f"flash_attention: needs CUDA tensors, got {q.device}; use SDPA elsewhere "
                        "(or TRITON_INTERPRET=1 set before import, for tests)")
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
