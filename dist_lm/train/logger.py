"""One sink per run: a row of metrics goes, once, to the console, the run's metrics.jsonl and MLflow.

Design decisions:
- The loop hands each row (a step and its metrics) to `RunLogger.log` and nothing else; the sink decides what each
  destination gets. MLflow gets it through a writer in a process of its own (dist_lm.train.mlflow_process): the
  loop never waits for MLflow, an MLflow outage costs it nothing, and MLflow's work never holds its GIL.
- metrics.jsonl is the run's own record, readable without MLflow (launch/compare_runs.py, the tests and the
  benchmarks read it): one JSON object per row, its step first. Only the main process writes it, and a resumed run
  first cuts it back to its checkpoint's step: the steps after it are trained again, and logged once.
- The console shows one line per `log` call, built from the metrics named in CONSOLE_FIELDS; the rows of a log
  interval's earlier steps (their losses) go to the files only. The progress bar is for a person at a terminal
  (it is off when stderr is not one); logs and CI get the lines.
- Non-main ranks hold a logger too (with a NullTracker), so the loop never asks which rank it is on.
- How the run ended goes to run_dir/status.json as well as MLflow: a job script reads it without MLflow (a
  launcher reports every failed worker as exit status 1, so the status alone cannot tell a stop from a crash).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dist_lm.train.mlflow_process import MlflowProcess
from dist_lm.train.tracking import MlflowTracker, NullTracker

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
COMPILE_METRIC = "perf/compile_and_first_step_s"
# What a console line shows of a row, in this order (a row naming none of these prints nothing).
CONSOLE_FIELDS = (
    ("train/loss", "loss {:.4f}"),
    ("val/loss", "val loss {:.4f}"),
    ("train/lr", "lr {:.2e}"),
    ("train/grad_norm", "grad norm {:.3f}"),
    ("perf/tokens_per_s", "{:,.0f} tok/s"),
    ("perf/mfu", "mfu {:.1%}"),
)


class RunLogger:
    """Fans each row of metrics out to the console, `run_dir/metrics.jsonl` (main process) and `tracker`."""

    def __init__(self, run_dir: Path, *, tracker: NullTracker, is_main: bool, start_step: int,
                 max_steps: int) -> None:
        self.run_dir = run_dir
        self.tracker = tracker
        self.is_main = is_main
        self.start_step = start_step
        self.max_steps = max_steps
        if is_main:
            truncate_metrics(run_dir / METRICS_FILE, start_step)
        self._bar = tqdm(total=max_steps, initial=start_step, disable=not (is_main and sys.stderr.isatty()),
                         unit="step", dynamic_ncols=True, mininterval=1.0)
        self._mlflow = MlflowProcess(tracker, run_dir=run_dir, say=self.say) if isinstance(tracker, MlflowTracker) \
            else None

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id (None without tracking, on other ranks, and until the writer has opened the run)."""
        return self._mlflow.run_id if self._mlflow is not None else None

    def _send(self, kind: str, payload: Any) -> None:
        if self._mlflow is not None:
            self._mlflow.submit(kind, payload)

    def say(self, text: str) -> None:
        """A line on the console of the main process (above the progress bar)."""
        if self.is_main:
            tqdm.write(text)

    def log_params(self, params: dict[str, Any], artifact: Path | None = None) -> None:
        """The run's parameters (and a file to keep beside them, such as the resolved config) to MLflow."""
        self._send("params", params)
        if artifact is not None:
            self._send("artifact", str(artifact))

    def log_tags(self, tags: dict[str, str]) -> None:
        """Tags of the MLflow run (set again by each process that trains it: a resumed run updates them)."""
        self._send("tags", tags)

    def log(self, step: int, metrics: dict[str, float], *,
            earlier: Mapping[int, dict[str, float]] | None = None) -> None:
        """One row at `step`, shown as one console line, after the rows of `earlier` steps, which go to
        metrics.jsonl and MLflow only (a log interval's per-step losses)."""
        rows = [*sorted((earlier or {}).items()), (step, metrics)]
        self._send("rows", rows)
        if self.is_main:
            append_jsonl(self.run_dir / METRICS_FILE, [{"step": s, **m} for s, m in rows])
        line = self.console_line(step, metrics)
        if line:
            self.say(line)
        if "train/loss" in metrics and "perf/tokens_per_s" in metrics:
            self._bar.set_postfix_str(f"loss {metrics['train/loss']:.3f} | {metrics['perf/tokens_per_s']:,.0f} tok/s",
                                      refresh=False)

    def console_line(self, step: int, metrics: dict[str, float]) -> str:
        """How a row reads on the console ('' for a row it does not show)."""
        if COMPILE_METRIC in metrics:
            return f"torch.compile + first {step - self.start_step} step(s): {metrics[COMPILE_METRIC]:.1f} s"
        parts = [fmt.format(metrics[key]) for key, fmt in CONSOLE_FIELDS if key in metrics]
        return f"step {step:>6}/{self.max_steps} | " + " | ".join(parts) if parts else ""

    def advance(self) -> None:
        """One optimizer step done (the progress bar)."""
        self._bar.update(1)

    def close(self, status: str, *, step: int | None = None, reason: str | None = None,
              checkpoint: Path | None = None, error: str | None = None) -> None:
        """End the progress bar and the MLflow run, and write how the run ended to run_dir/status.json: FINISHED,
        KILLED (stopped early by `reason`, a signal or the time limit) or FAILED (with `error`, also an MLflow tag),
        at `step`, its last checkpoint. Waits for the MLflow writer to send what it holds (bounded)."""
        self._bar.close()
        if self.is_main:
            write_status(self.run_dir, status, step=step, reason=reason, checkpoint=checkpoint)
        if self._mlflow is not None:
            self._mlflow.close(status, {"error": error} if error else {})


def write_status(run_dir: Path, status: str, *, step: int | None, reason: str | None,
                 checkpoint: Path | None) -> Path:
    """run_dir/status.json: how the last process to train this run ended, for job scripts (requeue on KILLED) and
    people; written whole to a temporary file and renamed, so a reader never sees half of it."""
    path = run_dir / STATUS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"status": status, "step": step, "reason": reason,
                               "checkpoint": str(checkpoint) if checkpoint else None,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows to a JSON-lines file."""
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step`: a run that died after its last checkpoint redoes those steps."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the crash being recovered from
            warnings.warn(f"dropping an unreadable line of {path}: {line[:80]!r}", RuntimeWarning, stacklevel=2)
    path.write_text("".join(line + "\n" for line in kept))
