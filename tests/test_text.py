"""Text-to-image inputs: caption readers on fixtures written here, the caption slots, and the text store
against a direct `transformers` forward of the same encoder on the same captions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.datasets.sources import SourceItem
from pipeline.text import minilm
from pipeline.text.captions import TEMPLATES, CaptionError, coco_index, image_captions, templated
from schemas.loading import load_config
from tests.conftest import repa


def _need_minilm() -> Path:
    path = minilm.model_dir()
    if not (path / "model.safetensors").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run `repa weights` (make weights) before the tests")
        pytest.skip(f"{path} is missing: run `repa weights` once")
    return path


# ----------------------------------------------------------------------------------------------
#                                        Caption readers
# ----------------------------------------------------------------------------------------------


def test_templates_name_the_class_and_are_seeded_per_image():
    a = templated("sneaker", "00000007", seed=0, count=3)
    assert a == templated("sneaker", "00000007", seed=0, count=3)  # same (seed, key): same captions
    assert len(set(a)) == 3 and all(c in {t.format("sneaker") for t in TEMPLATES} for c in a)
    others = {tuple(templated("sneaker", f"{i:08d}", seed=0, count=3)) for i in range(20)}
    assert len(others) > 5  # the choice varies between images
    assert templated("sneaker", "00000007", seed=1, count=3) != a or templated("sneaker", "00000008", 1, 3) != \
        templated("sneaker", "00000008", 0, 3)


def test_coco_captions_by_file_name(tmp_path):
    ann = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                      {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"}],
           "annotations": [{"image_id": 9, "caption": "A plate  of food.\n"}, {"image_id": 25, "caption": "A giraffe."},
                           {"image_id": 9, "caption": "Broccoli on a plate."}]}
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps(ann))
    assert coco_index(path) == {"COCO_train2014_000000000009.jpg": ["A plate of food.", "Broccoli on a plate."],
                                "COCO_train2014_000000000025.jpg": ["A giraffe."]}
    data = SimpleNamespace(captions="coco", captions_path=str(path), source="imagefolder", seed=0)
    items = [SourceItem("00000000", 0, None, origin="train2014/COCO_train2014_000000000025.jpg"),
             SourceItem("00000001", 0, None, origin="train2014/COCO_train2014_000000000009.jpg")]
    assert image_captions(data, None, items) == {"00000000": ["A giraffe."],
                                                 "00000001": ["A plate of food.", "Broccoli on a plate."]}
    with pytest.raises(CaptionError, match="no caption"):
        image_captions(data, None, [SourceItem("00000002", 0, None, origin="train2014/other.jpg")])
    with pytest.raises(CaptionError, match="not a file"):
        coco_index(tmp_path / "missing.json")


def test_caption_slots_repeat_in_order_and_count_the_own_ones():
    from jobs.text import caption_slots

    assert caption_slots(["a", "b"], 5) == (["a", "b", "a", "b", "a"], 2)
    assert caption_slots(list("abcdefg"), 5) == (list("abcde"), 5)


# ----------------------------------------------------------------------------------------------
#                                          The store
# ----------------------------------------------------------------------------------------------

CONFIG = """
workdir = "{workdir}"
[data]
source = "fashion-mnist"
path = "data/fashion-mnist"
resolution = 32
limit = 40
shard_size = 16
num_workers = 1
captions = "templates"
caption_templates = 2
[vae]
name = "identity"
weights = "none"
[teacher]
name = "dinov2_vits14"
weights = "random"
resolution = 56
[text]
name = "sentence-transformers/all-MiniLM-L6-v2"
weights = "minilm"
max_length = 16
captions_per_image = 3
batch_size = 32
[stores]
samples_per_shard = 16
[model]
name = "SiTDown-T/4"
num_classes = 10
"""


@pytest.mark.slow
def test_text_store_equals_a_direct_transformers_forward(tmp_path):
    """`repa ingest` + `repa text`, then every stored caption's token states, mask and pooled vector
    against AutoModel/AutoTokenizer run here on the same captions (fp16: max abs diff <= 1e-3)."""
    from transformers import AutoModel, AutoTokenizer

    from jobs.layout import states
    from pipeline.stores.zarr_store import StoreReader

    path = _need_minilm()
    config = tmp_path / "t2i.toml"
    config.write_text(CONFIG.format(workdir=tmp_path / "w"))
    for command in ("ingest", "text"):
        out = repa(command, "--config", str(config))
        assert out.returncode == 0, out.stderr
    cfg = load_config(str(config), [])
    found = states(cfg)
    assert list(found) == ["ingest", "latents", "teacher", "text", "train", "sample", "evaluate"]
    assert found["text"].state == "up-to-date"
    captions = json.loads((found["ingest"].path / "captions.json").read_text())
    store = StoreReader(found["text"].path / "store.zarr")
    keys = [str(k) for k in np.asarray(store.array("keys")[:])]
    assert keys == sorted(captions) and len(keys) == 40

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    rows = np.arange(0, 40, 7)
    tokens, mask = np.asarray(store.read("tokens", rows)), np.asarray(store.read("mask", rows))
    pooled, count = np.asarray(store.read("pooled", rows)), np.asarray(store.read("count", rows))
    assert tokens.shape == (len(rows), 3, 16, 384) and tokens.dtype == np.float16
    for r, row in enumerate(rows):
        own = captions[keys[row]]
        assert count[r] == 2 and len(own) == 2
        slots = [own[0], own[1], own[0]]  # 3 slots, 2 captions: repeated in order
        batch = tokenizer(slots, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        m = batch["attention_mask"].bool()
        assert np.array_equal(mask[r].astype(bool), m.numpy())
        direct = hidden.half().float().numpy()
        assert np.abs(tokens[r].astype(np.float32) - direct).max() <= 1e-3
        mean = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        assert np.abs(pooled[r].astype(np.float32) - mean.half().float().numpy()).max() <= 1e-3


def test_text_stage_is_listed_only_with_captions(tmp_path):
    from jobs.layout import states

    config = tmp_path / "t2i.toml"
    config.write_text(CONFIG.format(workdir=tmp_path / "w"))
    assert "text" in states(load_config(str(config), []))
    assert "text" not in states(load_config(str(config), ["data.captions=none"]))
    out = repa("text", "--config", str(config), "--set", "data.captions=none")
    assert out.returncode == 2 and "needs captions" in out.stderr
