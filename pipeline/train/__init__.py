"""Training: per-step batches (data), the loop and its update, checkpoints, EMA and metrics logging.

    training_loop(LoopSettings(steps=..., ...), run_dir=..., build_model=..., build_objective=...,
                  dataset=TrainDataset(...), worker=current_context(), ...)
runs under any launcher in pipeline.launch; the launcher's WorkerContext is read by the caller, not here.
`train_step` is one optimiser update of that loop; `TrainPlan` (pipeline.train.plan) is what the train
job hands every worker.
"""

from pipeline.train.data import TrainDataset
from pipeline.train.ema import EMA
from pipeline.train.logging import MetricsLogger
from pipeline.train.loop import training_loop
from pipeline.train.plan import LoopSettings, TrainPlan
from pipeline.train.step import train_step

__all__ = ["EMA", "LoopSettings", "MetricsLogger", "TrainDataset", "TrainPlan", "train_step", "training_loop"]
