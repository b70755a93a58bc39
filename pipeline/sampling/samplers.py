"""Samplers for flow-matching models: Euler / Heun ODE and Euler-Maruyama SDE, with guidance.

Time runs from t = 1 (pure noise) down to t = 0 (data) on the interpolant of pipeline/flow.py,
x_t = alpha_t * x0 + sigma_t * eps. The model is a velocity field v(x, t, y) ~ E[d x_t / dt | x_t].

Probability-flow ODE
    dx = v(x, t) dt, integrated from t = 1 to t = 0 on t_i = linspace(1, 0, steps + 1) with Euler
    steps, or with Heun steps (Euler predictor, trapezoidal corrector). As in the REPA family's
    sampler, the last step (onto t = 0) is a plain Euler step even with Heun, so the model is never
    evaluated at t = 0; Heun therefore costs 2 * steps - 1 evaluations.

Reverse-time SDE (derivation)
    The marginals p_t of x_t satisfy the continuity equation  d/dt p_t = -div(v p_t).
    Let s = 1 - t be reverse time and look for an SDE  dx = f ds + g dW_s  whose marginals at s
    are p_{1-s}. Its Fokker-Planck equation reads  d/ds p = -div(f p) + (g^2 / 2) Lap p, and we need
    d/ds p = -d/dt p = div(v p). Writing Lap p = div(p grad log p), the two agree when
        f = -v + (g^2 / 2) grad log p_t.
    Back in t (dt = -ds) with w(t) = g^2, this is
        dx = [v - 0.5 w(t) score(x, t)] dt + sqrt(w(t)) dW,     integrated BACKWARD (dt < 0),
    so an Euler-Maruyama step of size h = t_i - t_{i+1} > 0 is
        x <- x - h * (v - 0.5 w score) + sqrt(w h) * z,   z ~ N(0, I).
    The score term therefore moves x towards higher density and the injected noise is balanced by
    it: any w(t) >= 0 leaves the marginals unchanged (w = 0 is the ODE). We use w(t) = 2t, and
    the score comes from the velocity (Interpolant.score_from_velocity).
    Grid: Euler-Maruyama on t = linspace(1, 0.04, steps), then one last deterministic step from
    t = 0.04 to 0 (the score is singular at t = 0). `sde_last_step` chooses that step:
      "mean" (default): the noise-free Euler-Maruyama step, x <- x - h (v - 0.5 w score), i.e. the
                        mean of the last stochastic step (what the REPA family's published SDE
                        numbers use);
      "ode":            a probability-flow step, x <- x - h v.

Classifier-free guidance with a guidance interval
    When cfg_scale > 1 and guidance_low <= t_i <= guidance_high, the model runs once on the
    concatenated batch [x, x] with labels [y, null] and v = v_u + s (v_c - v_u); otherwise it runs
    once on the conditional batch alone (B rows, not 2B). As in REPA's samplers (`euler_sampler`,
    `euler_maruyama_sampler` of its generate.py), a scale <= 1 means no guidance at all (a scale
    below 1 is not an extrapolation towards the unconditional model), and the interval is tested
    at the step's start time t_i for every evaluation of the step: Heun's corrector, evaluated at
    t_{i+1}, is guided when t_i is inside the interval (`heun_guidance="t_cur"`, the default).
    `heun_guidance="t_next"` tests the corrector at its own time t_{i+1} instead; the two differ
    only for a step that straddles an interval end. Guiding v or the SDE drift is the same thing,
    since the score is affine in v at fixed (x, t).

Random numbers and devices
    The SDE's increments are drawn from `generator` ON THE GENERATOR'S DEVICE and then moved to the
    state's device, so a CPU generator drives a CUDA run (PyTorch refuses a CPU generator for a
    CUDA tensor) and the same seed gives the same increments on every device.

Precision
    The state is integrated in float64 (as the REPA sampler does); the model sees x and t in the
    dtype of `noise`, and the result is returned in that dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Literal

import numpy as np
import torch

from pipeline.flow import Interpolant, PathName, get_interpolant

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SamplerName = Literal["ode", "sde"]
LastStep = Literal["mean", "ode"]
HeunGuidance = Literal["t_cur", "t_next"]
LabelMode = Literal["uniform-random", "balanced"]

SDE_T_END = 0.04  # last time of the Euler-Maruyama grid; a deterministic step goes on to 0
STATE_DTYPE = torch.float64  # dtype of the integrated state


# ----------------------------------------------------------------------------------------------
#                                     Guided velocity field
# ----------------------------------------------------------------------------------------------


def conditioned_pair(y: torch.Tensor | dict[str, torch.Tensor], null_class: int):
    """The condition of a guided evaluation's 2B rows: y, then the null condition. Labels [B]: the
    null class; a text condition (dict, pipeline/models/mmdit.py): the same captions with `drop` set,
    which the model replaces by its learned null text."""
    if isinstance(y, dict):
        pair = {k: torch.cat([v, v]) for k, v in y.items()}
        pair["drop"] = torch.cat([y["drop"], torch.ones_like(y["drop"])])
        return pair
    return torch.cat([y, torch.full_like(y, null_class)])


class GuidedVelocity:
    """v(x, t) for a fixed label batch, with classifier-free guidance inside an interval.

    velocity_fn(x [B', C, H, W], t [B'], y [B']) -> v [B', C, H, W] is the model; it is called with
    x and t in `model_dtype` and its output is returned as float64.
    """

    def __init__(
        self,
        velocity_fn: VelocityFn,
        y: torch.Tensor | dict[str, torch.Tensor],
        *,
        cfg_scale: float,
        guidance_low: float,
        guidance_high: float,
        null_class: int,
        model_dtype: torch.dtype,
    ):
        self.velocity_fn = velocity_fn
        self.y = y
        self.cfg_scale = float(cfg_scale)
        self.guidance_low = float(guidance_low)
        self.guidance_high = float(guidance_high)
        self.model_dtype = model_dtype
        self.y_pair = conditioned_pair(y, null_class) if self.cfg_scale > 1.0 else None

    def guided(self, t: float) -> bool:
        """Whether an evaluation whose guidance is decided at time t uses it (two predictions)."""
        return self.y_pair is not None and self.guidance_low <= t <= self.guidance_high

    def _call_model(self, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        x_in = x.to(self.model_dtype)
        v = self.velocity_fn(x_in, x_in.new_full((x.shape[0],), t), y)
        if not isinstance(v, torch.Tensor):
            raise ValueError(
                f"velocity_fn must return a tensor, got {type(v).__name__}; wrap a backbone as "
                "lambda x, t, y: model(x, t, y).velocity"
            )
        if v.shape != x.shape:
            raise ValueError(
                f"velocity_fn returned shape {list(v.shape)} for an input of shape {list(x.shape)}; "
                "it must return the velocity tensor itself (same shape as x)"
            )
        return v.to(x.dtype)

    def __call__(self, x: torch.Tensor, t: float, guidance_t: float | None = None) -> torch.Tensor:
        """x [B, C, H, W] at the scalar time t -> v [B, C, H, W] (dtype of x).

        guidance_t: the time at which the guidance interval is tested (None = t).
        """
        if not self.guided(t if guidance_t is None else guidance_t):
            return self._call_model(x, t, self.y)
        v_cond, v_uncond = self._call_model(torch.cat([x, x]), t, self.y_pair).chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)


# ----------------------------------------------------------------------------------------------
#                                          Integrators
# ----------------------------------------------------------------------------------------------


def ode_times(steps: int) -> list[float]:
    """The ODE grid t = linspace(1, 0, steps + 1) as Python floats (no device syncs in the loop).

    torch.linspace in float64, as REPA's sampler builds it: numpy's linspace differs in the last
    bit at some points, which would flip a guidance-interval test at an end such as 0.7."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def sde_times(steps: int) -> list[float]:
    """The SDE grid: linspace(1, 0.04, steps) followed by 0 (steps + 1 points, steps intervals),
    torch.linspace in float64 as REPA's euler_maruyama_sampler."""
    return torch.linspace(1.0, SDE_T_END, steps, dtype=torch.float64).tolist() + [0.0]


def diffusion(t: float) -> float:
    """The SDE's diffusion coefficient w(t) = 2t (g(t)^2 in the derivation above)."""
    return 2.0 * t


def integrate_ode(
    field: GuidedVelocity, x: torch.Tensor, steps: int, heun: bool, heun_guidance: HeunGuidance = "t_cur"
) -> torch.Tensor:
    """Euler (or Heun) on the probability-flow ODE from t = 1 to t = 0; x [B, C, H, W] is the noise.

    With Heun, every step but the last gets the trapezoidal correction, whose guidance is decided
    at t_cur (REPA) or t_next (module docstring).
    """
    times = ode_times(steps)
    for i, (t_cur, t_next) in enumerate(pairwise(times)):
        dt = t_next - t_cur
        v_cur = field(x, t_cur)
        x_euler = x + dt * v_cur
        if heun and i < steps - 1:
            v_next = field(x_euler, t_next, t_cur if heun_guidance == "t_cur" else t_next)
            x = x + 0.5 * dt * (v_cur + v_next)
        else:
            x = x_euler
    return x


def integrate_sde(
    field: GuidedVelocity,
    x: torch.Tensor,
    steps: int,
    path: Interpolant,
    generator: torch.Generator | None,
    last_step: LastStep,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE, then one deterministic step to t = 0 (module docstring)."""
    times = sde_times(steps)
    for i, (t_cur, t_next) in enumerate(pairwise(times)):
        dt = t_next - t_cur  # negative
        v = field(x, t_cur)
        last = i == steps - 1
        if last and last_step == "ode":
            x = x + dt * v
            continue
        w = diffusion(t_cur)
        score = path.score_from_velocity(v, x, x.new_full((x.shape[0],), t_cur))
        x = x + dt * (v - 0.5 * w * score)
        if not last:
            x = x + (w * -dt) ** 0.5 * standard_normal(x, generator)
    return x


def standard_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped like `like`, on its device: drawn on the generator's own device (the
    global RNG of like.device when there is none), then moved."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


# ----------------------------------------------------------------------------------------------
#                                          Public API
# ----------------------------------------------------------------------------------------------


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    y: torch.Tensor | dict[str, torch.Tensor],
    *,
    sampler: SamplerName = "ode",
    steps: int = 50,
    heun: bool = False,
    path: PathName = "linear",
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_class: int,
    generator: torch.Generator | None = None,
    sde_last_step: LastStep = "mean",
    heun_guidance: HeunGuidance = "t_cur",
) -> torch.Tensor:
    """Draw x0 [B, C, H, W] from noise [B, C, H, W] (the state at t = 1) and labels y [B] (or a text
    condition: a dict whose tensors have B rows, see conditioned_pair).

    velocity_fn(x [B', C, H, W], t [B'], y [B']) -> v [B', C, H, W]; B' is B, or 2B on guided steps
    (rows B..2B-1 then carry the label `null_class`). x and t have the dtype and device of `noise`.
    sampler "ode": Euler (heun=False, `steps` evaluations) or Heun (2 * steps - 1 evaluations) on
    t = linspace(1, 0, steps + 1). sampler "sde": Euler-Maruyama with w(t) = 2t on
    linspace(1, 0.04, steps) and a last deterministic step to 0 (`steps` evaluations); its noise is
    drawn from `generator` on the generator's device (any: a CPU generator serves a CUDA run) and
    moved to noise.device. Guidance needs cfg_scale > 1; heun_guidance chooses when Heun's
    corrector tests the interval ("t_cur", REPA's; or "t_next"). See the module docstring. Runs
    without autograd; returns x0 in the dtype of `noise`.
    """
    if sampler not in ("ode", "sde"):
        raise ValueError(f"sampler={sampler!r} is not supported; expected 'ode' or 'sde'")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if heun and sampler != "ode":
        raise ValueError(f"heun=True applies to sampler='ode' only, got sampler={sampler!r}")
    if sde_last_step not in ("mean", "ode"):
        raise ValueError(f"sde_last_step={sde_last_step!r} is not supported; expected 'mean' or 'ode'")
    if heun_guidance not in ("t_cur", "t_next"):
        raise ValueError(f"heun_guidance={heun_guidance!r} is not supported; expected 't_cur' or 't_next'")
    if not guidance_low <= guidance_high:
        raise ValueError(
            f"guidance_low={guidance_low} must not exceed guidance_high={guidance_high}"
        )
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got dtype={noise.dtype}")
    rows = y["drop"].shape if isinstance(y, dict) else y.shape
    if rows != noise.shape[:1]:
        raise ValueError(f"y must have shape [B] = [{noise.shape[0]}], got {list(rows)}")
    flow_path = get_interpolant(path)
    field = GuidedVelocity(
        velocity_fn, y,
        cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
        null_class=null_class, model_dtype=noise.dtype,
    )
    x = noise.to(STATE_DTYPE)
    with torch.no_grad():
        if sampler == "ode":
            x = integrate_ode(field, x, steps, heun, heun_guidance)
        else:
            x = integrate_sde(field, x, steps, flow_path, generator, sde_last_step)
    return x.to(noise.dtype)


def class_balanced_labels(num: int, num_classes: int, seed: int | None = None) -> np.ndarray:
    """Labels [num] int64 in which every class appears num // num_classes or one more times.

    Order without a seed: round-robin 0, 1, ..., K-1, 0, 1, ... for the num // K full rounds, then
    the remainder r = num % K as r classes spread evenly over [0, K) (class floor(j K / r) for
    j < r), so every prefix of whole rounds is balanced. With a seed the same multiset is shuffled
    by numpy's default_rng(seed), reproducibly.
    """
    if num < 0:
        raise ValueError(f"num={num} must be >= 0")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    full, rest = divmod(num, num_classes)
    labels = np.concatenate([
        np.tile(np.arange(num_classes, dtype=np.int64), full),
        (np.arange(rest, dtype=np.int64) * num_classes) // max(rest, 1),
    ])
    if seed is not None:
        labels = np.random.default_rng(seed).permutation(labels)
    return labels


LABEL_STREAM = 0x1ABE1  # last word of the label generators' seeds (keeps them apart from other streams)


def label_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of batch `batch`'s labels: a function of (seed, batch) only."""
    words = np.random.SeedSequence([seed, batch, LABEL_STREAM]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 32) | int(words[1]))


def uniform_random_labels(num: int, num_classes: int, seed: int, batch_size: int) -> np.ndarray:
    """Labels [num] int64 as REPA's and HASTE's generate.py draw them: every batch of `batch_size`
    (the last one shorter) is torch.randint(0, num_classes, (n,)), here with the generator
    label_generator(seed, i) of batch i, so batch i's labels depend only on (seed, i) (and n).
    Class counts are multinomial, not balanced."""
    if num < 0 or num_classes < 1 or batch_size < 1:
        raise ValueError(f"need num >= 0, num_classes >= 1, batch_size >= 1; got {num}, {num_classes}, {batch_size}")
    parts = [
        torch.randint(0, num_classes, (min(num, lo + batch_size) - lo,), generator=label_generator(seed, i))
        for i, lo in enumerate(range(0, num, batch_size))
    ]
    return torch.cat(parts).numpy().astype(np.int64) if parts else np.zeros(0, np.int64)


def sample_labels(mode: LabelMode, num: int, num_classes: int, seed: int, batch_size: int) -> np.ndarray:
    """The labels of `num` samples drawn in batches of `batch_size`: "uniform-random" (REPA's and
    HASTE's protocol, uniform_random_labels) or "balanced" (class_balanced_labels, shuffled by seed).
    An unconditional model (num_classes = 0) gets zeros, which it ignores."""
    if num_classes == 0:
        return np.zeros(num, np.int64)
    if mode == "uniform-random":
        return uniform_random_labels(num, num_classes, seed, batch_size)
    if mode == "balanced":
        return class_balanced_labels(num, num_classes, seed)
    raise ValueError(f"sample.labels={mode!r} is not one of 'uniform-random', 'balanced'")
