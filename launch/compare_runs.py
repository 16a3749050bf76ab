"""Compare training runs: a table of what differs and how each did, and loss curves against tokens.

    python launch/compare_runs.py --experiment dist_lm-demo --plot losses.png

Reads the MLflow store of --tracking-uri (else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); with --runs-dir, or
when that store is a file that does not exist, reads <runs-dir>/*/metrics.jsonl instead (default runs/)."""

import argparse

from dist_lm.cli import run_main
from dist_lm.train.compare import AXES, collect_runs, format_table, plot_losses
from dist_lm.train.tracking import resolve_tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default dist_lm-demo); with the "
                        "metrics.jsonl source, keeps only the runs whose config logs to it")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db)")
    parser.add_argument("--runs-dir", default=None, help="read DIR/*/metrics.jsonl instead of MLflow")
    parser.add_argument("--x", choices=AXES, default="tokens", help="x-axis of the plot (default: tokens trained)")
    parser.add_argument("--max-runs", type=int, default=10, help="newest runs to compare")
    parser.add_argument("--plot", default="", help="write train/val loss curves to this image (.png, .svg, .pdf)")
    args = parser.parse_args()
    runs = collect_runs(resolve_tracking_uri(args.tracking_uri), args.experiment, args.max_runs, args.runs_dir)
    print(format_table(runs))
    if args.plot:
        print(f"loss curves: {plot_losses(runs, args.plot, args.x)}")


if __name__ == "__main__":
    run_main(main)
