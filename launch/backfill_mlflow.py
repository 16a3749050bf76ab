"""Send an MLflow run what its run directory's metrics.jsonl holds and the run lacks (after MLflow was away at the
end of training): `python launch/backfill_mlflow.py --run-dir runs/demo [--tracking-uri URI]`. Running it again
sends nothing new."""

import argparse

from dist_lm.cli import run_main
from dist_lm.train.backfill import backfill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", required=True, help="the run directory (holds metrics.jsonl)")
    parser.add_argument("--tracking-uri", default="", help="the MLflow store (default: the one the run used)")
    args = parser.parse_args()
    done = backfill(args.run_dir, args.tracking_uri)
    print(f"sent {done.points_sent} metric points to MLflow run {done.run_id} in {done.uri}"
          + (f"; status {done.status}" if done.status else ""))


if __name__ == "__main__":
    run_main(main)
