"""AdamW (multi-tensor), the warmup + cosine schedule, and global gradient clipping."""

from dist_lm.optim.adamw import AdamW, adamw_step, param_groups
from dist_lm.optim.clip import clip_grad_norm
from dist_lm.optim.schedule import cosine_with_warmup

__all__ = ["AdamW", "adamw_step", "clip_grad_norm", "cosine_with_warmup", "param_groups"]
