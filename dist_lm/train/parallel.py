"""Parallelism and compilation applied over the single-device model, in a fixed order.

Order (torchtitan's): activation checkpointing -> torch.compile -> data parallelism. Each step wraps
what the previous produced; DDP/FSDP come last, from `accelerator.prepare` in the trainer, so the
launch topology (the accelerate config) alone decides how the model is replicated or sharded.
"""

from __future__ import annotations

import torch

from dist_lm.config import RunConfig


def apply_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Compile the whole model; the returned wrapper shares the parameters of `model`."""
    return torch.compile(model)


def apply_parallelism(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """The single-device model with the configured wrappers applied, ready for accelerator.prepare."""
    if cfg.train.compile:
        model = apply_compile(model)
    return model
