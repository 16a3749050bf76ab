"""The run's MLflow calls, made from a background thread: the training loop never waits for MLflow.

It runs in the MLflow writer process (dist_lm.train.mlflow_process), which the training process feeds.

Design decisions:
- The loop's thread only appends to a queue (`submit`). A writer thread sends what is queued every `flush_s`
  seconds, or at once when 1,000 metrics are waiting (MLflow's limit per log_batch call): many steps per call,
  instead of a database transaction or an HTTP request per step on the training thread.
- Calls are sent in the order they were made, and a call leaves the queue only once MLflow took it: during an
  outage everything is kept (in memory; metrics.jsonl has it on disk too) and retried with a growing pause (up to a
  minute), then sent when the server is back. Rows go in chunks of at most 1,000 metrics, each removed when sent,
  so a retry never sends a chunk twice.
- Creating the run is the first queued call too, so an unreachable server at start costs the training thread
  nothing; its checkpoints then name no MLflow run until the writer has one (backfill can attach them later).
- One line when MLflow stops answering, one when it answers again (how much was sent); at the end the writer
  keeps trying for `close_timeout_s` (DOWN_AT_CLOSE_S when MLflow is away already: an unreachable server costs a
  run seconds), then says what was not sent and the command that sends it from metrics.jsonl
  (launch/backfill_mlflow.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from dist_lm.train.tracking import MAX_METRICS_PER_BATCH, MlflowTracker, write_run_file

# Answers of MLflow that retrying cannot change (a run the store does not hold, a value it refuses), unlike a
# server that cannot be reached or a locked database.
PERMANENT_ERRORS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE", "BAD_REQUEST",
                    "PERMISSION_DENIED", "RESOURCE_ALREADY_EXISTS", "UNAUTHENTICATED"}
RETRY_S = (2.0, 5.0, 10.0, 30.0, 60.0)  # pauses between attempts while MLflow does not answer
DOWN_AT_CLOSE_S = 3.0  # how long the end of a run waits for an MLflow that is already away


def is_permanent(exc: Exception) -> bool:
    """Whether MLflow refused the call (an answer), rather than could not be reached."""
    return getattr(exc, "error_code", None) in PERMANENT_ERRORS


class MlflowWriter:
    """Sends `tracker`'s calls from a daemon thread (see the module docstring)."""

    def __init__(self, tracker: MlflowTracker, *, run_dir: Path, say: Callable[[str], None], flush_s: float = 5.0,
                 close_timeout_s: float = 8.0, on_open: Callable[[str], None] | None = None) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self._say = say
        self._on_open = on_open
        self._flush_s = flush_s
        self._close_timeout_s = close_timeout_s
        self._ops: deque[tuple[str, Any]] = deque([("open", None)])
        self._pending_metrics = 0
        self._closing: tuple[str, dict[str, str]] | None = None
        self._down_since: float | None = None
        self._sent_while_down = 0
        self._failures = 0
        self._abandoned = False
        self._refused: set[str] = set()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dist_lm-mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, kind: str, payload: Any) -> None:
        """Queue one call: ("params", dict), ("tags", dict), ("artifact", path), ("rows", [(step, metrics, time_ms)]):
        rows stamped by the training process when their step ran (MlflowProcess.submit), not when MLflow took them."""
        with self._wake:
            self._ops.append((kind, payload))
            if kind == "rows":
                self._pending_metrics += sum(len(row[1]) for row in payload)
            if self._pending_metrics >= MAX_METRICS_PER_BATCH:
                self._wake.notify()

    def close(self, status: str, tags: dict[str, str] | None = None) -> int:
        """Send everything, then end the MLflow run with `status`; waits at most close_timeout_s after the first
        failed attempt. Returns how many queued calls were left unsent (0: all went)."""
        with self._wake:
            self._closing = (status, tags or {})
            self._wake.notify()
        # The thread checks its deadline between calls; one call in flight against a hung server may outlast it, so
        # the wait here is bounded on its own, and an unfinished thread is told to stop after that call.
        self._thread.join(timeout=self._close_timeout_s + 1.0)
        with self._wake:
            self._abandoned = self._thread.is_alive()
            unsent = list(self._ops)  # under the lock: the thread may still pop from it
        left = len(unsent)
        if left:
            rows = sum(len(p) for k, p in unsent if k == "rows")
            self._say(f"MLflow at {self.tracker.uri} did not answer at the end: {rows} metric rows and the run's "
                      f"final status ({status}) were not sent; they are in {self.run_dir}: send them later with "
                      f"python launch/backfill_mlflow.py --run-dir {self.run_dir}")
        return left

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug here must not go unsaid; training goes on, metrics.jsonl keeps everything
            self._say(f"MLflow writer stopped ({type(exc).__name__}: {exc}); metrics stay in {self.run_dir}: send "
                      f"them with python launch/backfill_mlflow.py --run-dir {self.run_dir}")

    def _loop(self) -> None:
        deadline = None  # set once close() asked: the end of the last attempts
        while not self._abandoned:
            with self._wake:
                if self._closing is not None and deadline is None:
                    # MLflow away already: a few more tries, not the full wait (backfill sends the rest later)
                    wait = self._close_timeout_s if self._down_since is None else min(self._close_timeout_s,
                                                                                     DOWN_AT_CLOSE_S)
                    deadline = time.monotonic() + wait
                    self._ops.append(("close", self._closing))
            if self._send_queued() and deadline is not None:
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            with self._wake:
                down = self._down_since is not None
                pause = RETRY_S[min(self._failures, len(RETRY_S)) - 1] if down else self._flush_s
                if deadline is not None:
                    pause = 1.0  # closing: try every second until the deadline
                # Woken early by close(), or by a full batch while MLflow answers (not while it is down: the
                # queue only grows then, and each wake-up would be one more failed attempt).
                self._wake.wait_for(partial(self._wake_up, deadline is None, not down), timeout=pause)

    def _wake_up(self, on_close: bool, on_full_batch: bool) -> bool:
        return (on_close and self._closing is not None) or (
            on_full_batch and self._pending_metrics >= MAX_METRICS_PER_BATCH)

    def _send_queued(self) -> bool:
        """Send the queue in order; True when it is empty, False at the first call MLflow did not take."""
        try:
            while True:
                with self._wake:
                    if not self._ops:
                        break
                    kind, payload = self._ops[0]
                try:
                    if kind == "rows":
                        self._send_rows()
                        continue
                    self._send(kind, payload)
                except Exception as exc:
                    if not is_permanent(exc):
                        raise
                    self._give_up_on(kind, exc)  # MLflow answered "no": retrying would block the queue for good
                with self._wake:
                    self._ops.popleft()
        except Exception as exc:  # a failure of the store (server away, disk full, locked): keep it all, try again
            self._failures += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                self._say(f"MLflow at {self.tracker.uri} does not answer ({type(exc).__name__}: {first}); training "
                          "goes on, its metrics are kept and sent when MLflow is back")
            return False
        if self._down_since is not None:
            self._say(f"MLflow at {self.tracker.uri} answers again after {time.monotonic() - self._down_since:.0f} s: "
                      f"sent the {self._sent_while_down} metric rows kept meanwhile")
            self._down_since, self._failures, self._sent_while_down = None, 0, 0
        return True

    def _give_up_on(self, kind: str, exc: Exception) -> None:
        """A call MLflow refused (not a failure to reach it): reopening a run the store does not hold starts a new
        one; anything else is dropped with one line (metrics.jsonl keeps the rows)."""
        first = str(exc).splitlines()[0][:200]
        if kind == "open" and self.tracker.run_id is not None:
            self._say(f"MLflow at {self.tracker.uri} has no run {self.tracker.run_id} to continue ({first}); "
                      "logging into a new run")
            self.tracker.run_id = None
            self._send("open", None)
            return
        if kind == "rows":
            with self._wake:  # drop the head call's rows, as a sent chunk would be
                _, payload = self._ops[0]
                self._pending_metrics -= sum(len(row[1]) for row in payload)
                self._ops[0] = ("rows", [])
        if kind not in self._refused:  # once per kind: a run deleted meanwhile refuses every call after
            self._refused.add(kind)
            self._say(f"MLflow at {self.tracker.uri} refused a {kind} call ({first}); left out of MLflow "
                      f"(metrics.jsonl in {self.run_dir} has every metric)")

    def _send(self, kind: str, payload: Any) -> None:
        t = self.tracker
        if kind == "open":
            t.open()
            write_run_file(self.run_dir, t)
            if self._on_open is not None:
                self._on_open(t.run_id)
        elif kind == "params":
            t.log_params(payload)
        elif kind == "tags":
            t.log_tags(payload)
        elif kind == "artifact":
            t.log_artifact(payload)
        elif kind == "close":
            status, tags = payload
            t.log_tags(tags)
            t.close(status)

    def _send_rows(self) -> None:
        """The rows of the leading queued "rows" calls, up to MAX_METRICS_PER_BATCH metrics, as one log_batch call;
        they leave the queue once it succeeded."""
        chunk, count, used = [], 0, []  # used: how many rows of each leading call went into the chunk
        with self._wake:  # the training thread appends meanwhile: read the queue under the lock
            for kind, payload in self._ops:
                if kind != "rows":
                    break
                taken = 0
                for row in payload:
                    if chunk and count + len(row[1]) > MAX_METRICS_PER_BATCH:
                        break
                    chunk.append(row)
                    count += len(row[1])
                    taken += 1
                used.append(taken)
                if taken < len(payload):
                    break
        self.tracker.log_rows(chunk)
        with self._wake:
            self._pending_metrics -= count
            for taken in used:
                kind, payload = self._ops[0]
                if taken == len(payload):
                    self._ops.popleft()
                else:
                    self._ops[0] = (kind, payload[taken:])
        if self._down_since is not None:
            self._sent_while_down += len(chunk)
