"""Train a model: `accelerate launch --config_file configs/accelerate/single.yaml launch/train.py
[--config configs/X.yaml] [section.key=value ...]`. With no --config it runs the demo. Exit statuses:
dist_lm/cli.py (75: stopped early with a checkpoint; the same command with train.resume=latest continues)."""

import os

LAUNCHER = os.getppid()  # read first: the launcher this worker must not outlive (dist_lm.train.stop.exit_with_parent)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from dist_lm.cli import EXIT_STOPPED, run_main  # noqa: E402
from dist_lm.config import load_config  # noqa: E402
from dist_lm.train import train  # noqa: E402
from dist_lm.train.stop import exit_with_parent  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEMO), help="training YAML (default: the demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=100")
    args = parser.parse_args()
    exit_with_parent(LAUNCHER)  # a killed launcher sends its workers SIGTERM: they stop with a checkpoint
    result = train(load_config(args.config, args.overrides))
    return EXIT_STOPPED if result.stopped else 0


if __name__ == "__main__":
    run_main(main)
