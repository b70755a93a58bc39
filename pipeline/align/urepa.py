"""U-REPA (arXiv 2503.18414): REPA for U-Net-shaped students, plus a manifold term.

    L = L_fm + coeff * (L_repa + manifold_weight * L_manifold)

The student is read at align.depth (0 = the model's default_align_depth, for SiT-down the middle of
its downsampled stage). The projector MLP runs FIRST, per token, on the student's own (e.g. 8x8)
grid; the projected map is THEN resized to the teacher's (e.g. 16x16) grid with align.resize
(default bilinear, which the paper does not name). Both L_repa and L_manifold compare these
projected, resized tokens with the teacher's tokens.

L_manifold (losses.manifold_loss) is the mean squared difference between the teacher's and the
student's cosine-similarity matrices, with a plus sign (the printed minus sign is taken as a typo)
and normalised by the number of entries. align.manifold_over picks what the matrices span:
"tokens" (per image, T x T over its patch tokens; default) or "samples" (per token position,
B x B across the batch).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.align.base import LossTerms, flow_matching_loss
from pipeline.align.losses import MANIFOLD_OVER, manifold_loss, repa_loss
from pipeline.align.repa import REPA
from pipeline.teachers.targets import TeacherTargets


class URepa(REPA):
    """Flow matching plus U-REPA's projected-feature and manifold terms. Parameters: the projector."""

    align_name = "urepa"

    def __init__(
        self,
        model: nn.Module,
        cfg,
        *,
        path: str = "linear",
        teacher_dim: int | None,
        teacher_grid: tuple[int, int] | None,
        teacher_heads: int | None = None,
    ):
        super().__init__(model, cfg, path=path, teacher_dim=teacher_dim, teacher_grid=teacher_grid,
                         teacher_heads=teacher_heads)
        if cfg.manifold_over not in MANIFOLD_OVER:
            raise ValueError(f"align.manifold_over={cfg.manifold_over!r} is not one of {MANIFOLD_OVER}")
        self.manifold_weight = float(cfg.manifold_weight)
        self.manifold_over = cfg.manifold_over

    def aligned_terms(
        self, model: nn.Module, batch: dict[str, torch.Tensor], teacher: TeacherTargets | None
    ) -> LossTerms:
        x_t, target = self.noised(batch)
        teacher = self.check_teacher(teacher, x_t.shape[0])
        out = self.call_model(model, x_t, batch, align_depth=self.align_depth)
        student = self.project(self.student_output(out))  # [B, T, D] on the teacher grid
        repa = repa_loss(student, teacher.tokens)
        manifold = manifold_loss(student, teacher.tokens, over=self.manifold_over)
        return LossTerms(
            fm=flow_matching_loss(out.velocity, target),
            align=self.coeff * (repa + self.manifold_weight * manifold),
            parts={"repa": repa, "manifold": manifold},
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, manifold_weight={self.manifold_weight}, "
            f"manifold_over={self.manifold_over!r}"
        )
