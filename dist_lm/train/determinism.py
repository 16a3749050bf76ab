"""train.deterministic: the same config and seed give the same losses bit for bit, on a GPU too.

Why a mode of its own: the seed fixes the init and the data order, which is all the CPU needs, but on a GPU the
default path picks kernels by timing them at start-up (our attention's block sizes, Inductor's reduction configs),
two equally correct kernels sum in different orders, and a few of PyTorch's kernels are not deterministic at all:
two runs of one command part at the first step by ~1e-5 and, through training's chaos, by tenths of a nat later
(benchmarks/README.md, "Scaling"). This mode fixes those choices and asks PyTorch for its deterministic kernels, at
some cost in speed (benchmarks/README.md, "Training step").

What it sets, for the duration of the `deterministic()` block (the run):
- our attention kernels: the first config of each list that fits the GPU instead of autotuning
  (flash_attention.set_autotune);
- Inductor's `deterministic` (no on-device benchmarking of choices that change numerics), where this torch has it;
- torch.use_deterministic_algorithms(True): an op with no deterministic kernel raises, rather than quietly
  breaking the promise; cuDNN's benchmark off; but not the NaN fill of every torch.empty that the mode also
  switches on (torch.utils.deterministic.fill_uninitialized_memory): a debugging aid that costs a write of each
  new buffer, while a kernel that reads memory it did not write would show as a difference between runs anyway;
- CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set: torch refuses cuBLAS under deterministic algorithms without it. It
  must be in the environment before the process's first cuBLAS call, so the trainer enters this block first.
Collectives are left as they are: NCCL reduces in the same order for the same sizes, ranks and algorithm. Measured
bit for bit on one GPU only (tests/gpu/test_loss_parity_gpu.py); on several, not yet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.utils.deterministic

from dist_lm.kernels import flash_attention

CUBLAS_DETERMINISTIC = ":4096:8"


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Run the block in deterministic mode (see the module docstring); restores the previous settings after (all but
    CUBLAS_WORKSPACE_CONFIG, which stays). enabled=False: a no-op, so callers need no branch."""
    if not enabled:
        yield
        return
    # Left set after the block: cuBLAS reads it once per process, so unsetting it would change nothing.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    import torch._inductor.config as inductor_config

    saved_algorithms = torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    saved_benchmark = torch.backends.cudnn.benchmark
    has_inductor_flag = hasattr(inductor_config, "deterministic")  # torch >= 2.10 (2.11 on the GPU hosts has it)
    saved_inductor = inductor_config.deterministic if has_inductor_flag else None
    saved_fill = torch.utils.deterministic.fill_uninitialized_memory
    saved_autotune = flash_attention._autotune
    try:  # every change inside, so that a failure halfway still restores the ones made
        flash_attention.set_autotune(False)
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
        if has_inductor_flag:
            inductor_config.deterministic = True
        yield
    finally:
        flash_attention.set_autotune(saved_autotune)
        torch.use_deterministic_algorithms(saved_algorithms, warn_only=saved_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = saved_fill
        torch.backends.cudnn.benchmark = saved_benchmark
        if has_inductor_flag:
            inductor_config.deterministic = saved_inductor
