"""The trainer's DDP communication hook (parallel.mean_allreduce_hook) on gloo processes: the gradients every
rank ends with are the mean of the ranks' own gradients, in fp32 and with bf16 on the wire."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkout_env, ok

WORKER = Path(__file__).with_name("ddp_hook_worker.py")
sys.path.insert(0, str(WORKER.parent))
import ddp_hook_worker  # noqa: E402


def expected_mean(world: int, step: int) -> dict[str, torch.Tensor]:
    """The mean over ranks of each rank's gradient, computed in one process without DDP."""
    grads = []
    for rank in range(world):
        module = ddp_hook_worker.model()
        module(ddp_hook_worker.batch(rank, step)).square().sum().backward()
        grads.append({name: p.grad for name, p in module.named_parameters()})
    return {name: sum(g[name] for g in grads) / world for name in grads[0]}


@pytest.mark.parametrize(("wire", "processes", "tol"), [("fp32", 2, 1e-6), ("fp32", 3, 1e-6), ("bf16", 2, 1e-2)])
def test_mean_allreduce_hook_gives_every_rank_the_mean_gradient(tmp_path, wire, processes, tol):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(WORKER), str(tmp_path), wire]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**checkout_env(), "OMP_NUM_THREADS": "1"}))
    result = json.loads((tmp_path / "grads.json").read_text())
    assert result["world"] == processes
    for step, got in enumerate(result["grads"]):
        want = expected_mean(processes, step)
        assert got.keys() == want.keys()
        for name, value in want.items():
            # bf16 on the wire: each rank's gradient rounded to 8 bits of mantissa before the sum.
            torch.testing.assert_close(torch.tensor(got[name]), value, rtol=tol, atol=tol * value.abs().max().item(),
                                       msg=lambda m, name=name, step=step: f"step {step} {name}: {m}")
