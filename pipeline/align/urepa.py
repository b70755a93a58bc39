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

from typing import ClassVar

import torch

from pipeline.align.losses import manifold_loss, repa_loss
from pipeline.align.repa import REPA
from pipeline.align.student import FeatureSite
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig


class URepa(REPA):
    """Flow matching plus U-REPA's projected-feature and manifold terms. Parameters: the projector."""

    config_fields: ClassVar[tuple[str, ...]] = REPA.config_fields + ("manifold_weight", "manifold_over")

    def __init__(self, site: FeatureSite, cfg: AlignConfig, **teacher):
        super().__init__(site, cfg, **teacher)
        self.manifold_weight = float(cfg.manifold_weight)
        self.manifold_over = cfg.manifold_over

    def alignment_terms(self, out: ModelOutput, teacher: TeacherTargets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = self.project(out, teacher)  # [B, T, D] on the teacher grid
        target = self.targets(teacher)
        repa = repa_loss(student, target)
        manifold = manifold_loss(student, target, over=self.manifold_over)
        return self.coeff * (repa + self.manifold_weight * manifold), {"repa": repa, "manifold": manifold}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, manifold_weight={self.manifold_weight}, "
            f"manifold_over={self.manifold_over!r}"
        )
