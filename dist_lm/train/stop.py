"""When a run stops before train.max_steps: a signal, the time limit; and how every rank agrees on the step.

Design decisions:
- SIGTERM (what SLURM and Kubernetes send at preemption and at the time limit, and what a launcher forwards),
  SIGINT (Ctrl-C) and SIGUSR1 (SLURM's usual warning signal) only set a flag. The handler runs between two
  bytecodes of the main thread, in the middle of a step; saving, logging or a collective from there would interleave
  with the step it interrupted. A second signal finds the flag set and changes nothing, so it cannot break the save
  that the first one started (SIGKILL still ends the process at once).
- The ranks agree: every train.stop_check_steps optimizer steps each rank contributes its reason (0 for none) to an
  all-reduce (MAX) of one integer over a gloo group, so every rank stops after the same optimizer step and saves one
  checkpoint together, even when the signal reached them at different steps. Gloo on the CPU: the check never waits
  for the GPU (a device all-reduce read back by the host would stall the queue of kernels every step).
- The time limit is a deadline on the monotonic clock, from the start of the run. A rank votes to stop when the time
  left would not cover the steps until the next check (at the longest step seen so far), the checkpoint save (the
  longest seen so far; before the first, an estimate from the bytes to write) and a margin.
- One process-level switch for the entry scripts: `exit_with_parent` asks Linux to send SIGTERM when the launcher
  dies (prctl PR_SET_PDEATHSIG), so a worker whose launcher was killed stops at an agreed step with a checkpoint
  instead of training on as an orphan.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_lm.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TIME_LIMIT = 128  # the reason code of the time limit: above every signal number, so MAX keeps it deterministic
MARGIN_S = 5.0  # slack on top of the estimated step and save times
ASSUMED_WRITE_BYTES_PER_S = 200e6  # the first save's estimate: a slow network filesystem, not a local NVMe
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_duration(text: str) -> float | None:
    """Seconds in a duration: '' or 'none' -> None; 5400, '90m', '2h', '1.5h', '45s'; SLURM's 'MM:SS', 'HH:MM:SS',
    'D-HH:MM:SS'.

    >>> [parse_duration(t) for t in ("", "5400", "90m", "1.5h", "1:30:00", "2-00:00:00", "10:00", "1-12")]
    [None, 5400.0, 5400.0, 5400.0, 5400.0, 172800.0, 600.0, 129600.0]
    """
    text = text.strip()
    if not text or text.lower() == "none":
        return None
    unit = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text)
    if unit:
        return float(unit[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit[2]]
    clock = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if clock and (":" in text or clock[1]):
        days = int(clock[1] or 0)
        parts = [int(p) for p in (clock[2], clock[3], clock[4]) if p is not None]
        hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if not clock[1] else (parts + [0, 0])[:3]
        return float(days * 86400 + hours * 3600 + minutes * 60 + seconds)
    raise UserError(f"config key train.time_limit={text!r} is not a duration; use seconds (5400), a unit (90m, 2h) "
                    "or SLURM's [D-]HH:MM:SS")


def reason_text(code: int) -> str:
    """'SIGTERM', 'the time limit', ... for a stop reason code."""
    if code == TIME_LIMIT:
        return "the time limit (train.time_limit)"
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class StopCheck:
    """Signal flag, time limit and the agreement between ranks (see the module docstring).

    Use: `install()` before the loop, `due(step)` after each optimizer step (a collective on the steps where it
    checks: every rank calls it with the same step), `note_save(seconds)` after each checkpoint, `restore()` after
    the loop. `due` returns the agreed reason code (0: go on)."""

    def __init__(self, *, time_limit_s: float | None = None, check_every: int = 1, group: object | None = None,
                 world_size: int = 1, first_save_bytes: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.signum = 0
        self.check_every = check_every
        self.group = group
        self.world_size = world_size
        self._clock = clock
        self._deadline = None if time_limit_s is None else clock() + time_limit_s
        self._save_s = first_save_bytes / ASSUMED_WRITE_BYTES_PER_S
        self._step_s = 0.0
        self._last = (None, clock())  # (step, time) at the last call of `due`
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Route the stop signals to the flag (main thread only: Python runs handlers there)."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers found by `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum  # the flag only: see the module docstring

    def note_save(self, seconds: float) -> None:
        """A checkpoint took this long to save (the time limit keeps room for the next)."""
        self._save_s = max(self._save_s, seconds)

    def time_left(self) -> float:
        return math.inf if self._deadline is None else self._deadline - self._clock()

    def local_reason(self, step: int) -> int:
        """This rank's vote: the signal received, TIME_LIMIT, or 0."""
        now = self._clock()
        last_step, last_time = self._last
        if last_step is not None and step > last_step:
            self._step_s = max(self._step_s, (now - last_time) / (step - last_step))
        self._last = (step, now)
        if self.signum:
            return self.signum
        needed = self.check_every * self._step_s + self._save_s + MARGIN_S
        return TIME_LIMIT if self.time_left() < needed else 0

    def due(self, step: int) -> int:
        """The reason all ranks agree to stop for after `step` (0: train on). A collective every `check_every`
        steps when there are several ranks; between checks a local signal waits for the next one."""
        if step % self.check_every:
            return 0
        vote = self.local_reason(step)
        if self.world_size == 1:
            return vote
        flag = torch.tensor([vote], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def host_group(stall_timeout_s: float) -> object | None:
    """A gloo group over every process for the stop check (None: the default group when it is gloo already).
    Every process must call it (creating a group is a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if "gloo" in str(dist.get_backend()):
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=stall_timeout_s))


def exit_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent (the launcher, pid `parent`, read as early as
    possible) dies; a no-op elsewhere. If the parent is already gone, stop now instead of training as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # not permitted here: the launcher's own forwarding still applies
    if os.getppid() != parent:  # it died before the request could cover it
        raise SystemExit(f"error: the launcher (pid {parent}) is gone; not starting")
