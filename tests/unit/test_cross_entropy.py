"""Chunked linear + cross-entropy equals F.cross_entropy on full logits; the model's two loss paths agree;
a compiled training step equals the eager one."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_lm.config import ModelConfig
from dist_lm.kernels.cross_entropy import default_chunk_size, linear_cross_entropy
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, param_groups


def make_inputs(n: int = 53, d: int = 24, vocab: int = 71, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::4] = -100  # every fourth row ignored
    return hidden, weight, targets


def value_and_grads(fn, hidden, weight, targets, grad_output: float = 1.0):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    (loss * grad_output).backward()
    return loss.detach(), h.grad, w.grad


def full_logits(h, w, y):
    return F.cross_entropy(h @ w.t(), y, ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 53, 1000, None])
def test_matches_full_logits_value_and_grads(chunk_size):
    hidden, weight, targets = make_inputs()
    ours = value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=chunk_size),
                           hidden, weight, targets, grad_output=2.5)
    ref = value_and_grads(full_logits, hidden, weight, targets, grad_output=2.5)
    assert ours[0].dtype == torch.float32
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[1][::4].abs().max() == 0  # ignored rows get no gradient
    assert ours[1][1::4].abs().max() > 0


def test_float64_matches_to_rounding():
    hidden, weight, targets = make_inputs(n=29, dtype=torch.float64)
    ours = value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=6), hidden, weight, targets)
    ref = value_and_grads(full_logits, hidden, weight, targets)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_all_ignored_is_nan_with_zero_grads_like_torch():
    hidden, weight, targets = make_inputs(n=9)
    targets[:] = -100
    loss, grad_h, grad_w = value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=4),
                                           hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(full_logits(hidden, weight, targets))
    assert grad_h.abs().max() == 0 and grad_w.abs().max() == 0


def test_no_grad_gives_the_same_loss():
    hidden, weight, targets = make_inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=10)
    torch.testing.assert_close(loss, full_logits(hidden, weight, targets), atol=1e-5, rtol=1e-5)
    assert not loss.requires_grad


def test_autocast_bf16_runs_matmuls_in_bf16_and_returns_fp32_grads():
    hidden, weight, targets = make_inputs(n=64, d=32, vocab=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = value_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_size=24), hidden, weight, targets)
        # the plain path under autocast: bf16 logits, fp32 CE (what the model does with fused_loss=False)
        ref = value_and_grads(lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y), hidden, weight, targets)
    exact = value_and_grads(full_logits, hidden, weight, targets)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-6)  # same bf16 logits, same fp32 CE
    for a, b in zip(ours[1:], ref[1:], strict=True):  # grads: bf16 matmuls, rounded differently
        assert (a - b).norm() / b.norm() < 1e-2
    assert (ours[0] - exact[0]).abs() > 0  # bf16 really was used (not silently fp32)


def test_default_chunk_size():
    assert default_chunk_size(16384, 32000) == 4096
    assert default_chunk_size(100, 32000) == 100
    assert default_chunk_size(10**6, 10**9) == 256


def test_bad_shapes_raise():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="same d"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="autocast"):
        linear_cross_entropy(hidden, weight.double(), targets)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, seq_len=16, d_model=32, num_layers=2, num_heads=4, attention_backend="sdpa")
    return ModelConfig(**{**base, **overrides})


def test_model_loss_fused_equals_full_logits():
    torch.manual_seed(0)
    fused = TransformerLM(tiny_config(fused_loss=True))
    plain = TransformerLM(tiny_config(fused_loss=False))
    plain.load_state_dict(fused.state_dict())
    x = torch.randint(0, 97, (3, 16))
    y = torch.randint(0, 97, (3, 16))
    y[0, :5] = -100
    losses = []
    for model in (fused, plain):
        loss = model(x, y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert fused(x).shape == (3, 16, 97)  # model(idx) still gives logits


def test_compiled_training_step_equals_eager():
    torch.manual_seed(0)
    eager = TransformerLM(tiny_config())
    compiled_raw = copy.deepcopy(eager)
    # fullgraph: the chunked-loss autograd.Function must trace without a graph break
    compiled = torch.compile(compiled_raw, fullgraph=True)
    opts = [AdamW(param_groups(m, 0.1), lr=1e-2, betas=(0.9, 0.95), fused=False) for m in (eager, compiled_raw)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, 97, (4, 16), generator=g)
        y = torch.randint(0, 97, (4, 16), generator=g)
        losses = []
        for model, opt in zip((eager, compiled), opts, strict=True):
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5, losses
    # Adam's m / sqrt(v) turns rounding-level grad differences into up to ~lr-sized ones where a grad is
    # near 0, so the weights are compared at 1% of one step (lr 1e-2), the losses above at 1e-5.
    for a, b in zip(eager.parameters(), compiled_raw.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
