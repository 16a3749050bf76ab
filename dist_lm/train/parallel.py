"""Parallelism and compilation applied over the single-device model, in a fixed order.

Order (torchtitan's): activation checkpointing -> torch.compile -> data parallelism. Each step wraps
what the previous produced; DDP/FSDP come last, from `accelerator.prepare` in the trainer, so the
launch topology (the accelerate config) alone decides how the model is replicated or sharded.

Design decisions:
- Checkpointing before compile: dynamo turns torch.utils.checkpoint regions into its checkpoint
  higher-order op and the partitioner recomputes them; wrapping a compiled module instead would
  recompute through an opaque compiled function.
- Checkpointing replaces each block's `forward` on the instance instead of wrapping the module
  (checkpoint_wrapper), so parameter names, state_dict keys, checkpoints and export stay unchanged.
  Non-reentrant checkpointing (use_reentrant=False): works with torch.compile, FSDP2 and inputs
  that do not require grad; it is skipped when grad is off (eval, generation with a KV cache).
- Compile granularity: "model" (default) compiles the whole forward, loss included, as one graph, so
  inductor also fuses the chunked cross-entropy's elementwise work (dist_lm.kernels.cross_entropy) and
  the embedding/final-norm glue. "blocks" compiles each TransformerBlock in place (module.compile()):
  one graph reused by all blocks (same code, same shapes: one compile, not num_layers), so compile time
  stops growing with depth, and a graph break in the head cannot split a block; the loss then runs
  eagerly with its own compiled elementwise helper. benchmarks/bench_train.py --compile-mode measures both.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from dist_lm.config import RunConfig

CompileMode = Literal["model", "blocks"]


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each of `model.blocks` in the backward instead of storing its activations; in place."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; activation checkpointing wraps each block")
    for block in blocks:
        if getattr(block.forward, "_dist_lm_checkpointed", False):
            continue  # applying twice would nest two recomputations
        block.forward = _checkpointed(block.forward)
        block.forward._dist_lm_checkpointed = True
    return model


def apply_compile(model: torch.nn.Module, mode: CompileMode = "model") -> torch.nn.Module:
    """Compile the whole model (returns a wrapper sharing its parameters) or each block in place."""
    if mode == "model":
        return torch.compile(model)
    if mode == "blocks":
        for block in model.blocks:
            block.compile()
        return model
    raise ValueError(f"compile mode {mode!r} is unknown; use 'model' or 'blocks'")


def apply_parallelism(model: torch.nn.Module, cfg: RunConfig, compile_mode: CompileMode = "model") -> torch.nn.Module:
    """The single-device model with the configured wrappers applied, ready for accelerator.prepare."""
    if cfg.train.activation_checkpointing:
        model = apply_activation_checkpointing(model)
    if cfg.train.compile:
        model = apply_compile(model, compile_mode)
    return model
