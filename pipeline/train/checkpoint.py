"""Training checkpoints and exported weights of a run directory.

    {run_dir}/checkpoints/step-{step:09d}.pt   the whole training state after `step` optimiser steps
    {run_dir}/ema.safetensors                  EMA weights of the backbone (sampling uses these)
    {run_dir}/model.safetensors                raw weights of the backbone

Every file is written to a temporary sibling, fsynced and renamed into place, so a killed job never
leaves a truncated checkpoint that `latest` could pick. Checkpoints hold only tensors and plain
containers of primitives and load with `torch.load(weights_only=True)`.

A checkpoint dict (`training_state`) holds, in this order:
    step        int: optimiser steps done
    model       backbone state_dict
    ema         EMA.state_dict(): float32 tensors keyed like model
    optimizer   AdamW state_dict (backbone's then objective's trainable parameters)
    objective   objective state_dict (projectors, HASTE's `stopped_at`)
    scaler      GradScaler state_dict, {} without fp16
    rng         torch / CUDA / numpy / python states (see `rng_state`)
    world_size  int: workers of the run that wrote it
    data        {seed, batch_size, step}: the data position (pipeline.train.data)
`save_training_state` writes one, `load_training_state` restores one into a freshly built run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from pipeline.stores.atomic import atomic_write_bytes, atomic_write_with
from pipeline.train.ema import EMA

PathLike = str | os.PathLike
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{9,})\.pt$")


# ----------------------------------------------------------------------------------------------
#                                      Finding checkpoints
# ----------------------------------------------------------------------------------------------


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def step_of(path: PathLike) -> int:
    """The step encoded in a checkpoint file name `step-000001234.pt`."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint file name (expected step-<9 digits>.pt)")
    return int(m.group(1))


def list_checkpoints(directory: PathLike) -> list[Path]:
    """Checkpoint files of a run directory (its checkpoints/ folder) or of a folder holding them, oldest first."""
    directory = Path(directory)
    found = []
    for folder in (directory / CHECKPOINT_DIR, directory):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.is_file() and _NAME.match(p.name)]
    return sorted(set(found), key=step_of)


def latest(run_dir: PathLike) -> Path | None:
    """The newest checkpoint of `run_dir`, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_path(resume: str, run_dir: PathLike, restore_dir: PathLike | None = None) -> Path | None:
    """The checkpoint a run starts from: resume = auto (newest of run_dir and restore_dir, a launcher's
    restored checkpoint folder) | never (None) | the path of a checkpoint file."""
    if resume == "never":
        return None
    if resume != "auto":
        return Path(resume)
    found = [p for p in (latest(run_dir), latest(restore_dir) if restore_dir else None) if p]
    return max(found, key=step_of) if found else None


def prune(run_dir: PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints of `run_dir`; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    old = list_checkpoints(Path(run_dir) / CHECKPOINT_DIR)[:-keep]
    for p in old:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return old


def remove_all(run_dir: PathLike) -> None:
    """Delete every checkpoint of `run_dir` (a run started over with resume='never')."""
    for old in list_checkpoints(Path(run_dir) / CHECKPOINT_DIR):
        old.unlink()


# ----------------------------------------------------------------------------------------------
#                                       Save and load
# ----------------------------------------------------------------------------------------------


def save(run_dir: PathLike, step: int, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write `state` as checkpoints/step-{step:09d}.pt atomically, then keep only the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    atomic_write_with(path, lambda f: torch.save(state, f))
    if keep is not None:
        prune(run_dir, keep)
    return path


def load(path: PathLike) -> dict[str, Any]:
    """A checkpoint dict, on CPU, loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist: pass an existing step-*.pt file or resume='auto'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to resume "
                         "from the previous one") from e


# ----------------------------------------------------------------------------------------------
#                                        Training state
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What `load_training_state` hands back besides the restored modules."""

    step: int  # optimiser steps done: the run continues with step index `step`
    rng: dict[str, Any]  # `rng_state()` at save time; the loop restores it with `set_rng_state`
    path: Path  # the checkpoint file


def training_state(
    *,
    step: int,  # optimiser steps done
    model: nn.Module,  # the bare backbone (not DDP-wrapped or compiled)
    ema: EMA,  # EMA of the backbone
    optimizer: torch.optim.Optimizer,  # the run's AdamW
    objective: nn.Module,  # the objective (projectors, HASTE's termination buffer)
    scaler: torch.amp.GradScaler | None,  # fp16 grad scaler, None without one
    world_size: int,  # workers of this run
    data_seed: int,  # TrainDataset.seed
    batch_size: int,  # global batch size
) -> dict[str, Any]:
    """The checkpoint dict (module docstring); RNG states are taken now."""
    return {
        "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(), "objective": objective.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng_state(), "world_size": world_size,
        "data": {"seed": data_seed, "batch_size": batch_size, "step": step},
    }


def save_training_state(
    run_dir: PathLike,
    step: int,
    *,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    objective: nn.Module,
    scaler: torch.amp.GradScaler | None,
    world_size: int,
    data_seed: int,
    batch_size: int,
    keep: int | None = None,  # newest checkpoints kept (None = all)
) -> Path:
    """Write `training_state(...)` (arguments as there) as checkpoints/step-{step:09d}.pt; returns its path."""
    state = training_state(step=step, model=model, ema=ema, optimizer=optimizer, objective=objective,
                           scaler=scaler, world_size=world_size, data_seed=data_seed, batch_size=batch_size)
    return save(run_dir, step, state, keep=keep)


def load_training_state(
    path: PathLike,
    *,
    model: nn.Module,  # restored in place, like every module below
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    objective: nn.Module,
    scaler: torch.amp.GradScaler | None,
    data_seed: int,  # must match the checkpoint's: another seed or batch size changes the data order
    batch_size: int,
) -> Restored:
    """Load a checkpoint written by `save_training_state` into a freshly built run (RNG: see Restored)."""
    path = Path(path)
    state = load(path)
    data = state["data"]
    if (data["seed"], data["batch_size"]) != (data_seed, batch_size):
        raise ValueError(
            f"checkpoint {path} was written with data seed {data['seed']} and batch size "
            f"{data['batch_size']}, this run has {data_seed} and {batch_size}: resuming would change the "
            "data order; use a new run directory or resume='never'"
        )
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return Restored(step=int(state["step"]), rng=state["rng"], path=path)


# ----------------------------------------------------------------------------------------------
#                                          RNG state
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and python RNG states as tensors and primitives (weights_only-safe)."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only where as many devices exist)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"], "gauss": n["gauss"],
    })
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ----------------------------------------------------------------------------------------------
#                                       Exported weights
# ----------------------------------------------------------------------------------------------


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written in one fixed order (metadata keys sorted,
    tensors by name) and padded with spaces to a multiple of 8, as the format asks. The library writes
    the metadata from a hash map, whose order changes from process to process; tensor offsets do not
    depend on the header, so only the header is rewritten. Equal weights -> equal bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def export_safetensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (moved to CPU, contiguous, unshared) with string `metadata` to `path` atomically,
    byte for byte the same for the same weights (canonical_safetensors)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = safetensors_bytes(plain, metadata={k: str(v) for k, v in metadata.items()})
    atomic_write_bytes(final, canonical_safetensors(data))
    return final


def export_weights(run_dir: PathLike, model: nn.Module, ema: EMA, step: int, metadata: dict[str, str]) -> Path:
    """ema.safetensors and model.safetensors with {model, step, **metadata}; returns the EMA file."""
    meta = {"model": str(getattr(model, "name", "") or type(model).__name__), "step": str(step), **metadata}
    export_safetensors(Path(run_dir) / "model.safetensors", model.state_dict(), meta)
    return export_safetensors(Path(run_dir) / "ema.safetensors", ema.state_dict(), meta)
