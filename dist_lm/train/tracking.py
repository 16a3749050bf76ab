"""Experiment tracking with MLflow, on the main process only; a tracking failure never stops training.

Design decisions:
- The tracking URI is the config's, else MLFLOW_TRACKING_URI (the ecosystem's convention), else
  `sqlite:///mlflow.db` in the working directory, which `mlflow ui` opens with no flags.
- We use `MlflowClient` with an explicit run id rather than mlflow's global active run, so a
  resumed training run logs into the same MLflow run (its id is stored in every checkpoint).
- Params are the flattened config (`optim.lr`), so runs compare key by key.
- Every call is guarded: the first failure warns once with the reason and turns tracking off,
  because losing a metric is better than losing a training run. Non-main ranks get NullTracker.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class NullTracker:
    """Does nothing; used on non-main ranks and when tracking is off or broken."""

    run_id: str | None = None
    uri: str | None = None

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
    """Logs to one MLflow run, creating it or reopening `run_id` when resuming."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 system_metrics: bool = False) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        self._monitor = None
        self._logged_up_to = 0
        if run_id is None:
            exp = self._client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
            run_id = self._client.create_run(exp_id, run_name=run_name).info.run_id
        else:
            self._client.update_run(run_id, status="RUNNING")
            # A run that died after its last checkpoint already logged the steps about to be redone (with the
            # same values: resuming is exact); log them once.
            history = self._client.get_metric_history(run_id, "train/loss")
            self._logged_up_to = max((m.step for m in history), default=0)
        self.run_id = run_id
        if system_metrics:
            self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        import mlflow
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mlflow.set_tracking_uri(self.uri)  # the monitor logs through the fluent API's URI
        self._monitor = SystemMetricsMonitor(self.run_id)
        self._monitor.start()

    def _guard(self, method: str, *args) -> None:
        """Call MlflowClient.<method>(*args); on failure warn once and stop tracking."""
        if self._client is None:
            return
        try:
            getattr(self._client, method)(*args)
        except Exception as exc:  # any tracking failure (server down, disk full) must not end training
            warnings.warn(f"MLflow {method} failed ({type(exc).__name__}: {exc}); tracking is off for the rest "
                          "of this run, training goes on", RuntimeWarning, stacklevel=3)
            self._client = None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._guard("log_batch", self.run_id, [], items[i:i + 100])

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """(step, metrics) rows in as few log_batch calls as MLflow's limit of 1,000 metrics per call allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for step, metrics in rows if step > self._logged_up_to
                 for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._guard("log_batch", self.run_id, items[i:i + 1000])

    def log_artifact(self, path: str) -> None:
        self._guard("log_artifact", self.run_id, path)

    def log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._guard("log_batch", self.run_id, [], [], [RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:  # the system-metrics thread failing must not fail a finished run
                warnings.warn(f"MLflow system metrics did not stop cleanly ({type(exc).__name__}: {exc})",
                              RuntimeWarning, stacklevel=2)
        self._guard("set_terminated", self.run_id, status)


def make_tracker(enabled: bool, is_main: bool, *, uri: str, experiment: str, run_name: str,
                 run_id: str | None = None, system_metrics: bool = False) -> NullTracker:
    """MlflowTracker on the main process when enabled; otherwise (or if MLflow fails to start) NullTracker."""
    if not (enabled and is_main):
        return NullTracker()
    try:
        return MlflowTracker(uri, experiment, run_name, run_id, system_metrics)
    except Exception as exc:  # a broken store at start must not stop training either
        warnings.warn(f"MLflow could not start at {uri} ({type(exc).__name__}: {exc}); training without tracking",
                      RuntimeWarning, stacklevel=2)
        return NullTracker()
