"""The flow-matching objective (align = "none") and the base class of every training objective.

An objective is an nn.Module whose only trainable parameters are its projector(s). It is called as

    loss, logs = objective(model, batch, teacher, step)

batch:   dict with x0 [B,C,H,W] (clean latent), eps [B,C,H,W] (noise), t [B] (times in [0, 1]) and
         y [B] (labels, label dropout already applied).
teacher: pipeline.teachers.targets.TeacherTargets for this batch, or None when needs_teacher(step)
         is False.

Every objective runs one pipeline (`Objective.forward`): x_t = alpha_t x0 + sigma_t eps and the
velocity target from the interpolant, ONE model call (`predict`: asking for the hidden tokens of
`align_depth` and the attention logits of `attn_layers` only while aligning), the subclass's hook
`alignment_terms(out, teacher)` for the weighted extra terms, and the flow-matching loss. forward returns the
total loss (0-d float32) and detached 0-d logs ("loss", "fm", and the alignment terms that were
computed). Nothing in forward synchronises with the host.

What the rest of the pipeline reads, declared on the class so that no job branches on a method name:
    reads_teacher        whether training reads a teacher store at all;
    config_fields        the align.* fields that shape the result (they enter the run fingerprint);
    teacher_blocks(cfg)  the 0-indexed teacher blocks whose attention logits the targets must carry;
    validate(...)        what the method needs from the student and the teacher, before any compute;
and on an instance: needs_teacher(step) and align_depth (the resolved 1-indexed aligned block).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn

from pipeline.flow import Interpolant, get_interpolant
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig

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
    """Flow matching; a subclass adds its weighted alignment terms in `alignment_terms`."""

    reads_teacher: ClassVar[bool] = False
    config_fields: ClassVar[tuple[str, ...]] = ()
    align_depth: int | None = None  # 1-indexed student block whose tokens the hook reads (None: none)
    attn_layers: tuple[int, ...] = ()  # 0-indexed student blocks whose attention logits it reads

    def __init__(self, path: str = "linear"):
        super().__init__()
        self.path_name = path
        self.path: Interpolant = get_interpolant(path)

    @classmethod
    def validate(cls, model: nn.Module, cfg: AlignConfig, *, teacher_dim: int | None = None,
                 teacher_grid: tuple[int, int] | None = None, teacher_heads: int | None = None,
                 teacher_depth: int | None = None) -> None:
        """Raise student.AlignmentError when this objective cannot train `model` with this teacher."""

    @classmethod
    def teacher_blocks(cls, cfg: AlignConfig) -> tuple[int, ...]:
        """0-indexed teacher blocks whose attention logits TeacherTargets.attn_logits must carry."""
        return ()

    def needs_teacher(self, step: int) -> bool:
        """Whether forward at `step` aligns, i.e. reads teacher targets (False: pass teacher=None)."""
        return False

    # -- the pipeline ---------------------------------------------------------------------------

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor], teacher: TeacherTargets | None,
                aligned: bool) -> tuple[ModelOutput, torch.Tensor]:
        """Noise the batch and make the ONE model call: (its output, the velocity target [B, C, H, W]).
        While `aligned` the model also returns the hidden tokens and attention logits the hook reads."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks keys {missing}; an objective needs {list(BATCH_KEYS)}")
        x0, eps, t = batch["x0"], batch["eps"], batch["t"]
        if eps.shape != x0.shape or t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"batch shapes disagree: x0 {tuple(x0.shape)}, eps {tuple(eps.shape)}, "
                             f"t {tuple(t.shape)} (expected eps like x0 and t [B])")
        x_t, target = self.path.interpolate(x0, eps, t), self.path.velocity(x0, eps, t)
        if not aligned:
            return model(x_t, t, batch["y"], align_depth=None, attn_layers=()), target
        if teacher is None:
            raise ValueError(f"{type(self).__name__} aligns at this step (needs_teacher(step) is True): "
                             "pass its TeacherTargets, not None")
        return model(x_t, t, batch["y"], align_depth=self.align_depth, attn_layers=self.attn_layers), target

    def alignment_terms(self, out: ModelOutput, teacher: TeacherTargets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The hook: (weighted sum of the alignment terms 0-d, unweighted terms by log name)."""
        raise NotImplementedError(f"{type(self).__name__} has no alignment terms")

    def terms(self, model: nn.Module, batch: dict[str, torch.Tensor], teacher: TeacherTargets | None,
              aligned: bool) -> LossTerms:
        """The undetached pieces (HASTE's trigger takes gradients of them separately)."""
        out, target = self.predict(model, batch, teacher, aligned)
        align, parts = self.alignment_terms(out, teacher) if aligned else (None, {})
        return LossTerms(fm=flow_matching_loss(out.velocity, target), align=align, parts=parts)

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        teacher: TeacherTargets | None,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss 0-d, detached logs). loss = fm (+ the weighted alignment terms)."""
        aligned = self.needs_teacher(step)
        out, target = self.predict(model, batch, teacher, aligned)
        align, parts = self.alignment_terms(out, teacher) if aligned else (None, {})
        fm = flow_matching_loss(out.velocity, target)
        loss = fm if align is None else fm + align
        logs = {"loss": loss.detach(), "fm": fm.detach()}
        logs.update({name: value.detach() for name, value in parts.items()})
        return loss, logs


class FlowMatching(Objective):
    """align = "none": plain flow matching, no teacher, no parameters (the student is used as is)."""

    def extra_repr(self) -> str:
        return f"path={self.path_name!r}"
