"""`repa compare`'s arithmetic: seeds aggregated per checkpoint, speed-ups, and the reference floor."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from jobs.compare import aggregate, images_to_reach, speedups, table
from pipeline.metrics.floor import floor_metrics


def _points(fids, kids=None, images=(100, 200)):
    kids = kids or [None] * len(fids)
    return [{"step": i // 10, "images": i, "fid": f, "kid": k} for i, f, k in zip(images, fids, kids, strict=True)]


def test_seed_aggregation_and_speedups_by_hand():
    none = aggregate([_points([50.0, 30.0], [0.05, 0.03]), _points([54.0, 34.0], [0.07, 0.05])])
    assert [(p["fid"], p["fid_min"], p["fid_max"]) for p in none] == [(52.0, 50.0, 54.0), (32.0, 30.0, 34.0)]
    assert none[0]["kid"] == pytest.approx(0.06) and none[1]["kid_max"] == 0.05 and none[0]["seeds"] == 2
    method = aggregate([_points([40.0, 20.0]), _points([44.0, 26.0])])
    assert [p["fid"] for p in method] == [42.0, 23.0] and method[0]["kid"] is None

    s = speedups(none, method)
    # mean curve 42 -> 23 reaches none's final mean 32 at 100 + (42 - 32) / (42 - 23) * 100 images
    assert s["mean"] == pytest.approx(200 / (100 + 10 / 19 * 100))
    # worst seed 44 -> 26 reaches none's best final seed 30 at 100 + (44 - 30) / (44 - 26) * 100
    assert s["separated"] == pytest.approx(200 / (100 + 14 / 18 * 100))
    # none's 100-image FID 52 is beaten at the first checkpoint already (no earlier one to interpolate from)
    assert s["per_checkpoint"] == [pytest.approx(1.0), pytest.approx(s["mean"])]
    # a slower curve: none's 100-image FID 52 after 100 + (60 - 52) / (60 - 40) * 100 images; its final never
    slow = aggregate([_points([60.0, 40.0])])
    assert speedups(none, slow) == {"mean": None, "separated": None, "per_checkpoint": [pytest.approx(100 / 140), None]}
    assert images_to_reach([(100, 60.0), (200, 40.0)], 32.0) is None


def test_table_shows_mean_range_speedups_and_floor():
    none = aggregate([_points([50.0, 30.0], [0.05, 0.03]), _points([54.0, 34.0], [0.07, 0.05])])
    method = aggregate([_points([40.0, 20.0], [0.04, 0.02])])
    result = {"baseline": "none", "methods": {
        "none": {"seeds": [0, 1], "points": none, "train_seconds": 10.0, "speedup": speedups(none, none)},
        "urepa": {"seeds": [0], "points": method, "train_seconds": None, "speedup": speedups(none, method)}},
        "floor": {"fid": 5.25, "kid": 0.0001, "images_per_half": 500}}
    md = table(result)
    assert "| none | 2 | 52.0 (50.0-54.0) | 32.0 (30.0-34.0) | 10 | 1x (baseline) | - |" in md
    assert "| urepa | 1 | 40.0 | 20.0 | ? | " in md
    assert "| none | 60.0 (50.0-70.0) | 40.0 (30.0-50.0) |" in md  # KID x 1e3
    assert "FID 5.2, KID x 1e3 0.1" in md and "500 vs 500" in md


def test_floor_is_fid_and_kid_of_the_two_halves():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(41, 6)) + np.linspace(0, 1, 41)[:, None]  # 41 rows: halves of 20, last row left out
    got = floor_metrics(pool)
    a, b = pool[:20], pool[20:40]
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert got["fid"] == pytest.approx(fid, rel=1e-6) and got["images_per_half"] == 20

    def k(x, y):
        return (x @ y.T / 6 + 1) ** 3

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    mmd = ((kaa.sum() - np.trace(kaa)) / 380 + (kbb.sum() - np.trace(kbb)) / 380 - 2 * kab.mean())
    assert got["kid"] == pytest.approx(mmd, rel=1e-9)


def test_text_to_image_tables_the_prompt_agreement():
    def points(fids, agreed):
        return [{"step": i // 10, "images": i, "fid": f, "kid": None, "agreement": a}
                for i, f, a in zip((100, 200), fids, agreed, strict=True)]

    none = aggregate([points([50.0, 30.0], [0.20, 0.30]), points([54.0, 34.0], [0.30, 0.50])])
    assert none[1]["agreement"] == pytest.approx(0.4) and none[1]["agreement_min"] == 0.3
    haste = aggregate([points([40.0, 20.0], [0.5, 0.75])])
    md = table({"baseline": "none", "methods": {
        "none": {"seeds": [0, 1], "points": none, "train_seconds": 1.0, "speedup": speedups(none, none)},
        "haste": {"seeds": [0], "points": haste, "train_seconds": 1.0, "speedup": speedups(none, haste)}}})
    assert "| prompt agreement % |" in md and "| none | 25.0 (20.0-30.0) | 40.0 (30.0-50.0) |" in md
    assert "| haste | 50.0 | 75.0 |" in md
    assert "agreement" not in aggregate([_points([50.0, 30.0])])[0]  # class-conditional: no such column
