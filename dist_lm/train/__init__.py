"""Training: the loop, checkpoints, tracking, throughput accounting.

`train`, `evaluate` and `TrainResult` load the trainer (and torch) on first use, so that a process which needs
only a light part of this package (the MLflow writer process, dist_lm.train.mlflow_process) starts in a moment.
"""

from typing import Any

__all__ = ["TrainResult", "evaluate", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dist_lm.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dist_lm.train' has no attribute {name!r}")
