"""HASTE (arXiv 2505.16792): feature and attention alignment in phase I, plain flow matching after.

Phase I (step < align.tau and not terminated):

    L = L_fm + coeff * L_repa + attn_coeff * mean over pairs (s, t) of
            attention_ce(student logits of block s, first H_teacher heads; teacher logits of block t)

with (s, t) = zip(align.student_layers, align.teacher_layers), both 0-indexed, L_repa REPA's
projected-feature term at align.depth, temperature 1. The student's attention maps are not resized:
each student layer must attend over the teacher's patch grid, and the student needs at least as
many heads as the teacher (checked when the objective is built).

Phase II (step >= align.tau, or after `terminate(step)`, e.g. from trigger.GradientAngleTrigger):
L = L_fm. needs_teacher(step) is False, so no teacher data is read, and the model is called with
neither align_depth nor attn_layers, so no hidden state is kept and no attention logits are
computed. A teacher passed anyway is ignored, never read. Termination is stored in the buffer
`stopped_at` (the step, -1 while aligning), so it is saved in state_dict and survives a resume.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from pipeline.align.losses import attention_ce, repa_loss
from pipeline.align.repa import REPA
from pipeline.align.student import AlignmentError, FeatureSite, check_attention_layers, check_teacher_layers
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig


class HASTE(REPA):
    """Flow matching plus HASTE's feature and attention terms until termination.

    Parameters: the projector. Buffers: `stopped_at` (0-d int64, -1 = not terminated).
    """

    config_fields: ClassVar[tuple[str, ...]] = REPA.config_fields + (
        "attn_coeff", "student_layers", "teacher_layers", "tau", "trigger", "trigger_start", "trigger_every",
        "trigger_threshold")

    def __init__(self, site: FeatureSite, cfg: AlignConfig, *, teacher_heads: int, **teacher):
        super().__init__(site, cfg, teacher_heads=teacher_heads, **teacher)
        self.attn_layers = tuple(int(s) for s in cfg.student_layers)
        self.teacher_layers = tuple(int(t) for t in cfg.teacher_layers)
        self.teacher_heads = int(teacher_heads)
        self.attn_coeff = float(cfg.attn_coeff)
        self.tau = int(cfg.tau)
        self.register_buffer("stopped_at", torch.tensor(-1, dtype=torch.long))
        self._stopped_at: int | None = None  # host copy of the buffer, read without a device sync

    @classmethod
    def validate(cls, model: nn.Module, cfg: AlignConfig, *, teacher_dim: int | None = None,
                 teacher_grid: tuple[int, int] | None = None, teacher_heads: int | None = None,
                 teacher_depth: int | None = None) -> FeatureSite:
        """REPA's checks, plus: attention layers that pair with the teacher's (heads, grid, range).

        (The config itself pairs student_layers with teacher_layers one to one.)
        """
        site = super().validate(model, cfg, teacher_dim=teacher_dim, teacher_grid=teacher_grid)
        if not cfg.student_layers:
            raise AlignmentError("align=haste needs at least one layer pair in align.student_layers / teacher_layers")
        check_attention_layers(model, cfg.student_layers, teacher_heads=teacher_heads, teacher_grid=teacher_grid)
        check_teacher_layers(cfg.teacher_layers, teacher_depth)
        return site

    @classmethod
    def teacher_blocks(cls, cfg: AlignConfig) -> tuple[int, ...]:
        return tuple(int(t) for t in cfg.teacher_layers)

    # -- phase ----------------------------------------------------------------------------------

    def needs_teacher(self, step: int) -> bool:
        """True in phase I: before tau and before any terminate()."""
        return self._stopped_at is None and step < self.tau

    def terminate(self, step: int) -> None:
        """Switch alignment off for good from `step` on (the first call wins)."""
        if self._stopped_at is None:
            self._stopped_at = int(step)
            self.stopped_at.fill_(int(step))

    @property
    def terminated_at(self) -> int | None:
        """The step given to terminate(), or None (tau alone does not set it)."""
        return self._stopped_at

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        value = int(self.stopped_at.item())  # once per load, not per step
        self._stopped_at = None if value < 0 else value

    # -- the terms ------------------------------------------------------------------------------

    def attention_loss(self, out: ModelOutput, teacher: TeacherTargets) -> torch.Tensor:
        """Unweighted attention term: attention_ce averaged over the layer pairs."""
        if len(out.attn_logits) != len(self.attn_layers):
            raise ValueError(
                f"the model returned {len(out.attn_logits)} attention logits for attn_layers="
                f"{list(self.attn_layers)}; its forward must honour attn_layers"
            )
        t = self.teacher_grid[0] * self.teacher_grid[1]
        want = (out.velocity.shape[0], self.teacher_heads, t, t)
        shapes = [tuple(x.shape) for x in teacher.attn_logits]
        if len(shapes) != len(self.teacher_layers) or any(s != want for s in shapes):
            raise ValueError(
                f"align=haste needs teacher attention logits of blocks {list(self.teacher_layers)}, each "
                f"{list(want)}; got {len(shapes)} tensors of shapes {shapes} (is teacher.cache hidden or "
                "online, and were the objective's teacher_blocks requested?)"
            )
        h = self.teacher_heads
        losses = [attention_ce(s[:, :h], t) for s, t in zip(out.attn_logits, teacher.attn_logits, strict=True)]
        return torch.stack(losses).mean()

    def alignment_terms(self, out: ModelOutput, teacher: TeacherTargets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        repa = repa_loss(self.project(out, teacher), self.targets(teacher))
        attn = self.attention_loss(out, teacher)
        return self.coeff * repa + self.attn_coeff * attn, {"repa": repa, "attn": attn}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, student_layers={list(self.attn_layers)}, "
            f"teacher_layers={list(self.teacher_layers)}, teacher_heads={self.teacher_heads}, "
            f"attn_coeff={self.attn_coeff}, tau={self.tau}"
        )
