"""Compare the runs of an MLflow experiment: a table of what differs and how they did, and loss curves.

Design decisions:
- Reads the same store the trainer writes (the config's URI rules: explicit, MLFLOW_TRACKING_URI,
  then sqlite:///mlflow.db), through MlflowClient only: no server needed, a sqlite file works.
- The table shows only the params that differ between the runs (the rest is noise), then the final
  train and val loss, tokens/s and MFU when logged.
- The plot is matplotlib's Agg backend, written to a file: it works on headless machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_lm.errors import UserError

RESULT_METRICS = ("train/loss", "val/loss", "perf/tokens_per_s", "perf/mfu")


def collect_runs(uri: str, experiment: str, max_runs: int = 20) -> list[dict[str, Any]]:
    """The newest `max_runs` runs of an experiment: id, name, status, params, last metrics, loss histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise UserError(f"no MLflow experiment {experiment!r} in {uri}; experiments there: {names or 'none'}")
    runs = []
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs):
        histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                     for key in ("train/loss", "val/loss") if key in run.data.metrics}
        runs.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "params": dict(run.data.params),
            "metrics": {k: run.data.metrics[k] for k in RESULT_METRICS if k in run.data.metrics},
            "history": histories,
        })
    return runs


def differing_params(runs: list[dict[str, Any]]) -> list[str]:
    """Param keys whose values are not the same in every run."""
    keys = sorted({k for r in runs for k in r["params"]})
    return [k for k in keys if len({r["params"].get(k) for r in runs}) > 1]


def format_table(runs: list[dict[str, Any]]) -> str:
    """A plain-text table: run name, differing params, final metrics."""
    params = differing_params(runs)
    header = ["run", "status", *params, *(m for m in RESULT_METRICS if any(m in r["metrics"] for r in runs))]
    rows = []
    for r in runs:
        cells = [r["name"] or r["run_id"][:8], r["status"], *(r["params"].get(p, "") for p in params)]
        for m in header[2 + len(params):]:
            v = r["metrics"].get(m)
            cells.append("" if v is None else f"{v:.1%}" if m == "perf/mfu" else f"{v:,.0f}" if "tokens" in m
                         else f"{v:.4f}")
        rows.append([str(c) for c in cells])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def plot_losses(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """Train (solid) and val (dashed, markers) loss against step for every run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    formats = fig.canvas.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() not in formats:
        plt.close(fig)
        raise UserError(f"cannot write a plot to {str(path)!r}: the suffix picks the format; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        label = r["name"] or r["run_id"][:8]
        if "train/loss" in r["history"]:
            steps, values = zip(*r["history"]["train/loss"])
            ax.plot(steps, values, color=color, label=f"{label} train", linewidth=1)
        if "val/loss" in r["history"]:
            steps, values = zip(*r["history"]["val/loss"])
            ax.plot(steps, values, color=color, linestyle="--", marker="o", label=f"{label} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
