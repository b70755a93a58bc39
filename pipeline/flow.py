"""Flow-matching interpolants (SiT formulation): x_t = alpha_t * x0 + sigma_t * eps, t in [0, 1].

t = 0 is data, t = 1 is noise. The model predicts the velocity v = d/dt x_t
= alpha'_t * x0 + sigma'_t * eps. Both the training loss and the samplers read the path from here.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

PathName = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "lognormal"]


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] so it broadcasts against `like` [B, ...]."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class Interpolant:
    """An interpolant between data (t=0) and Gaussian noise (t=1)."""

    name: str

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def d_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t [B, ...] from data x0 [B, ...], noise eps [B, ...] and t [B]."""
        a, s = self.alpha_sigma(_bcast(t, x0))
        return a * x0 + s * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Target velocity d x_t / dt [B, ...]."""
        da, ds = self.d_alpha_sigma(_bcast(t, x0))
        return da * x0 + ds * eps

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) implied by a velocity prediction v at (x, t).

        With x = a x0 + s eps and v = a' x0 + s' eps, eliminate x0:
        eps = (a v - a' x) / (a s' - a' s), and score = -eps / s.
        """
        tb = _bcast(t, x)
        a, s = self.alpha_sigma(tb)
        da, ds = self.d_alpha_sigma(tb)
        eps = (a * v - da * x) / (a * ds - da * s)
        return -eps / s


class LinearInterpolant(Interpolant):
    """alpha = 1 - t, sigma = t, so v = eps - x0."""

    name = "linear"

    def alpha_sigma(self, t):
        return 1 - t, t

    def d_alpha_sigma(self, t):
        return -torch.ones_like(t), torch.ones_like(t)


class CosineInterpolant(Interpolant):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2) (variance preserving)."""

    name = "cosine"

    def alpha_sigma(self, t):
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def d_alpha_sigma(self, t):
        h = 0.5 * math.pi
        return -h * torch.sin(h * t), h * torch.cos(h * t)


def get_interpolant(name: PathName) -> Interpolant:
    paths = {"linear": LinearInterpolant, "cosine": CosineInterpolant}
    if name not in paths:
        raise ValueError(f"unknown path {name!r}; expected one of {sorted(paths)}")
    return paths[name]()


def sample_time(
    n: int, kind: TimeSampling, path: PathName = "linear", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw n training times in (0, 1).

    uniform:   t ~ U(0, 1).
    lognormal: sigma = exp(N(0, 1)) as a noise-to-signal ratio, mapped to the t whose
               sigma_t / alpha_t equals it: t = sigma / (1 + sigma) on the linear path and
               t = (2 / pi) * atan(sigma) on the cosine path.
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "lognormal":
        ratio = torch.exp(torch.randn(n, generator=generator))
        if path == "linear":
            return ratio / (1 + ratio)
        return (2 / math.pi) * torch.atan(ratio)
    raise ValueError(f"unknown time sampling {kind!r}; expected 'uniform' or 'lognormal'")
