"""One rank of the gradient-averager test (tests/integration/test_grad_sync.py), started by torchrun over gloo.

usage: torchrun --nproc_per_node N grad_sync_worker.py OUT_DIR {eager,split}

Each rank starts from its own random weights (rank 0's are broadcast), then runs one optimizer step's worth of
backward: two micro-steps on inputs that differ by rank and step, gradients synchronised on the second only.
With "split" the model is compiled cut into pieces (dist_lm.train.grad_sync.split_compile, a backend that only
counts the pieces, so that no C++ compiler is needed). Rank 0 writes the weights, the gradients, the number of
pieces and of coalesced launches.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lm.train.grad_sync import GradientAverager, broadcast_parameters, split_compile


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 3))


def batch(rank: int, micro_step: int) -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(100 * micro_step + rank))


def main() -> None:
    out, how = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    module = model(seed=rank)  # different on every rank until the broadcast
    broadcast_parameters(module)
    pieces = []

    def counting_backend(gm, example_inputs):
        pieces.append(len(example_inputs))
        return gm.forward

    run = split_compile(module, bucket_mb=1100 / 2**20, backend=counting_backend) if how == "split" else module
    # 1100 bytes: a 16x16 fp32 weight is 1024, so about one Linear layer per piece and per launch
    averager = GradientAverager(module.parameters(), bucket_mb=1100 / 2**20)
    launches = []
    launch = averager._launch
    averager._launch = lambda: (launches.append(len(averager._pending)), launch())[1]
    for micro_step in range(2):
        averager.enabled = micro_step == 1
        run(batch(rank, micro_step)).square().sum().backward()
    averager.wait()
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "world": dist.get_world_size(), "pieces": pieces, "launches": [n for n in launches if n],
            "weights": {n: p.tolist() for n, p in module.named_parameters()},
            "grads": {n: p.grad.tolist() for n, p in module.named_parameters()}}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the other gloo workers: no C++ teardown, where gloo's threads can abort the process


if __name__ == "__main__":
    main()
