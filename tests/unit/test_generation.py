"""generate() and generate_batch(): the KV cache and the batch change no greedy token, filters give known answers,
eos and the window are honoured per row, seeded sampling repeats and stays inside top-k / top-p."""

import math
from pathlib import Path

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from dist_lm.config import ModelConfig
from dist_lm.errors import UserError
from dist_lm.model import KVCache, TransformerLM, filter_logits, generate, sample_text
from dist_lm.model.generation import _decode_logits, _graph_cache, cast_for_inference, generate_batch, sample_tokens
from dist_lm.model.kv_cache import StaticKVCache
from dist_lm.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "tokenizers" / "tinystories-10k"

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, seq_len=24, d_model=32, num_layers=2, num_heads=4, attention_backend="sdpa")
    return TransformerLM(cfg).eval()


def greedy_without_cache(model: TransformerLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_uncached_greedy(model):
    prompt = [3, 14, 15, 9, 26]
    n = model.cfg.seq_len - len(prompt)  # fills the window exactly, no slide
    assert generate(model, prompt, n, temperature=0) == greedy_without_cache(model, prompt, n)


def test_cached_logits_equal_full_forward(model):
    ids = torch.tensor([[5, 7, 11, 13, 17, 19]])
    cache = KVCache(model.cfg.num_layers, model.cfg.seq_len)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :4], cache=cache), model(ids[:, 4:5], cache=cache), model(ids[:, 5:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 6


def test_generation_past_the_window_slides(model):
    prompt = [1, 2, 3]
    n = 3 * model.cfg.seq_len
    out = generate(model, prompt, n, temperature=0)
    assert len(out) == n and all(0 <= t < model.cfg.vocab_size for t in out)
    in_window = model.cfg.seq_len - len(prompt)
    assert out[:in_window] == greedy_without_cache(model, prompt, in_window)


def test_long_prompt_keeps_its_last_seq_len_tokens(model):
    long_prompt = list(range(40))
    assert generate(model, long_prompt, 3, temperature=0) == generate(model, long_prompt[-24:], 3, temperature=0)


def test_stops_at_eos_without_returning_it(model):
    prompt = [4, 8, 15]
    greedy = greedy_without_cache(model, prompt, 6)
    eos = greedy[3]
    first = greedy.index(eos)
    assert generate(model, prompt, 6, temperature=0, eos_id=eos) == greedy[:first]


def test_seeded_sampling_is_reproducible(model):
    def sample(seed: int) -> list[int]:
        return generate(model, [1, 2], 20, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_training_mode_is_restored(model):
    model.train()
    generate(model, [1], 2, temperature=0)
    assert model.training
    model.eval()


def test_top_k_known_answer():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    expected = torch.tensor([NEG_INF, 5.0, NEG_INF, 4.0, NEG_INF])
    assert torch.equal(filter_logits(logits, top_k=2), expected)
    assert torch.equal(filter_logits(logits, top_k=5), logits)


def test_top_p_known_answer_in_any_order():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    kept = lambda p: (filter_logits(logits, top_p=p) > NEG_INF).tolist()
    assert kept(0.4) == [False, True, False, False]  # the top token alone already has 0.5
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert kept(0.9) == [False, True, True, True]  # 0.5 + 0.3 + 0.15 >= 0.9
    assert kept(1.0) == [True, True, True, True]


def test_top_k_then_top_p_on_a_batch():
    logits = torch.tensor([[0.0, math.log(2), math.log(4), math.log(8)]] * 2)  # probs 1/15, 2/15, 4/15, 8/15
    out = filter_logits(logits, top_k=3, top_p=0.75)
    # after top-k the probs are 2/14, 4/14, 8/14; 8/14 < 0.75 <= 12/14 keeps two
    assert (out > NEG_INF).tolist() == [[False, False, True, True]] * 2


def test_bad_arguments_are_rejected(model):
    # The prompt errors reach users of launch/generate.py: they speak of the prompt, not of an argument name.
    with pytest.raises(UserError, match="^the prompt is empty"):
        generate(model, [], 3)
    with pytest.raises(UserError, match="^the prompt holds token id 61, outside .*\\[0, 61\\)"):
        generate(model, [61], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 3, top_k=0)


def test_cache_overflow_is_an_error():
    cache = KVCache(num_layers=1, max_len=4)
    kv = torch.zeros(1, 2, 3, 8)
    cache.update(0, kv, kv)
    cache.advance(3)
    with pytest.raises(ValueError, match="4 positions"):
        cache.update(0, kv, kv)


def test_sample_text_continues_the_prompt_and_refuses_an_empty_one():
    tokenizer = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    lm = TransformerLM(ModelConfig(vocab_size=7040, seq_len=32, d_model=32, num_layers=1, num_heads=2,
                                   attention_backend="sdpa")).eval()
    text = sample_text(lm, tokenizer, "Once upon a time", 5, seed=0)
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert text == sample_text(lm, tokenizer, "Once upon a time", 5, seed=0)  # seeded: the same story
    with pytest.raises(UserError, match="^the prompt is empty; pass some text"):
        sample_text(lm, tokenizer, "", 5, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Batches: ragged prompts, each row on its own


RAGGED = [[3, 14, 15, 9, 26], [1], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7], [2, 4], [60, 0, 33]]


def test_batched_greedy_equals_one_at_a_time_and_the_uncached_oracle(model):
    n = 30  # past the window for the 12-token prompt: every row slides at its own time
    batched = generate_batch(model, RAGGED, n, temperature=0)
    alone = [greedy_without_cache(model, p, model.cfg.seq_len - len(p)) for p in RAGGED]
    for row, oracle in zip(batched, alone):
        assert row[: len(oracle)] == oracle  # inside the window: the plain forward, token by token
    assert batched == [generate(model, p, n, temperature=0) for p in RAGGED]
    assert batched == generate_batch(model, RAGGED, n, temperature=0, use_cache=False)
    assert batched == generate_batch(model, RAGGED[::-1], n, temperature=0)[::-1]  # the order changes nothing


@pytest.mark.parametrize("sync_every", [1, 4, 64])
def test_each_row_stops_at_its_own_eos(model, sync_every):
    free = generate_batch(model, RAGGED, 20, temperature=0)
    # forced: a token some rows produce (at different steps) and some never do
    eos = next(t for t in free[0][2:] if 2 <= sum(t in row for row in free) < len(free))
    stopped = generate_batch(model, RAGGED, 20, temperature=0, eos_id=eos, sync_every=sync_every)
    assert len({len(out) for out in stopped}) >= 3  # ragged stops, and some row runs to the end
    for row, out in zip(free, stopped):  # every other row stops at its own first eos, or runs to the end
        assert out == (row[: row.index(eos)] if eos in row else row)
        assert eos not in out
    assert stopped == [generate(model, p, 20, temperature=0, eos_id=eos) for p in RAGGED]


def test_streamed_chunks_add_up_to_the_result(model):
    chunks: list[list[list[int]]] = []
    out = generate_batch(model, RAGGED, 10, temperature=0, sync_every=3, on_tokens=chunks.append)
    assert len(chunks) == 4  # 3 + 3 + 3 + 1 tokens: the host reads every 3 tokens and at the end
    assert [sum((c[row] for c in chunks), []) for row in range(len(RAGGED))] == out


def test_static_cache_logits_equal_full_forward_per_row(model):
    ids = torch.tensor([[5, 7, 11, 13, 17, 19], [2, 3, 0, 0, 0, 0]])  # row 1: two tokens, right-padded
    cache = StaticKVCache.for_model(model, batch_size=2, max_len=8)
    with torch.no_grad():
        cache.start_prefill(torch.tensor([6, 2]))
        prefill = model(ids, cache=cache)
        assert cache.pos.tolist() == [6, 2]
        step = model(torch.tensor([[23], [29]]), cache=cache)[:, -1]  # row 0 at position 6, row 1 at 2
        full0, full1 = model(torch.tensor([[5, 7, 11, 13, 17, 19, 23]])), model(torch.tensor([[2, 3, 29]]))
    torch.testing.assert_close(prefill[0], full0[0, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefill[1, :2], full1[0, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, torch.stack([full0[0, -1], full1[0, -1]]), atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [7, 3]


def test_batched_sampling_is_seeded_and_stays_in_top_k(model):
    def sample(seed: int, **kw) -> list[list[int]]:
        return generate_batch(model, RAGGED, 15, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(7) == sample(7) and sample(7) != sample(8)
    # top_k=1 leaves one token: any temperature and seed give the greedy text
    assert sample(7, top_k=1) == generate_batch(model, RAGGED, 15, temperature=0)
    assert sample(7, top_p=1e-6) == generate_batch(model, RAGGED, 15, temperature=0)  # the top token always stays


def test_sample_tokens_draws_only_inside_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3, 0.0]] * 2000))  # (2000, 5); id 4 has p = 0
    top_k = sample_tokens(logits, 1.0, top_k=2, generator=gen)
    assert set(top_k.tolist()) == {1, 3}
    top_p = sample_tokens(logits, 1.0, top_p=0.9, generator=gen)
    assert set(top_p.tolist()) == {1, 2, 3}  # 0.5 + 0.3 + 0.15 >= 0.9
    free = sample_tokens(logits, 1.0, generator=gen)
    assert set(free.tolist()) == {0, 1, 2, 3}
    share = (free == 1).float().mean().item()
    assert abs(share - 0.5) < 0.05  # the exponential race draws from p


def test_num_valid_ids_are_never_drawn(model):
    gen = torch.Generator().manual_seed(0)
    out = generate_batch(model, RAGGED, 15, temperature=5.0, num_valid_ids=10, generator=gen)
    assert all(0 <= t < 10 for row in out for t in row)


def test_cast_for_inference_keeps_rope_in_fp32():
    torch.manual_seed(0)
    lm = cast_for_inference(TransformerLM(ModelConfig(vocab_size=61, seq_len=24, d_model=32, num_layers=1,
                                                      num_heads=4, attention_backend="sdpa")), torch.bfloat16)
    assert lm.embed_tokens.weight.dtype == torch.bfloat16 and lm.rope_cos.dtype == torch.float32
    assert "rope_cos" in dict(lm.named_buffers())
    out = generate_batch(lm, RAGGED[:2], 5, temperature=0)
    assert [len(r) for r in out] == [5, 5]


def test_empty_batch_and_zero_tokens(model):
    assert generate_batch(model, [], 5) == []
    assert generate_batch(model, RAGGED, 0) == [[] for _ in RAGGED]
    with pytest.raises(UserError, match="^the prompt is empty"):
        generate_batch(model, [[1], []], 3)


def test_compiled_decode_keeps_a_graph_per_shape_past_dynamo_recompile_limit(model):
    """The decode step compiles one static graph per (batch, cache length): more shapes than dynamo's recompile
    limit must still decode (with fullgraph=True dynamo raises past it), and give the eager path's tokens."""
    prompts = [[5, 9, 2], [1, 7], [4, 4, 4, 4]]
    with torch._dynamo.config.patch(recompile_limit=1):
        for batch in (1, 2, 3):  # three shapes on a limit of one
            got = generate_batch(model, prompts[:batch], 6, temperature=0, compile=True)
            assert got == generate_batch(model, prompts[:batch], 6, temperature=0, compile=False)
        assert torch._dynamo.config.recompile_limit == 1  # the raised limit was for the call only


class _OutputSizes(CustomGraphPass):
    """An inductor post-grad pass that records the size of every tensor the graph computes."""

    def __init__(self) -> None:
        self.sizes: list[tuple[str, int]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            value = node.meta.get("val")
            if node.op == "call_function" and isinstance(value, torch.Tensor):
                self.sizes.append((str(node.target), value.numel()))

    def uuid(self) -> None:
        return None


def test_compiled_decode_step_writes_each_layer_in_place():
    """The compiled decode step never builds a tensor larger than one layer's cache. When the cache was one
    (layers, ...) block, writing a layer's slice compiled into a copy of the whole block per layer: 6.5 ms a decode
    step at batch 64 on an H100, where one layer's write is a few bytes."""
    cfg = ModelConfig(vocab_size=256, seq_len=1024, d_model=64, num_layers=4, num_heads=4, d_ff=128)
    model = TransformerLM(cfg).eval()
    cache = _graph_cache(model, batch_size=4, max_len=1024)  # the compiled path's cache, as generate_batch builds it
    record = _OutputSizes()
    step = torch.compile(_decode_logits, fullgraph=True, dynamic=False)
    with torch._inductor.config.patch(post_grad_custom_post_pass=record, fx_graph_cache=False), torch.no_grad():
        step(model, cache, torch.zeros(4, 1, dtype=torch.long))
    layer = cache.k[0].numel()  # 4 * 4 * 1024 * 16, larger than every weight of this model
    assert record.sizes, "the pass saw no graph"
    assert max(size for _, size in record.sizes) <= layer, sorted(set(record.sizes), key=lambda s: -s[1])[:4]
    assert cache.pos.tolist() == [1, 1, 1, 1]
