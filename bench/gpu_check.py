"""`make gpu-check`: every CUDA path of the pipeline once, on small data, in a few minutes.

On a machine with a CUDA GPU it builds a throw-away workdir (synthetic 32px images, the tiny random
VAE with 16x16 latents, a random-init DINOv2-S at 112px, SiT-S/2 and SiTDown-T/2), runs the `repa` stages in subprocesses the
way a user would, and prints one line per path:

    path | ok/FAIL/skip | seconds | detail

  ingest, encode (vae.precision = bf16 autocast), teacher (teacher.precision = bf16, cache = hidden),
  train none / repa / urepa / haste (bf16, local launcher, train.num_workers = 1; HASTE with the
  gradient-angle trigger), train repa with torch.compile (when torch offers it), sample ODE (Heun)
  and SDE (fp32 with TF32 matmuls, and bf16 autocast), evaluate (Inception on the GPU), and
  bench/bench_models.py for SiT-B/2 and SiT-XL/2 at batch 64 in bf16 (images/s and model FLOP
  utilisation), bench/bench_loader.py (W = 0, 2, 4 loader processes at the ImageNet-256 geometry) and
  bench/bench_train_step.py (cached vs online teacher, SiT-B/2 + DINOv2-B/14 at batch 64, bf16).

Nothing needs Ray or the network. Without a CUDA device it prints "no CUDA device: gpu-check needs
one" and exits 0, so the Makefile target never fails a CPU machine; `--device cpu` runs the same
paths on the CPU instead (a dry run of the script itself, with tiny bench models). Exit status:
0 when every path is ok (or skipped), 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: gpu-check needs one (`python bench/gpu_check.py --device cpu` runs it on the CPU)"

CONFIG = """
workdir = "{workdir}"
[data]
source = "synthetic"
resolution = 32
synthetic_count = 128
synthetic_classes = 4
shard_size = 64
num_workers = 1
[vae]
name = "tiny-random"
weights = "random"
precision = "bf16"
device = "{device}"
batch_size = 64
[teacher]
name = "dinov2_vits14"
weights = "random"
resolution = {teacher_resolution}
cache = "hidden"
hidden_layer = 8
precision = "bf16"
device = "{device}"
batch_size = 64
[stores]
samples_per_shard = 64
[model]
name = "{model}"
num_classes = 4
[align]
projector_dim = 256
tau = 1000
[train]
align = "repa"
launcher = "local"
num_workers = 1
use_gpu = {use_gpu}
batch_size = 16
steps = {steps}
precision = "bf16"
checkpoint_every = 1000
log_every = 1
loader_workers = 0
[sample]
num = 32
batch_size = 16
steps = 10
cfg_scale = 1.5
guidance_high = 0.7
device = "{device}"
[eval]
reference = "ingest"
batch_size = 32
splits = 2
device = "{device}"
"""

TRAIN_PATHS = {  # path -> --set overrides (train.name fixes the run directory)
    "train none": ["train.align=none"],
    "train repa": ["train.align=repa"],
    "train urepa": ["train.align=urepa", "model.name=SiTDown-T/2"],
    "train haste": ["train.align=haste", "align.trigger=gradient-angle", "align.trigger_start=2",
                    "align.trigger_every=2"],
    "train repa compile": ["train.align=repa", "train.compile=true"],
}
SAMPLE_PATHS = {
    "sample ode heun fp32": ["sample.sampler=ode", "sample.heun=true", "sample.precision=fp32"],
    "sample sde fp32": ["sample.sampler=sde", "sample.precision=fp32", "sample.labels=uniform-random"],
    "sample sde bf16": ["sample.sampler=sde", "sample.precision=bf16"],
}


@dataclass
class Result:
    path: str
    status: str  # ok | FAIL | skip
    seconds: float
    detail: str

    def line(self) -> str:
        return f"{self.path:<22} | {self.status:<4} | {self.seconds:7.1f} s | {self.detail}"


@dataclass
class Check:
    """Runs the paths one after another and prints each result as it comes."""

    workdir: Path
    config: Path
    timeout: float
    results: list[Result] = field(default_factory=list)

    def report(self, result: Result) -> Result:
        self.results.append(result)
        print(result.line(), flush=True)
        return result

    def run(self, path: str, argv: list[str], detail=None) -> Result:
        """Run `python argv...` from the repository root; detail(stdout) -> str on success."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=self.timeout, env=env)
        except subprocess.TimeoutExpired:
            return self.report(Result(path, "FAIL", time.perf_counter() - t0, f"timed out after {self.timeout:.0f} s"))
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
            return self.report(Result(path, "FAIL", seconds, f"exit {proc.returncode}: {why[-300:]}"))
        try:
            text = detail(proc.stdout) if detail else ""
        except Exception as exc:  # a stage that ran but left no readable result is a failure too
            return self.report(Result(path, "FAIL", seconds, f"ran, but its result is unreadable: {exc}"))
        return self.report(Result(path, "ok", seconds, text))

    def stage(self, path: str, command: str, overrides: list[str], detail=None) -> Result:
        sets = [a for o in overrides for a in ("--set", o)]
        return self.run(path, ["-m", "jobs.cli", command, "--config", str(self.config), *sets], detail)

    def skip(self, path: str, why: str) -> Result:
        return self.report(Result(path, "skip", 0.0, why))

    def directory(self, stage: str, overrides: list[str]) -> Path:
        """The output directory of `stage` for this config and overrides (as `repa status` finds it)."""
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from jobs.layout import states
        from schemas.loading import load_config

        return states(load_config(self.config, overrides), upto=stage)[stage].path

    def manifest(self, stage: str, overrides: list[str] = ()) -> dict:
        return json.loads((self.directory(stage, list(overrides)) / "manifest.json").read_text())


def rate(stats: dict, *keys: str) -> str:
    return ", ".join(f"{k} {stats[k]}" for k in keys if k in stats)


def cuda_info() -> dict | None:
    """{name, count, compile} of the visible CUDA devices in a child process, or None without CUDA."""
    code = ("import json, torch, importlib.util as u; ok = torch.cuda.is_available(); "
            "print(json.dumps({'name': torch.cuda.get_device_name(0) if ok else None, "
            "'count': torch.cuda.device_count() if ok else 0, 'torch': torch.__version__, "
            "'compile': hasattr(torch, 'compile') and u.find_spec('triton') is not None}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"gpu-check: cannot import torch: {proc.stderr.strip()[-500:]}")
    info = json.loads(proc.stdout)
    return info if info["count"] > 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default; exits 0 with a note when there is none) or cpu (a dry run)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the work here (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per train path")
    ap.add_argument("--timeout", type=float, default=240, help="seconds allowed per path")
    ap.add_argument("--no-bench", action="store_true", help="skip the bench_models path")
    args = ap.parse_args(argv)

    info = cuda_info() if args.device == "cuda" else None
    if args.device == "cuda" and info is None:
        print(NO_CUDA, flush=True)
        return 0
    gpu = args.device == "cuda"
    print(f"gpu-check on {info['name'] + ' (torch ' + info['torch'] + ')' if gpu else 'the CPU (dry run)'}",
          flush=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="repa-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gpu-check.toml"
    # 16x16 latents: SiT-S/2 (8x8 tokens) against an 8x8 teacher grid on the GPU; on the CPU SiT-S/4
    # against a 4x4 grid, 16 times cheaper. HASTE needs the student's grid to be the teacher's.
    config.write_text(CONFIG.format(workdir=workdir / "work", device=args.device, use_gpu="true" if gpu else "false",
                                    steps=args.steps, model="SiT-S/2" if gpu else "SiT-S/4",
                                    teacher_resolution=112 if gpu else 56))
    check = Check(workdir, config, args.timeout)
    start = time.perf_counter()
    try:
        _run_paths(check, gpu, compile_ok=bool(info and info["compile"]), bench=not args.no_bench)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [r.path for r in check.results if r.status == "FAIL"]
    total = Result("total", "FAIL" if failed else "ok", time.perf_counter() - start,
                   f"{len(check.results)} paths, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    print(total.line(), flush=True)
    return 1 if failed else 0


def _run_paths(check: Check, gpu: bool, compile_ok: bool, bench: bool) -> None:
    if check.stage("ingest", "ingest", [], lambda _: rate(check.manifest("ingest")["stats"], "images")).status != "ok":
        return
    latents = check.stage("encode bf16", "encode", [],
                          lambda _: rate(check.manifest("latents")["stats"], "images", "images_per_s"))
    teacher = check.stage("teacher bf16", "teacher", [],
                          lambda _: rate(check.manifest("teacher")["stats"], "images", "images_per_s"))
    if "FAIL" in (latents.status, teacher.status):
        return

    def trained(name: str, overrides: list[str]):
        def detail(_: str) -> str:
            run_dir = check.directory("train", overrides)
            stats = json.loads((run_dir / "manifest.json").read_text())["stats"]
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            terms = sorted({k for r in rows for k in r if k in ("fm", "repa", "manifold", "attn", "trigger_cosine")})
            return f"step {stats['step']}, loss {stats['loss']:.4f}, {stats['images_per_s']:.1f} img/s, terms {terms}"
        return detail

    ok_runs = []
    for path, overrides in TRAIN_PATHS.items():
        if "compile" in path and not gpu:
            check.skip(path, "CUDA only (the CPU dry run does not compile)")
            continue
        if "compile" in path and not compile_ok:
            check.skip(path, "torch.compile is not offered here (no triton)")
            continue
        name = path.replace(" ", "-")
        run = [*overrides, f"train.name={name}"]
        if check.stage(path, "train", run, trained(name, run)).status == "ok":
            ok_runs.append(name)

    if "train-repa" not in ok_runs:
        for path in (*SAMPLE_PATHS, "evaluate"):
            check.skip(path, "needs the train repa path")
    else:
        run = ["train.align=repa", "train.name=train-repa"]

        def sampled(overrides: list[str]):
            def detail(_: str) -> str:
                m = check.manifest("sample", overrides)
                return rate(m["stats"], "images", "images_per_s") + f", labels {m['config']['sample.labels']}"
            return detail

        last = None
        for path, overrides in SAMPLE_PATHS.items():
            last = check.stage(path, "sample", [*run, *overrides], sampled([*run, *overrides]))
        if last is not None and last.status == "ok":
            final = [*run, *SAMPLE_PATHS["sample sde bf16"]]
            check.stage("evaluate", "evaluate", final,
                        lambda _: ", ".join(f"{k} {v:.3f}" for k, v in json.loads(
                            (check.directory("evaluate", final) / "metrics.json").read_text()).items()
                            if k in ("fid", "sfid", "precision", "recall")))
        else:
            check.skip("evaluate", "needs the last sample path")

    if not bench:
        return
    bench_args = (["--models", "SiT-B/2", "SiT-XL/2", "--batch", "64", "--steps", "10", "--input-size", "32"] if gpu
                  else ["--models", "SiT-T/2", "--batch", "8", "--steps", "2", "--input-size", "16"])
    bench_args += ["--channels", "4", "--precision", "bf16", "--teacher-grid", "16" if gpu else "8",
                   "--teacher-dim", "768" if gpu else "384"]

    def benched(stdout: str) -> str:
        parts = []
        for line in stdout.splitlines():
            r = json.loads(line)
            mfu = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") is not None else "MFU n/a"
            parts.append(f"{r['model']} {r['images_per_s']} img/s, {r['tflop_s']} TFLOP/s, {mfu}")
        return "; ".join(parts)

    check.run("bench models bf16", ["bench/bench_models.py", *bench_args], benched)

    def loaded(stdout: str) -> str:
        rows = [json.loads(line) for line in stdout.splitlines()]
        return "; ".join(f"W={r['workers']} P={r['prefetch']} {r['samples_per_s']:.0f}/s" for r in rows)

    loader_args = (["--workers", "0", "2", "4"] if gpu else
                   ["--num", "256", "--per-shard", "128", "--batch", "32", "--tokens", "16", "--dim", "384",
                    "--steps", "3", "--workers", "0", "1"])
    check.run("bench loader", ["bench/bench_loader.py", *loader_args], loaded)
    if not gpu:
        check.skip("bench train step", "its CPU preset takes minutes: python bench/bench_train_step.py")
        return

    def stepped(stdout: str) -> str:
        rows = [json.loads(line) for line in stdout.splitlines()]
        parts = [f"{r['align']}+{r['cache']} {r['images_per_s']} img/s" for r in rows if r["bench"] == "train_step"]
        ratios = rows[-1]
        return "; ".join(parts) + (f"; online/tokens {ratios['repa_online_over_tokens']}x, "
                                   f"online/hidden {ratios['haste_online_over_hidden']}x")

    check.run("bench train step bf16", ["bench/bench_train_step.py", "--preset", "gpu", "--batch", "64", "--steps", "5"],
              stepped)


if __name__ == "__main__":
    sys.exit(main())
