"""attention(): sdpa and reference agree, end-aligned causal masking for decoding, backend errors."""

import warnings

import pytest
import torch

from dist_lm import warn
from dist_lm.model import attention, reference_attention


def qkv(t_q: int = 7, t_k: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, t_q, 8, generator=g)  # (B, H, Tq, D)
    k = torch.randn(2, 3, t_k, 8, generator=g)
    v = torch.randn(2, 3, t_k, 8, generator=g)
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_reference(causal):
    q, k, v = qkv()
    out = attention(q, k, v, causal=causal, backend="sdpa")
    ref = attention(q, k, v, causal=causal, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_match_reference():
    grads = []
    for backend in ("sdpa", "reference"):
        q, k, v = (t.requires_grad_() for t in qkv())
        attention(q, k, v, backend=backend).square().sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_is_causal_softmax():
    q, k, v = qkv(t_q=3, t_k=3)
    out = reference_attention(q, k, v, causal=True)
    # The first query sees only the first key, so its output is that key's value.
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


@pytest.mark.parametrize("backend", ["sdpa", "reference", "auto"])
@pytest.mark.parametrize("t_q", [1, 3])
def test_fewer_queries_align_to_the_end_of_the_keys(backend, t_q):
    q, k, v = qkv(t_q=7, t_k=7)
    full = attention(q, k, v, backend="reference")  # (B, H, 7, D)
    tail = attention(q[:, :, -t_q:], k, v, backend=backend)  # queries at key positions 7 - t_q ... 6
    torch.testing.assert_close(tail, full[:, :, -t_q:], atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_is_sdpa_and_says_why_once(monkeypatch):
    monkeypatch.setattr(warn, "_said", set())
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention(q, k, v, backend="auto")
        attention(q, k, v, backend="auto")
    assert [str(w.message) for w in caught] == [
        "attention backend='auto' uses sdpa: the Triton kernel needs CUDA tensors, these are on cpu"]
    torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"))


def test_unknown_backend_lists_the_accepted_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flash.*auto, triton, sdpa, reference"):
        attention(q, k, v, backend="flash")


def test_triton_on_cpu_is_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, k, v, backend="triton")


def test_more_queries_than_keys_is_rejected():
    q, k, v = qkv(t_q=5, t_k=3)
    with pytest.raises(ValueError, match="5 queries"):
        attention(q, k, v)


def test_fallback_warning_is_issued_once(monkeypatch):
    monkeypatch.setattr(warn, "_said", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn.warn_once("triton unavailable")
        warn.warn_once("triton unavailable")
    assert len(caught) == 1 and "triton unavailable" in str(caught[0].message)



@pytest.mark.parametrize(("rank", "warns"), [(None, True), ("0", True), ("1", False)])
def test_fallback_warning_only_on_the_main_rank(monkeypatch, rank, warns):
    # Before the process group exists (or without one), RANK from torchrun/accelerate decides.
    monkeypatch.setattr(warn, "_said", set())
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    q, k, v = qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attention(q, k, v, backend="auto")
        attention(q, k, v, backend="auto")
    assert len(caught) == (1 if warns else 0), [str(w.message) for w in caught]


def test_fallback_warning_follows_the_process_group_rank(monkeypatch, tmp_path):
    # An initialised group is the authority: its rank 0 warns even where RANK says otherwise.
    import torch.distributed as dist

    monkeypatch.setattr(warn, "_said", set())
    monkeypatch.setenv("RANK", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn.warn_once("fallback")
    finally:
        dist.destroy_process_group()
    assert [str(w.message) for w in caught] == ["fallback"]


def test_fallback_warning_does_not_break_the_compiled_graph(monkeypatch):
    # fullgraph=True raises on a graph break; a warning (or a rank query) inside the trace would be one.
    monkeypatch.setattr(warn, "_said", set())
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="auto"), fullgraph=True, backend="eager")
    q, k, v = qkv()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, backend="sdpa"))
