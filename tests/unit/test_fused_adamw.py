"""The Triton multi-tensor AdamW equals the foreach reference, run on the CPU through Triton's interpreter.

Triton decides interpreter-or-compiler when a @triton.jit function is defined (at import), and the unit
and GPU suites may share a process, so the kernel runs happen in one subprocess started with
TRITON_INTERPRET=1 (this file doubles as its script); it writes the measured differences to JSON and the
tests below assert on them. The fallback and validation tests run in-process: no kernel launches there.
"""

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dist_lm.optim import AdamW

REPO_ROOT = Path(__file__).resolve().parents[2]
# Tensor sizes: a multi-tile matrix with a partial last tile, an exact tile, one element, odd shapes.
SHAPES = [(37, 5), (4096,), (3, 4099), (1,), (9000,), (6, 7)]


def make_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def groups(params: list[nn.Parameter]) -> list[dict]:
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def run(fused: bool, steps: int, params: list[nn.Parameter], opt: AdamW | None = None, first: int = 0) -> AdamW:
    opt = opt or AdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    g = torch.Generator().manual_seed(1 + first)
    for step in range(first, first + steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 + step % 7) / 7  # a new lr every step: must not recompile or be baked in
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            # Parameter 4 has no grad every third step: its step count (bias correction) lags behind.
            p.grad = None if (i == 4 and step % 3 == 0) else grad
        opt.step()
    return opt


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------------------------
# Subprocess worker (runs with TRITON_INTERPRET=1)


def _worker(out_path: str) -> None:
    import dist_lm.kernels.fused_adamw as fa

    launches = []
    original = fa.FusedAdamWPlan.step

    def counting_step(self, *args, **kwargs):
        launches.append(self.num_tiles)
        return original(self, *args, **kwargs)

    fa.FusedAdamWPlan.step = counting_step
    results: dict = {}
    start = make_params()
    ours, ref = make_params(), make_params()
    opt = run(True, 50, ours)
    ref_opt = run(False, 50, ref)
    results["launches"] = len(launches)
    results["param_diff"] = _max_diff(ours, ref)
    results["moved"] = min((p - s).abs().max().item() for p, s in zip(ours, start, strict=True))
    states = [opt.state[p] for p in ours]
    ref_states = [ref_opt.state[p] for p in ref]
    results["exp_avg_diff"] = _max_diff([s["exp_avg"] for s in states], [s["exp_avg"] for s in ref_states])
    results["exp_avg_sq_diff"] = _max_diff([s["exp_avg_sq"] for s in states], [s["exp_avg_sq"] for s in ref_states])
    results["steps"] = [s["step"].item() for s in states]
    results["ref_steps"] = [s["step"].item() for s in ref_states]
    results["state_keys"] = sorted({k for s in states for k in s})

    # state_dict round trip into a fresh fused optimizer continues exactly like the uninterrupted one
    resumed = make_params()
    for p, q in zip(resumed, ours, strict=True):
        p.data.copy_(q.data)
    opt2 = AdamW(groups(resumed), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    # deepcopy, as a checkpoint on disk is: torch's load_state_dict shares the 'step' tensors it is given
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(True, 5, resumed, opt2, first=50)
    run(True, 5, ours, opt, first=50)
    results["resume_diff"] = _max_diff(resumed, ours)
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fused_adamw") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_fused_kernel_ran_for_every_bucket(interpreted):
    # 50 steps x 2 groups, plus an extra launch on the steps where param 4's lagging count splits its group
    assert interpreted["launches"] >= 100


def test_fused_equals_reference_over_50_steps(interpreted):
    assert interpreted["moved"] > 1e-2  # the steps did move every tensor
    assert interpreted["param_diff"] < 1e-6
    assert interpreted["exp_avg_diff"] < 1e-6
    assert interpreted["exp_avg_sq_diff"] < 1e-6


def test_fused_state_layout_and_step_counts(interpreted):
    assert interpreted["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert interpreted["steps"] == interpreted["ref_steps"]
    assert interpreted["steps"][4] == 33  # skipped on the 17 steps divisible by 3


def test_fused_state_dict_round_trip(interpreted):
    assert interpreted["resume_diff"] == 0.0


# ----------------------------------------------------------------------------------------------
# In-process: fallbacks (no kernel runs)


def test_fused_true_on_cpu_warns_and_matches_foreach():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("run the unit suite without TRITON_INTERPRET: this test checks the CPU fallback")
    ours, ref = make_params(), make_params()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(True, 3, ours)
    assert any("foreach path" in str(w.message) and "CUDA" in str(w.message) for w in caught)
    run(False, 3, ref)
    assert _max_diff(ours, ref) == 0.0


def test_fused_auto_falls_back_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(None, 2, make_params())


def test_supported_reasons():
    from dist_lm.kernels.fused_adamw import fused_adamw_supported

    assert fused_adamw_supported([torch.zeros(8), torch.zeros(3, 3)]) == ""
    assert "fp32" in fused_adamw_supported([torch.zeros(8, dtype=torch.bfloat16)])
    assert "contiguous" in fused_adamw_supported([torch.zeros(4, 4).t()])
    assert "aligned" in fused_adamw_supported([torch.zeros(8)[1:]])


if __name__ == "__main__":
    _worker(sys.argv[1])
