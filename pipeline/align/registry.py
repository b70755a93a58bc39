"""train.align name -> objective class; the compatibility check that runs before any compute.

    none   FlowMatching   plain flow matching
    repa   REPA           + projected-feature term
    urepa  URepa          + projected-feature and manifold terms (projector, then resize)
    haste  HASTE          + projected-feature and attention terms until tau / the trigger
"""

from __future__ import annotations

import torch.nn as nn

from pipeline.align.base import FlowMatching, Objective
from pipeline.align.haste import HASTE
from pipeline.align.repa import REPA
from pipeline.align.student import AlignmentError
from pipeline.align.urepa import URepa
from schemas.config import AlignConfig

OBJECTIVES: dict[str, type[Objective]] = {"none": FlowMatching, "repa": REPA, "urepa": URepa, "haste": HASTE}


def objective_class(align: str) -> type[Objective]:
    """The class behind a train.align value."""
    if align not in OBJECTIVES:
        raise AlignmentError(f"train.align={align!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[align]


def check_compatible(
    align: str,
    model: nn.Module,
    cfg: AlignConfig,
    *,
    teacher_dim: int | None,
    teacher_grid: tuple[int, int] | None,
    teacher_heads: int | None,
    teacher_depth: int | None = None,
):
    """Raise AlignmentError (one line naming the key and the fix) if `align` cannot train `model`.

    teacher_*: width D, patch grid (gh, gw), heads and number of blocks of the teacher (teacher_depth
    None = not checked). Builds nothing; returns what the class's validate resolved (the feature site).
    """
    try:
        return objective_class(align).validate(
            model, cfg, teacher_dim=teacher_dim, teacher_grid=teacher_grid,
            teacher_heads=teacher_heads, teacher_depth=teacher_depth,
        )
    except AlignmentError:
        raise
    except ValueError as err:  # a model method's own ValueError: same contract, one line
        raise AlignmentError(f"align={align}: {err}") from err


def build_objective(
    align: str,
    model: nn.Module,
    cfg: AlignConfig,
    *,
    path: str,
    teacher_dim: int | None,
    teacher_grid: tuple[int, int] | None,
    teacher_heads: int | None,
) -> Objective:
    """The objective for train.align = `align` (projector freshly initialised, on the CPU).

    model: the student backbone (read for its geometry, not kept). path: the flow-matching
    interpolant ("linear" | "cosine"). teacher_* may be None for align="none".
    """
    cls = objective_class(align)
    if cls is FlowMatching:
        return FlowMatching(path)
    site = check_compatible(align, model, cfg, teacher_dim=teacher_dim, teacher_grid=teacher_grid,
                            teacher_heads=teacher_heads)
    return cls(site, cfg, path=path, teacher_dim=teacher_dim, teacher_grid=teacher_grid, teacher_heads=teacher_heads)
