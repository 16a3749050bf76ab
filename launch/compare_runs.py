"""Compare the runs of an MLflow experiment: `python launch/compare_runs.py --experiment dist_lm-demo
--plot losses.png`. Reads MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (or pass --tracking-uri)."""

import argparse

from dist_lm.cli import run_main
from dist_lm.train.compare import collect_runs, format_table, plot_losses
from dist_lm.train.tracking import resolve_tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="dist_lm-demo", help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db)")
    parser.add_argument("--max-runs", type=int, default=10, help="newest runs to compare")
    parser.add_argument("--plot", default="", help="write train/val loss curves to this PNG")
    args = parser.parse_args()
    runs = collect_runs(resolve_tracking_uri(args.tracking_uri), args.experiment, args.max_runs)
    print(format_table(runs))
    if args.plot:
        print(f"loss curves: {plot_losses(runs, args.plot)}")


if __name__ == "__main__":
    run_main(main)
