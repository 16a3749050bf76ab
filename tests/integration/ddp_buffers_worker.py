"""One rank of the DDP buffer test (tests/integration/test_ddp_setup.py), started by torchrun over gloo.

usage: torchrun --nproc_per_node 2 ddp_buffers_worker.py OUT_DIR

Builds DDP with the trainer's settings (trainer.ddp_kwargs), recording the warnings the constructor gives, then
gives each rank a different buffer value and runs a forward, with DDP's buffer broadcast left on (as DDP's
default) and turned off by parallel.stop_forward_buffer_sync; each rank writes what its buffer holds afterwards.
"""

import gc
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_lm.config import RunConfig
from dist_lm.parallel import ddp_kwargs, stop_forward_buffer_sync


class Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for mode in ("default", "stopped"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = DistributedDataParallel(Scaled(), **ddp_kwargs(RunConfig()).to_kwargs())
        if mode == "stopped":
            stop_forward_buffer_sync(ddp)
        with torch.no_grad():
            ddp.module.scale.fill_(10.0 + rank)  # after DDP's broadcast at construction
        ddp(torch.ones(2, 4)).sum().backward()
        result[mode] = {"scale": ddp.module.scale.item(),
                        "warnings": [str(w.message) for w in caught if "buffers" in str(w.message)]}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # DDP's reducer holds the process group: freed after the group is destroyed (at exit), gloo's threads could
    # abort the process ("terminate called without an active exception", 1 run in ~6). Both modules: a DDP
    # module sits in reference cycles, so the first one is not freed when the name is rebound.
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
