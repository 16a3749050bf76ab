"""FlashAttention kernels on the CPU through the Triton interpreter, against a float64 reference.

Triton decides interpreter-or-compiler when a @triton.jit function is defined (at import), and the
unit and GPU suites may share a process, so the kernel checks run in one subprocess started with
TRITON_INTERPRET=1 (this file doubles as its script). It computes every case once and writes the
errors to JSON; each parametrized test below asserts on its own case. Inputs are fp32 and fp16: the
interpreter's bf16 tl.dot is wrong (triton 3.9 with torch 2.13 CPU), its fp32 and fp16 dots are right.
Validation tests run in-process: they raise before any kernel launches.
"""

import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from dist_lm.kernels.flash_attention import attention_reference, flash_attention

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "float16": 5e-3}  # ||out - ref|| / ||ref|| vs float64; interpreter fp32 is exact fp32

# name: (batch, heads, seq_q, seq_k, head_dim, causal, dtype, forced (BLOCK_M, BLOCK_N) per kernel or None)
CASES: dict[str, tuple] = {
    "seq1_causal": (1, 2, 1, 1, 16, True, "float32", None),
    "seq17_causal": (1, 2, 17, 17, 16, True, "float32", None),
    "seq64_causal_fp16": (2, 3, 64, 64, 32, True, "float16", None),
    "seq130_causal_d64": (1, 2, 130, 130, 64, True, "float32", None),
    "seq130_full_d64_fp16": (1, 2, 130, 130, 64, False, "float16", None),
    "kv_cache_causal": (1, 2, 33, 77, 32, True, "float32", None),
    "decode_causal_fp16": (1, 1, 1, 100, 64, True, "float16", None),
    "q_longer_full": (1, 2, 77, 33, 32, False, "float32", None),
    "padded_d24_causal": (2, 2, 50, 50, 24, True, "float32", None),
    "padded_d40_full_fp16": (1, 2, 45, 45, 40, False, "float16", None),
    "tall_blocks_causal": (1, 2, 70, 70, 32, True, "float32", ((32, 16), (32, 16), (16, 32))),
    "wide_blocks_causal": (1, 2, 70, 90, 32, True, "float16", ((16, 32), (16, 32), (32, 16))),
    "big_blocks_full": (1, 1, 100, 61, 32, False, "float32", ((32, 32), (32, 32), (32, 32))),
    "offset1_causal_fp16": (1, 2, 129, 130, 32, True, "float16", None),
    "one_query_full": (2, 1, 1, 19, 16, False, "float32", None),
}


# ----------------------------------------------------------------------------------------------
# Subprocess worker (runs with TRITON_INTERPRET=1)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, or the absolute norm where ref is exactly zero (dq, dk with one key)."""
    err = (x.double() - ref).norm().item()
    scale = ref.norm().item()
    return err / scale if scale > 0 else err


def _run_case(fa, case: tuple, generator: torch.Generator) -> dict:
    batch, heads, seq_q, seq_k, head_dim, causal, dtype_name, blocks = case
    dtype = getattr(torch, dtype_name)

    def rand(seq: int) -> torch.Tensor:
        return torch.randn(batch, heads, seq, head_dim, generator=generator).to(dtype).requires_grad_()

    q, k, v = rand(seq_q), rand(seq_k), rand(seq_k)
    do = torch.randn(batch, heads, seq_q, head_dim, generator=generator).to(dtype)
    forced = {}
    if blocks is not None:
        forced = {name: (bm, bn, 1, 1) for name, (bm, bn) in zip(("fwd", "dq", "dkdv"), blocks, strict=True)}
    with fa._force_configs(**forced):
        o = flash_attention(q, k, v, causal=causal)
        o.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal)
    ref.backward(do.double())
    grads = (q.grad, k.grad, v.grad)
    return {
        "o": _rel(o, ref), "dq": _rel(q.grad, q64.grad), "dk": _rel(k.grad, k64.grad), "dv": _rel(v.grad, v64.grad),
        "finite": bool(torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)),
        "dtype": str(o.dtype).removeprefix("torch."),
    }


def _run_extras(fa, generator: torch.Generator) -> dict:
    """Checks beyond the accuracy grid: strides, scale, determinism, autocast, torch.compile, opcheck."""
    out = {}

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    # (B, S, H, D) storage viewed as (B, H, S, D), plus a k whose last dim is strided (copied inside)
    q = rand(2, 40, 3, 32).transpose(1, 2).requires_grad_()
    k = rand(2, 3, 32, 40).transpose(2, 3).requires_grad_()
    v = rand(2, 40, 3, 32).transpose(1, 2).requires_grad_()
    o = flash_attention(q, k, v, causal=True, sm_scale=0.3)
    o.backward(torch.ones_like(o))  # an expanded-looking, constant upstream gradient
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, sm_scale=0.3)
    ref.backward(torch.ones_like(ref))
    out["strided_scaled"] = {"o": _rel(o, ref), "dq": _rel(q.grad, q64.grad), "dk": _rel(k.grad, k64.grad),
                             "dv": _rel(v.grad, v64.grad)}

    # no atomics: two backward passes agree bit for bit
    q, k, v = (rand(1, 2, 48, 32).requires_grad_() for _ in range(3))
    do = rand(1, 2, 48, 32)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flash_attention(q, k, v).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    out["deterministic"] = all(torch.equal(a, b) for a, b in zip(*grads, strict=True))

    # autocast: fp32 inputs run in the autocast dtype, like SDPA
    q, k, v = (rand(1, 2, 20, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.float16):
        o = flash_attention(q, k, v)
    ref = attention_reference(*(t.half().double() for t in (q, k, v)))
    out["autocast"] = {"dtype": str(o.dtype).removeprefix("torch."), "o": _rel(o, ref)}

    # torch.compile: fullgraph=True raises on any graph break; aot_eager exercises the fake kernels
    # and the autograd registration without needing a C++ toolchain for Inductor
    torch._dynamo.reset()
    q, k, v = (rand(1, 2, 24, 16).requires_grad_() for _ in range(3))

    def loss_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (flash_attention(q, k, v, causal=True) * 1.5).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    compiled_grads = [t.grad.clone() for t in (q, k, v)]
    q.grad = k.grad = v.grad = None
    eager_loss = loss_fn(q, k, v)
    eager_loss.backward()
    eager_grads = (q.grad, k.grad, v.grad)
    out["compile"] = {"loss": abs(loss.item() - eager_loss.item()) / abs(eager_loss.item()),
                      "grads": max(_rel(a, b.double()) for a, b in zip(compiled_grads, eager_grads, strict=True))}

    # torch.library's own consistency checks of schema, fake kernels and autograd registration
    q, k, v = (rand(1, 1, 9, 16).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.dist_lm.flash_attention_fwd.default, (q, k, v, True, 0.25))
    out["opcheck"] = True
    return out


def _worker(json_path: str) -> None:
    import dist_lm.kernels.flash_attention as fa

    assert fa._INTERPRETED, "worker must run with TRITON_INTERPRET=1"
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs each run
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = _run_case(fa, case, generator)
        except Exception:  # reported per case by the parent test, which fails on it
            results[name] = {"error": traceback.format_exc()}
    try:
        results["extras"] = _run_extras(fa, generator)
    except Exception:
        results["extras"] = {"error": traceback.format_exc()}
    Path(json_path).write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("flash_attention") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=out.parent, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(interpreted: dict, name: str) -> None:
    result = interpreted[name]
    assert "error" not in result, result.get("error")
    assert result["finite"], f"{name}: NaN or inf in the output or gradients"
    tol = TOLERANCE[CASES[name][6]]
    assert result["dtype"] == CASES[name][6]
    for key in ("o", "dq", "dk", "dv"):
        assert result[key] <= tol, f"{name}: {key} relative error {result[key]:.2e} > {tol:.0e}"


def test_strides_and_scale(interpreted: dict) -> None:
    extras = interpreted["extras"]
    assert "error" not in extras, extras.get("error")
    for key, err in extras["strided_scaled"].items():
        assert err <= TOLERANCE["float32"], f"{key}: {err:.2e}"


def test_backward_is_deterministic(interpreted: dict) -> None:
    assert interpreted["extras"]["deterministic"]


def test_autocast_runs_in_autocast_dtype(interpreted: dict) -> None:
    result = interpreted["extras"]["autocast"]
    assert result["dtype"] == "float16"
    assert result["o"] <= TOLERANCE["float16"]


def test_compiles_without_graph_break(interpreted: dict) -> None:
    result = interpreted["extras"]["compile"]
    assert result["loss"] <= 1e-6 and result["grads"] <= 1e-6, result


def test_custom_op_passes_opcheck(interpreted: dict) -> None:
    assert interpreted["extras"]["opcheck"] is True


def test_reference_known_answers() -> None:
    # identical keys: softmax is uniform, so the output is the mean of the visible values
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    v = torch.arange(5, dtype=torch.float64).view(1, 1, 5, 1).expand(1, 1, 5, 4)
    out = attention_reference(q, k, v, causal=True)
    # bottom-right alignment: query i of 3 sees keys 0..i+2
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64))
    out = attention_reference(q, k, v, causal=False)
    torch.testing.assert_close(out[0, 0, :, 0], torch.full((3,), 2.0, dtype=torch.float64))
    assert math.isclose(attention_reference(q, q, q, causal=False, sm_scale=0.0)[0, 0, 0, 0].item(),
                        q[0, 0, :, 0].mean().item())


def _qkv(*shape: int, dtype: torch.dtype = torch.float16, device: str = "cpu") -> list[torch.Tensor]:
    return [torch.randn(*shape).to(dtype=dtype, device=device) for _ in range(3)]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _qkv(1, 2, 8, 16, dtype=torch.float64), "dtype"),
        (lambda: _qkv(2, 8, 16), "4-D"),
        (lambda: _qkv(1, 2, 8, 256), "head_dim"),
        (lambda: [*_qkv(1, 2, 8, 16)[:2], torch.randn(1, 2, 8, 16, dtype=torch.float32)], "dtypes differ"),
        (lambda: [torch.randn(1, 4, 8, 16).half(), *_qkv(1, 2, 8, 16)[1:]], "shapes do not match"),
        (lambda: _qkv(1, 2, 8, 16, device="meta"), "CPU|CUDA"),
        (lambda: [torch.randn(1, 2, 9, 16).half(), *_qkv(1, 2, 8, 16)[1:]], "without keys"),
    ],
    ids=["float64", "3d", "head_dim_256", "mixed_dtypes", "gqa", "meta_device", "causal_q_longer"],
)
def test_refuses_what_it_cannot_handle(make, match: str) -> None:
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, causal=True)


def test_refuses_bad_scale() -> None:
    with pytest.raises(ValueError, match="sm_scale"):
        flash_attention(*_qkv(1, 1, 4, 16), sm_scale=float("nan"))


if __name__ == "__main__":
    _worker(sys.argv[1])
