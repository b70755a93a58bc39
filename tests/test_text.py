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
from schemas.config import ExperimentConfig
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


# ----------------------------------------------------------------------------------------------
#                             Guidance, prompts and the agreement score
# ----------------------------------------------------------------------------------------------


def test_guidance_pairs_a_text_condition_with_its_null_text():
    from pipeline.sampling.samplers import conditioned_pair

    y = {"tokens": torch.randn(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.bool), "pooled": torch.randn(2, 4),
         "drop": torch.tensor([False, True])}
    pair = conditioned_pair(y, null_class=0)
    assert torch.equal(pair["tokens"], torch.cat([y["tokens"], y["tokens"]]))
    assert pair["drop"].tolist() == [False, True, True, True]  # rows B..2B-1: the null text
    assert torch.equal(conditioned_pair(torch.tensor([3, 1]), null_class=10), torch.tensor([3, 1, 10, 10]))


def test_agreement_by_hand():
    from pipeline.metrics.agreement import prompt_agreement

    # two well separated classes on the unit circle; k = 1 judges by the nearest bank image
    bank = np.array([[1, 0], [0.9, 0.1], [1, 0.05], [0, 1], [0.1, 0.9], [0.05, 1]], np.float32)
    bank_labels = np.array([0, 0, 0, 1, 1, 1])
    samples = np.array([[1, 0.02], [0.02, 1], [1, 0.1], [0.3, 1]], np.float32)  # judged 0, 1, 0, 1
    prompts = np.array([0, 1, 1, -1])  # the third sample shows class 0 for a class-1 prompt; the last has none
    out = prompt_agreement(bank, bank_labels, samples, prompts, k=1)
    assert out["agreement"] == pytest.approx(2 / 3) and out["agreement_samples"] == 3
    assert out["agreement_chance"] == pytest.approx(2 / 3)  # class 1 is 2 of the 3 prompts
    assert out["agreement_real"] == pytest.approx(1.0)  # 5 bank rows judge the 6th correctly
    with pytest.raises(ValueError, match="no sample has a prompt class"):
        prompt_agreement(bank, bank_labels, samples, np.full(4, -1), k=1)


def test_prompts_from_a_file_or_the_training_captions(tmp_path):
    from jobs.sample import sample_prompts

    ingest = tmp_path / "ingest"
    ingest.mkdir()
    (ingest / "captions.json").write_text(json.dumps({"00000000": ["a cat", "a cat sleeping"], "00000001": ["a dog"]}))
    (ingest / "index.tsv").write_text("key\tlabel\torigin\n00000000\t3\ta.png\n00000001\t5\tb.png\n")
    cfg = ExperimentConfig.model_validate({"sample": {"num": 6, "seed": 1}})
    prompts, labels = sample_prompts(cfg, ingest)
    assert len(prompts) == 6 and all(p in {"a cat", "a cat sleeping", "a dog"} for p in prompts)
    assert all((lab == 5) == (p == "a dog") for p, lab in zip(prompts, labels, strict=True))
    assert sample_prompts(cfg, ingest)[0] == prompts  # seeded
    file = tmp_path / "prompts.txt"
    file.write_text("a red car\n\na blue bird\n")
    cfg = ExperimentConfig.model_validate({"sample": {"num": 3, "prompts": str(file)}})
    assert sample_prompts(cfg, ingest)[0] == ["a red car", "a blue bird", "a red car"]
    assert sample_prompts(cfg, ingest)[1].tolist() == [-1, -1, -1]


T2I_RUN = """
[train]
align = "{align}"
batch_size = 8
steps = 4
precision = "fp32"
checkpoint_every = 2
log_every = 1
grid = 0
[align]
projector_dim = 32
student_layers = [1]
teacher_layers = [11]
tau = 2
[sample]
num = 8
sampler = "ode"
steps = 2
batch_size = 4
cfg_scale = 2.0
[eval]
reference = "ingest"
batch_size = 8
splits = 2
"""


@pytest.mark.slow
@pytest.mark.parametrize("align", ["repa", "haste"])
def test_text_to_image_trains_samples_from_typed_prompts_and_scores(tmp_path, align):
    _need_minilm()
    config = tmp_path / "t2i.toml"
    text = CONFIG.format(workdir=tmp_path / "w").replace('name = "SiTDown-T/4"\nnum_classes = 10',
                                                         'name = "MMDiT-T/4"\nnum_classes = 0')
    if align == "haste":
        text = text.replace('resolution = 56\n', 'resolution = 112\ncache = "hidden"\nhidden_layer = 10\n', 1)
    config.write_text(text + T2I_RUN.format(align=align))
    for command in ("features", "train", "eval"):
        out = repa(command, "--config", str(config))
        assert out.returncode == 0, (command, out.stderr[-2000:])
    metrics = json.loads(next((tmp_path / "w" / "runs").glob("*/eval/metrics.json")).read_text())
    assert 0.0 <= metrics["agreement"] <= 1.0 and metrics["agreement_samples"] == 8
    rows = [json.loads(line) for line in next((tmp_path / "w" / "runs").glob("*/metrics.jsonl")).read_text().splitlines()]
    assert "repa" in rows[0] and (align != "haste" or "attn" in rows[0])
    prompts = tmp_path / "typed.txt"
    prompts.write_text("a photo of a sneaker.\na photo of a bag.\n")
    out = repa("sample", "--config", str(config), "--prompts", str(prompts), "--set", "sample.num=4")
    assert out.returncode == 0, out.stderr[-2000:]
    drawn = next((tmp_path / "w" / "runs").glob("*/samples/prompts.txt"))
    assert drawn.read_text().split("\n")[:4] == ["a photo of a sneaker.", "a photo of a bag."] * 2


def test_captioned_grid_puts_each_prompt_under_its_image():
    import io

    from PIL import Image

    from pipeline.sampling.images import captioned_grid

    images = np.zeros((6, 32, 32, 3), np.uint8)
    images[:, :, :, 0] = 200  # red cells
    png = captioned_grid(images, [f"a photo of a thing number {i} " * 3 for i in range(6)], columns=3, rows=2,
                         cell=64, lines=2)
    grid = np.asarray(Image.open(io.BytesIO(png)))
    assert grid.shape == (2 * (64 + 2 * 12 + 4), 3 * 64, 3)
    assert (grid[:64, :64] == [200, 0, 0]).all()  # the first image, scaled to the cell
    band = grid[64:64 + 28, :64]
    assert (band != 255).any() and (band == 255).any()  # text drawn on the white band under it
    blank = captioned_grid(images, [""] * 6, columns=3, rows=2, cell=64, lines=2)
    assert (np.asarray(Image.open(io.BytesIO(blank)))[64:64 + 28] == 255).all()  # no prompt, no ink
