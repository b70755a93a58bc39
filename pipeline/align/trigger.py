"""HASTE's optional gradient-angle trigger (the paper's appendix; not in its public code).

After `start`, `start + every`, `start + 2 * every`, ... optimiser updates (the training loop asks
`should_check(updates done)`), measure how the alignment and denoising losses pull on one middle
block of the student: on a fixed probe batch (the loop uses the first micro batch of step 0, the
same samples, noise and teacher targets at every check: pipeline.train.loop.probe_batch), for each t
in PROBE_TIMES (the whole batch at that t), take the gradients of the weighted alignment term and of the flow-matching loss with respect to
that block's parameters and compute their cosine. The mean over the probe times is the signal; once
it falls below `threshold` (default -0.05: the two objectives pull apart) alignment is switched off
for good with `objective.terminate(step)`.

Which block: the paper says "a middle block" without naming it. The alignment terms only reach the
blocks up to align_depth, so the default is the middle of those: 0-indexed `align_depth // 2`
(block 4 for align_depth 8, the first of HASTE's attention layers 4..7). `block` overrides it.

The probe costs two backward passes per probe time through blocks 1..align_depth and never touches
`.grad` of any parameter (torch.autograd.grad), so it can run between optimiser steps. Its result
is read on the host (one sync per check). Under data parallelism every rank must take the same
decision: compute it on one rank and broadcast it, or use identical probe data and model on all.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.teachers.targets import TeacherTargets
from schemas.config import AlignConfig

PROBE_TIMES = (0.02, 0.1, 0.5, 0.8)


class GradientAngleTrigger:
    """Decides when HASTE's alignment stops early. Stateless apart from the last measured value."""

    def __init__(
        self,
        start: int,
        every: int,
        threshold: float = -0.05,
        *,
        block: int | None = None,
        times: tuple[float, ...] = PROBE_TIMES,
    ):
        if start < 0 or every < 1:
            raise ValueError(f"trigger: need start >= 0 and every >= 1, got start={start}, every={every}")
        if not times or not all(0.0 <= t <= 1.0 for t in times):
            raise ValueError(f"trigger: probe times must be a non-empty tuple in [0, 1], got {times!r}")
        self.start, self.every, self.threshold = int(start), int(every), float(threshold)
        self.block = block
        self.times = tuple(float(t) for t in times)
        self.last: float | None = None

    def should_check(self, step: int) -> bool:
        """True at start, start + every, start + 2 * every, ... (step = optimiser updates done)."""
        return step >= self.start and (step - self.start) % self.every == 0

    def probe_block(self, model: nn.Module, objective: nn.Module) -> nn.Module:
        """The student block whose parameters the gradients are taken with respect to."""
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(f"trigger: model {type(model).__name__} has no `blocks` list to probe")
        index = self.block
        if index is None:
            depth = getattr(objective, "align_depth", None)
            if depth is None:
                raise ValueError("trigger: the objective aligns no block (align_depth is None); nothing to probe")
            index = depth // 2
        if not 0 <= index < len(blocks):
            raise ValueError(f"trigger: block {index} is out of range 0 .. {len(blocks) - 1} (0-indexed)")
        return blocks[index]

    def check(
        self,
        model: nn.Module,
        objective: nn.Module,
        probe_batch: dict[str, torch.Tensor],
        probe_teacher: TeacherTargets,
    ) -> float:
        """Mean over PROBE_TIMES of cos(grad L_align, grad L_fm) on the probe block; in [-1, 1].

        model: the bare backbone (a DDP wrapper is unwrapped through `.module`).
        probe_batch: x0, eps, y of a fixed batch (any "t" in it is replaced by each probe time).
        probe_teacher: the teacher targets of that batch.
        """
        model = getattr(model, "module", model)
        if getattr(objective, "align_depth", None) is None:
            raise ValueError(f"trigger: objective {type(objective).__name__} has no alignment term to probe")
        params = [p for p in self.probe_block(model, objective).parameters() if p.requires_grad]
        x0 = probe_batch["x0"]
        cosines = []
        with torch.enable_grad():
            for t in self.times:
                batch = {**probe_batch, "t": torch.full((x0.shape[0],), t, device=x0.device, dtype=x0.dtype)}
                terms = objective.terms(model, batch, probe_teacher, aligned=True)
                g_align = _flat_grad(terms.align, params, retain_graph=True)
                g_fm = _flat_grad(terms.fm, params, retain_graph=False)
                cosines.append(torch.nn.functional.cosine_similarity(g_align, g_fm, dim=0, eps=1e-12))
        self.last = float(torch.stack(cosines).mean().clamp(-1.0, 1.0).item())
        return self.last

    def __repr__(self) -> str:
        return (
            f"GradientAngleTrigger(start={self.start}, every={self.every}, threshold={self.threshold}, "
            f"block={self.block}, times={self.times})"
        )


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool) -> torch.Tensor:
    """d loss / d params, flattened into one float32 vector (zeros where a parameter is unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params, strict=True)
    ])


def build_trigger(objective: type | nn.Module, cfg: AlignConfig) -> GradientAngleTrigger | None:
    """The trigger an align config asks for: align.trigger = "gradient-angle" on an objective that can
    stop aligning (HASTE's `terminate`)."""
    if cfg.trigger == "off" or not callable(getattr(objective, "terminate", None)):
        return None
    return GradientAngleTrigger(cfg.trigger_start, cfg.trigger_every, cfg.trigger_threshold)
