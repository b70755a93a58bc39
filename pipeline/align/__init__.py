"""Training objectives: flow matching alone or with REPA, U-REPA or HASTE alignment.

    objective = build_objective(cfg.train.align, model, cfg.align, path=..., teacher_dim=...,
                                teacher_grid=..., teacher_heads=...)
    loss, logs = objective(model, batch, teacher, step)

losses.py holds the alignment losses as plain tensor functions, heads.py the projector and the grid
resize, student.py what is read from a backbone, base.py the one pipeline every objective runs, one
module per method (each adds its terms in `alignment_terms`), trigger.py HASTE's optional early
stop, registry.py the name -> class table and the checks.
"""

from pipeline.align.base import FlowMatching, LossTerms, Objective, flow_matching_loss
from pipeline.align.haste import HASTE
from pipeline.align.heads import GridAdapter, Projector, align_to_grid
from pipeline.align.losses import attention_ce, manifold_loss, repa_loss
from pipeline.align.registry import OBJECTIVES, build_objective, check_compatible, objective_class
from pipeline.align.repa import REPA
from pipeline.align.student import AlignmentError
from pipeline.align.trigger import GradientAngleTrigger, build_trigger
from pipeline.align.urepa import URepa

__all__ = [
    "AlignmentError", "FlowMatching", "GradientAngleTrigger", "GridAdapter", "HASTE", "LossTerms",
    "OBJECTIVES", "Objective", "Projector", "REPA", "URepa", "align_to_grid", "attention_ce",
    "build_objective", "build_trigger", "check_compatible", "flow_matching_loss", "manifold_loss",
    "objective_class", "repa_loss",
]
