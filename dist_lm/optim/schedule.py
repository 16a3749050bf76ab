"""Learning-rate schedule: linear warmup, cosine decay to a floor, then the floor.

Design decisions:
- A pure function of the step (no scheduler object, nothing to checkpoint): the trainer sets
  `group["lr"]` from it before each optimizer step, so resuming at step N gives the same lr.
- Warmup starts at 0 (lr(0) = 0) and reaches max_lr at warmup_steps; the cosine runs from warmup_steps
  to cosine_steps and lands exactly on min_lr there. warmup_steps == 0 starts at the peak;
  warmup_steps == cosine_steps has no cosine: warmup, then straight to the floor.
"""

from __future__ import annotations

import math

from dist_lm.errors import UserError


def cosine_with_warmup(step: int, max_lr: float, min_lr: float, warmup_steps: int, cosine_steps: int) -> float:
    """Learning rate at optimizer step `step` (counted from 0).

    >>> [round(cosine_with_warmup(s, 1.0, 0.1, 2, 4), 3) for s in range(6)]
    [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if not 0 <= warmup_steps <= cosine_steps:
        raise UserError(
            f"warmup_steps={warmup_steps} must be in [0, cosine_steps={cosine_steps}]; warmup cannot outlast the cosine"
        )
    # 1) linear warmup from 0
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    # 3) past the cosine: the floor
    if step >= cosine_steps:
        return min_lr
    # 2) cosine from max_lr at warmup_steps down to min_lr at cosine_steps
    progress = (step - warmup_steps) / (cosine_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
