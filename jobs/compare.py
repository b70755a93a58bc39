"""`repa compare`: does alignment speed training up, and by how much? Measured, on one config.

Recipe (the stages are ordinary stages, so a rerun redoes only what changed):
  1. features once: ingest, encode, teacher (one store serves every method: with
     `teacher.cache = "hidden"` the store also holds the final tokens, which REPA and U-REPA read);
  2. per method in `compare.methods`: train the same student with the same seed, data order and
     step budget, `train.align` = that method;
  3. per method and per step of `compare.checkpoints`: sample from that checkpoint's EMA weights
     (`sample.checkpoint`) and evaluate (FID, KID, ...) into `{run}/eval-step{N}`;
  4. `{workdir}/compare/compare.md` (method x training images -> FID / KID), `compare.png` (FID
     against training images, one line per method) and `compare.json`; the table is printed.

The speed-up of a method is the number of training images the `none` run needed for its final FID
divided by the images this method needed to reach that FID (linearly interpolated between
checkpoints), or "not reached" within the budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs import layout
from jobs.run import say
from jobs.stage import UsageError
from pipeline.stores.atomic import atomic_write_bytes, atomic_write_json
from schemas.config import ExperimentConfig

BASELINE = "none"


# ----------------------------------------------------------------------------------------------
#                                           The plan
# ----------------------------------------------------------------------------------------------


def checkpoints(cfg: ExperimentConfig) -> list[int]:
    """The steps every run is evaluated at (validated against the training schedule)."""
    steps = cfg.train.total_steps
    points = list(cfg.compare.checkpoints) or [steps]
    bad = [c for c in points if c > steps or (c != steps and c % cfg.train.checkpoint_every)]
    if bad:
        raise UsageError(f"compare.checkpoints {bad} are not checkpoints of a {steps}-step run: each must be <= "
                         f"train.steps and a multiple of train.checkpoint_every = {cfg.train.checkpoint_every}")
    every = cfg.train.checkpoint_every
    written = [k * every for k in range(1, steps // every + 1)] + ([steps] if steps % every else [])
    kept = written[-cfg.train.keep_checkpoints:]
    pruned = [c for c in points if c not in kept]
    if pruned:
        need = len(written) - written.index(points[0])
        raise UsageError(f"compare.checkpoints {pruned} would be deleted during the run (train.keep_checkpoints = "
                         f"{cfg.train.keep_checkpoints} keeps steps {kept}): set train.keep_checkpoints >= {need}")
    return points


def method_config(cfg: ExperimentConfig, method: str, step: int | None = None) -> ExperimentConfig:
    """cfg with train.align = method (and sample.checkpoint = step), validated again."""
    data = cfg.model_dump(mode="json")
    data["train"]["align"] = method
    if step is not None:
        data["sample"]["checkpoint"] = step
    return ExperimentConfig.model_validate(data)


def plan(cfg: ExperimentConfig) -> list[tuple[str, list[ExperimentConfig], list[ExperimentConfig]]]:
    """[(method, [train config], [one sample/evaluate config per checkpoint])] in run order."""
    points = checkpoints(cfg)
    if BASELINE not in cfg.compare.methods:
        raise UsageError(f"compare.methods must include {BASELINE!r}: speed-ups are measured against it")
    return [(m, [method_config(cfg, m)], [method_config(cfg, m, p) for p in points]) for m in cfg.compare.methods]


# ----------------------------------------------------------------------------------------------
#                                         The summary
# ----------------------------------------------------------------------------------------------


def images_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Training images at which a (images, FID) curve first reaches `target`, interpolated linearly
    between the checkpoints that bracket it; None if it never does."""
    prev = None
    for images, fid in curve:
        if fid <= target:
            if prev is None or prev[1] == fid:
                return float(images)
            (i0, f0) = prev
            return i0 + (f0 - target) / (f0 - fid) * (images - i0)
        prev = (images, fid)
    return None


def collect(cfg: ExperimentConfig) -> dict:
    """Read every evaluation of the plan; a missing one is a usage error naming the stage."""
    rows = {}
    batch = cfg.train.batch_size
    for method, (train_cfg,), evals in plan(cfg):
        points = []
        for ecfg in evals:
            path = layout.SPECS["evaluate"].directory(ecfg) / "metrics.json"
            if not path.is_file():
                raise UsageError(f"{path} is missing: run `repa compare` (method {method}, checkpoint "
                                 f"{ecfg.sample.checkpoint})")
            m = json.loads(path.read_text())
            points.append({"step": ecfg.sample.checkpoint, "images": ecfg.sample.checkpoint * batch,
                           "fid": m["fid"], "kid": m.get("kid"), "kid_std": m.get("kid_std"),
                           "precision": m.get("precision"), "recall": m.get("recall")})
        manifest = layout.SPECS["train"].directory(train_cfg) / "manifest.json"
        seconds = json.loads(manifest.read_text()).get("stats", {}).get("seconds") if manifest.is_file() else None
        rows[method] = {"run": str(layout.SPECS["train"].directory(train_cfg)), "train_seconds": seconds,
                        "points": points}
    base = rows[BASELINE]["points"][-1]
    for row in rows.values():
        reach = images_to_reach([(p["images"], p["fid"]) for p in row["points"]], base["fid"])
        row["images_to_baseline_fid"] = reach
        row["speedup"] = (base["images"] / reach) if reach else None
    return {"baseline": BASELINE, "baseline_fid": base["fid"], "baseline_images": base["images"],
            "num_samples": cfg.sample.num, "model": cfg.model.name, "teacher": f"{cfg.teacher.name} "
            f"({cfg.teacher.weights}, {cfg.teacher.resolution}px)", "methods": rows}


def table(result: dict) -> str:
    """The markdown table: one row per method, FID (KID x 1e3) per checkpoint, then the speed-up."""
    methods = result["methods"]
    images = [p["images"] for p in next(iter(methods.values()))["points"]]
    head = "| method | " + " | ".join(f"{i / 1000:g}k img" for i in images) + " | train s | speed-up |"
    lines = [head, "|" + "---|" * (len(images) + 3)]
    for method, row in methods.items():
        cells = []
        for p in row["points"]:
            kid = f" ({p['kid'] * 1e3:.1f})" if isinstance(p.get("kid"), float) else ""
            cells.append(f"{p['fid']:.1f}{kid}")
        if method == result["baseline"]:
            speed = "1x (baseline)"
        elif row["speedup"]:
            speed = f"{row['speedup']:.2f}x"
        else:
            speed = "not reached"
        secs = f"{row['train_seconds']:.0f}" if row["train_seconds"] else "?"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs} | {speed} |")
    return "\n".join(lines)


def plot(result: dict) -> bytes:
    """PNG of FID against training images, one line per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, row in result["methods"].items():
        xs = [p["images"] for p in row["points"]]
        ax.plot(xs, [p["fid"] for p in row["points"]], marker="o", label=method)
    ax.axhline(result["baseline_fid"], color="grey", lw=0.8, ls="--", label=f"{result['baseline']} final")
    ax.set_xlabel("training images")
    ax.set_ylabel(f"FID ({result['num_samples']} samples)")
    ax.set_title(f"{result['model']}, teacher {result['teacher']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summarise(cfg: ExperimentConfig) -> Path:
    """Write compare.md / compare.png / compare.json under {workdir}/compare and print the table."""
    result = collect(cfg)
    out = Path(cfg.workdir) / "compare"
    md = table(result)
    lines = [
        f"# Alignment comparison: {result['model']}, teacher {result['teacher']}",
        "",
        f"FID (KID x 1e3) of {result['num_samples']} EMA samples per checkpoint; speed-up = training images the "
        f"`{result['baseline']}` run needed for its final FID {result['baseline_fid']:.2f} / images this method "
        "needed to reach it (interpolated between checkpoints).",
        "",
        md,
        "",
        "![FID against training images](compare.png)",
        "",
    ]
    atomic_write_bytes(out / "compare.md", "\n".join(lines).encode())
    atomic_write_bytes(out / "compare.png", plot(result))
    atomic_write_json(out / "compare.json", result)
    print(md, flush=True)
    say("compare", f"-> {out / 'compare.md'}, {out / 'compare.png'}")
    return out
