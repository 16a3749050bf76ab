"""The run's MLflow writer in a process of its own: the training process never runs MLflow's code.

Design decisions:
- Why a process and not a thread: a sqlite store's work (SQLAlchemy, in Python) done by a thread of the training
  process holds the GIL that a host-bound training loop (an eager GPU step launches its kernels from Python) needs
  at that moment; a server does that work in its own process. One H100 measurement with the writer a thread (the
  seed shape, eager, one run per mode) had sqlite at -3.3% of tokens/s and a server at +1.1%. In a child process
  no store's work holds the training process's GIL, MLflow's import (seconds, ~100 MB) stays out of it, and a
  trainer killed without a word still gets its run ended (below).
- The child (`main` here, in a fresh interpreter) runs MlflowWriter unchanged: batching, retries through
  an outage, the bounded end. The training process writes JSON lines to its stdin (a header naming the run, then
  one line per call) and reads JSON lines from its stdout (a line to say, the run's id once it is open, and at
  the end how many calls were left unsent). JSON both ways, no pickle; NaN and infinite losses pass.
- The training thread never blocks on the child: the pipe is non-blocking and what it cannot take yet waits in a
  buffer (at most MAX_BUFFERED_BYTES; metrics.jsonl holds everything anyway) that the next call writes on. Only
  close() waits, and for a bounded time.
- The child ignores the signals that stop training (SIGINT, SIGTERM, SIGUSR1, SIGHUP: Ctrl-C and SLURM reach
  every process of a job): the trainer stops on them and ends the MLflow run as KILLED through the child. When
  the trainer dies without a word (SIGKILL, out of memory), the child reads the end of its stdin, sends what it
  holds, and ends the run as KILLED with a tag that says so.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_lm.train.mlflow_writer import MlflowWriter
from dist_lm.train.tracking import MlflowTracker

MAX_BUFFERED_BYTES = 64 << 20  # calls waiting for a child that does not read (stopped, hung) beyond which they drop
PATH_ENV = "DIST_LM_WRITER_SYS_PATH"  # the training process's sys.path, handed to the child
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
KILLED_TAG = "killed"


class MlflowProcess:
    """MlflowWriter's interface (submit, close), carried out by a child process (see the module docstring)."""

    def __init__(self, tracker: MlflowTracker, *, run_dir: Path, say: Callable[[str], None], flush_s: float = 5.0,
                 close_timeout_s: float = 8.0) -> None:
        self.run_id = tracker.run_id  # the run to continue, until the child names the one it opened
        self.run_dir = run_dir
        self._say = say
        self._close_timeout_s = close_timeout_s
        self._unsent: int | None = None
        self._lost = False
        self._buffer = bytearray()
        # The child imports what this process imports (its sys.path, without the working directory `python -c`
        # would put first: a user's uuid.py there must not shadow the standard library's).
        boot = (f"import json, os, sys; sys.path[:] = json.loads(os.environ.pop({PATH_ENV!r})); "
                f"from {__name__} import main; sys.exit(main())")
        env = {**os.environ, PATH_ENV: json.dumps([p for p in sys.path if p])}
        self._proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env)
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read, name="dist_lm-mlflow-reader", daemon=True)
        self._reader.start()
        self._write({"uri": tracker.uri, "experiment": tracker.experiment, "run_name": tracker.run_name,
                     "run_id": tracker.run_id, "run_dir": str(run_dir), "flush_s": flush_s,
                     "close_timeout_s": close_timeout_s})

    def submit(self, kind: str, payload: Any) -> None:
        """Queue one call, as MlflowWriter.submit; rows are stamped here, when their step ran."""
        if kind == "rows":
            now = int(time.time() * 1000)
            payload = [(step, metrics, now) for step, metrics in payload]
        self._write({"kind": kind, "payload": payload})

    def close(self, status: str, tags: dict[str, str] | None = None) -> int:
        """Have the child send everything and end the MLflow run with `status` (it waits at most close_timeout_s
        for an MLflow that does not answer); returns how many calls were left unsent (0: all went)."""
        self._write({"kind": "close", "payload": [status, tags or {}]}, wait_s=self._close_timeout_s)
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=self._close_timeout_s + 5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5.0)
        if self._unsent is None:  # the child did not get to the end
            self._lose(f"exit status {self._proc.returncode}")
            return 1
        return self._unsent

    def _read(self) -> None:
        """The child's answers, on a thread that sleeps in read() between them."""
        for line in self._proc.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if "say" in answer:
                self._say(answer["say"])
            elif "fatal" in answer:  # MLflow cannot even be imported there: say it once, send nothing more
                self._lose(f"MLflow cannot be used: {answer['fatal']}")
            elif "run_id" in answer:
                self.run_id = answer["run_id"]
            elif "unsent" in answer:
                self._unsent = answer["unsent"]

    def _write(self, record: dict, wait_s: float = 0.0) -> None:
        if self._lost:
            return
        if len(self._buffer) > MAX_BUFFERED_BYTES:
            self._lose(f"it has not read {len(self._buffer) >> 20} MiB of calls")
            return
        self._buffer += json.dumps(record, default=str).encode() + b"\n"
        deadline = time.monotonic() + wait_s
        while self._buffer:
            try:
                del self._buffer[: os.write(self._fd, self._buffer)]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # the next call writes on
                poller = select.poll()  # not select.select: it refuses a descriptor numbered 1024 or more
                poller.register(self._fd, select.POLLOUT)
                poller.poll(min(left, 0.5) * 1000)
            except OSError as exc:  # BrokenPipeError: the child is gone
                self._lose(f"{type(exc).__name__}, exit status {self._proc.poll()}")
                return

    def _lose(self, why: str) -> None:
        if not self._lost:
            self._lost = True
            self._buffer.clear()
            self._say(f"the MLflow writer process stopped ({why}); training goes on, its metrics stay in "
                      f"{self.run_dir}: send them with python launch/backfill_mlflow.py --run-dir {self.run_dir}")


def _close_in_fork_child() -> None:
    """A process forked from the training process (a data loader worker) must not hold the writer's pipe open: the
    child learns that the trainer died from the pipe's end, which a forked copy would put off until it exits."""
    for writer in list(_LIVE):
        writer._lost = True
        try:
            writer._proc.stdin.close()
        except OSError:
            pass


_LIVE: weakref.WeakSet[MlflowProcess] = weakref.WeakSet()
os.register_at_fork(after_in_child=_close_in_fork_child)


def main() -> int:
    """The child: one MlflowWriter fed from stdin, answering on stdout."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Answers get stdout's descriptor to themselves; anything a library prints (MLflow prints "View run ..." links)
    # goes to stderr instead of into an answer.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    lock = threading.Lock()  # the writer thread and this one both answer

    def tell(**answer: Any) -> None:
        with lock:
            try:
                answers.write(json.dumps(answer) + "\n")
                answers.flush()
            except (OSError, ValueError):  # the training process is gone: its log (our stderr) still reads
                if "say" in answer:
                    print(answer["say"], file=sys.stderr, flush=True)

    try:
        header = json.loads(sys.stdin.readline())
    except ValueError:
        return 0  # the training process ended before it named a run
    try:
        import mlflow.tracking  # noqa: F401 (a broken install: one line, and the run trains without tracking)
    except Exception as exc:
        tell(fatal=f"{type(exc).__name__}: {exc}")
        return 1
    tracker = MlflowTracker(header["uri"], header["experiment"], header["run_name"], header["run_id"], open_now=False)
    writer = MlflowWriter(tracker, run_dir=Path(header["run_dir"]), say=lambda text: tell(say=text),
                          flush_s=header["flush_s"], close_timeout_s=header["close_timeout_s"],
                          on_open=lambda run_id: tell(run_id=run_id))
    for line in sys.stdin:
        try:
            call = json.loads(line)
        except ValueError:
            break  # a line cut short: the training process died while writing it
        if call["kind"] == "close":
            status, tags = call["payload"]
            tell(unsent=writer.close(status, tags))
            return 0
        writer.submit(call["kind"], call["payload"])
    # The end of stdin with no close: the training process ended without ending the run (killed by SIGKILL or the
    # OOM killer, most likely; or its calls were cut off).
    why = "the training process ended without ending the run (killed by SIGKILL or out of memory?)"
    tell(say=f"{header['run_dir']}: {why}: sending what it logged and marking the MLflow run KILLED")
    writer.close("KILLED", {KILLED_TAG: why})
    return 0


if __name__ == "__main__":
    sys.exit(main())
