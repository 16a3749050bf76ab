"""LM head + cross-entropy in row chunks, gradients computed in the forward: no (N, V) fp32 logits.

The plain path, `F.cross_entropy(lm_head(x).float(), y)`, materialises the logits of the whole batch
twice (compute dtype, then fp32), then softmax and its gradient: at the 124M shape (16k tokens, vocab
32k) that is 1 GiB bf16 + 2 GiB fp32 + 2 GiB fp32 gradient, and five passes over them. Here the N rows
are processed `chunk_size` at a time; each chunk's logits live only inside the loop.

Design decisions:
- Gradients in the forward (the idea of Liger's fused linear cross-entropy and of "cut cross-entropy").
  The loss is the last op of the graph, so its gradient w.r.t. the logits is known in the forward up to
  the scalar grad_output: dlogits = (softmax - onehot(target)) / num_valid. Each chunk computes
  logits -> fp32 logsumexp -> loss -> dlogits -> grad_hidden chunk and the chunk's share of grad_weight,
  and drops its logits. `backward` only multiplies the stored grads by grad_output. No recomputation of
  the logits matmul, so 3 matmuls total, the same as the plain path.
- Precision: the matmuls run in the compute dtype (the autocast dtype when autocast is on for the
  device, else the inputs' dtype); logsumexp, the loss and softmax run in fp32; dlogits is rounded to
  the compute dtype for the two gradient matmuls, as autograd's bf16 matmul backward would be.
  grad_weight is summed over chunks in fp32 (a bf16 running sum would round once per chunk) and returned
  in the weight's dtype, i.e. fp32 for fp32 master weights. The loss is fp32 whatever the inputs.
- Autocast is resolved in the public function (read the autocast state, cast explicitly) and switched
  off inside the Function, so the kernel's precision never depends on autocast's op lists.
- ignore_index rows contribute 0 to the loss and to every gradient; the mean is over valid rows; with no
  valid row the loss is NaN (0/0), as F.cross_entropy's is. The count stays on the device: no host sync.
- torch.compile: dynamo traces the autograd.Function (forward and backward) with the Python chunk loop
  unrolled over the static chunk boundaries, with no graph break (checked with fullgraph=True in
  tests/unit/test_cross_entropy.py), and inductor fuses each chunk's fp32 elementwise tail (upcast,
  logsumexp, exp, one-hot subtract, scale, downcast) into a few kernels around the three matmuls. In
  eager mode on CUDA that tail would be ~6 separate passes over (n, V) fp32, slower than the matmuls
  themselves, so eager CUDA calls run the same tail through a small torch.compile'd helper (compiled
  once per chunk shape: the body chunk and the tail chunk). A Triton kernel for the tail would save
  little over inductor's fused one and need a custom op to stay visible to inductor; not worth it.
- chunk_size: by default the rows that make a chunk's fp32 logits about 2^27 elements (512 MiB; e.g.
  4096 rows at vocab 32000): few enough chunks that the per-chunk fp32 grad_weight accumulation
  (V * d * 8 bytes of traffic each) stays small against the matmuls, while the transient is a fraction
  of the full fp32 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 27  # default budget: rows * vocab of one chunk's fp32 logits


def cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The oracle: full logits hidden @ weight.T, then F.cross_entropy in fp32 (mean over valid rows)."""
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=ignore_index)


def default_chunk_size(num_rows: int, vocab_size: int) -> int:
    """Rows per chunk: ~2^27 logits per chunk, a multiple of 256 rows (matmul-friendly), at most num_rows."""
    rows = max(256, (_CHUNK_ELEMENTS // max(vocab_size, 1)) // 256 * 256)
    return max(1, min(rows, num_rows))


def _chunk_loss_and_dlogits(
    logits: torch.Tensor,  # (n, V) compute dtype
    targets: torch.Tensor,  # (n,) int64
    grad_scale: torch.Tensor,  # () fp32: 1 / num_valid
    ignore_index: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed fp32 loss of the chunk's valid rows and, if asked, dlogits (n, V) in the compute dtype."""
    logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
    valid = targets != ignore_index  # (n,)
    safe_targets = torch.where(valid, targets, 0)  # ignored rows gather column 0, then are masked
    lse = torch.logsumexp(logits32, dim=-1)  # (n,)
    target_logit = logits32.gather(1, safe_targets[:, None]).squeeze(1)  # (n,)
    loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
    if not need_grad:
        return loss_sum, None
    # d(mean loss)/d logits = (softmax - onehot) / num_valid on valid rows, 0 on ignored rows
    row_scale = torch.where(valid, grad_scale, 0.0)[:, None]  # (n, 1)
    onehot = safe_targets[:, None] == torch.arange(logits.shape[1], device=logits.device)[None, :]  # (n, V)
    dlogits = (torch.exp(logits32 - lse[:, None]) - onehot.float()) * row_scale
    return loss_sum, dlogits.to(logits.dtype)


_compiled_chunk = None


def _chunk_fn():
    """The chunk tail to call: traced inline under torch.compile, compiled once for eager CUDA, else eager."""
    global _compiled_chunk
    if torch.compiler.is_compiling():
        return _chunk_loss_and_dlogits
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_dlogits, dynamic=False)
    return _compiled_chunk


class LinearCrossEntropy(torch.autograd.Function):
    """Chunked hidden @ weight.T -> mean CE; grads made in forward, scaled by grad_output in backward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,  # (N, d)
        weight: torch.Tensor,  # (V, d)
        targets: torch.Tensor,  # (N,) int64
        compute_dtype: torch.dtype,
        ignore_index: int,
        chunk_size: int,
        need_grad_hidden: bool,
        need_grad_weight: bool,
        use_compiled_tail: bool,
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            num_rows = hidden.shape[0]
            need_grad = need_grad_hidden or need_grad_weight
            num_valid = (targets != ignore_index).sum().to(torch.promote_types(compute_dtype, torch.float32))
            grad_scale = 1.0 / num_valid.clamp(min=1.0)
            w = weight.to(compute_dtype)  # (V, d): one cast, reused by every chunk
            chunk = _chunk_fn() if use_compiled_tail else _chunk_loss_and_dlogits
            loss_sum = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=hidden.device)
            grad_hidden_chunks = []
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_grad_weight \
                else None
            for start in range(0, num_rows, chunk_size):
                h = hidden[start:start + chunk_size].to(compute_dtype)  # (n, d)
                logits = h @ w.t()  # (n, V) compute dtype
                chunk_loss, dlogits = chunk(logits, targets[start:start + chunk_size], grad_scale, ignore_index,
                                            need_grad)
                loss_sum = loss_sum + chunk_loss
                if need_grad_hidden:
                    grad_hidden_chunks.append(dlogits @ w)  # (n, d)
                if need_grad_weight:
                    grad_weight = grad_weight + (dlogits.t() @ h).to(acc_dtype)  # (V, d) fp32 running sum
            loss = loss_sum / num_valid  # NaN when nothing is valid, as F.cross_entropy
            grad_hidden = None
            if need_grad_hidden:
                grad_hidden = torch.cat(grad_hidden_chunks).to(hidden.dtype) if grad_hidden_chunks \
                    else torch.zeros_like(hidden)
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,  # (N, d) final hidden states (after the last norm)
    weight: torch.Tensor,  # (V, d) LM head weight
    targets: torch.Tensor,  # (N,) int64 target ids, ignore_index = ignored
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets, fp32 scalar, without (N, V) logits.

    Under autocast the matmuls run in the autocast dtype (as nn.Linear's would); otherwise hidden and
    weight must share a dtype. chunk_size=None picks `default_chunk_size(N, V)`.

    >>> h, w, y = torch.randn(5, 4), torch.randn(7, 4), torch.tensor([1, 6, -100, 0, 3])
    >>> bool(torch.allclose(linear_cross_entropy(h, w, y, chunk_size=2), F.cross_entropy(h @ w.T, y)))
    True
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be (N, d) and weight {tuple(weight.shape)} (V, d) "
                         "with the same d; flatten (B, T, d) to (B*T, d) first")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be ({hidden.shape[0]},), one id per hidden row")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None for the default)")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    elif hidden.dtype == weight.dtype:
        compute_dtype = hidden.dtype
    else:
        raise ValueError(f"hidden is {hidden.dtype} and weight {weight.dtype}; cast one, or run under autocast")
    num_rows = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(num_rows, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    use_compiled_tail = hidden.is_cuda and not torch.compiler.is_compiling()
    return LinearCrossEntropy.apply(
        hidden, weight, targets, compute_dtype, ignore_index, max(1, min(chunk, max(num_rows, 1))),
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad, use_compiled_tail,
    )


__all__ = ["LinearCrossEntropy", "cross_entropy_reference", "default_chunk_size", "linear_cross_entropy"]
