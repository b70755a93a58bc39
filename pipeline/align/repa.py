"""REPA (arXiv 2410.06940): align one student block's tokens with the teacher's patch tokens.

    L = L_fm + coeff * L_repa,   L_repa = mean over b, n of -cos(resize(h_phi(h_bn)), y_bn)

h = the output of student block `align.depth` (1-indexed; 0 = the model's default_align_depth),
h_phi = the per-token projector MLP (heads.Projector, hidden width align.projector_dim), y = the
teacher's x_norm_patchtokens. iREPA's two options (arXiv 2512.10794) apply here and in the subclasses:
align.projector = "conv" makes h_phi one 3x3 convolution over the token grid (heads.ConvProjector), and
align.spatial_norm = true compares with losses.spatial_normalize(y, align.spatial_norm_gamma) instead of y. When the student's token grid differs from the teacher's patch grid,
the PROJECTED map is resized to the teacher grid (heads.align_to_grid, mode align.resize), the order
U-REPA found best; REPA's own setup has equal grids and no resize.

The objective holds the projector and nothing of the model; the model is passed to every call.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from pipeline.align.base import Objective
from pipeline.align.heads import GridAdapter, build_projector
from pipeline.align.losses import repa_loss, spatial_normalize
from pipeline.align.student import FeatureSite, check_teacher_geometry, feature_site
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig


class REPA(Objective):
    """Flow matching plus REPA's projected-feature term.

    Parameters: the projector only. `align_depth` is the resolved 1-indexed student block.
    Subclasses (U-REPA, HASTE) reuse `project` and `feature_loss` in their `alignment_terms`.
    """

    reads_teacher: ClassVar[bool] = True
    config_fields: ClassVar[tuple[str, ...]] = ("depth", "coeff", "projector_dim", "resize", "projector",
                                                "spatial_norm", "spatial_norm_gamma")

    def __init__(self, site: FeatureSite, cfg: AlignConfig, *, path: str = "linear", teacher_dim: int,
                 teacher_grid: tuple[int, int], teacher_heads: int | None = None):
        """site: the checked student block (validate's result); teacher_*: width D, grid (gh, gw), heads."""
        super().__init__(path)
        self.teacher_dim, self.teacher_grid = int(teacher_dim), (int(teacher_grid[0]), int(teacher_grid[1]))
        self.align_depth = site.depth
        self.student_grid = site.grid
        self.coeff = float(cfg.coeff)
        self.projector = build_projector(cfg.projector, site.width, self.teacher_dim, cfg.projector_dim, site.grid)
        self.resize = GridAdapter(site.grid, self.teacher_grid, cfg.resize)
        self.spatial_norm = cfg.spatial_norm
        self.spatial_norm_gamma = float(cfg.spatial_norm_gamma)

    @classmethod
    def validate(cls, model: nn.Module, cfg: AlignConfig, *, teacher_dim: int | None = None,
                 teacher_grid: tuple[int, int] | None = None, teacher_heads: int | None = None,
                 teacher_depth: int | None = None) -> FeatureSite:
        """Check the teacher geometry and align.depth against the model; returns the resolved site.

        Any student grid works: it is resized to the teacher grid after the projector.
        """
        check_teacher_geometry(cls.__name__.lower(), teacher_dim, teacher_grid)
        return feature_site(model, cfg.depth)

    def needs_teacher(self, step: int) -> bool:
        return True

    # -- the pieces -----------------------------------------------------------------------------

    def project(self, out: ModelOutput, teacher: TeacherTargets) -> torch.Tensor:
        """The model's hidden tokens [B, h*w, C_h] -> projected and resized [B, T, D] on the teacher grid."""
        if out.hidden is None:
            raise ValueError(
                f"the model returned no hidden tokens for align_depth={self.align_depth}; its forward must "
                "honour the align_depth argument (see pipeline/models/output.py)"
            )
        student = self.resize(self.projector(out.hidden))
        if teacher.tokens.shape != student.shape or tuple(teacher.grid) != self.teacher_grid:
            raise ValueError(
                f"teacher tokens {tuple(teacher.tokens.shape)} on grid {tuple(teacher.grid)} do not match "
                f"this objective, built for [B, T, D] = {list(student.shape)} on grid {self.teacher_grid}: the "
                "teacher store and the objective were made for different teachers or resolutions"
            )
        return student

    def targets(self, teacher: TeacherTargets) -> torch.Tensor:
        """The teacher tokens [B, T, D] the feature terms compare with: as stored, or spatially
        normalised (align.spatial_norm, iREPA)."""
        if self.spatial_norm:
            return spatial_normalize(teacher.tokens, self.spatial_norm_gamma)
        return teacher.tokens

    def alignment_terms(self, out: ModelOutput, teacher: TeacherTargets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        repa = repa_loss(self.project(out, teacher), self.targets(teacher))
        return self.coeff * repa, {"repa": repa}

    def extra_repr(self) -> str:
        return (
            f"path={self.path_name!r}, align_depth={self.align_depth}, coeff={self.coeff}, "
            f"student_grid={self.student_grid}, teacher_grid={self.teacher_grid}, teacher_dim={self.teacher_dim}"
        )
