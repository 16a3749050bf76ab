"""What the trainer sets up on a DDP model, on gloo processes: the averaging (DDP's own in the trainer, the
benchmarks' parallel.mean_allreduce_hook as the alternative: every rank ends with the mean of the ranks' gradients,
in fp32 and with bf16 on the wire) and the alignment of the compiled graph's pieces with DDP's buckets
(parallel.align_compiled_pieces_with_buckets)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkout_env, ok

WORKER = Path(__file__).with_name("ddp_hook_worker.py")
PIECES_WORKER = Path(__file__).with_name("ddp_pieces_worker.py")
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


@pytest.mark.parametrize(("wire", "processes", "tol"), [("trainer", 2, 1e-6), ("fp32", 2, 1e-6), ("fp32", 3, 1e-6),
                                                       ("bf16", 2, 1e-2)])
def test_ddp_as_set_up_gives_every_rank_the_mean_gradient(tmp_path, wire, processes, tol):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(WORKER), str(tmp_path), wire]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**checkout_env(), "OMP_NUM_THREADS": "1"}))
    result = json.loads((tmp_path / "grads.json").read_text())
    assert result["world"] == processes
    assert result["hooks"] == ([] if wire == "trainer" else ["mean_allreduce_hook"])
    for step, got in enumerate(result["grads"]):
        want = expected_mean(processes, step)
        assert got.keys() == want.keys()
        for name, value in want.items():
            # bf16 on the wire: each rank's gradient rounded to 8 bits of mantissa before the sum.
            torch.testing.assert_close(torch.tensor(got[name]), value, rtol=tol, atol=tol * value.abs().max().item(),
                                       msg=lambda m, name=name, step=step: f"step {step} {name}: {m}")


def test_compiled_pieces_align_with_buckets_so_only_the_last_piece_is_reduced_after_the_backward(tmp_path):
    """A bucket's all-reduce starts when every gradient in it is ready; gradients come out a compiled piece at a
    time. Aligned, the buckets holding the last piece's gradients (the embedding's side, finished last) hold
    nothing else, so what is all-reduced after the backward is that piece. Without the alignment this model's
    tail was 9.51 MiB for a 5.44 MiB last piece (dynamo's first piece 1 MiB-sized, DDP's first bucket 5 MiB)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(PIECES_WORKER),
           str(tmp_path), "5", "1"]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**checkout_env(), "OMP_NUM_THREADS": "1"}))
    result = json.loads((tmp_path / "pieces.json").read_text())
    size = result["bytes"]
    pieces, buckets = result["pieces"], result["buckets"]  # both in backward order: the LM head's side first
    assert len(pieces) >= 3, pieces  # the all-reduces of the first pieces can overlap the backward
    assert sorted(n for p in pieces for n in p) == sorted(size) == sorted(n for b in buckets for n in b)
    assert "lm_head.weight" in pieces[0] and "embed_tokens.weight" in pieces[-1]
    last = set(pieces[-1])
    tail = sum(size[n] for b in buckets if last & set(b) for n in b)
    last_bytes = sum(size[n] for n in last)
    # DDP fills buckets in the order the gradients arrive, which inside a piece need not be the graph's: one
    # small parameter may spill across the boundary (0.06 MiB here; 4.5 of 132 MiB at the 124M shape).
    assert tail <= 1.1 * last_bytes, (tail, last_bytes, buckets)


def test_trainer_ddp_keeps_each_ranks_buffers_without_a_deprecated_argument(tmp_path):
    """The trainer turns DDP's per-forward broadcast of rank 0's buffers off (the RoPE tables are equal on every
    rank; the broadcast would be a collective per step) on the built module, so that DDP's constructor gets no
    `broadcast_buffers`, which torch 2.13 deprecates with a FutureWarning at every launch."""
    worker = Path(__file__).with_name("ddp_buffers_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**checkout_env(), "OMP_NUM_THREADS": "1"}))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["default"]["scale"] == 10.0, result  # DDP's default: rank 0's buffer before the forward
        assert result["stopped"]["scale"] == 10.0 + rank, result  # each rank keeps its own
        assert result["default"]["warnings"] == result["stopped"]["warnings"] == [], result
