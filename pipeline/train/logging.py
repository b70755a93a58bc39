"""Training metrics: one JSON row per logged step in metrics.jsonl, and TensorBoard scalars.

    {run_dir}/metrics.jsonl   {"step": int, "loss": float, ...} one object per line, flushed per row
    {run_dir}/tensorboard/    event files of torch.utils.tensorboard.SummaryWriter

On resume from step S, rows with step > S (written after the checkpoint the run resumes from) are
removed first and TensorBoard purges its events past S, so both read as one uninterrupted run.
Only rank 0 logs; other ranks build a disabled logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pipeline.stores.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_rows(path: os.PathLike | str) -> list[dict]:
    """The rows of a metrics.jsonl file (a torn last line from a killed run is dropped)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Appends metric rows of rank 0 to metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: os.PathLike | str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in read_rows(self.path) if int(row.get("step", 0)) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step > 0 else None
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one row {"step": step, **metrics} (non-finite values are written as null)."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
