"""TransformerLM: parameter count, causality, backends agree, init, RoPE, loss, and that it can learn."""

import math

import pytest
import torch

from dist_lm.config import ModelConfig
from dist_lm.model import TransformerBlock, TransformerLM, apply_rope, rope_tables
from dist_lm.optim import AdamW, param_groups

V = 97


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(vocab_size=V, seq_len=32, d_model=32, num_layers=2, num_heads=4, attention_backend="sdpa")
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(tiny_cfg(**overrides))


def random_ids(batch: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, t), generator=torch.Generator().manual_seed(seed))


def expected_count(cfg: ModelConfig) -> int:
    d, d_ff, vocab = cfg.d_model, cfg.ffn_dim(), cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * d_ff + 2 * d
    return cfg.num_layers * per_layer + 2 * vocab * d + d


def test_seed_config_has_48_787_968_parameters():
    cfg = ModelConfig(vocab_size=10000, seq_len=256, d_model=512, num_layers=12, num_heads=8)
    with torch.device("meta"):  # shapes only: no 49M-element init on a shared CPU
        model = TransformerLM(cfg)
    assert cfg.ffn_dim() == 1408
    assert model.num_parameters() == expected_count(cfg) == 48_787_968


def test_tiny_parameter_count_and_state_dict_holds_only_parameters():
    model = tiny_model(d_ff=48)
    assert model.num_parameters() == expected_count(model.cfg)
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert all(isinstance(b, TransformerBlock) for b in model.blocks)
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_later_tokens_never_change_earlier_logits(backend):
    model = tiny_model(attention_backend=backend)
    idx = random_ids()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_sdpa_and_reference_models_agree():
    idx = random_ids()
    with torch.no_grad():
        sdpa = tiny_model(attention_backend="sdpa")(idx)
        ref = tiny_model(attention_backend="reference")(idx)
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=1e-5)


def test_logits_shape_and_loss_at_init_is_about_ln_vocab():
    model = tiny_model()
    idx = random_ids(batch=4, t=32)
    logits = model(idx)
    assert logits.shape == (4, 32, V) and logits.dtype == torch.float32
    loss = model(idx, random_ids(batch=4, t=32, seed=2))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(V)) < 0.5


def test_loss_ignores_minus_100_targets():
    model = tiny_model()
    idx, targets = random_ids(), random_ids(seed=3)
    masked = targets.clone()
    masked[:, ::2] = -100
    with torch.no_grad():
        logits = model(idx)
        expected = torch.nn.functional.cross_entropy(logits[:, 1::2].reshape(-1, V), targets[:, 1::2].reshape(-1))
        torch.testing.assert_close(model(idx, masked), expected)


def test_bf16_autocast_gives_bf16_logits_and_fp32_loss():
    model = tiny_model()
    idx = random_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(idx).dtype == torch.bfloat16
        assert model(idx, idx).dtype == torch.float32


def test_same_seed_gives_identical_weights():
    a, b, c = tiny_model(seed=5), tiny_model(seed=5), tiny_model(seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    a.init_weights(torch.Generator().manual_seed(9))
    b.init_weights(torch.Generator().manual_seed(9))
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_init_is_truncated_normal_with_scaled_output_projections():
    model = tiny_model(d_model=64, num_layers=4, num_heads=4, vocab_size=4096)
    std = model.cfg.init_std
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        is_out = name.endswith(("o_proj.weight", "down_proj.weight"))
        target = std / math.sqrt(2 * 4) if is_out else std
        assert p.abs().max() <= 3 * target + 1e-7, name
        assert abs(p.std().item() - target) < 0.15 * target, name  # trunc at 3 std shrinks the std by ~1.3%


def test_meta_device_model_is_completed_by_init_weights():
    cfg = tiny_cfg()
    with torch.device("meta"):
        model = TransformerLM(cfg)
    model.to_empty(device="cpu")  # parameters and the RoPE buffers are now garbage
    model.init_weights(torch.Generator().manual_seed(0))
    reference = tiny_model()
    reference.init_weights(torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(random_ids()), reference(random_ids()))


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    cos, sin = rope_tables(64, head_dim, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum().item()

    for offset in (0, 3, 17):
        assert score(5, 2) == pytest.approx(score(5 + offset, 2 + offset), abs=1e-5)
        assert score(2, 9) == pytest.approx(score(2 + offset, 9 + offset), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    # Rotation keeps the norm, and position 0 is the identity.
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)


def test_too_long_input_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="seq_len=32"):
        model(random_ids(t=33))


def test_a_few_adamw_steps_reduce_the_loss():
    model = tiny_model()
    idx = random_ids(batch=4, t=32)
    targets = torch.roll(idx, -1, dims=1)
    opt = AdamW(param_groups(model, weight_decay=0.1), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(10):
        loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]
