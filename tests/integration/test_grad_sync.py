"""dist_lm.parallel.grad_sync on gloo processes: after a synchronised backward every rank holds the mean over ranks of
its accumulated gradients, computed where the backward left them (launched in groups as they arrive), with rank
0's weights; the same through a graph compiled in pieces (split_compile), whose pieces are what lets the groups
start before the backward ends."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkout_env, ok

WORKER = Path(__file__).with_name("grad_sync_worker.py")
sys.path.insert(0, str(WORKER.parent))
import grad_sync_worker  # noqa: E402


def expected_mean(world: int, mixed: bool = False) -> dict[str, torch.Tensor]:
    """Rank 0's weights; each rank's two micro-steps accumulated; the mean over ranks. One process, no collectives."""
    total: dict[str, torch.Tensor] = {}
    for rank in range(world):
        module = grad_sync_worker.model(seed=0, mixed=mixed)
        for micro_step in range(2):
            module(grad_sync_worker.batch(rank, micro_step)).square().sum().backward()
        for name, p in module.named_parameters():
            total[name] = total.get(name, 0) + p.grad / world
    return total


@pytest.mark.parametrize(("how", "processes", "sparse", "mixed"),
                         [("eager", 2, False, False), ("eager", 3, True, False), ("eager", 2, False, True),
                          ("split", 2, False, False), ("split", 2, True, False)])
def test_every_rank_ends_with_the_mean_of_the_accumulated_gradients(tmp_path, how, processes, sparse, mixed):
    """mixed: the last layer in float64, so that a group's gradients are of two dtypes (on gloo the averager sends
    one flat tensor per dtype): its 408 bytes of gradients come first in the backward and cannot fill a group of
    BUCKET_MB alone, so the first group also holds a float32 16x16 weight's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(WORKER), str(tmp_path), how, *(["sparse"] if sparse else []), *(["mixed"] if mixed else [])]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**checkout_env(), "OMP_NUM_THREADS": "1"}))
    want = expected_mean(processes, mixed)
    reference = grad_sync_worker.model(seed=0, mixed=mixed)
    for rank in range(processes):  # every rank, not only rank 0 (a reduce to rank 0 would pass there)
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == processes
        for name, p in reference.named_parameters():  # rank 0's initial weights reached every rank
            torch.testing.assert_close(torch.tensor(result["weights"][name], dtype=p.dtype), p.detach(), rtol=0, atol=0)
        assert result["grads"].keys() == want.keys()
        for name, value in want.items():
            got = torch.tensor(result["grads"][name], dtype=value.dtype)
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
        # more than one all-reduce, every parameter in exactly one
        assert len(result["launched"]) >= 3 and sum(result["launched"]) == 11, result["launched"]
        # sparse: only the embedding rows some rank looked up in either micro-step went on the wire (the others
        # are zero everywhere, and the comparison above checks they stayed zero)
        seen = {int(i) for r in range(processes) for m in range(2) for i in grad_sync_worker.batch(r, m).flatten()}
        assert result["embedding_rows"] == (len(seen) if sparse else None), (result["embedding_rows"], len(seen))
        if how == "split":
            pieces = result["pieces"]
            assert len(pieces) >= 3, pieces  # the compiled graph was cut, as under DDP
            assert sorted(n for piece in pieces for n in piece) == sorted(want)
            # one all-reduce per piece, each started inside the backward, as soon as its piece's part ended
            assert result["started_in_backward"] == result["launched"], result
            assert sorted(result["launched"]) == sorted(len(p) for p in pieces), (result["launched"], pieces)


def test_a_parameter_without_gradient_is_named_not_silently_left_local():
    import torch.distributed as dist

    from dist_lm.parallel.grad_sync import GradientAverager

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        averager = GradientAverager([*used.parameters(), *unused.parameters()])
        averager.enabled = True
        used(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="2 parameter\\(s\\) got no gradient"):
            averager.wait()
        # the failed step leaves nothing behind: the next synchronised step (every parameter used) goes through
        # and every gradient is the mean (one rank: its own), not refused as a second gradient of the first step
        for module in (used, unused):
            module.zero_grad(set_to_none=True)
        x = torch.randn(2, 4)
        averager.enabled = True
        (used(x) + unused(x)).sum().backward()
        averager.wait()
        assert averager.launched == [4]
        torch.testing.assert_close(unused.weight.grad, torch.ones(4, 1) * x.sum(0))
    finally:
        dist.destroy_process_group()


def test_embedding_rows_go_sparse_until_most_rows_are_seen_and_a_missing_note_is_an_error():
    import torch.distributed as dist

    from dist_lm.parallel.grad_sync import GradientAverager

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        embed = torch.nn.Embedding(20, 3)
        averager = GradientAverager(embed.parameters(), token_embedding=embed.weight)

        def step(ids: torch.Tensor, note: bool = True) -> None:
            averager.enabled = True
            if note:
                averager.note_tokens(ids)
            embed(ids).square().sum().backward()
            averager.wait()

        step(torch.tensor([[1, 5, 5, 7]]))
        assert averager.embedding_rows == 3  # rows 1, 5, 7 went; the others are zero
        want = torch.zeros(20, 3)
        for i, n in ((1, 1), (5, 2), (7, 1)):
            want[i] = 2 * n * embed.weight[i].detach()
        torch.testing.assert_close(embed.weight.grad, want)
        embed.weight.grad = None
        step(torch.arange(19).view(1, -1))  # 19 of 20 rows: more than DENSE_FRACTION, the whole gradient goes
        assert averager.embedding_rows is None
        embed.weight.grad = None
        with pytest.raises(RuntimeError, match="note_tokens was not called"):
            step(torch.tensor([[2]]), note=False)
    finally:
        dist.destroy_process_group()
