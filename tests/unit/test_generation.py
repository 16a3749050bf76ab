"""generate(): the KV cache changes nothing, filters give known answers, eos and the window are honoured."""

import math
from pathlib import Path

import pytest
import torch

from dist_lm.config import ModelConfig
from dist_lm.errors import UserError
from dist_lm.model import KVCache, TransformerLM, filter_logits, generate, sample_text
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
