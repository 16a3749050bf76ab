"""Generation on CUDA: the compiled decode step (torch.compile reduce-overhead, CUDA graphs) and the Triton prefill
give the eager CPU-style path's greedy tokens; batched equals one at a time; seeded sampling repeats."""

import pytest
import torch

from dist_lm.config import ModelConfig
from dist_lm.model import TransformerLM
from dist_lm.model.generation import generate_batch

PROMPTS = [[5, 9, 2, 7, 11, 3, 8], [1], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], [2, 6]]


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, seq_len=96, d_model=128, num_layers=3, num_heads=4, attention_backend="auto")
    return TransformerLM(cfg).cuda().eval()


@pytest.fixture(autouse=True)
def no_tf32():
    # fp32 weights, TF32 off: the compiled kernels and the eager ones agree to rounding, so argmax is stable
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_compiled_greedy_equals_eager_greedy(model):
    eager = generate_batch(model, PROMPTS, 40, temperature=0, compile=False)
    compiled = generate_batch(model, PROMPTS, 40, temperature=0, compile=True)
    again = generate_batch(model, PROMPTS, 40, temperature=0, compile=True)  # the recorded graph, replayed
    uncached = generate_batch(model, PROMPTS, 40, temperature=0, use_cache=False)
    assert compiled == eager == again == uncached
    alone = [generate_batch(model, [p], 40, temperature=0, compile=True)[0] for p in PROMPTS]
    assert alone == eager


def test_compiled_path_stops_rows_at_eos_and_slides_past_the_window(model):
    free = generate_batch(model, PROMPTS, 30, temperature=0, compile=False)
    eos = free[0][5]
    stopped = generate_batch(model, PROMPTS, 30, temperature=0, eos_id=eos, compile=True)
    for row, out in zip(free, stopped):
        assert out == (row[: row.index(eos)] if eos in row else row)
    long = generate_batch(model, PROMPTS[:2], 3 * model.cfg.seq_len, temperature=0, compile=True)
    assert long == generate_batch(model, PROMPTS[:2], 3 * model.cfg.seq_len, temperature=0, compile=False)


def test_bf16_compiled_runs_and_seeded_sampling_repeats(model):
    lm = TransformerLM(model.cfg).cuda().eval()
    lm.load_state_dict(model.state_dict())
    lm.to(torch.bfloat16)

    def draw(seed: int) -> list[list[int]]:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return generate_batch(lm, PROMPTS, 24, temperature=1.0, top_k=50, top_p=0.9, generator=gen)

    assert draw(3) == draw(3) and draw(3) != draw(4)
    greedy = generate_batch(lm, PROMPTS, 24, temperature=0)
    assert all(len(row) == 24 for row in greedy)
