"""Where compared runs come from: an MLflow experiment, or the run directories' metrics.jsonl. Each run becomes one
RunRecord, whatever its source; the table and the plot (dist_lm.train.compare) never ask where it came from.

Design decisions:
- A resumed run's attempts merge by step, the last logged value winning (MLflow: metric timestamp; metrics.jsonl:
  file order). A resumed run continues its MLflow run and cuts its metrics.jsonl back to its checkpoint, so the
  value logged last is the one of the attempt that carried on: one curve per run, each step once.
- x in tokens: `train/tokens` as the trainer logs it (all processes, from the data position, so right across a
  resume on another world size). A step without it (a run from before it was logged) gets step x
  global_batch_size x model.seq_len from the run's params, and the record says so (tokens_estimated).
- Status: the store's, unless run_dir/status.json, readable from here, was written after the run's last logged
  metric. Then it tells of a process end the store missed (a store stuck at RUNNING): its status is shown, with
  what the store says. For a store status that is already final, status.json only adds the reason and step. A
  process killed with SIGKILL writes no status.json and stays RUNNING: telling it from a live run would mean
  testing the run directory's lock, which could make a run starting at that moment refuse to start.
- Two runs with one name keep it, followed by a short id (MLflow: 8 characters of the run id; metrics.jsonl: the
  run directory's name), so the table and legend have one distinct entry per run.
- Without an MLflow store, runs come from `<runs_dir>/*/metrics.jsonl` with params from each run's config.yaml,
  flattened the way dist_lm.config.flatten_config does (num_processes and global_batch_size derived from the first
  logged train/tokens, else from the newest checkpoint). A missing sqlite file is not opened: MlflowClient would
  create an empty store there.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from dist_lm.errors import UserError

DEFAULT_EXPERIMENT = "dist_lm-demo"
# MLflow metrics a record is built from; the first three are merged per step.
METRICS = ("train/loss", "train/tokens", "val/loss", "perf/tokens_per_s", "perf/mfu")
# Params that name a run rather than describe it: the run column already tells runs apart.
IDENTITY_PARAMS = ("name", "run_dir")


@dataclass
class Curve:
    """One metric of one run, one point per step in step order (a resumed run's attempts merged)."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    tokens: list[float] | None = None
    """Tokens trained on by all processes after each step; None when the run gives no way to know them."""


@dataclass
class RunRecord:
    """What the comparison knows of one run."""

    id: str
    """The MLflow run id, or the run directory's name (metrics.jsonl source)."""
    name: str
    """The run's name, followed by its short id when another compared run has the same name."""
    status: str
    """FINISHED, RUNNING, 'KILLED (SIGTERM at step 20)', ..."""
    params: dict[str, str]
    train: Curve
    val: Curve
    tokens_per_s: float | None = None
    """Median of the logged perf/tokens_per_s (one value per log interval: the median ignores a slow one)."""
    mfu: float | None = None
    tokens_estimated: bool = False
    """Some x in tokens came from step x global_batch_size x seq_len, not from logged train/tokens."""
    started: float = 0.0
    short_id: str = ""

    @property
    def final_train_loss(self) -> float | None:
        return self.train.values[-1] if self.train.values else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val.values[-1] if self.val.values else None

    @property
    def best_val(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest validation loss."""
        return min(zip(self.val.steps, self.val.values), key=lambda p: p[1], default=None)

    @property
    def tokens_trained(self) -> float | None:
        return self.train.tokens[-1] if self.train.tokens else None


def collect_runs(uri: str, experiment: str | None = None, max_runs: int = 20, runs_dir: str | Path | None = None,
                 say: Callable[[str], None] | None = None) -> list[RunRecord]:
    """The newest `max_runs` runs, oldest first: from the MLflow store at `uri` (experiment `experiment`, default
    dist_lm-demo), or from `runs_dir`/*/metrics.jsonl when runs_dir is given or the store is a file that does not
    exist (then `say` tells so in one line). An experiment given with runs_dir keeps the runs logged to it."""
    say = say or (lambda line: print(line, file=sys.stderr))
    if runs_dir is None:
        missing = missing_store(uri)
        if missing is None:
            return read_mlflow_runs(uri, experiment or DEFAULT_EXPERIMENT, max_runs)
        runs_dir = Path("runs")
        say(f"no MLflow store at {missing}; reading {runs_dir}/*/metrics.jsonl instead")
    return read_jsonl_runs(Path(runs_dir), experiment, max_runs)


def missing_store(uri: str) -> Path | None:
    """The local file or directory `uri` names when it does not exist; None for one that exists, or a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    elif parsed.scheme in ("", "file"):
        path = parsed.path
    else:
        return None
    return Path(path) if path and not Path(path).exists() else None


def merge_segments(points: Iterable[tuple[int, float]]) -> dict[int, float]:
    """{step: value} in step order, from (step, value) points in the order they were logged: a step logged again (by
    a resumed attempt) keeps its latest value.

    >>> merge_segments([(1, 9.0), (2, 8.0), (3, 7.0), (2, 8.5), (3, 7.5)])
    {1: 9.0, 2: 8.5, 3: 7.5}
    """
    merged: dict[int, float] = {}
    for step, value in points:
        merged[int(step)] = value
    return dict(sorted(merged.items()))


def build_record(*, id: str, short_id: str, name: str, status: str, params: dict[str, str],
                 merged: dict[str, dict[int, float]], started: float) -> RunRecord:
    """A record from merged per-step metrics (METRICS keys -> {step: value}) and params."""
    logged_tokens = merged.get("train/tokens", {})
    tokens_per_step = _tokens_per_step(params)

    def curve(key: str) -> tuple[Curve, bool]:
        points = merged.get(key, {})
        steps, values = list(points), list(points.values())
        estimated = [s for s in steps if s not in logged_tokens]
        if estimated and tokens_per_step is None:
            return Curve(steps, values, None), False
        if not estimated:
            return Curve(steps, values, [logged_tokens[s] for s in steps]), False
        return Curve(steps, values, [logged_tokens.get(s, s * tokens_per_step) for s in steps]), True

    (train, est_train), (val, est_val) = curve("train/loss"), curve("val/loss")
    speeds, mfus = merged.get("perf/tokens_per_s", {}), merged.get("perf/mfu", {})
    return RunRecord(id=id, short_id=short_id, name=name, status=status, params=params, train=train, val=val,
                     tokens_per_s=statistics.median(speeds.values()) if speeds else None,
                     mfu=mfus[max(mfus)] if mfus else None, tokens_estimated=est_train or est_val, started=started)


def _tokens_per_step(params: dict[str, str]) -> int | None:
    try:
        return int(float(params["global_batch_size"])) * int(float(params["model.seq_len"]))
    except (KeyError, ValueError):
        return None


def run_status(store: str | None, ended: dict[str, Any] | None, ended_at: float | None,
               last_logged: float | None) -> str:
    """The status to show. `store`: the MLflow run's (None without a store); `ended`: run_dir/status.json (None when
    absent), written at `ended_at`; `last_logged`: when the run last logged a metric (seconds since the epoch).

    >>> run_status("RUNNING", {"status": "KILLED", "reason": "SIGTERM", "step": 20}, 1000.0, 999.5)
    'KILLED (SIGTERM at step 20; MLflow: RUNNING)'
    >>> run_status("RUNNING", {"status": "KILLED", "reason": "SIGTERM", "step": 20}, 1000.0, 1010.0)
    'RUNNING'
    """
    # status.json's time has whole seconds: one written in the second of the last metric still counts as newer.
    newer = ended is not None and ended_at is not None and (last_logged is None or ended_at >= math.floor(last_logged))
    if not newer:
        return store or "RUNNING"
    final = str(ended.get("status", ""))
    shown = final if store in (None, "RUNNING") else store
    detail = _end_detail(ended) if shown == final else ""
    if store is not None and store != shown:
        detail = f"{detail}; MLflow: {store}" if detail else f"MLflow: {store}"
    return f"{shown} ({detail})" if detail else shown


def _end_detail(ended: dict[str, Any]) -> str:
    """'SIGTERM at step 20' for a stopped run, 'at step 12' for a failed one, '' for a finished one."""
    if ended.get("status") == "FINISHED":
        return ""
    step = f"at step {ended['step']}" if ended.get("step") is not None else ""
    return " ".join(filter(None, [ended.get("reason"), step]))


def read_status_file(run_dir: Path) -> tuple[dict[str, Any] | None, float | None]:
    """run_dir/status.json and when it was written (its `time`, else the file's mtime); (None, None) if unreadable."""
    path = run_dir / "status.json"
    try:
        ended = json.loads(path.read_text())
        mtime = path.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return None, None
    try:
        return ended, datetime.strptime(ended["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        return ended, mtime


def disambiguate(records: list[RunRecord]) -> list[RunRecord]:
    """Runs sharing a name get their short id after it (in place; returns `records`)."""
    counts = Counter(r.name for r in records)
    for r in records:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({r.short_id})"
    return records


# ----------------------------------------------------------------------------------------------
# MLflow


def read_mlflow_runs(uri: str, experiment: str, max_runs: int = 20) -> list[RunRecord]:
    """The newest `max_runs` runs of an MLflow experiment, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise UserError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: {names or 'none'}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs)
    records = [_mlflow_record(client, run, uri) for run in runs]
    return disambiguate(sorted(records, key=lambda r: r.started))


def _mlflow_record(client: Any, run: Any, uri: str) -> RunRecord:
    run_id, params = run.info.run_id, dict(run.data.params)
    merged, last_logged = {}, None
    for key in METRICS:
        if key not in run.data.metrics:
            continue
        history = client.get_metric_history(run_id, key)
        # sorted() is stable: a tie in time keeps the store's order
        merged[key] = merge_segments((m.step, m.value) for m in sorted(history, key=lambda m: m.timestamp))
        newest = max((m.timestamp for m in history), default=None)
        if newest is not None:
            last_logged = max(last_logged or 0.0, newest / 1000)
    ended, ended_at = _mlflow_status_file(params, uri)
    status = run_status(run.info.status, ended, ended_at, last_logged)
    return build_record(id=run_id, short_id=run_id[:8], name=run.info.run_name or run_id[:8], status=status,
                        params=params, merged=merged, started=(run.info.start_time or 0) / 1000)


def _mlflow_status_file(params: dict[str, str], uri: str) -> tuple[dict[str, Any] | None, float | None]:
    """The run directory's status.json, if readable from here: a relative run_dir is tried against this directory,
    then against a sqlite store's directory (the trainer's default store and runs/ share its working directory)."""
    run_dir = Path(params.get("run_dir") or Path("runs") / params.get("name", ""))
    candidates = [run_dir]
    if not run_dir.is_absolute() and uri.startswith("sqlite:///"):
        candidates.append(Path(uri[len("sqlite:///"):]).parent / run_dir)
    for candidate in candidates:
        ended, ended_at = read_status_file(candidate)
        if ended is not None:
            return ended, ended_at
    return None, None


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def read_jsonl_runs(runs_dir: Path, experiment: str | None = None, max_runs: int = 20) -> list[RunRecord]:
    """The `max_runs` runs under runs_dir (one directory each, holding metrics.jsonl) that logged last, oldest
    first; with `experiment`, only those whose config logs to it."""
    files = sorted(runs_dir.glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        raise UserError(f"no runs to compare: no {runs_dir}/*/metrics.jsonl and no MLflow store; pass --runs-dir "
                        "(the directory holding the run directories) or --tracking-uri")
    records = [_jsonl_record(path.parent) for path in files]
    if experiment is not None:
        found = sorted({r.params.get("tracking.experiment", "") for r in records})
        records = [r for r in records if r.params.get("tracking.experiment") == experiment]
        if not records:
            raise UserError(f"no run in {runs_dir} logs to experiment {experiment!r}; experiments there: {found}")
    return disambiguate(sorted(records[:max_runs], key=lambda r: r.started))


def _jsonl_record(run_dir: Path) -> RunRecord:
    path = run_dir / "metrics.jsonl"
    rows = read_metrics_file(path)
    params = _dir_params(run_dir, rows)
    merged = {key: merge_segments((r["step"], r[key]) for r in rows if key in r) for key in METRICS}
    ended, ended_at = read_status_file(run_dir)
    mtime = path.stat().st_mtime
    return build_record(id=run_dir.name, short_id=run_dir.name, name=params.get("name") or run_dir.name,
                        status=run_status(None, ended, ended_at, mtime), params=params,
                        merged={k: v for k, v in merged.items() if v}, started=mtime)


def read_metrics_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, in file order; a line that does not parse (the one a live run is writing, or
    one cut short by a crash) is skipped, with a warning for any but the last."""
    lines = path.read_text().splitlines()
    rows, bad = [], 0
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += i < len(lines) - 1
            continue
        rows.append(row)
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) of {path}", file=sys.stderr)
    return rows


def _dir_params(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, str]:
    """config.yaml flattened to dotted keys (the MLflow params' names and str() values), plus num_processes and
    global_batch_size, which the config alone cannot tell."""
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        print(f"warning: {run_dir / 'config.yaml'} unreadable ({exc}); comparing {run_dir.name} without its params",
              file=sys.stderr)
        raw = {}
    params = {k: str(v) for k, v in flatten(raw).items()}
    per_process = _int(raw, "train", "batch_size") * _int(raw, "train", "grad_accum_steps", default=1)
    global_batch = _global_batch(run_dir, rows, _int(raw, "model", "seq_len"))
    if global_batch and per_process:
        params.update(num_processes=str(global_batch // per_process), global_batch_size=str(global_batch))
    return params


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys, as dist_lm.config.flatten_config does for a config (a dict read from a run's
    config.yaml need not load as today's config: an older run may have keys since renamed).

    >>> flatten({"optim": {"lr": 0.001}, "name": "demo"})
    {'optim.lr': 0.001, 'name': 'demo'}
    """
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _int(raw: dict[str, Any], section: str, key: str, default: int = 0) -> int:
    value = (raw.get(section) or {}).get(key, default)
    return value if isinstance(value, int) else default


def _global_batch(run_dir: Path, rows: list[dict[str, Any]], seq_len: int) -> int | None:
    """Sequences per step: from the first row with train/tokens (the run's first attempt, as MLflow's params say),
    else from the newest checkpoint's state.json."""
    first = next((r for r in rows if "train/tokens" in r and r["step"] > 0), None)
    if first is not None and seq_len:
        return round(first["train/tokens"] / first["step"] / seq_len)
    states = sorted(run_dir.glob("checkpoints/step_*/state.json"))
    try:
        return int(json.loads(states[-1].read_text())["data"]["global_batch_size"]) if states else None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None

