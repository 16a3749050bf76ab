"""FSDP2 (torch.distributed.fsdp.fully_shard) over the single-device model, in place.

Design decisions:
- Applied here rather than by `accelerator.prepare`: we choose what to shard (each TransformerBlock, the class
  itself, then the root) and the mixed-precision policy, instead of Accelerate's string-matched auto-wrap. The
  accelerate config still decides that the launch is FSDP (`fsdp_options` reads it).
- `fully_shard` on every block, then on the root (embedding, final norm, LM head), so each block's parameters are
  all-gathered just before it runs and freed after (reshard_after_forward=True) or kept until the backward
  (False: more memory, one all-gather fewer per block). Unit "group" shards runs of `group_blocks` consecutive
  blocks as one unit each (fully_shard of a list of modules: one all-gather, one reduce-scatter per run). With
  unit "model" only the root is sharded: the bf16 weights are gathered once per step and kept until the backward
  ends, the fp32 master weights, gradients and optimizer state stay sharded (fewer hooks and collectives for
  small models).
- MixedPrecisionPolicy: params in the compute dtype for the matmuls, gradients reduced in fp32 (reduce_dtype) so
  the sum over ranks does not lose bits; the optimizer keeps fp32 master shards.
"""

from __future__ import annotations

import os
import typing
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from dist_lm.config import FSDPUnit, TrainConfig
from dist_lm.errors import UserError
from dist_lm.model.transformer import TransformerBlock

FSDP_UNITS: tuple[str, ...] = typing.get_args(FSDPUnit)


@dataclass(frozen=True)
class FSDPOptions:
    """How to shard: the data-parallel process group's mesh, compute dtype, resharding."""

    param_dtype: torch.dtype | None = None
    """Dtype of the all-gathered parameters the matmuls see (bf16 for mixed precision); None keeps fp32."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (gather again in the backward)."""
    mesh: object | None = None
    """A 1-D DeviceMesh over the ranks; None builds one over the default process group."""
    unit: str = "block"
    """"block": fully_shard each TransformerBlock, then the root; "group": runs of `group_blocks` consecutive blocks
    as one unit each, then the root; "model": the root only (one unit)."""
    group_blocks: int = 4
    """Blocks per unit when unit is "group"."""
    explicit_prefetch: bool = False
    """Block units: each block's forward (backward) issues the next block's all-gather itself, instead of
    FSDP2's implicit prefetch, which is issued only when the host reaches the next block; for a host that
    runs behind the GPU. Experimental: benchmarks/bench_scaling.py --fsdp-prefetch, not in the config yet."""


def fsdp_options(accelerator: Accelerator, unit: str = TrainConfig.fsdp_unit,
                 group_blocks: int = TrainConfig.fsdp_group_blocks) -> FSDPOptions | None:
    """FSDP2 settings from the accelerate config when launched with distributed_type FSDP, else None."""
    if accelerator.distributed_type != DistributedType.FSDP:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # set by accelerate launch
            warnings.warn("the accelerate config asks for FSDP, which Accelerate does not run on the CPU; "
                          "training with plain data parallelism instead", RuntimeWarning, stacklevel=2)
        return None
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise UserError("the accelerate config asks for FSDP version 1; dist_lm shards with FSDP2: set "
                        "fsdp_config.fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    if accelerator.mixed_precision == "fp16":
        raise UserError("FSDP2 with fp16 needs a sharded gradient scaler, which dist_lm does not have; use "
                        "mixed_precision bf16")
    dtype = {"bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    return FSDPOptions(param_dtype=dtype, reshard_after_forward=bool(plugin.reshard_after_forward), unit=unit,
                       group_blocks=group_blocks)


def apply_fsdp(model: torch.nn.Module, options: FSDPOptions) -> torch.nn.Module:
    """FSDP2 over `model`: fully_shard each TransformerBlock, then the root; in place (returns the model)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise UserError("FSDP needs an initialised process group; launch with accelerate launch or torchrun")
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7):
        # public fully_shard (2.6) and distribute_tensor(src_data_rank=None), used to reload shards (2.7)
        raise UserError(f"FSDP2 in dist_lm needs torch >= 2.7, this is {torch.__version__}; upgrade torch or "
                        "train with DDP (configs/accelerate/ddp.yaml)")
    mesh = options.mesh
    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=torch.float32)
    if options.unit not in FSDP_UNITS:
        raise UserError(f"FSDP unit {options.unit!r} is unknown; use one of {FSDP_UNITS} (train.fsdp_unit)")
    if options.unit == "group" and options.group_blocks < 1:
        raise UserError(f"FSDP group units need group_blocks >= 1, got {options.group_blocks} "
                        "(train.fsdp_group_blocks)")
    if options.explicit_prefetch and options.unit != "block":
        raise UserError(f"explicit prefetch is for block units, not {options.unit!r} units")
    if options.unit == "model":
        # One unit: a single all-gather of the bf16 weights before the forward, kept through the backward (a
        # reshard would gather them all again; newer torch honours an explicit True on the root), then one
        # reduce-scatter of the gradients. reshard_after_forward only concerns block units.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no TransformerBlock to shard")
    size = options.group_blocks
    units = [blocks[i:i + size] for i in range(0, len(blocks), size)] if options.unit == "group" else blocks
    for unit in units:  # a list of blocks is one unit: fully_shard gathers and reduces them together
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=options.reshard_after_forward)
    # The root's parameters (embedding, final norm, head) are gathered for the whole step anyway.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if options.explicit_prefetch:
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):
                block.set_modules_to_forward_prefetch([blocks[i + 1]])
            if i > 0:  # the backward runs the blocks in reverse
                block.set_modules_to_backward_prefetch([blocks[i - 1]])
    return model
