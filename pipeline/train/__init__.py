"""Training: per-step batches (data), the loop, checkpoints, EMA and metrics logging.

    training_loop(run_dir=..., build_model=..., build_objective=..., dataset=TrainDataset(...), steps=...)
runs under any launcher in pipeline.launch.
"""

from pipeline.train.data import TrainDataset
from pipeline.train.ema import EMA
from pipeline.train.logging import MetricsLogger
from pipeline.train.loop import training_loop

__all__ = ["EMA", "MetricsLogger", "TrainDataset", "training_loop"]
