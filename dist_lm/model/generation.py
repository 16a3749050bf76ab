"""Autoregressive generation for many prompts at once: a static KV cache, sampling on the device, a compiled decode
step on CUDA.

Design decisions:
- `generate_batch(model, prompts, ...)` takes prompts of any lengths. They are right-padded into one prefill and
  each row keeps its own position (kv_cache.StaticKVCache): a row sees exactly the positions and keys it would
  see alone, so greedy output for a prompt does not depend on the batch, nor on the cache (`use_cache=False`
  recomputes the whole context every token: the oracle the tests compare against). `generate(model, ids)` is
  the one-prompt case.
- Each row stops at its own eos (not returned) or after max_new_tokens. Rows that stopped keep being decoded
  with the rest (the shapes stay static); their tokens are dropped on the host.
- The host reads tokens back only every `sync_every` tokens (one small copy, also the only synchronisation), to
  learn whether every row has stopped and to stream them (`on_tokens`); so a batch decodes up to
  sync_every - 1 tokens past its last eos, a price paid in compute, never in output.
- Sampling runs on the device: temperature, then top-k, then top-p (keep the smallest set of tokens, most likely
  first, whose mass reaches top_p; the most likely token always stays), then one draw by the exponential race
  (argmax of p / E, E ~ Exp(1), is a draw from p) instead of torch.multinomial, which can synchronise on CUDA.
  temperature 0 is greedy. A seeded `generator` makes the draws repeatable for a given batch.
- On CUDA the one-token decode step is compiled once per process (torch.compile, mode="reduce-overhead":
  inductor's fused kernels replayed as a CUDA graph); its cache is kept per model and reused by later calls of
  the same shape, so the graph is recorded once. The prefill stays eager (its length varies) and goes through
  the model's attention backend (the Triton flash kernel under `auto`). On the CPU everything is eager.
- The decode step is compiled for static shapes (dynamic=False): one graph per (batch size, cache length), the
  length rounded up to a multiple of 64. Left to itself, dynamo turns the second batch size it sees into one
  dynamic-shape graph for every later one (TORCH_LOGS=recompiles shows it); static graphs are the ones CUDA graphs
  and inductor's autotuning are best at. (124M on an H100, from tokens/s: 0.64 ms a step at batch 1, 0.96 ms at
  batch 64, prefill included, once the cache's layout stopped copying itself; see kv_cache.py.) Each new shape
  compiles once (about 15 s at 124M), so a server wants few batch sizes; the recompile limit is raised to
  MAX_DECODE_GRAPHS while generate_batch runs, because with fullgraph=True dynamo raises, not falls back, past its
  default of 8.
- The context never exceeds `cfg.seq_len` (RoPE tables and training stop there). A prompt longer than that keeps
  its last seq_len tokens. When a row's context would pass seq_len, it slides: it keeps its last seq_len // 2
  tokens and is prefilled again (the batch is, at that point: one prefill per seq_len // 2 new tokens keeps
  the cost linear, at the price of the model seeing half a window right after a slide).
- Generation is for an unwrapped single-device model (e.g. rank 0 after gathering a full state dict), run
  without autocast: the cache and the logits are in the dtype of the weights.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from dist_lm.errors import UserError
from dist_lm.model.kv_cache import KVCache, StaticKVCache

__all__ = ["KVCache", "cast_for_inference", "filter_logits", "generate", "generate_batch", "sample_next", "sample_text",
           "sample_tokens"]

SYNC_EVERY = 16
"""Tokens decoded between two reads of the new tokens by the host (stop check, streaming)."""


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


def sample_tokens(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row (B,) int64, on the logits' device (argmax when temperature is 0)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)  # (B, V)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # a CPU generator can drive a CUDA model (at a copy per token)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)  # (B, V) ~ Exp(1)
    return torch.argmax(probs / race, dim=-1).to(logits.device)  # a filtered token has p = 0: never wins


def sample_next(
    logits: torch.Tensor,  # (V,)
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id drawn from the logits of one position (argmax when temperature is 0)."""
    return int(sample_tokens(logits[None], temperature, top_k, top_p, generator)[0])


def _check_args(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None) -> None:
    vocab = model.cfg.vocab_size
    for prompt_ids in prompts:
        if len(prompt_ids) == 0:
            raise UserError("the prompt is empty (no token ids); start it with some text, or with the end-of-text id "
                            "for a story from nothing")
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise UserError(f"the prompt holds token id {bad[0]}, outside the model's vocabulary [0, {vocab}); "
                            "encode it with the tokenizer the model was trained with")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1 or None (no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] or None (no nucleus filter)")


# ---------------------------------------------------------------------------------------------------------------
# Decoders: prefill(ids, lengths) -> logits of each row's last token; step(tokens) -> logits of the next position


def _last_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of right-padded rows -> (B, V) at each row's last real token."""
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1]


def _decode_logits(model: nn.Module, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step: tokens (B, 1) at each row's cache.pos -> logits (B, V)."""
    return model(tokens, cache=cache)[:, -1]


_compiled_decode: Callable | None = None
MAX_DECODE_GRAPHS = 64  # compiled decode shapes a process may hold (dynamo's recompile limit while decoding)
# One cache per model for the compiled path: the CUDA graph reads the cache's buffers at fixed addresses, so a
# later call of the same shape reuses both instead of recording a new graph.
_static_caches: weakref.WeakKeyDictionary[nn.Module, StaticKVCache] = weakref.WeakKeyDictionary()


def _compiled_step() -> Callable:
    """_decode_logits compiled once per process (dynamo's cache of it is shared by every call and model)."""
    global _compiled_decode
    if _compiled_decode is None:
        _compiled_decode = torch.compile(_decode_logits, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled_decode


def _graph_cache(model: nn.Module, batch_size: int, max_len: int) -> StaticKVCache:
    weight = model.embed_tokens.weight
    cache = _static_caches.get(model)
    if cache is None or not cache.matches(batch_size, max_len, weight.dtype, weight.device):
        cache = StaticKVCache.for_model(model, batch_size, max_len)
        for buf in cache.buffers():
            torch._dynamo.mark_static_address(buf)  # mutated inside the graph: must never move
        _static_caches[model] = cache
    return cache


class _CachedDecoder:
    """Prefill into a StaticKVCache, then one token per step (compiled on request)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, compiled: bool) -> None:
        self.model, self.compiled = model, compiled
        if compiled:
            self.cache = _graph_cache(model, batch_size, max_len)
        else:
            self.cache = StaticKVCache.for_model(model, batch_size, max_len)

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.cache.start_prefill(lengths)
        return _last_logits(self.model(ids, cache=self.cache), lengths)  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return _decode_logits(self.model, self.cache, tokens[:, None])
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: the graph may reuse them
        return _compiled_step()(self.model, self.cache, tokens[:, None])  # (B, V)


class _UncachedDecoder:
    """The oracle: every step runs the whole context again, no cache."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, compiled: bool) -> None:
        self.model, self.max_len = model, max_len

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.ids = torch.nn.functional.pad(ids, (0, self.max_len - ids.shape[1]))  # (B, max_len)
        self.lengths, self.width = lengths.clone(), ids.shape[1]
        return _last_logits(self.model(ids), lengths)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids.scatter_(1, self.lengths[:, None], tokens[:, None])
        self.lengths += 1
        self.width += 1
        return _last_logits(self.model(self.ids[:, : self.width]), self.lengths)


# ---------------------------------------------------------------------------------------------------------------
# The loop


class _Rows:
    """The host's view: each row's new tokens (eos cut off) and which rows are finished."""

    def __init__(self, num_rows: int, eos_id: int | None, on_tokens: Callable[[list[list[int]]], None] | None):
        self.outputs: list[list[int]] = [[] for _ in range(num_rows)]
        self.stopped = [False] * num_rows
        self.eos_id, self.on_tokens = eos_id, on_tokens

    def take(self, chunk: list[list[int]]) -> bool:
        """Add a chunk (B rows of new token ids); True when every row has stopped."""
        fresh: list[list[int]] = []
        for row, ids in enumerate(chunk):
            new: list[int] = []
            if not self.stopped[row]:
                if self.eos_id is not None and self.eos_id in ids:
                    ids, self.stopped[row] = ids[: ids.index(self.eos_id)], True
                new = list(ids)
                self.outputs[row] += new
            fresh.append(new)
        if self.on_tokens is not None:
            self.on_tokens(fresh)
        return all(self.stopped)


def _pad_right(contexts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T) right-padded with 0, lengths (B,)."""
    width = max(map(len, contexts))
    ids = torch.tensor([c + [0] * (width - len(c)) for c in contexts], dtype=torch.long)
    lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)
    return ids.to(device), lengths.to(device)


def _segment(decoder, contexts: list[list[int]], num_tokens: int, sample: Callable, rows: _Rows,
             sync_every: int, device: torch.device) -> int:
    """Prefill every row's context, then decode up to num_tokens per row; returns the tokens decoded per row."""
    logits = decoder.prefill(*_pad_right(contexts, device))  # (B, V)
    pending: list[torch.Tensor] = []
    for t in range(num_tokens):
        tokens = sample(logits)  # (B,) on the device
        pending.append(tokens)
        last = t + 1 == num_tokens
        if last or len(pending) == sync_every:
            all_stopped = rows.take(torch.stack(pending, dim=1).tolist())  # the host's one read per chunk
            pending = []
            if all_stopped:
                return t + 1
        if not last:
            logits = decoder.step(tokens)
    return num_tokens


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    num_valid_ids: int | None = None,
    use_cache: bool = True,
    compile: bool | None = None,
    sync_every: int = SYNC_EVERY,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt with up to max_new_tokens ids from `model` (a TransformerLM); returns the new ids
    of each prompt, in order, without the eos that stopped it.

    num_valid_ids: sample only ids below it. The model's vocab_size is often padded past the tokenizer's
    (to a multiple of 64, or a round 10,000); the padding ids decode to nothing and must never be drawn.
    compile: compile the decode step (default: on CUDA). on_tokens: called every sync_every tokens with each
    row's new ids (for streaming).
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if sync_every < 1:
        raise ValueError(f"sync_every={sync_every} must be >= 1")
    rows = _Rows(len(prompts), eos_id, on_tokens)
    if max_new_tokens == 0 or not prompts:
        return rows.outputs
    window, device = model.cfg.seq_len, next(model.parameters()).device
    contexts = [[int(t) for t in p][-window:] for p in prompts]
    compiled = device.type == "cuda" if compile is None else compile

    def sample(logits: torch.Tensor) -> torch.Tensor:
        return sample_tokens(logits[:, :num_valid_ids], temperature, top_k, top_p, generator)

    was_training = model.training
    model.eval()
    # room for a compiled graph per decode shape, for this call only (dynamo's default is 8)
    graph_room = torch._dynamo.config.patch(
        recompile_limit=max(torch._dynamo.config.recompile_limit, MAX_DECODE_GRAPHS))
    try:
        with graph_room:
            # slots rounded up to a multiple of 64: calls of nearby lengths share one compiled graph
            max_len = min(window, -(-(max(map(len, contexts)) + max_new_tokens) // 64) * 64)
            decoder = (_CachedDecoder if use_cache else _UncachedDecoder)(model, len(prompts), max_len, compiled)
            remaining = max_new_tokens
            while remaining and not all(rows.stopped):
                # 1) as many tokens as the fullest live row has room for (its last one needs no slot of its own)
                room = min(window - len(c) + 1 for c, done in zip(contexts, rows.stopped) if not done)
                before = [len(o) for o in rows.outputs]
                done = _segment(decoder, contexts, min(remaining, room), sample, rows, sync_every, device)
                remaining -= done
                # 2) contexts grow by what was decoded; a full one slides; a finished row shrinks to one token
                for i, context in enumerate(contexts):
                    context += rows.outputs[i][before[i]:]
                    if rows.stopped[i]:
                        contexts[i] = context[-1:]
                    elif len(context) > window:
                        contexts[i] = context[-max(1, window // 2):]
    finally:
        model.train(was_training)
    return rows.outputs


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    num_valid_ids: int | None = None,
    **kwargs,
) -> list[int]:
    """Continue one prompt: generate_batch of a batch of one (kwargs: use_cache, compile, sync_every,
    on_tokens)."""
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_id=eos_id, generator=generator, num_valid_ids=num_valid_ids, **kwargs)[0]


def cast_for_inference(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the weights of `model` (a TransformerLM) to dtype in place, keeping the RoPE tables in fp32 (a bf16
    angle table would round the positions). Returns the model."""
    cos, sin = model.rope_cos.float(), model.rope_sin.float()
    model.to(dtype)
    model.rope_cos, model.rope_sin = cos, sin  # registered buffers: reassigning keeps them buffers
    return model


def sample_text(model: nn.Module, tokenizer, prompt: str, num_tokens: int, *, seed: int,
                temperature: float = 0.8, top_p: float = 0.95) -> str:
    """Prompt + a seeded sample of up to `num_tokens` from the model, stopping at the tokenizer's end-of-text
    (`tokenizer`: a dist_lm.tokenizer.Tokenizer)."""
    if not prompt:
        raise UserError("the prompt is empty; pass some text to continue, e.g. 'Once upon a time'")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    # eager: a sample in the middle of training is not worth a compilation beside the training step's own
    ids = generate(model, tokenizer.encode(prompt), num_tokens, temperature=temperature, top_p=top_p,
                   eos_id=tokenizer.eot_id, generator=generator, num_valid_ids=tokenizer.vocab_size, compile=False)
    return prompt + tokenizer.decode(ids)
