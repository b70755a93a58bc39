"""Samplers against an analytic model, guidance-interval bookkeeping against REPA's sampler loop,
the device contract of the SDE's generator, sampled labels and ADM's pixel quantisation.

The analytic model: data x0 ~ N(m, diag(s^2)) and eps ~ N(0, I), so on a path
x_t = a_t x0 + g_t eps every coordinate of x_t is Gaussian with mean a_t m and variance
V_t = a_t^2 s^2 + g_t^2, and the exact velocity E[a'_t x0 + g'_t eps | x_t = x] is, with r = x - a_t m,
    v(x, t) = a'_t (m + a_t s^2 r / V_t) + g'_t g_t r / V_t.
Its probability-flow ODE maps the noise z (the state at t = 1) to exactly m + s z, and the marginal
at t = 0 of the SDE is N(m, s^2). The path formulas are written out here, independently of
pipeline/flow.py.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.precision import autocast_dtype
from pipeline.sampling import (
    class_balanced_labels,
    sample,
    sample_labels,
    samples_to_uint8,
    uniform_random_labels,
)
from pipeline.sampling.samplers import label_generator

MEAN = torch.tensor([1.5, -0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 2.0], dtype=torch.float64)
NULL = 10


# ----------------------------------------------------------------------------------------------
#                                      Analytic model
# ----------------------------------------------------------------------------------------------


def path_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(a, g, a', g') at times t for the linear and cosine interpolants."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def gaussian_velocity(path: str):
    """velocity_fn(x [B, 2, 1, 1], t [B], y [B]) of the exact field for x0 ~ N(MEAN, STD^2)."""

    def velocity_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = MEAN.to(x.dtype).view(1, 2, 1, 1)
        s2 = (STD**2).to(x.dtype).view(1, 2, 1, 1)
        a, g, da, dg = (c.view(-1, 1, 1, 1) for c in path_coefficients(path, t))
        var = a * a * s2 + g * g
        r = x - a * m
        return da * (m + a * s2 * r / var) + dg * g * r / var

    return velocity_fn


def draw_noise(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % NULL


# ----------------------------------------------------------------------------------------------
#                                         ODE and SDE
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_heun_maps_noise_to_data_exactly(path):
    # The exact flow sends z to m + s z coordinatewise; 50 Heun steps (second order; the last step
    # is Euler) reproduce it to a few 1e-3 (measured max error 1.9e-3 linear, 2.5e-3 cosine, and
    # four times less with 100 steps).
    n = 4000
    noise = draw_noise(n)
    x0 = sample(gaussian_velocity(path), noise, labels(n), sampler="ode", steps=50, heun=True,
                path=path, null_class=NULL)
    expected = MEAN.view(1, 2, 1, 1) + STD.view(1, 2, 1, 1) * noise
    assert torch.allclose(x0, expected, atol=5e-3)
    # and the sample statistics: standard errors s / sqrt(4000) = 0.016 s (mean) and about
    # s / sqrt(8000) = 0.011 s (std); 4 of them as tolerance.
    flat = x0.view(n, 2)
    assert torch.all((flat.mean(0) - MEAN).abs() < 4 * STD / math.sqrt(n))
    assert torch.all((flat.std(0) / STD - 1).abs() < 4 / math.sqrt(2 * n))


def test_ode_euler_is_first_order():
    # Euler's global error is O(1/steps): halving the step halves the error (measured max error
    # 0.36 at 25 steps, 0.18 at 50 on the linear path).
    noise = draw_noise(500)
    expected = MEAN.view(1, 2, 1, 1) + STD.view(1, 2, 1, 1) * noise
    errors = []
    for steps in (25, 50):
        x0 = sample(gaussian_velocity("linear"), noise, labels(500), sampler="ode", steps=steps, null_class=NULL)
        errors.append((x0 - expected).abs().max().item())
    assert 0.0 < errors[1] < 0.3
    assert 1.8 < errors[0] / errors[1] < 2.2


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_lands_on_the_data_distribution(path):
    # 200 Euler-Maruyama steps on 4000 samples: the marginal must be N(m, s^2). Tolerance per
    # coordinate: 4 standard errors (mean: s / sqrt(n); std: s / sqrt(2n)) plus 0.02 s for the
    # bias of the scheme. That bias, computed exactly by pushing mean and variance through the
    # affine-Gaussian steps, is at most 1.3% of s here (about 1% of it comes from stopping the
    # noise at t = 0.04 and does not vanish with more steps). The SDE's generator seed differs
    # from the noise seed, so its increments are independent of the starting point.
    n = 4000
    gen = torch.Generator().manual_seed(1)
    x0 = sample(gaussian_velocity(path), draw_noise(n), labels(n), sampler="sde", steps=200,
                path=path, null_class=NULL, generator=gen)
    flat = x0.view(n, 2)
    assert torch.isfinite(flat).all()
    assert torch.all((flat.mean(0) - MEAN).abs() < (4 / math.sqrt(n) + 0.02) * STD)
    assert torch.all((flat.std(0) / STD - 1).abs() < 4 / math.sqrt(2 * n) + 0.02)


def test_sde_is_stochastic_and_reproducible():
    velocity = gaussian_velocity("linear")
    noise = draw_noise(64)

    def run(seed: int) -> torch.Tensor:
        return sample(velocity, noise, labels(64), sampler="sde", steps=10, null_class=NULL,
                      generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_sde_without_noise_steps_is_one_mean_step():
    # steps=1: the grid is [1, 0] and the only step is the deterministic mean step from t = 1:
    # x - 1 * (v - 0.5 * w(1) * score) with w(1) = 2 and, on the linear path at t = 1, v = x - m
    # (E[x0 | x_1] = m, E[eps | x_1] = x) and score = -x.
    noise = draw_noise(8)
    x0 = sample(gaussian_velocity("linear"), noise, labels(8), sampler="sde", steps=1, null_class=NULL)
    m = MEAN.view(1, 2, 1, 1)
    expected = noise - ((noise - m) - 0.5 * 2.0 * (-noise))
    assert torch.allclose(x0, expected, atol=1e-12)


def test_sde_diffusion_coefficient_is_two_t():
    # The marginals do not depend on w(t), so pin it on a two-step run by hand. v = 0 everywhere,
    # linear path, grid [1, 0.04, 0]. At t = 1 the score implied by v = 0 is -x, so the stochastic
    # step gives x1 = x - 0.96 (0 - 0.5 w(1) (-x)) + sqrt(0.96 w(1)) z = 0.04 x + sqrt(1.92) z for
    # w(1) = 2. At t = 0.04 the implied score is -x / 0.04 and w = 0.08, so the mean step gives
    # x1 - 0.04 (0.5 * 0.08 * x1 / 0.04) = 0.96 x1. Starting from x = 1: mean 0.96 * 0.04 = 0.0384,
    # variance 0.96^2 * 1.92 = 1.769472 (with w = 4t it would be 0.96^2 * 3.84 and a mean of -0.88).
    n = 20_000
    x0 = sample(lambda x, t, y: torch.zeros_like(x), torch.ones(n, 1, 1, 1, dtype=torch.float64),
                torch.zeros(n, dtype=torch.long), sampler="sde", steps=2, null_class=NULL,
                generator=torch.Generator().manual_seed(3)).flatten()
    var = 0.96**2 * 1.92
    assert abs(x0.mean().item() - 0.0384) < 5 * math.sqrt(var / n)
    assert abs(x0.var().item() / var - 1) < 5 * math.sqrt(2 / n)


def test_model_sees_the_noise_dtype_and_state_is_float64():
    seen = []

    def velocity_fn(x, t, y):
        seen.append((x.dtype, t.dtype))
        return torch.zeros_like(x)

    noise = draw_noise(4, dtype=torch.float32)
    out = sample(velocity_fn, noise, labels(4), sampler="ode", steps=3, null_class=NULL)
    assert out.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.float32)}


def test_heun_skips_the_last_correction():
    calls = []

    def velocity_fn(x, t, y):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    sample(velocity_fn, draw_noise(2), labels(2), sampler="ode", steps=4, heun=True, null_class=NULL)
    assert calls == pytest.approx([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])


# ----------------------------------------------------------------------------------------------
#                                  Classifier-free guidance
# ----------------------------------------------------------------------------------------------


class Spy:
    """A velocity field that records, per call, the time, the batch size and the labels."""

    def __init__(self):
        self.calls: list[tuple[float, int, torch.Tensor]] = []

    def __call__(self, x, t, y):
        assert torch.all(t == t[0])
        self.calls.append((float(t[0]), x.shape[0], y.clone()))
        return 0.01 * x


@pytest.mark.parametrize(
    "sampler,heun,steps", [("ode", False, 20), ("ode", True, 20), ("sde", False, 25)]
)
def test_guidance_only_inside_the_interval(sampler, heun, steps):
    # heun_guidance="t_next": every evaluation tests the interval at its own time
    b, low, high = 6, 0.3, 0.7
    y = labels(b)
    spy = Spy()
    sample(spy, draw_noise(b), y, sampler=sampler, heun=heun, steps=steps, cfg_scale=2.5,
           guidance_low=low, guidance_high=high, null_class=NULL, generator=torch.Generator().manual_seed(0),
           heun_guidance="t_next")
    guided_times, plain_times = [], []
    for t, rows, y_seen in spy.calls:
        if (y_seen == NULL).any():
            assert rows == 2 * b
            assert torch.equal(y_seen[:b], y) and torch.all(y_seen[b:] == NULL)
            guided_times.append(t)
        else:
            assert rows == b and torch.equal(y_seen, y)
            plain_times.append(t)
    assert guided_times and plain_times
    assert all(low <= t <= high for t in guided_times)
    assert all(not low <= t <= high for t in plain_times)


def repa_guided_evaluations(steps: int, heun: bool, cfg_scale: float, low: float, high: float):
    """(time, guided) of every model call of REPA's euler_sampler, written out from its loop:
    for (t_cur, t_next) in the grid, guided = cfg_scale > 1 and low <= t_cur <= high for the
    predictor at t_cur AND for Heun's corrector at t_next (all steps but the last)."""
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()  # REPA's t_steps
    calls = []
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        guided = cfg_scale > 1.0 and low <= t_cur <= high
        calls.append((t_cur, guided))
        if heun and i < steps - 1:
            calls.append((t_next, guided))
    return calls


@pytest.mark.parametrize("cfg_scale", [2.5, 0.5])
def test_heun_guidance_follows_repas_sampler(cfg_scale):
    # 20 steps on [0.3, 0.7]: the step from t = 0.3 to 0.25 guides its corrector at 0.25 too (t_cur
    # is inside), and the step from 0.75 to 0.7 does not guide its corrector at 0.7 (t_cur is out)
    b, low, high = 4, 0.3, 0.7
    spy = Spy()
    sample(spy, draw_noise(b), labels(b), sampler="ode", heun=True, steps=20, cfg_scale=cfg_scale,
           guidance_low=low, guidance_high=high, null_class=NULL)
    got = [(t, rows == 2 * b) for t, rows, _ in spy.calls]
    expected = repa_guided_evaluations(20, True, cfg_scale, low, high)
    assert [t for t, _ in got] == [t for t, _ in expected]  # the same grid, to the last bit
    assert [g for _, g in got] == [g for _, g in expected]
    if cfg_scale > 1:
        assert (0.25, True) in [(round(t, 6), g) for t, g in got]  # a guided corrector outside [0.3, 0.7]
        assert (0.7, False) in [(round(t, 6), g) for t, g in got]  # an unguided corrector at its end
    else:
        assert not any(g for _, g in got)


def test_guidance_needs_a_scale_above_one():
    # REPA guides only when cfg_scale > 1: a scale of 0.5 (or 0) is the conditional model alone,
    # not v_u + s (v_c - v_u). v = 3 for conditional rows, 1 for unconditional ones: Euler over
    # 4 steps gives noise - 3.
    def velocity_fn(x, t, y):
        return torch.where(y == NULL, 1.0, 3.0).to(x.dtype).view(-1, 1, 1, 1).expand_as(x)

    noise = draw_noise(3)
    for scale in (0.0, 0.5, 1.0):
        x0 = sample(velocity_fn, noise, labels(3), sampler="ode", steps=4, cfg_scale=scale, null_class=NULL)
        assert torch.allclose(x0, noise - 3.0, atol=1e-12)


def test_cfg_scale_one_never_runs_the_unconditional_model():
    b = 5
    spy = Spy()
    sample(spy, draw_noise(b), labels(b), sampler="ode", heun=True, steps=10, cfg_scale=1.0,
           guidance_low=0.0, guidance_high=1.0, null_class=NULL)
    assert len(spy.calls) == 19
    assert all(rows == b and not (y == NULL).any() for _, rows, y in spy.calls)


def test_guided_velocity_combines_the_two_predictions():
    # v = 3 for conditional rows and 1 for unconditional rows; scale 4 -> guided v = 1 + 4 (3 - 1) = 9.
    # Euler, 4 steps (t = 1, .75, .5, .25), interval [0.5, 1]: the first three steps are guided,
    # the last is not, so x0 = noise - 0.25 * (9 + 9 + 9 + 3).
    def velocity_fn(x, t, y):
        value = torch.where(y == NULL, 1.0, 3.0).to(x.dtype)
        return value.view(-1, 1, 1, 1).expand_as(x)

    noise = draw_noise(3)
    x0 = sample(velocity_fn, noise, labels(3), sampler="ode", steps=4, cfg_scale=4.0,
                guidance_low=0.5, guidance_high=1.0, null_class=NULL)
    assert torch.allclose(x0, noise - 0.25 * 30.0, atol=1e-12)


def test_argument_errors():
    noise, y = draw_noise(2), labels(2)
    velocity = gaussian_velocity("linear")
    with pytest.raises(ValueError, match="sampler"):
        sample(velocity, noise, y, sampler="ddim", null_class=NULL)
    with pytest.raises(ValueError, match="heun"):
        sample(velocity, noise, y, sampler="sde", heun=True, null_class=NULL)
    with pytest.raises(ValueError, match="guidance_low"):
        sample(velocity, noise, y, guidance_low=0.8, guidance_high=0.2, null_class=NULL)
    with pytest.raises(ValueError, match="steps"):
        sample(velocity, noise, y, steps=0, null_class=NULL)
    with pytest.raises(ValueError, match="shape"):
        sample(velocity, noise, labels(3), null_class=NULL)
    with pytest.raises(ValueError, match="unknown path"):
        sample(velocity, noise, y, path="vp", null_class=NULL)
    with pytest.raises(ValueError, match="velocity"):
        sample(lambda x, t, y: (x, None), noise, y, null_class=NULL)
    with pytest.raises(ValueError, match="heun_guidance"):
        sample(velocity, noise, y, heun=True, heun_guidance="t_mid", null_class=NULL)


# ----------------------------------------------------------------------------------------------
#                            The SDE's generator and the state's device
# ----------------------------------------------------------------------------------------------


def strict_rng(monkeypatch):
    """Make torch's sampling functions refuse a generator on another device than the one they
    draw on (PyTorch does so for a CPU generator and a CUDA tensor, but not for the meta device,
    which stands in for CUDA here)."""
    for name in ("randn", "rand", "randint", "normal", "randn_like", "rand_like"):
        original = getattr(torch, name)

        def strict(*args, _original=original, _name=name, **kwargs):
            gen = kwargs.get("generator")
            if gen is not None:
                if _name.endswith("_like"):
                    target = kwargs.get("device") or args[0].device
                else:
                    target = kwargs.get("device") or "cpu"
                if torch.device(target) != gen.device:
                    raise RuntimeError(f"torch.{_name}: a {gen.device} generator for a {target} tensor")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, strict)


@pytest.mark.parametrize("sampler,heun", [("sde", False), ("ode", False), ("ode", True)])
def test_samplers_draw_on_the_generators_device(monkeypatch, sampler, heun):
    # the state lives on another device than the CPU generator (meta here, CUDA on a GPU run)
    strict_rng(monkeypatch)
    with pytest.raises(RuntimeError, match="generator for a meta tensor"):
        torch.randn(2, generator=torch.Generator(), device="meta")  # the guard itself works
    noise = torch.zeros(4, 2, 1, 1, dtype=torch.float32, device="meta")
    y = torch.zeros(4, dtype=torch.long, device="meta")
    out = sample(lambda x, t, yy: torch.zeros_like(x), noise, y, sampler=sampler, heun=heun, steps=5,
                 cfg_scale=2.0, null_class=NULL, generator=torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == noise.shape


def test_sde_increments_are_the_generators_cpu_draws():
    # v = 0, linear path, two steps (see test_sde_diffusion_coefficient_is_two_t): the result is
    # 0.96 * (0.04 x + sqrt(1.92) z) where z is the FIRST standard normal draw of the generator, on
    # the CPU, in float64, shaped like x: exactly, so the draw is the same whatever the device.
    x = draw_noise(6)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = sample(lambda xx, t, y: torch.zeros_like(xx), x, labels(6), sampler="sde", steps=2, null_class=NULL,
                 generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out, 0.96 * (0.04 * x + math.sqrt(1.92) * z), atol=1e-12)


# ----------------------------------------------------------------------------------------------
#                                  Precision and pixel values
# ----------------------------------------------------------------------------------------------


def test_sampling_precision_is_fp32_unless_asked():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert autocast_dtype("fp32", cuda) is None  # REPA's generate.py: no autocast, TF32 matmuls
    assert autocast_dtype("bf16", cuda) is torch.bfloat16 and autocast_dtype("fp16", cuda) is torch.float16
    assert autocast_dtype("bf16", cpu) is None  # CPU runs in fp32, as training does


def test_pixels_are_quantised_as_adm_does():
    # ADM (and REPA's generate.py): ((x + 1) * 127.5).clamp(0, 255).to(uint8), i.e. truncation.
    # Written out with numpy: floor of the clipped value (all values are >= 0 after the clip).
    x = torch.tensor([-2.0, -1.0, -0.999, -0.5, 0.0, 0.003, 0.5, 0.99, 0.999, 1.0, 3.0])
    x = x.view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()
    got = samples_to_uint8(x)
    ref = np.floor(np.clip((x.numpy().astype(np.float32) + 1) * np.float32(127.5), 0, 255)).astype(np.uint8)
    assert got.shape == (1, 1, 11, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref.transpose(0, 2, 3, 1))
    assert got[0, 0, :, 0].tolist() == [0, 0, 0, 63, 127, 127, 191, 253, 254, 255, 255]  # 0 -> 127.5 -> 127


# ----------------------------------------------------------------------------------------------
#                                    Class-balanced labels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num,classes", [(50, 10), (53, 10), (7, 10), (1000, 1000), (0, 3)])
def test_class_balanced_labels_counts(num, classes):
    got = class_balanced_labels(num, classes)
    assert got.shape == (num,) and got.dtype == np.int64
    counts = Counter(got.tolist())
    per_class = [counts.get(c, 0) for c in range(classes)]
    assert sum(per_class) == num
    assert max(per_class) - min(per_class) <= 1
    assert set(counts) <= set(range(classes))


def test_class_balanced_labels_seeded_shuffle():
    plain = class_balanced_labels(103, 10)
    a, b, c = (class_balanced_labels(103, 10, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == sorted(plain.tolist())
    # without a seed the first whole rounds are 0..K-1 in order
    assert plain[:20].tolist() == list(range(10)) * 2


# ----------------------------------------------------------------------------------------------
#                                  REPA's uniform-random labels
# ----------------------------------------------------------------------------------------------


def test_uniform_random_labels_are_randint_per_batch():
    # REPA / HASTE: y = torch.randint(0, num_classes, (n,)) for each batch; here batch i's draw
    # comes from its own generator, so it depends on (seed, i) only
    num, classes, bs, seed = 2500, 1000, 256, 3
    got = uniform_random_labels(num, classes, seed, bs)
    assert got.shape == (num,) and got.dtype == np.int64
    for i, lo in enumerate(range(0, num, bs)):
        n = min(num, lo + bs) - lo
        ref = torch.randint(0, classes, (n,), generator=label_generator(seed, i)).numpy()
        np.testing.assert_array_equal(got[lo:lo + n], ref)
    # a longer run keeps the first batches; another seed draws other labels
    np.testing.assert_array_equal(uniform_random_labels(num + 700, classes, seed, bs)[:2304], got[:2304])
    assert not np.array_equal(uniform_random_labels(num, classes, seed + 1, bs), got)
    np.testing.assert_array_equal(sample_labels("uniform-random", num, classes, seed, bs), got)


def test_uniform_random_labels_are_uniform_not_balanced():
    # 20000 draws over 10 classes: each count is Binomial(20000, 0.1), sd 42.4; within 5 sd of 2000,
    # and (unlike balanced labels) not all equal
    got = uniform_random_labels(20_000, 10, 0, 64)
    counts = np.bincount(got, minlength=10)
    assert got.min() >= 0 and got.max() <= 9 and len(counts) == 10
    assert np.all(np.abs(counts - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9))
    assert counts.max() - counts.min() > 1
    balanced = sample_labels("balanced", 20_000, 10, 0, 64)
    assert np.bincount(balanced).tolist() == [2000] * 10
    with pytest.raises(ValueError, match="sample.labels"):
        sample_labels("stratified", 10, 10, 0, 4)
