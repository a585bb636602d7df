"""Training: `thrifty train` / :class:`Trainer`, LoRA, checkpoints, distributed on torchrun."""
from thrifty.train.trainer import TrainConfig, Trainer, TrainError, TrainStopped, parse_duration

__all__ = ["Trainer", "TrainConfig", "TrainError", "TrainStopped", "parse_duration"]
