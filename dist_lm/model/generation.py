"""Autoregressive sampling with a KV cache: temperature, top-k, top-p.

Design decisions:
- `KVCache` holds one preallocated (B, H, seq_len, D) key and value buffer per layer, allocated on first
  use in the dtype and device of the keys (so autocast and bf16 models need no special case). The model
  writes new keys at `cache.pos` and advances it once per forward, after all layers.
- The context never exceeds `cfg.seq_len` (RoPE tables and training stop there). When the cache is full,
  generation slides the window: it keeps the last seq_len // 2 tokens, re-prefills them into an empty cache
  and goes on. One prefill per seq_len // 2 new tokens keeps the cost linear, at the price of the model
  seeing half a window right after a slide. A prompt longer than seq_len is cut to its last seq_len tokens.
- `generate` returns only the new ids, without the eos id that stopped it (a caller that needs to know
  compares the length to max_new_tokens). temperature 0 is greedy; otherwise sampling draws from
  `generator` (or the global RNG), so a seeded generator gives the same text.
- Filters follow the usual order: temperature, then top-k, then top-p (keep the smallest set of tokens,
  most likely first, whose probability mass reaches top_p; the most likely token always stays).
- Generation is for an unwrapped single-device model (e.g. rank 0 after gathering a full state dict).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dist_lm.errors import UserError


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

    def advance(self, num_tokens: int) -> None:
        """Called by the model once per forward, after every layer has stored its keys."""
        self.pos += num_tokens

    def reset(self) -> None:
        self.pos = 0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits (..., V) outside the top-k and outside the top-p nucleus.

    >>> filter_logits(torch.tensor([1.0, 3.0, 2.0]), top_k=2)
    tensor([-inf, 3., 2.])
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the nucleus already reached top_p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,  # (V,)
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id drawn from the logits of the last position (argmax when temperature is 0)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)  # a CPU generator can drive a CUDA model
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_args(model: nn.Module, prompt_ids, max_new_tokens, temperature, top_k, top_p) -> None:
    vocab = model.cfg.vocab_size
    if len(prompt_ids) == 0:
        raise UserError("the prompt is empty (no token ids); start it with some text, or with the end-of-text id "
                        "for a story from nothing")
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise UserError(f"the prompt holds token id {bad[0]}, outside the model's vocabulary [0, {vocab}); encode "
                        "it with the tokenizer the model was trained with")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1 or None (no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] or None (no nucleus filter)")


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    num_valid_ids: int | None = None,
) -> list[int]:
    """Continue prompt_ids with up to max_new_tokens ids from `model` (a TransformerLM); returns the new ids.

    num_valid_ids: sample only ids below it. The model's vocab_size is often padded past the tokenizer's
    (to a multiple of 64, or a round 10,000); the padding ids decode to nothing and must never be drawn.
    """
    _check_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p)
    cfg = model.cfg
    device = next(model.parameters()).device
    window = cfg.seq_len
    keep_on_slide = max(1, window // 2)
    context = [int(t) for t in prompt_ids][-window:]
    new_ids: list[int] = []
    if max_new_tokens == 0:
        return new_ids

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(cfg.num_layers, window)

        def step(ids: list[int]) -> torch.Tensor:
            logits = model(torch.tensor([ids], dtype=torch.long, device=device), cache=cache)[0, -1]  # (V,)
            return logits[:num_valid_ids]

        logits = step(context)
        while True:
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None and next_id == eos_id:
                break
            new_ids.append(next_id)
            context.append(next_id)
            if len(new_ids) == max_new_tokens:
                break
            if cache.pos == window:
                cache.reset()
                logits = step(context[-keep_on_slide:])
            else:
                logits = step([next_id])
    finally:
        model.train(was_training)
    return new_ids


def sample_text(model: nn.Module, tokenizer, prompt: str, num_tokens: int, *, seed: int,
                temperature: float = 0.8, top_p: float = 0.95) -> str:
    """Prompt + a seeded sample of up to `num_tokens` from the model, stopping at the tokenizer's end-of-text
    (`tokenizer`: a dist_lm.tokenizer.Tokenizer)."""
    if not prompt:
        raise UserError("the prompt is empty; pass some text to continue, e.g. 'Once upon a time'")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = generate(model, tokenizer.encode(prompt), num_tokens, temperature=temperature, top_p=top_p,
                   eos_id=tokenizer.eot_id, generator=generator, num_valid_ids=tokenizer.vocab_size)
    return prompt + tokenizer.decode(ids)
