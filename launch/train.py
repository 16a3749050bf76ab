"""Train a model: `accelerate launch --config_file configs/accelerate/single.yaml launch/train.py
[--config configs/X.yaml] [section.key=value ...]`. With no --config it runs the demo."""

import argparse
from pathlib import Path

from dist_lm.cli import run_main
from dist_lm.config import load_config
from dist_lm.train import train

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEMO), help="training YAML (default: the demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=100")
    args = parser.parse_args()
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    run_main(main)
