"""`repa compare`: does alignment speed training up, and by how much? Measured, on one config.

Recipe (the stages are ordinary stages, so a rerun redoes only what changed):
  1. features once: ingest, encode, teacher (one store serves every method: with
     `teacher.cache = "hidden"` the store also holds the final tokens, which REPA and U-REPA read);
  2. per method in `compare.methods` and seed in `compare.seeds`: train the same student with the
     same data and step budget, `train.align` = that method, `train.seed` = that seed (init, data
     order and noise; the methods share each seed's order);
  3. per run and per step of `compare.checkpoints`: sample from that checkpoint's EMA weights
     (`sample.checkpoint`) and evaluate (FID, KID, ...) into `{run}/eval-step{N}`;
  4. `{workdir}/compare/compare.md` (method x training images -> FID / KID: mean and best-worst seed;
     the speed-ups; the reference's real-vs-real floor), `compare.png` (FID against training images,
     a band per method) and `compare.json`; the table is printed.

The speed-up of a method is the number of training images the `none` runs needed for their final
mean FID divided by the images this method's mean curve needed to reach it (linearly interpolated
between checkpoints), or "not reached" within the budget. It is claimed only where it also holds
for this method's worst seed against `none`'s best (`speedups`: "separated").
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs import layout
from jobs.run import publish, say
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


def seeds(cfg: ExperimentConfig, method: str) -> list[int]:
    """The train.seed values `method` runs with: compare.seeds (or train.seed alone), the first one only
    for a method in compare.one_seed."""
    all_seeds = list(cfg.compare.seeds) or [cfg.train.seed]
    return all_seeds[:1] if method in cfg.compare.one_seed else all_seeds


def method_config(cfg: ExperimentConfig, method: str, step: int | None = None,
                  seed: int | None = None) -> ExperimentConfig:
    """cfg with train.align = method (and sample.checkpoint = step, train.seed = seed), validated again."""
    data = cfg.model_dump(mode="json")
    data["train"]["align"] = method
    if step is not None:
        data["sample"]["checkpoint"] = step
    if seed is not None:
        data["train"]["seed"] = seed
    return ExperimentConfig.model_validate(data)


def schedule(cfg: ExperimentConfig) -> list[tuple[str, list[ExperimentConfig], list[ExperimentConfig]]]:
    """[(method, [train config per seed], [sample/evaluate config per seed and checkpoint])] in run order."""
    points = checkpoints(cfg)
    if BASELINE not in cfg.compare.methods:
        raise UsageError(f"compare.methods must include {BASELINE!r}: speed-ups are measured against it")
    return [(m, [method_config(cfg, m, seed=s) for s in seeds(cfg, m)],
             [method_config(cfg, m, p, s) for s in seeds(cfg, m) for p in points]) for m in cfg.compare.methods]


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


def aggregate(per_seed: list[list[dict]]) -> list[dict]:
    """Per checkpoint: mean, min and max over seeds of FID and KID (None where a seed lacks KID)."""
    out = []
    for points in zip(*per_seed, strict=True):
        fids = [p["fid"] for p in points]
        kids = [p["kid"] for p in points]
        row = {"step": points[0]["step"], "images": points[0]["images"], "seeds": len(points),
               "fid": sum(fids) / len(fids), "fid_min": min(fids), "fid_max": max(fids),
               "kid": None, "kid_min": None, "kid_max": None}
        if all(isinstance(k, float) for k in kids):
            row.update(kid=sum(kids) / len(kids), kid_min=min(kids), kid_max=max(kids))
        agreed = [p.get("agreement") for p in points]
        if all(isinstance(a, float) for a in agreed):  # text-to-image with class-named prompts
            row.update(agreement=sum(agreed) / len(agreed), agreement_min=min(agreed), agreement_max=max(agreed))
        out.append(row)
    return out


def speedups(base: list[dict], row: list[dict]) -> dict:
    """How much sooner `row` (aggregated points) reaches `base`'s FIDs.

    mean:      base's last images / images at which row's mean curve reaches base's final mean FID;
    separated: the same with row's worst seed per checkpoint (max FID) against base's best final seed
               (min FID): a speed-up that holds although the seed ranges do not overlap;
    per_checkpoint: for each base checkpoint, base's images / images row's mean curve needs for base's
               mean FID there (the map of where the gain is).
    None where the curve does not reach the target within the run.
    """
    def ratio(curve, target, images):
        reach = images_to_reach(curve, target)
        return images / reach if reach else None

    mean = [(p["images"], p["fid"]) for p in row]
    worst = [(p["images"], p["fid_max"]) for p in row]
    last = base[-1]
    return {"mean": ratio(mean, last["fid"], last["images"]),
            "separated": ratio(worst, last["fid_min"], last["images"]),
            "per_checkpoint": [ratio(mean, b["fid"], b["images"]) for b in base]}


def _seconds(directory: Path) -> float:
    """stats.seconds of the stage whose manifest is in `directory` (0 when it has none)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return 0.0
    return float(json.loads(manifest.read_text()).get("stats", {}).get("seconds") or 0.0)


def stage_seconds(cfg: ExperimentConfig) -> dict:
    """Wall time of every stage the comparison ran, from the manifests: features (ingest, latents,
    teacher), the reference images' ingest, training, sampling and evaluation summed over the plan."""
    out = {name: _seconds(layout.SPECS[name].directory(cfg)) for name in layout.stages(cfg)
           if name in ("ingest", "latents", "teacher", "text")}
    if cfg.eval.reference in layout.REFERENCE_IMAGES:
        out["reference"] = _seconds(layout.SPECS["ingest"].directory(layout.holdout_config(cfg)))
    out["train"] = out["sample"] = out["evaluate"] = 0.0
    for _, train_cfgs, eval_cfgs in schedule(cfg):
        out["train"] += sum(_seconds(layout.SPECS["train"].directory(c)) for c in train_cfgs)
        for c in eval_cfgs:
            out["sample"] += _seconds(layout.SPECS["sample"].directory(c))
            out["evaluate"] += _seconds(layout.SPECS["evaluate"].directory(c))
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def collect(cfg: ExperimentConfig, floor: dict | None = None) -> dict:
    """Read every evaluation of the plan; a missing one is a usage error naming the stage. `floor`: the
    reference's real-vs-real floor (evaluate.reference_floor), shown under the table."""
    rows = {}
    batch = cfg.train.batch_size
    for method, train_cfgs, evals in schedule(cfg):
        per_seed: dict[int, list[dict]] = {}
        for ecfg in evals:
            path = layout.SPECS["evaluate"].directory(ecfg) / "metrics.json"
            if not path.is_file():
                raise UsageError(f"{path} is missing: run `repa compare` (method {method}, seed {ecfg.train.seed}, "
                                 f"checkpoint {ecfg.sample.checkpoint})")
            m = json.loads(path.read_text())
            per_seed.setdefault(ecfg.train.seed, []).append(
                {"step": ecfg.sample.checkpoint, "images": ecfg.sample.checkpoint * batch, "fid": m["fid"],
                 "kid": m.get("kid"), "kid_std": m.get("kid_std"), "precision": m.get("precision"),
                 "recall": m.get("recall"), "agreement": m.get("agreement")})
        known = [t for t in (_seconds(layout.SPECS["train"].directory(c)) for c in train_cfgs) if t]
        rows[method] = {"runs": [str(layout.SPECS["train"].directory(t)) for t in train_cfgs],
                        "seeds": list(per_seed), "per_seed": per_seed, "points": aggregate(list(per_seed.values())),
                        "train_seconds": sum(known) / len(known) if known else None}
    base = rows[BASELINE]["points"]
    for row in rows.values():
        row["speedup"] = speedups(base, row["points"])
    return {"baseline": BASELINE, "baseline_fid": base[-1]["fid"], "baseline_images": base[-1]["images"],
            "num_samples": cfg.sample.num, "model": cfg.model.name, "conditional": cfg.model.num_classes > 0,
            "teacher": f"{cfg.teacher.name} ({cfg.teacher.weights}, {cfg.teacher.resolution}px)",
            "floor": floor, "seconds": stage_seconds(cfg), "methods": rows}


def _fmt_range(p: dict, key: str, scale: float = 1.0) -> str:
    if p[key] is None:
        return "-"
    if p["seeds"] == 1:
        return f"{p[key] * scale:.1f}"
    return f"{p[key] * scale:.1f} ({p[key + '_min'] * scale:.1f}-{p[key + '_max'] * scale:.1f})"


def _fmt_speed(value: float | None) -> str:
    return f"{value:.2f}x" if value else "not reached"


def table(result: dict) -> str:
    """Markdown: FID per checkpoint (mean and min-max over seeds), then KID x 1e3 likewise, then the
    speed-ups; the floor under the tables."""
    methods = result["methods"]
    images = [p["images"] for p in next(iter(methods.values()))["points"]]
    cols = " | ".join(f"{i / 1000:g}k img" for i in images)
    lines = [f"| method | seeds | {cols} | train s | speed-up (mean) | speed-up (worst seed vs best {result['baseline']}) |",
             "|" + "---|" * (len(images) + 5)]
    for method, row in methods.items():
        cells = " | ".join(_fmt_range(p, "fid") for p in row["points"])
        secs = f"{row['train_seconds']:.0f}" if row["train_seconds"] else "?"
        if method == result["baseline"]:
            speed = "1x (baseline) | -"
        else:
            speed = f"{_fmt_speed(row['speedup']['mean'])} | {_fmt_speed(row['speedup']['separated'])}"
        lines.append(f"| {method} | {len(row['seeds'])} | {cells} | {secs} | {speed} |")
    lines += ["", f"| KID x 1e3 | {cols} |", "|" + "---|" * (len(images) + 1)]
    for method, row in methods.items():
        lines.append(f"| {method} | " + " | ".join(_fmt_range(p, "kid", 1e3) for p in row["points"]) + " |")
    if all("agreement" in p for row in methods.values() for p in row["points"]):
        lines += ["", f"| prompt agreement % | {cols} |", "|" + "---|" * (len(images) + 1)]
        for method, row in methods.items():
            lines.append(f"| {method} | " + " | ".join(_fmt_range(p, "agreement", 100) for p in row["points"]) + " |")
    base_cols = " | ".join(f"{result['baseline']}'s {i / 1000:g}k-image FID" for i in images)
    lines += ["", f"| speed-up to reach | {base_cols} |", "|" + "---|" * (len(images) + 1)]
    for method, row in methods.items():
        if method != result["baseline"]:
            lines.append(f"| {method} | " + " | ".join(_fmt_speed(v) for v in row["speedup"]["per_checkpoint"]) + " |")
    secs = result.get("seconds")
    if secs:
        ref = f", reference images {secs['reference']:.0f}" if "reference" in secs else ""
        text = f", text {secs['text']:.0f}" if "text" in secs else ""
        features = secs["ingest"] + secs["latents"] + secs["teacher"] + secs.get("text", 0.0)
        lines += ["", f"Time (stage manifests): features {features:.0f} s "
                      f"(ingest {secs['ingest']:.0f}, latents {secs['latents']:.0f}, teacher {secs['teacher']:.0f}{text}){ref}, "
                      f"training {secs['train']:.0f} s, sampling {secs['sample']:.0f} s, evaluation {secs['evaluate']:.0f} s; "
                      f"total {secs['total']:.0f} s."]
    floor = result.get("floor")
    if floor:
        lines += ["", f"Floor (real vs real, {floor['images_per_half']} vs {floor['images_per_half']} reference "
                      f"images): FID {floor['fid']:.1f}, KID x 1e3 {floor['kid'] * 1e3:.1f}."]
    return "\n".join(lines)


def plot(result: dict) -> bytes:
    """PNG of FID against training images: one line per method (the seeds' mean) in a band from the
    best to the worst seed; the floor as a dotted line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, row in result["methods"].items():
        xs = [p["images"] for p in row["points"]]
        line, = ax.plot(xs, [p["fid"] for p in row["points"]], marker="o",
                        label=f"{method} ({len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''})")
        if len(row["seeds"]) > 1:
            ax.fill_between(xs, [p["fid_min"] for p in row["points"]], [p["fid_max"] for p in row["points"]],
                            color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(result["baseline_fid"], color="grey", lw=0.8, ls="--", label=f"{result['baseline']} final")
    if result.get("floor"):
        ax.axhline(result["floor"]["fid"], color="black", lw=0.8, ls=":", label="real vs real floor")
    ax.set_xlabel("training images")
    ax.set_ylabel(f"FID ({result['num_samples']} samples)")
    kind = "class-conditional" if result.get("conditional", True) else "unconditional"
    ax.set_title(f"{result['model']} ({kind}), teacher {result['teacher']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summarise(cfg: ExperimentConfig, floor: dict | None = None) -> Path:
    """Write compare.md / compare.png / compare.json under {workdir}/compare and print the table."""
    result = collect(cfg, floor)
    out = layout.workdir(cfg) / "compare"
    md = table(result)
    lines = [
        f"# Alignment comparison: {result['model']}, teacher {result['teacher']}",
        "",
        f"FID of {result['num_samples']} EMA samples per checkpoint: the mean over seeds (best-worst seed). "
        f"Speed-up (mean) = training images the `{result['baseline']}` run needed for its final mean FID "
        f"{result['baseline_fid']:.2f} / images this method's mean curve needed to reach it (interpolated "
        "between checkpoints); the worst-seed column asks the same of this method's worst seed against the "
        f"best `{result['baseline']}` seed, so it counts only where the seed ranges do not overlap.",
        "",
        md,
        "",
        "![FID against training images](compare.png)",
        "",
    ]
    atomic_write_bytes(out / "compare.md", "\n".join(lines).encode())
    atomic_write_bytes(out / "compare.png", plot(result))
    atomic_write_json(out / "compare.json", result)
    publish(cfg, out / "compare.md", out / "compare.png", out / "compare.json")
    print(md, flush=True)
    say("compare", f"-> {out / 'compare.md'}, {out / 'compare.png'}")
    return out
