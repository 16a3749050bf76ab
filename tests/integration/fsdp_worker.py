"""One rank of the FSDP2 CPU test (tests/integration/test_fsdp.py), started by torchrun over gloo.

It goes through the same functions as the trainer (apply_parallelism with FSDPOptions, our AdamW and
clipping, the consolidated checkpoint writer), not through Accelerate, which turns FSDP off on the CPU.

usage: torchrun --nproc_per_node N fsdp_worker.py OUT_DIR STEPS UNIT [RESUME_CHECKPOINT]
       (UNIT: block | model | group | block+prefetch | model+compile | group+compile; group = both blocks of
       this 2-block model in one unit, through the list form of fully_shard)
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lm.config import ModelConfig, RunConfig
from dist_lm.model import TransformerLM
from dist_lm.optim import AdamW, clip_grad_norm, param_groups
from dist_lm.parallel import FSDPOptions, apply_parallelism
from dist_lm.train.checkpoint import (
    full_tensor,
    load_checkpoint,
    load_model_weights,
    model_state_full,
    optimizer_from_tensors,
    optimizer_param_names,
    optimizer_to_tensors,
    save_checkpoint,
)

# vocab 67: the embedding and head rows split 34/33 over 2 ranks, so uneven shards are covered too.
CFG = RunConfig(model=ModelConfig(vocab_size=65, seq_len=16, d_model=32, num_layers=2, num_heads=2))
MAX_NORM = 0.5  # below the ~0.75 gradient norms of this model, so clipping scales the shards
GLOBAL_BATCH = 8


def batch(step: int) -> torch.Tensor:
    """The global batch of a step, (GLOBAL_BATCH, seq_len + 1), the same for any number of ranks."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.model.vocab_size, (GLOBAL_BATCH, CFG.model.seq_len + 1), generator=g)


def run(out_dir: Path, steps: int, resume: Path | None, rank: int, world: int, fsdp: FSDPOptions | None,
        compile: bool = False) -> None:
    cfg = copy.deepcopy(CFG)
    cfg.train.compile = compile
    torch.manual_seed(0)
    model = TransformerLM(CFG.model)
    start = 0
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt:
        load_model_weights(model, ckpt.model_state, resume)
        start = ckpt.state["step"]
    raw = model
    model = apply_parallelism(model, cfg, fsdp=fsdp)
    from torch.distributed.tensor import DTensor

    if fsdp is not None:  # really sharded: every parameter is a DTensor holding 1/world of the rows
        from torch.distributed.fsdp import FSDPModule

        assert all(isinstance(p, DTensor) for p in raw.parameters())
        # block and group units: every block is (in) an FSDP unit; model units: only the root is
        assert all(isinstance(b, FSDPModule) == (fsdp.unit != "model") for b in raw.blocks)
    opt = AdamW(param_groups(raw, 0.1), lr=1e-2)
    names = optimizer_param_names(opt, raw)
    if ckpt:
        optimizer_from_tensors(opt, names, ckpt.optimizer_tensors, ckpt.state["optimizer"], resume)
    losses, norms = [], []
    per_rank = GLOBAL_BATCH // world
    for step in range(start, start + steps):
        data = batch(step)[rank * per_rank:(rank + 1) * per_rank]
        loss = model(data[:, :-1], data[:, 1:])
        if fsdp is not None and fsdp.unit == "model":  # gathered once, kept for the backward (no reshard)
            assert not any(isinstance(p, DTensor) for p in raw.parameters())
        loss.backward()
        norms.append(float(full_tensor(clip_grad_norm(model.parameters(), MAX_NORM))))
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    if compile:  # every frame dynamo met compiled (a break in a loop skips a frame and leaves it eager)
        from torch._dynamo.utils import counters

        assert counters["frames"]["ok"] == counters["frames"]["total"] > 0, dict(counters["frames"])
        assert not counters["unimplemented"] and not counters["graph_break"], dict(counters["unimplemented"])
        if fsdp is not None and fsdp.unit == "model":  # the whole forward, one graph inside the root's hooks
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    model_state = model_state_full(raw)  # collective under FSDP2: every rank calls it
    tensors, groups = optimizer_to_tensors(opt, names)
    if rank == 0:
        save_checkpoint(out_dir, start + steps, model_state, tensors, {"optimizer": groups})
        (out_dir / "losses.json").write_text(json.dumps({"losses": losses, "grad_norms": norms}))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out, steps, unit = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    resume = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    unit, _, extra = unit.partition("+")
    run(out, steps, resume, rank, world, FSDPOptions(unit=unit, explicit_prefetch=extra == "prefetch", group_blocks=2),
        compile=extra == "compile")
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running interpreter/C++ teardown: gloo's background threads were seen to abort the process
    # there ("terminate called without an active exception", 2 of 16 runs) after all results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
