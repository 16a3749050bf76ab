"""Scaled dot-product attention behind one function, with interchangeable backends.

Design decisions:
- One entry point, `attention(q, k, v, causal=, backend=)`, on (B, H, T, D) tensors, so the model never
  knows which kernel runs. Backends: `sdpa` (PyTorch's fused kernels), `reference` (explicit softmax in
  fp32; the oracle the others are tested against), `triton` (dist_lm.kernels.flash_attention, imported
  only when chosen so CPU installs never need Triton), and `auto`.
- `auto` picks triton for CUDA tensors when it imports, else sdpa, warning once and saying why (CPU
  tensors, or the kernel failed to import), so nobody benchmarks the fallback by mistake. Only the main
  rank warns: every rank falls back alike, and N copies of one line bury the log of an N-process run.
- Causal masking with fewer queries than keys (decoding with a KV cache) aligns the queries to the END of
  the keys: query i sits at key position Tk - Tq + i. SDPA's `is_causal` aligns top-left, so that case
  builds an explicit mask (and needs none when Tq == 1). The Triton kernel aligns the same way itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dist_lm.errors import UserError
from dist_lm.warn import warn_once

BACKENDS = ("auto", "triton", "sdpa", "reference")

def _causal_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where attention is allowed, queries aligned to the end of the keys."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1) absolute positions of the queries
    k_pos = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(D)) v in fp32, cast back to q's dtype: the oracle for the fast paths."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~_causal_mask(t_q, t_k, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.float()).to(q.dtype)  # (B, H, Tq, D)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not causal or t_q == 1:
        # A single query at the end of the keys may see every key: no mask at all.
        return F.scaled_dot_product_attention(q, k, v)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(t_q, t_k, q.device))


def _load_triton():
    """The Triton flash-attention function, or the reason it cannot be used."""
    try:
        from dist_lm.kernels.flash_attention import flash_attention
    except ImportError as exc:  # triton missing, or the kernel module failed to import
        return None, f"{type(exc).__name__}: {exc}"
    return flash_attention, ""


def attention(
    q: torch.Tensor,  # (B, H, Tq, D)
    k: torch.Tensor,  # (B, H, Tk, D), Tk >= Tq
    v: torch.Tensor,  # (B, H, Tk, D)
    *,
    causal: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head attention softmax(q k^T / sqrt(D)) v -> (B, H, Tq, D).

    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> attention(q, k, v, backend="sdpa").shape
    torch.Size([1, 2, 4, 8])
    """
    if backend not in BACKENDS:
        raise UserError(f"attention backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UserError(
            f"attention expects (B, H, T, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-2] < q.shape[-2]:
        raise UserError(
            f"attention got {q.shape[-2]} queries but only {k.shape[-2]} keys; queries must not outnumber keys"
        )
    if backend == "reference":
        return reference_attention(q, k, v, causal)
    if backend == "sdpa":
        return _sdpa(q, k, v, causal)

    # triton or auto; the kernel aligns fewer queries than keys to the end of the keys (KV-cache decoding)
    if backend == "triton":
        if not q.is_cuda:
            raise UserError(f"attention backend='triton' needs CUDA tensors, got device {q.device}; use 'sdpa'")
        fn, why = _load_triton()
        if fn is None:
            raise UserError(f"attention backend='triton' cannot import dist_lm.kernels.flash_attention ({why}); "
                            "install triton or use backend='sdpa'")
        return fn(q, k, v, causal=causal, sm_scale=None)

    # auto
    if not q.is_cuda:
        warn_once(f"attention backend='auto' uses sdpa: the Triton kernel needs CUDA tensors, these are on {q.device}")
        return _sdpa(q, k, v, causal)
    fn, why = _load_triton()
    if fn is None:
        warn_once(f"attention backend='auto' falls back to sdpa on CUDA: the Triton kernel is unavailable ({why})")
        return _sdpa(q, k, v, causal)
    return fn(q, k, v, causal=causal, sm_scale=None)
