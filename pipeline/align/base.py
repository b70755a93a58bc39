"""The flow-matching objective (align = "none") and the base class of every training objective.

An objective is an nn.Module whose only trainable parameters are its projector(s). It is called as

    loss, logs = objective(model, batch, teacher, step)

batch:   dict with x0 [B,C,H,W] (clean latent), eps [B,C,H,W] (noise), t [B] (times in [0, 1]) and
         y [B] (labels, label dropout already applied).
teacher: pipeline.teachers.targets.TeacherTargets for this batch, or None when needs_teacher(step)
         is False.
It builds x_t = alpha_t x0 + sigma_t eps and the velocity target from the interpolant path, calls the
model once, and returns the total loss (0-d float32) and detached 0-d logs ("loss", "fm", and the
alignment terms that were computed). Nothing in forward synchronises with the host.

Besides the call, the training loop reads:
    needs_teacher(step)          whether to load teacher targets for this step;
    teacher_attention_layers()   the 0-indexed teacher blocks whose logits the targets must carry;
    align_depth                  the resolved 1-indexed student block that is aligned (None: none).
A subclass states what it needs from the student and the teacher in the classmethod `validate`,
which the registry also calls before any compute is spent (raising student.AlignmentError).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from pipeline.flow import Path, get_path
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets

BATCH_KEYS = ("x0", "eps", "t", "y")


# ----------------------------------------------------------------------------------------------
#                                   Flow-matching loss
# ----------------------------------------------------------------------------------------------


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE averaged over all non-batch dims, then over the batch. [B, ...] x 2 -> 0-d float32."""
    if pred.shape != target.shape:
        raise ValueError(
            f"model velocity {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    return per_sample.mean()


class LossTerms(NamedTuple):
    """Undetached pieces of one objective evaluation.

    fm:    0-d flow-matching loss.
    align: 0-d weighted sum of the alignment terms (already multiplied by their coefficients), or
           None when no alignment term is active.
    parts: unweighted alignment terms by log name ("repa", "manifold", "attn").
    """

    fm: torch.Tensor
    align: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}


# ----------------------------------------------------------------------------------------------
#                                       Base objective
# ----------------------------------------------------------------------------------------------


class Objective(nn.Module):
    """Flow matching plus the alignment terms a subclass adds in `terms`."""

    align_depth: int | None = None

    def __init__(self, path: str = "linear"):
        super().__init__()
        self.path_name = path
        self.path: Path = get_path(path)

    @classmethod
    def validate(
        cls,
        model: nn.Module,
        cfg,
        *,
        teacher_dim: int | None = None,
        teacher_grid: tuple[int, int] | None = None,
        teacher_heads: int | None = None,
        teacher_depth: int | None = None,
    ) -> None:
        """Raise student.AlignmentError when this objective cannot train `model` with this teacher."""

    # -- what the data path must provide -------------------------------------------------------

    def needs_teacher(self, step: int) -> bool:
        """Whether forward at `step` reads teacher targets (False: pass teacher=None)."""
        return False

    def teacher_attention_layers(self) -> tuple[int, ...]:
        """0-indexed teacher blocks whose attention logits TeacherTargets.attn_logits must carry."""
        return ()

    # -- the pieces -----------------------------------------------------------------------------

    def noised(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t [B,C,H,W] and the target velocity [B,C,H,W] of a batch on this objective's path."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks keys {missing}; an objective needs {list(BATCH_KEYS)}")
        x0, eps, t = batch["x0"], batch["eps"], batch["t"]
        if eps.shape != x0.shape or t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(
                f"batch shapes disagree: x0 {tuple(x0.shape)}, eps {tuple(eps.shape)}, t {tuple(t.shape)} "
                "(expected eps like x0 and t [B])"
            )
        return self.path.interpolate(x0, eps, t), self.path.velocity(x0, eps, t)

    def call_model(
        self,
        model: nn.Module,
        x_t: torch.Tensor,
        batch: dict[str, torch.Tensor],
        align_depth: int | None = None,
        attn_layers: tuple[int, ...] = (),
    ) -> ModelOutput:
        """The single forward pass of a training step."""
        return model(x_t, batch["t"], batch["y"], align_depth=align_depth, attn_layers=attn_layers)

    def terms(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        teacher: TeacherTargets | None,
        step: int,
    ) -> LossTerms:
        """Flow matching only: one model call without alignment outputs."""
        x_t, target = self.noised(batch)
        out = self.call_model(model, x_t, batch)
        return LossTerms(fm=flow_matching_loss(out.velocity, target))

    # -- the step -------------------------------------------------------------------------------

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        teacher: TeacherTargets | None,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss 0-d, detached logs). loss = fm (+ the weighted alignment terms)."""
        parts = self.terms(model, batch, teacher, step)
        loss = parts.fm if parts.align is None else parts.fm + parts.align
        logs = {"loss": loss.detach(), "fm": parts.fm.detach()}
        logs.update({name: value.detach() for name, value in parts.parts.items()})
        return loss, logs


class FlowMatching(Objective):
    """align = "none": plain flow matching, no teacher, no parameters (the student is used as is)."""

    def extra_repr(self) -> str:
        return f"path={self.path_name!r}"
