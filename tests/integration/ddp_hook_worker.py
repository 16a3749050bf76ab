"""One rank of the DDP comm-hook test (tests/integration/test_ddp_setup.py), started by torchrun over gloo.

usage: torchrun --nproc_per_node N ddp_hook_worker.py OUT_DIR WIRE   (WIRE: trainer | fp32 | bf16)

Each rank runs two backward passes of a small model wrapped in DDP, on inputs that differ by rank, and rank 0
writes the gradients of both passes. WIRE trainer: set up as the trainer sets it up (trainer.configure_ddp: DDP's
own averaging), gradients set to None between steps as the trainer's zero_grad does (each new gradient is copied
into its bucket); fp32 / bf16: the benchmarks' mean all-reduce hook, gradients zeroed in place (the second pass
reduces into the same buckets, which are the gradients).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_lm.parallel import configure_ddp, use_mean_allreduce


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(100 * step + rank))


def main() -> None:
    out, wire = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = DistributedDataParallel(model(), gradient_as_bucket_view=True, bucket_cap_mb=1)
    if wire == "trainer":
        configure_ddp(ddp)
    else:
        use_mean_allreduce(ddp, torch.bfloat16 if wire == "bf16" else None)
    grads = []
    for step in range(2):
        ddp.zero_grad(set_to_none=wire == "trainer")  # False: views of the buckets stay views
        ddp(batch(rank, step)).square().sum().backward()
        grads.append({name: p.grad.tolist() for name, p in ddp.module.named_parameters()})
    if rank == 0:
        hooks = [hook.__name__ for hook, _ in ddp._comm_hooks]  # DDP alone averages too: check which one did
        (out / "grads.json").write_text(json.dumps({"grads": grads, "world": dist.get_world_size(), "hooks": hooks}))
    dist.barrier()
    dist.destroy_process_group()
    # As fsdp_worker: leave without interpreter/C++ teardown, where gloo's background threads can abort the
    # process ("terminate called without an active exception") after the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
