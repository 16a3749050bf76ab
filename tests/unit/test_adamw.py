"""AdamW equals torch.optim.AdamW, its state round-trips, param_groups split right; clip_grad_norm equals torch's."""

import copy

import pytest
import torch
import torch.nn as nn

from dist_lm.config import ModelConfig
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, clip_grad_norm, param_groups


def make_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (4,), (3, 5, 2), (6,)]
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def groups(params: list[nn.Parameter]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def run(opt_cls, steps: int, params: list[nn.Parameter], opt=None) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    opt = opt or opt_cls(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 + step % 7) / 7  # the trainer's schedule changes lr every step
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            # The last parameter gets no gradient on every third step: its own step count lags behind.
            p.grad = None if (i == 3 and step % 3 == 0) else grad
        opt.step()
    return params, opt


def test_matches_torch_adamw_over_100_steps():
    ours, _ = run(AdamW, 100, make_params())
    theirs, _ = run(lambda *a, **k: torch.optim.AdamW(*a, **k, foreach=False), 100, make_params())
    for a, b, start in zip(ours, theirs, make_params(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert (a - start).abs().max() > 1e-2  # the steps did move the weights


def test_state_has_torch_keys_and_only_tensors_and_numbers():
    params, opt = run(AdamW, 5, make_params())
    sd = opt.state_dict()
    for state in sd["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert sd["state"][3]["step"].item() == 3  # skipped on steps 0 and 3
    for group in sd["param_groups"]:
        for key, value in group.items():
            flat = value if isinstance(value, (list, tuple)) else [value]
            assert all(isinstance(v, (int, float)) for v in flat), key


def test_state_dict_round_trip_continues_identically():
    params, opt = run(AdamW, 10, make_params())
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = AdamW(groups(twin), lr=1.0)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(AdamW, 10, params, opt)
    run(AdamW, 10, twin, twin_opt)
    for a, b in zip(params, twin, strict=True):
        assert torch.equal(a, b)


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="betas"):
        AdamW(make_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        AdamW(make_params(), eps=0)


def test_param_groups_decay_matrices_but_not_norms_or_embedding():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=50, seq_len=8, d_model=16, num_layers=2, num_heads=2))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert ids(decay).isdisjoint(ids(no_decay))
    assert ids(decay) | ids(no_decay) == set(names)
    assert {names[i] for i in ids(no_decay)} == {
        n for n in names.values() if n.endswith("layernorm.weight") or n in ("norm.weight", "embed_tokens.weight")
    }
    assert id(model.lm_head.weight) in ids(decay)


def grads_pair(scale: float, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    ours = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(5, 3), (7,), (2, 2, 2)]]
    theirs = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(5, 3), (7,), (2, 2, 2)]]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = (scale * torch.randn(a.shape, generator=g)).to(dtype)
        b.grad = a.grad.clone()
    return ours, theirs


@pytest.mark.parametrize("scale", [10.0, 0.01])  # above and below max_norm
def test_clip_grad_norm_matches_torch(scale):
    ours, theirs = grads_pair(scale)
    norm = clip_grad_norm(ours, max_norm=1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_clip_grad_norm_of_bf16_grads_is_fp32_and_zero_only_measures():
    ours, _ = grads_pair(10.0, dtype=torch.bfloat16)
    before = [p.grad.clone() for p in ours]
    norm = clip_grad_norm(ours, max_norm=0)
    assert norm.dtype == torch.float32
    expected = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in before]))
    torch.testing.assert_close(norm, expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, before, strict=True))
    clip_grad_norm(ours, max_norm=1.0)
    assert ours[0].grad.dtype == torch.bfloat16
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in ours]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-2)
