"""One writer per run directory: a lock the main process takes before it writes anything there.

Design decisions:
- An OS record lock (fcntl.lockf) on `run_dir/.lock`, held for the whole run. The kernel releases it when the
  holder exits however it exits (a crash, SIGKILL, a lost node: NFS's lock manager reclaims it), so a stale lock
  needs no lease or clean-up: a lock nobody holds is free, whatever the file says.
- The file holds who has it (host, pid, start time, run name) for the refusal message. It stays after the run: deleting
  it on release would let a newcomer lock an unlinked file while a third process creates a fresh one.
- Taken before the checks that read the directory (is there a checkpoint to resume, does a fresh start find one), so
  two runs started together into one directory cannot both pass them.
- A filesystem that refuses locks (ENOLCK, some network mounts) warns once and the run goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dist_lm.errors import UserError

LOCK_FILE = ".lock"


class RunDirLock:
    """The lock of one run directory; `acquire` it once, `release` when the run ends (or let the process exit)."""

    def __init__(self, run_dir: str | Path, run_name: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise UserError naming the run that holds it; creates run_dir if needed."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"run_dir {self.run_dir} is a file; point run_dir (or name) at a directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise UserError(f"run_dir {self.run_dir} is in use by another run ({_holder(path)}); wait for it to "
                                "end, or start this one under another name (name=... or run_dir=...)") from None
            if exc.errno == errno.ENOLCK:
                warnings.warn(f"cannot lock {path} on this filesystem ({exc.strerror}): a second run into "
                              f"{self.run_dir} would not be stopped", RuntimeWarning, stacklevel=2)
                return self
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run": self.run_name,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    """'pid 123 on host gpu7, run "demo", since ...' from the lock file, or what could be read of it."""
    try:
        who = json.loads(path.read_text())
        return f"pid {who['pid']} on host {who['host']}, run {who.get('run')!r}, since {who.get('since')}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its lock file {path} names no holder"


@contextmanager
def take_turns(path: Path) -> Iterator[None]:
    """Processes of one machine run the block one at a time, through an flock on the file `path` (created empty if
    missing, kept after). The file opens read-only and is created world-writable, so another user of a shared
    directory can take it too; a file that cannot be opened, or a filesystem without locks, warns and runs the
    block unlocked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        warnings.warn(f"cannot open the lock file {path} ({exc.strerror}); going on without it", RuntimeWarning,
                      stacklevel=3)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, or by the kernel if this process dies
        except OSError as exc:  # a filesystem without locks (some network or FUSE mounts)
            warnings.warn(f"cannot lock {path} ({exc.strerror}); going on without the lock", RuntimeWarning,
                          stacklevel=3)
        yield
    finally:
        os.close(fd)
