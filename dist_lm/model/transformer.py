"""Decoder-only Transformer LM: embedding -> pre-norm blocks -> RMSNorm -> untied LM head.

Design decisions:
- Single-device code. Parallelism (activation checkpointing, compile, FSDP) is applied from outside, one
  `TransformerBlock` at a time, through `model.blocks`; a block takes only tensors (and an optional KV
  cache) so it can be checkpointed, compiled and sharded on its own.
- A KV cache is any object with `rope(cos, sin, T)` (the angles of the new tokens' positions), `attend(layer_id,
  q, k, v, backend)` (store k, v and attend over everything cached) and `advance(T)`: the growing
  `generation.KVCache` (one position for the whole batch) and the static `kv_cache.StaticKVCache` (a position
  per row, for batched decoding) both fit, and the path without a cache is untouched.
- Parameter names follow Hugging Face Llama (`q_proj`, `gate_proj`, `input_layernorm`...) and RoPE uses
  the half-split layout (pairs are (x[i], x[i + D/2]), i.e. `rotate_half`), so export to a Llama checkpoint
  is a rename of the outer prefixes with no weight permutation.
- RoPE cos/sin tables are non-persistent buffers, computed in fp32 and applied in fp32: `state_dict()`
  holds exactly the parameters, which is what the safetensors checkpoints store. `init_weights` rebuilds
  them too, so a model created on the meta device and materialised with `to_empty` is complete.
- The loss lives in the model (`model(idx, targets)`), so a fused LM-head + cross-entropy can later
  replace `_loss` without logits (B, T, V) ever being materialised; the loss is always fp32.
- Init: truncated normal (std init_std, cut at +-3 std) for every matrix, with the attention and FFN
  output projections scaled by 1/sqrt(2 * num_layers) (GPT-2: each block adds two residual branches);
  RMSNorm weights 1. Given the same torch.manual_seed (or generator), the weights are identical.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_lm.config import ModelConfig
from dist_lm.errors import UserError
from dist_lm.kernels.cross_entropy import linear_cross_entropy
from dist_lm.model.attention import BACKENDS, attention

if TYPE_CHECKING:
    from dist_lm.model.kv_cache import Cache


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistic computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None):
    """cos, sin tables (seq_len, head_dim) in fp32 for the half-split layout (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): pair i is (i, i + D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; cos/sin are (T, D) already sliced to them."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k; no biases."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id  # index into the KV cache
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim()
        self.backend = cfg.attention_backend
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, d) -> (B, H, T, D)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = attention(q, k, v, causal=True, backend=self.backend)  # (B, H, T, D)
        else:  # the cache stores k, v and attends over every cached position it allows
            y = cache.attend(self.layer_id, q, k, v, self.backend)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), hidden width cfg.ffn_dim(); no biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_dim()
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). The unit of FSDP wrapping and checkpointing."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = CausalSelfAttention(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerLM(nn.Module):
    """The language model. `model(idx)` -> logits (B, T, V); `model(idx, targets)` -> mean CE loss (fp32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.num_heads or cfg.head_dim() % 2:
            raise UserError(
                f"model.d_model={cfg.d_model} must split into num_heads={cfg.num_heads} heads of even width "
                "(RoPE rotates pairs); pick num_heads dividing d_model with an even quotient"
            )
        if cfg.attention_backend not in BACKENDS:
            raise UserError(f"model.attention_backend={cfg.attention_backend!r} is unknown; use one of {BACKENDS}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim(), cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (seq_len, D) fp32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter and the RoPE tables; deterministic given the seed or generator."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim(), cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

        def trunc_normal(w: torch.Tensor, std: float) -> None:
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)

        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.num_layers)
        trunc_normal(self.embed_tokens.weight, std)
        for block in self.blocks:
            attn, mlp = block.self_attn, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                trunc_normal(lin.weight, std)
            trunc_normal(attn.o_proj.weight, out_std)
            trunc_normal(mlp.gate_proj.weight, std)
            trunc_normal(mlp.up_proj.weight, std)
            trunc_normal(mlp.down_proj.weight, out_std)
            block.input_layernorm.reset_parameters()
            block.post_attention_layernorm.reset_parameters()
        self.norm.reset_parameters()
        trunc_normal(self.lm_head.weight, std)

    def num_parameters(self) -> int:
        """Number of parameter elements (the global count, also when parameters are sharded DTensors)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,  # (B, T) int64 token ids
        targets: torch.Tensor | None = None,  # (B, T) int64, -100 = ignored
        *,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in the compute dtype, or the scalar fp32 mean cross-entropy when targets are given.

        With a KV cache, idx holds only the new tokens; the cache knows their positions (`Cache.rope`).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if cache is None:
            if T > self.cfg.seq_len:
                raise UserError(
                    f"sequence of {T} tokens exceeds model.seq_len={self.cfg.seq_len}; "
                    "crop the input to the last seq_len tokens"
                )
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D)
        else:
            cos, sin = cache.rope(self.rope_cos, self.rope_sin, T)  # (T, D) or (B, 1, T, D): per-row positions
        x = self.embed_tokens(idx)  # (B, T, d)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        return self._loss(x, targets)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean CE over non-ignored targets: chunked LM head + CE (cfg.fused_loss), or full logits then CE."""
        if targets.shape != x.shape[:2]:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(x.shape[:2])}")
        if self.cfg.fused_loss:
            # (B*T, d) rows x (V, d) head: logits only ever exist one chunk of rows at a time
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index=-100)
        logits = self.lm_head(x)  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
