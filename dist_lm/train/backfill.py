"""Send an MLflow run what its run directory's metrics.jsonl holds and the run lacks (after an outage at the end).

Design decisions:
- metrics.jsonl is the run's own record (dist_lm.train.logger), complete whatever MLflow went through; a metric
  point is identified by (metric, step), so backfilling sends only the pairs the MLflow run does not hold: run it
  twice and the second run sends nothing.
- The MLflow run is the one run_dir/mlflow.json names (written when the trainer's writer opened it), else a new one
  in the config's experiment, with the config's params, whose id is then written there. Its final status is
  status.json's (FINISHED, KILLED, FAILED).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from dist_lm.config import config_from_dict, flatten_config
from dist_lm.errors import UserError
from dist_lm.train.logger import METRICS_FILE, STATUS_FILE
from dist_lm.train.tracking import RUN_FILE, MlflowTracker, resolve_tracking_uri, write_run_file


@dataclass
class Backfill:
    """What one backfill did."""

    run_id: str
    uri: str
    points_sent: int
    status: str | None


def read_rows(path: Path) -> list[tuple[int, dict[str, float]]]:
    """metrics.jsonl as (step, metrics) rows; a line cut short by a crash is skipped with a warning."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            rows.append((int(row.pop("step")), {k: float(v) for k, v in row.items()}))
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"skipping an unreadable line of {path}: {line[:80]!r}", RuntimeWarning, stacklevel=2)
    return rows


def backfill(run_dir: str | Path, uri: str = "") -> Backfill:
    """Send run_dir's metric points that its MLflow run lacks, then set the run's final status; see the module
    docstring. `uri`: the store, if not the one mlflow.json (or the config) names."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE}: pass a run directory (e.g. runs/demo)")
    tracker = _tracker(run_dir, uri)
    write_run_file(run_dir, tracker)
    rows = read_rows(run_dir / METRICS_FILE)
    keys = sorted({k for _, metrics in rows for k in metrics})
    held = {key: tracker.logged_steps(key) for key in keys}
    missing = [(step, {k: v for k, v in metrics.items() if step not in held[k]}) for step, metrics in rows]
    missing = [(step, metrics) for step, metrics in missing if metrics]
    tracker.log_rows(missing, skip_logged=False)
    status = _final_status(run_dir)
    if status is not None:
        tracker.close(status)
    return Backfill(tracker.run_id, tracker.uri, sum(len(m) for _, m in missing), status)


def _tracker(run_dir: Path, uri: str) -> MlflowTracker:
    """The MLflow run of run_dir, opened: the one mlflow.json names (its status left as it is), else, or when that
    store does not hold it (another --tracking-uri), a new one from config.yaml (params logged)."""
    if (run_dir / RUN_FILE).is_file():
        known = json.loads((run_dir / RUN_FILE).read_text())
        tracker = MlflowTracker(uri or known["tracking_uri"], known["experiment"], known["run_name"],
                                known["run_id"], open_now=False)
        try:
            tracker.open(mark_running=False)
            return tracker
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} has neither {RUN_FILE} nor config.yaml: it is not a run directory")
    import yaml

    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    tracker = MlflowTracker(uri or resolve_tracking_uri(cfg.tracking.tracking_uri), cfg.tracking.experiment, cfg.name,
                            open_now=False)
    tracker.open()
    tracker.log_params(flatten_config(cfg))
    return tracker


def _final_status(run_dir: Path) -> str | None:
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())["status"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{run_dir / STATUS_FILE} is unreadable ({exc}); delete it to backfill the metrics "
                        "without a final status") from None
    return status if status in ("FINISHED", "KILLED", "FAILED") else None
