"""Training: the loop, checkpoints, tracking, throughput accounting."""

from dist_lm.train.trainer import TrainResult, evaluate, train

__all__ = ["TrainResult", "evaluate", "train"]
