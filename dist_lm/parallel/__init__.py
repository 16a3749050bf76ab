"""Everything that wraps the single-device TransformerLM for several devices, applied in a fixed order:
activation checkpointing -> torch.compile (CUDA graphs) -> DDP | FSDP2 | the coalesced gradient sync.

One module per step (activation_checkpointing, compile, ddp, fsdp, grad_sync); `apply` puts them in order.
The trainer calls `parallelize` and holds no parallelism of its own; benchmarks and tests call the steps.
"""

from dist_lm.parallel.activation_checkpointing import apply_activation_checkpointing
from dist_lm.parallel.apply import ParallelModel, apply_parallelism, parallelize
from dist_lm.parallel.compile import COMPILE_MODES, apply_compile, compiled_as, cuda_graphs
from dist_lm.parallel.ddp import (
    align_compiled_pieces_with_buckets,
    configure_ddp,
    ddp_kwargs,
    prepare_data_parallel,
    stop_forward_buffer_sync,
    use_mean_allreduce,
)
from dist_lm.parallel.fsdp import FSDP_UNITS, FSDPOptions, apply_fsdp, fsdp_options
from dist_lm.parallel.grad_sync import GradientAverager, replicate

__all__ = [
    "COMPILE_MODES", "FSDP_UNITS", "FSDPOptions", "GradientAverager", "ParallelModel",
    "align_compiled_pieces_with_buckets", "apply_activation_checkpointing", "apply_compile", "apply_fsdp",
    "apply_parallelism", "compiled_as", "configure_ddp", "cuda_graphs", "ddp_kwargs", "fsdp_options", "parallelize",
    "prepare_data_parallel", "replicate", "stop_forward_buffer_sync", "use_mean_allreduce",
]
