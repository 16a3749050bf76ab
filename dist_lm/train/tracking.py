"""MLflow specifics: the tracking URI, one run's calls, bounded network waits, and backfill from metrics.jsonl.

Design decisions:
- The tracking URI is the config's, else MLFLOW_TRACKING_URI (the ecosystem's convention), else
  `sqlite:///mlflow.db` in the working directory, which `mlflow ui` opens with no flags.
- `MlflowClient` with an explicit run id rather than mlflow's global active run, so a resumed training run logs
  into the same MLflow run (its id is stored in every checkpoint and in run_dir/mlflow.json).
- Params are the flattened config (`optim.lr`), so runs compare key by key.
- MlflowTracker's calls raise: the run's writer (dist_lm.train.mlflow_writer, in a process of its own:
  dist_lm.train.mlflow_process) keeps what failed and sends it again, so a tracking failure never stops or slows
  training. Made in the training process, an MlflowTracker only names the run (it imports no MLflow there).
- A server that does not answer must not cost minutes: unless the user set them, this process gives each HTTP
  request 5 s and one retry (MLflow's defaults are 120 s and 7 retries with exponential backoff: 4 minutes).
- Backfill (`backfill`, launch/backfill_mlflow.py) sends what metrics.jsonl holds and the MLflow run lacks, by
  (metric, step): running it twice sends nothing the second time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_lm.train.lock import take_turns

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
RUN_FILE = "mlflow.json"  # run_dir/mlflow.json: which MLflow run holds this run directory's metrics


def resolve_tracking_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def view_command(uri: str) -> str:
    """How to look at runs in `uri`: a server's address is opened in a browser; a store gets `mlflow ui` on it."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


class NullTracker:
    """Does nothing; what non-main ranks and runs without tracking hold."""

    run_id: str | None = None
    uri: str | None = None

    def open(self) -> str | None:
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_rows([(step, metrics)])

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        pass

    def log_artifact(self, path: str) -> None:
        pass

    def log_tags(self, tags: dict[str, str]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run: created by `open()` (or reopened when `run_id` is given: a resumed training run); every call
    may raise (a server away, a full disk) and leaves retrying to its caller."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 open_now: bool = True) -> None:
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)  # before MLflow's first request: it reads them per request
        if importlib.util.find_spec("mlflow") is None:  # the caller trains without tracking, and says so
            raise ModuleNotFoundError("No module named 'mlflow' (pip install mlflow)")

        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self._client = None  # made by open(), so that its failure is retried with the rest
        self._reopened = False  # a run id given: the run may hold points already (see log_rows)
        self._held: dict[str, set[int]] = {}  # per metric, the steps a reopened run held (read once per metric)
        self._opened = False
        if open_now:
            self.open()

    def open(self, *, mark_running: bool = True) -> str:
        """Create the run, or reopen the given one (a resumed training run: marked RUNNING again unless
        `mark_running` is False, as backfill wants); returns its id. Idempotent once it succeeded."""
        if self._opened:
            return self.run_id
        from mlflow.tracking import MlflowClient  # its import (a second or so) before the lock, not under it

        with store_lock(self.uri):
            if self._client is None:
                self._client = MlflowClient(tracking_uri=self.uri)
            if self.run_id is None:
                exp_id = self._experiment_id()
                self.run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
            else:
                self._client.get_run(self.run_id)  # raises RESOURCE_DOES_NOT_EXIST for a run this store lacks
                if mark_running:
                    self._client.update_run(self.run_id, status="RUNNING")
                self._reopened = True
        self._opened = True
        return self.run_id

    def _experiment_id(self) -> str:
        """The experiment's id, created if the store has none of that name (by this process or, at the same moment,
        by another run's: a server answers that one RESOURCE_ALREADY_EXISTS)."""
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(self.experiment)
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(self.experiment).experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client.log_batch(self.run_id, [], items[i:i + 100])

    def log_rows(self, rows: list[tuple], *, skip_logged: bool = True) -> None:
        """(step, metrics) or (step, metrics, timestamp_ms) rows in as few log_batch calls as MLflow's limit per call
        allows; a row without a timestamp gets now. `skip_logged`: not the (metric, step) points a reopened run
        already holds (a resumed run redoes the steps after its checkpoint, with the same values: each is logged
        once, and what the killed attempt never sent is sent now)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), row[2] if len(row) > 2 else now, row[0]) for row in rows
                 for k, v in row[1].items() if not (skip_logged and self._holds(k, row[0]))]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, items[i:i + MAX_METRICS_PER_BATCH])

    def _holds(self, key: str, step: int) -> bool:
        """Whether the reopened run already holds metric `key` at `step` (its history read once per metric)."""
        if not self._reopened:
            return False  # a run this process created holds only what it sent, once
        if key not in self._held:
            self._held[key] = self.logged_steps(key)
        return step in self._held[key]

    def log_artifact(self, path: str) -> None:
        self._client.log_artifact(self.run_id, path)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run holds metric `key`."""
        return {m.step for m in self._client.get_metric_history(self.run_id, key)}

    def log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._client.log_batch(self.run_id, [], [], [RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///path` store (relative to the working directory with three slashes, absolute with
    four); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Processes of one machine take turns at a sqlite store's first use. MLflow creates and migrates its tables
    then, and a migration is not safe from two processes at once: two runs started together on a new file (a
    sweep, two jobs, a test) left `_alembic_tmp_*` tables behind that broke the file for every later reader. The
    lock is a file beside the store (`mlflow.db.lock`); other stores need none."""
    path = sqlite_path(uri)
    if path is None or not path.parent.is_dir():
        yield  # no directory: MLflow's own error says so, retried by the writer like any other
        return
    with take_turns(path.with_name(path.name + ".lock")):
        yield


def write_run_file(run_dir: Path, tracker: MlflowTracker) -> None:
    """run_dir/mlflow.json: the run id and where it lives, for backfill and for people."""
    (run_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": tracker.uri, "experiment": tracker.experiment,
                                                "run_id": tracker.run_id, "run_name": tracker.run_name}) + "\n")


def read_run_id(run_dir: Path, uri: str) -> str | None:
    """The MLflow run id run_dir/mlflow.json names for the store `uri` (None: no file, another store, unreadable).
    A resumed run whose checkpoint names no MLflow run (MLflow was away until then, or backfill created it) goes
    on in this one instead of starting a second."""
    try:
        known = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return known.get("run_id") if isinstance(known, dict) and known.get("tracking_uri") == uri else None
