"""Activation checkpointing: recompute each Transformer block in the backward instead of storing its activations.

Design decisions:
- Applied before compile (dist_lm.parallel.apply's order): dynamo turns torch.utils.checkpoint regions into its
  checkpoint higher-order op and the partitioner recomputes them; wrapping a compiled module instead would
  recompute through an opaque compiled function.
- Each block's `forward` is replaced on the instance instead of wrapping the module (checkpoint_wrapper), so
  parameter names, state_dict keys, checkpoints and export stay unchanged.
- Non-reentrant checkpointing (use_reentrant=False): works with torch.compile, FSDP2 and inputs that do not
  require grad; it is skipped when grad is off (eval, generation with a KV cache).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


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
