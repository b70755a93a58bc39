"""REPA (arXiv 2410.06940): align one student block's tokens with the teacher's patch tokens.

    L = L_fm + coeff * L_repa,   L_repa = mean over b, n of -cos(resize(h_phi(h_bn)), y_bn)

h = the output of student block `align.depth` (1-indexed; 0 = the model's default_align_depth),
h_phi = the per-token projector MLP (heads.Projector, hidden width align.projector_dim), y = the
teacher's x_norm_patchtokens. When the student's token grid differs from the teacher's patch grid,
the PROJECTED map is resized to the teacher grid (heads.align_to_grid, mode align.resize), the order
U-REPA found best; REPA's own setup has equal grids and no resize.

The objective holds the projector and nothing of the model; the model is passed to every call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.align.base import LossTerms, Objective, flow_matching_loss
from pipeline.align.heads import GridAdapter, Projector
from pipeline.align.losses import repa_loss
from pipeline.align.student import FeatureSite, feature_site, teacher_geometry
from pipeline.models.output import ModelOutput
from pipeline.teachers.targets import TeacherTargets


class REPA(Objective):
    """Flow matching plus REPA's projected-feature term.

    Parameters: the projector only. `align_depth` is the resolved 1-indexed student block.
    Subclasses (U-REPA, HASTE) reuse `project` and `feature_loss` and add their terms in
    `aligned_terms`.
    """

    align_name = "repa"

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
        super().__init__(path)
        site = self.validate(model, cfg, teacher_dim=teacher_dim, teacher_grid=teacher_grid,
                             teacher_heads=teacher_heads)
        self.teacher_dim, self.teacher_grid = teacher_geometry(self.align_name, teacher_dim, teacher_grid)
        self.align_depth = site.depth
        self.student_grid = site.grid
        self.coeff = float(cfg.coeff)
        self.projector = Projector(site.width, self.teacher_dim, cfg.projector_dim)
        self.resize = GridAdapter(site.grid, self.teacher_grid, cfg.resize)

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
    ) -> FeatureSite:
        """Check the teacher geometry and align.depth against the model; returns the resolved site.

        Any student grid works: it is resized to the teacher grid after the projector.
        """
        teacher_geometry(cls.align_name, teacher_dim, teacher_grid)
        return feature_site(model, cfg.depth)

    # -- what the data path must provide -------------------------------------------------------

    def needs_teacher(self, step: int) -> bool:
        return True

    # -- the pieces -----------------------------------------------------------------------------

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Student tokens [B, h*w, C_h] -> projected and resized [B, T, D] on the teacher grid."""
        return self.resize(self.projector(hidden))

    def check_teacher(self, teacher: TeacherTargets | None, batch_size: int) -> TeacherTargets:
        """The targets this objective needs for a batch of `batch_size` (shapes only; no host sync)."""
        if teacher is None:
            raise ValueError(
                f"align={self.align_name} needs teacher targets while alignment is on "
                "(needs_teacher(step) is True): pass a TeacherTargets, not None"
            )
        want = (batch_size, self.teacher_grid[0] * self.teacher_grid[1], self.teacher_dim)
        if tuple(teacher.tokens.shape) != want or tuple(teacher.grid) != self.teacher_grid:
            raise ValueError(
                f"teacher tokens {tuple(teacher.tokens.shape)} on grid {tuple(teacher.grid)} do not match "
                f"this objective, built for [B, T, D] = {list(want)} on grid {self.teacher_grid}: the "
                "teacher store and the objective were made for different teachers or resolutions"
            )
        return teacher

    def student_output(self, out: ModelOutput) -> torch.Tensor:
        """The hidden tokens the model returned for align_depth (checked)."""
        if out.hidden is None:
            raise ValueError(
                f"the model returned no hidden tokens for align_depth={self.align_depth}; its forward must "
                "honour the align_depth argument (see pipeline/models/output.py)"
            )
        return out.hidden

    def feature_loss(self, out: ModelOutput, teacher: TeacherTargets) -> torch.Tensor:
        """Unweighted L_repa of a model output against the targets."""
        return repa_loss(self.project(self.student_output(out)), teacher.tokens)

    def aligned_terms(
        self, model: nn.Module, batch: dict[str, torch.Tensor], teacher: TeacherTargets | None
    ) -> LossTerms:
        """fm and the alignment terms with alignment on, whatever the step (also used by the trigger)."""
        x_t, target = self.noised(batch)
        teacher = self.check_teacher(teacher, x_t.shape[0])
        out = self.call_model(model, x_t, batch, align_depth=self.align_depth)
        repa = self.feature_loss(out, teacher)
        return LossTerms(
            fm=flow_matching_loss(out.velocity, target), align=self.coeff * repa, parts={"repa": repa}
        )

    def terms(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        teacher: TeacherTargets | None,
        step: int,
    ) -> LossTerms:
        return self.aligned_terms(model, batch, teacher)

    def extra_repr(self) -> str:
        return (
            f"path={self.path_name!r}, align_depth={self.align_depth}, coeff={self.coeff}, "
            f"student_grid={self.student_grid}, teacher_grid={self.teacher_grid}, teacher_dim={self.teacher_dim}"
        )

