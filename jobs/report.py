"""`repa report`: one page on a configured experiment, from what the stages wrote.

Writes `{run}/report.md` (stage states, training summary, metrics, where the pictures are) and
`{run}/loss.png` (training curves from metrics.jsonl), and prints the headline: FID and the grid.
Reads only; a stage that has not run is reported as such, not run.
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs import layout
from jobs.run import publish, pull_all, say
from pipeline.stores.atomic import atomic_write_bytes, atomic_write_text
from schemas.config import ExperimentConfig

CURVES = ("loss", "fm", "repa", "manifold", "attn")


def read_metrics_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a row cut by a crash ends the readable part
    return rows


def plot_curves(rows: list[dict], title: str) -> bytes | None:
    """PNG of the loss terms over steps, or None without rows."""
    present = [k for k in CURVES if any(k in r for r in rows)]
    if not rows or not present:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k in present:
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
        ax.plot(*zip(*pts, strict=True), label=k)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report(cfg: ExperimentConfig) -> None:
    pull_all(cfg)
    states = layout.states(cfg)
    run_dir = states["train"].path
    lines = [f"# {layout.run_name(cfg)}", "", "| stage | state | path |", "|---|---|---|"]
    lines += [f"| {s.stage} | {s.state} | {s.path} |" for s in states.values()]
    rows = read_metrics_rows(run_dir / "metrics.jsonl")
    if rows:
        last = next((r for r in reversed(rows) if "loss" in r), rows[-1])
        lines += ["", "## Training", "", f"- steps: {last.get('step')}  (model {cfg.model.name}, align "
                  f"{cfg.train.align}, teacher {cfg.teacher.name} weights={cfg.teacher.weights})"]
        lines += [f"- last {k}: {last[k]:.4f}" for k in CURVES if isinstance(last.get(k), float)]
        if isinstance(last.get("images_per_s"), float):
            lines.append(f"- throughput: {last['images_per_s']:.1f} images/s")
        png = plot_curves(rows, layout.run_name(cfg))
        if png:
            atomic_write_bytes(run_dir / "loss.png", png)
            lines.append(f"- curves: {run_dir / 'loss.png'}")
    metrics_path = states["evaluate"].path / "metrics.json"
    headline = []
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        lines += ["", "## Evaluation", "", f"{m.get('num_samples')} samples against {m.get('reference')}", "",
                  "| metric | value |", "|---|---|"]
        for k in ("fid", "sfid", "is", "precision", "recall"):
            if m.get(k) is not None:
                lines.append(f"| {k} | {m[k]:.4f} |")
                headline.append(f"{k.upper() if k != 'is' else 'IS'} {m[k]:.2f}")
    grid = states["sample"].path / "grid.png"
    if grid.is_file():
        lines += ["", f"Samples: {grid}"]
    if cfg.teacher.weights == "random" and cfg.train.align != "none":
        lines += ["", "Note: the teacher is a random-init DINOv2 (offline stand-in), not real DINOv2 features."]
    if run_dir.is_dir():
        atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
        publish(cfg, run_dir / "report.md", run_dir / "loss.png")
        say("report", f"{run_dir / 'report.md'}")
    if headline:
        print(f"{', '.join(headline)}  |  samples: {grid}")
        if cfg.teacher.weights == "random" and cfg.train.align != "none":
            print("note: aligned to a RANDOM-INIT DINOv2 (offline stand-in): set teacher.weights = hub for real features")
    else:
        print("no metrics yet: run `repa eval` (or `make eval`) for this config")
