"""Warnings for a fallback the user should know about, said once per process and by the main rank only.

Design decisions:
- Python's own deduplication is per call site and is defeated by "always" filters (pytest, notebooks), so the
  messages already said are kept here.
- Only the main rank warns (rank 0 of the process group once one exists, else RANK from torchrun/accelerate):
  every rank falls back alike, and N copies of one line bury the log of an N-process run.
- Never while dynamo traces: warnings.warn would break the graph (the eager or first uncompiled call says it);
  the rank query stays behind that guard too, so tracing never sees the process group queried.
"""

from __future__ import annotations

import os
import warnings

import torch

_said: set[str] = set()


def is_main_rank() -> bool:
    """Rank 0 of the process group, or of the launch (RANK, set by torchrun/accelerate) before the group exists."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def warn_once(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn(message) the first time this process asks, on the main rank only; silent while compiling."""
    if torch.compiler.is_compiling():
        return
    if message not in _said:
        _said.add(message)  # on the other ranks too: they ask for the rank once, then stay silent
        if is_main_rank():
            warnings.warn(message, category, stacklevel=3)
