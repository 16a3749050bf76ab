"""KV caches for TransformerLM: the growing one (one position for the batch) and the static one (a position per row).

Design decisions:
- The model talks to a cache through three calls (`Cache`): `rope` (the RoPE angles of the new tokens, once per
  forward), `attend` (per layer: store k, v, attend over what is cached) and `advance` (after the last layer).
  So the cache, not the model, decides where each row's tokens sit and which keys a query may see.
- `KVCache` grows per layer on first use, holds one fill position for the whole batch (every row the same
  length), and attends with the model's own backend, queries aligned to the end of the keys. It is the simple
  cache of single-prompt use and of tests (`model(ids[:, :4], cache=c)` then `model(ids[:, 4:], cache=c)`).
- `StaticKVCache` is allocated once: one (B, H, max_len, D) buffer per layer for keys and one for values, separate
  tensors and not slices of one (layers, ...) block. Compiled, a write into a slice of a graph input becomes a
  copy of the whole block (functionalization's select_scatter), once per layer: by count about 18 GB of copies a
  decode step at batch 64 of a 124M model with 320 slots, in line with the 6.5 ms a step an H100 took there
  (2026-12-07). A write into a whole input is done in place: on the CPU, 17.6 -> 1.7 ms a step (batch 8); on
  the H100, 6.5 -> 0.96 ms at batch 64 and 0.75 -> 0.64 ms at batch 1.
  Every row starts at slot 0 and has its own next position `pos` (B,), a
  device tensor: prompts of different lengths are right-padded in the prefill, where causal attention alone
  keeps real tokens from seeing the padding (it only ever comes after them), and RoPE positions are exactly
  those the prompt would have alone; the padding's keys land beyond each row's `pos` and are overwritten by
  its decoded tokens, or masked until then. A row's result therefore does not depend on the batch.
- Prefill (`start_prefill(lengths)`, every row from slot 0): attention over the new keys only, causal, through
  the model's backend (the Triton flash kernel on CUDA under `auto`); then `pos` becomes each row's length.
  Decode: keys are written at each row's `pos` (index_put), and attention runs over the whole buffer with a mask
  `slot <= position` (SDPA), so every decode step has the same shapes and the same buffers: what
  torch.compile and CUDA graphs need. Nothing in a decode forward reads a value back to the host or stores
  a new tensor on the cache; `pos += T` is an in-place update of a buffer whose address never changes.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from dist_lm.errors import UserError
from dist_lm.model.attention import attention


class Cache(Protocol):
    def rope(self, cos: torch.Tensor, sin: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's RoPE tables (seq_len, D) taken at the new tokens' positions: (T, D) or (B, 1, T, D)."""

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """Store k, v (B, H, T, D) of layer `layer_id`; attention of q (B, H, T, D) over the cached keys."""

    def advance(self, num_tokens: int) -> None:
        """Called by the model once per forward, after every layer has stored its keys."""


def _check_window(end: int, table_len: int) -> None:
    if end > table_len:
        raise UserError(f"sequence of {end} tokens exceeds model.seq_len={table_len}; "
                        "crop the input to the last seq_len tokens")


class KVCache:
    """Keys and values of the tokens seen so far, per layer; `pos` is how many positions are filled."""

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.pos = 0
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at positions pos ... pos + T - 1 and return all keys and values so far."""
        end = self.pos + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot store up to position {end}")
        buf_k = self._k[layer_id]
        shape = (*k.shape[:2], self.max_len, k.shape[-1])
        if buf_k is None or buf_k.shape != shape or buf_k.dtype != k.dtype or buf_k.device != k.device:
            self._k[layer_id] = buf_k = k.new_zeros(shape)
            self._v[layer_id] = v.new_zeros(shape)
        buf_v = self._v[layer_id]
        buf_k[:, :, self.pos : end] = k
        buf_v[:, :, self.pos : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]  # (B, H, pos + T, D)

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_window(self.pos + num_tokens, cos.shape[0])
        return cos[self.pos : self.pos + num_tokens], sin[self.pos : self.pos + num_tokens]  # (T, D)

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        k, v = self.update(layer_id, k, v)  # (B, H, pos + T, D)
        return attention(q, k, v, causal=True, backend=backend)  # queries aligned to the end of the keys

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def reset(self) -> None:
        self.pos = 0


class StaticKVCache:
    """Preallocated keys and values (layers, B, H, max_len, D) with a next position per row, `pos` (B,)."""

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch_size, num_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # per layer
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows = torch.arange(batch_size, device=device)  # (B,) row index of the decode writes
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next slot of each row
        self.slots = torch.arange(max_len, device=device)  # (S,) for the decode mask
        self.max_len = max_len
        self._prefill_lengths: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> StaticKVCache:
        """A cache for `model` (a TransformerLM) in the dtype and on the device of its weights."""
        cfg, weight = model.cfg, model.embed_tokens.weight
        return cls(cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.head_dim(), dtype=weight.dtype,
                   device=weight.device)

    def matches(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        k = self.k[0]
        return (k.shape[0], self.max_len, k.dtype, k.device) == (batch_size, max_len, dtype, device)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes (a CUDA graph needs them at fixed addresses)."""
        return [*self.k, *self.v, self.pos, self.slots, self.rows]

    def start_prefill(self, lengths: torch.Tensor) -> None:
        """The next forward holds every row's tokens from slot 0, right-padded; after it row i continues at
        lengths[i] (B,). Earlier contents are forgotten."""
        self._prefill_lengths = lengths

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prefill_lengths is not None:
            _check_window(num_tokens, min(cos.shape[0], self.max_len))
            return cos[:num_tokens], sin[:num_tokens]  # (T, D): every row from position 0
        # The caller keeps pos + T within max_len and seq_len: an index past the table fails on the device.
        positions = self.pos[:, None] + torch.arange(num_tokens, device=self.pos.device)  # (B, T)
        return cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, D)

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        num_tokens = k.shape[-2]
        keys, values = self.k[layer_id], self.v[layer_id]  # (B, H, S, D)
        if self._prefill_lengths is not None:
            keys[:, :, :num_tokens] = k
            values[:, :, :num_tokens] = v
            return attention(q, k, v, causal=True, backend=backend)  # (B, H, T, D); padding comes after
        positions = self.pos[:, None] + torch.arange(num_tokens, device=self.pos.device)  # (B, T)
        # keys[b, :, positions[b, t]] = k[b, :, t], in place on the whole buffer (see the module's docstring)
        index = (self.rows[:, None], slice(None), positions)  # advanced (B, T) dims first: the value is (B, T, H, D)
        keys[index] = k.transpose(1, 2)
        values[index] = v.transpose(1, 2)
        mask = self.slots <= positions[:, None, :, None]  # (B, 1, T, S): a row's own slots up to each query
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, D)

    def advance(self, num_tokens: int) -> None:
        if self._prefill_lengths is not None:
            self.pos.copy_(self._prefill_lengths)
            self._prefill_lengths = None
        else:
            self.pos.add_(num_tokens)  # in place: the buffer a CUDA graph reads stays where it is
