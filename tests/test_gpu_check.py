"""`make gpu-check` on a machine without CUDA: a clear note and exit 0 (the check itself needs a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this stays a no-CUDA run on every machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--workdir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [
        "no CUDA device: gpu-check needs one (`python bench/gpu_check.py --device cpu` runs it on the CPU)"
    ]
    assert not (tmp_path / "w").exists()  # nothing was built


def test_makefile_has_a_gpu_check_target_outside_the_tests():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ngpu-check: setup\n\t$(PY) bench/gpu_check.py $(GPU_CHECK)\n" in makefile
    test_recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    assert "gpu_check" not in test_recipe
