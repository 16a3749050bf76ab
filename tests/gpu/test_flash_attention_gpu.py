"""Triton FlashAttention on the GPU against float64, SDPA and the model's sdpa backend.

DIST_LM_GPU_FAST=1 trims the matrix (bf16, head_dim 64/128, lengths 1/257/2048) to run in a couple of
minutes; the full matrix (bf16+fp16, head_dim 32/64/128, lengths up to 16k) takes several. The matrix
runs with the first config of each autotune list (forced) so it compiles a few kernels instead of
autotuning every key; test_every_autotune_config_is_exact covers the configs the autotuner may pick.
"""

import os

import pytest
import torch

import dist_lm.kernels.flash_attention as fa
from dist_lm.kernels.flash_attention import attention_reference, flash_attention

FAST = os.environ.get("DIST_LM_GPU_FAST") == "1"
DTYPES = [torch.bfloat16] if FAST else [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128] if FAST else [32, 64, 128]
LENGTHS = [1, 257, 2048] if FAST else [1, 100, 256, 1000, 4096, 16384]
OUT_TOL, GRAD_TOL = 1e-2, 2e-2  # ||x - ref|| / ||ref|| against float64, for bf16 (fp16 lands lower)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    err = (x.double() - ref).norm().item()
    scale = ref.norm().item()
    return err / scale if scale > 0 else err


def _poison_allocator(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
    """Leave NaN-filled blocks of the output sizes in the caching allocator: an unwritten output shows as NaN."""
    blocks = [torch.full(s, float("nan"), dtype=dt, device="cuda") for s in shapes for dt in (dtype, torch.float32)]
    del blocks


def _first_configs(head_dim: int) -> dict:
    group = "small_d" if max(16, head_dim) <= 64 else "large_d"
    return {name: fa._CONFIGS[name][group][0] for name in ("fwd", "dq", "dkdv")}


def _check(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool, dtype: torch.dtype,
           forced: dict | None = None) -> dict:
    def rand(seq: int) -> torch.Tensor:
        return torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype).requires_grad_()

    q, k, v = rand(seq_q), rand(seq_k), rand(seq_k)  # fresh inputs every call
    do = torch.randn(batch, heads, seq_q, head_dim, device="cuda", dtype=dtype)
    _poison_allocator([tuple(q.shape), tuple(k.shape), (batch, heads, seq_q)], dtype)
    with fa._force_configs(**(forced or {})):
        o = flash_attention(q, k, v, causal=causal)
        o.backward(do)
    torch.cuda.synchronize()
    grads = (q.grad, k.grad, v.grad)
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads), "NaN/inf: unwritten or overflow"
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal)
    ref.backward(do.double())
    return {"o": _rel(o, ref), "dq": _rel(q.grad, q64.grad), "dk": _rel(k.grad, k64.grad),
            "dv": _rel(v.grad, v64.grad)}


def _assert_close(errs: dict) -> None:
    assert errs["o"] <= OUT_TOL, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= GRAD_TOL, errs


@pytest.mark.parametrize("seq", LENGTHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_float64(dtype: torch.dtype, head_dim: int, causal: bool, seq: int) -> None:
    batch, heads = (1, 1) if seq > 4096 else (1, 2) if seq > 1024 else (2, 3)
    errs = _check(batch, heads, seq, seq, head_dim, causal, dtype, _first_configs(head_dim))
    print(f"{dtype} d={head_dim} causal={causal} seq={seq}: {errs}")
    _assert_close(errs)


@pytest.mark.parametrize("seq_q, seq_k, causal", [(1, 4096, True), (100, 300, True), (300, 100, False),
                                                   (77, 1000, True)])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_uneven_lengths_and_padded_head_dim(seq_q: int, seq_k: int, causal: bool, head_dim: int) -> None:
    _assert_close(_check(2, 2, seq_q, seq_k, head_dim, causal, torch.bfloat16, _first_configs(head_dim)))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_autotune_config_is_exact(head_dim: int) -> None:
    group = "small_d" if head_dim <= 64 else "large_d"
    lists = {name: fa._CONFIGS[name][group] for name in ("fwd", "dq", "dkdv")}
    for i in range(max(len(c) for c in lists.values())):
        forced = {name: configs[i % len(configs)] for name, configs in lists.items()}
        for causal in (True, False):
            errs = _check(2, 2, 1000, 1000, head_dim, causal, torch.bfloat16, forced)
            assert errs["o"] <= OUT_TOL and max(errs["dq"], errs["dk"], errs["dv"]) <= GRAD_TOL, (forced, errs)


@pytest.mark.skipif(FAST, reason="fast mode: the benchmark exercises autotuning")
def test_autotuned_path() -> None:
    _assert_close(_check(2, 4, 1024, 1024, 64, True, torch.bfloat16))


def test_fp32_runs_as_tf32() -> None:
    errs = _check(1, 2, 300, 300, 64, True, torch.float32, {"fwd": (64, 64, 4, 2), "dq": (64, 32, 4, 2),
                                                            "dkdv": (32, 64, 4, 2)})
    assert max(errs.values()) <= 2e-3, errs  # tf32 dots: ~3e-4 expected


def test_backward_is_deterministic() -> None:
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    runs = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flash_attention(q, k, v).backward(do)
        runs.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_torch_compile_fullgraph_and_autocast() -> None:
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", requires_grad=True) for _ in range(3))  # fp32 leaves

    def loss_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = flash_attention(q, k, v, causal=True)
        assert o.dtype == torch.bfloat16
        return o.float().square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True)  # raises on a graph break
    loss = compiled(q, k, v)
    loss.backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q.grad = k.grad = v.grad = None
    eager = loss_fn(q, k, v)
    eager.backward()
    assert abs(loss.item() - eager.item()) <= 1e-3 * abs(eager.item())
    for a, b in zip(got, (q.grad, k.grad, v.grad), strict=True):
        assert _rel(a, b.double()) <= 1e-3


def test_model_loss_matches_sdpa_backend() -> None:
    from dist_lm.config import ModelConfig
    from dist_lm.model import TransformerLM

    losses = {}
    state = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 512, (8, 257), device="cuda", generator=gen) for _ in range(5)]
    for backend in ("sdpa", "triton"):
        cfg = ModelConfig(vocab_size=512, seq_len=256, d_model=256, num_layers=2, num_heads=4,
                          attention_backend=backend)
        model = TransformerLM(cfg).cuda()
        if state is None:
            state = {k: t.clone() for k, t in model.state_dict().items()}
        model.load_state_dict(state)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[backend] = []
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[backend].append(loss.item())
    print(losses)
    for a, b in zip(losses["sdpa"], losses["triton"], strict=True):
        assert abs(a - b) <= 0.02 + 5e-3 * abs(a), losses  # bf16 noise: kernels round differently
