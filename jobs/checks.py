"""Can this config run? The checks every command makes before any compute (exit 2, naming the key).

    check_config(cfg)                 from the config alone: the latent and teacher geometry that the
                                      stages WILL produce (schemas/names.py, no weights loaded);
    check_manifests(cfg, latents, teacher, kwargs)
                                      the same rules against the manifests the stages DID write
                                      (`repa train`, which runs only this one).

The rules: a known model that takes the latents (square, channels), enough classes, and an objective
that fits the model and the teacher (pipeline.align: depth, grids, heads, layers), with the teacher
arrays it needs cached.
"""

from __future__ import annotations

from typing import Any

import torch

from jobs.stage import UsageError
from schemas.config import ExperimentConfig
from schemas.names import VAES, teacher_geometry

# Classes of the sources that know them before ingest (imagefolder / webdataset: counted at ingest).
KNOWN_CLASSES = {"fashion-mnist": 10}


def model_kwargs(cfg: ExperimentConfig, latents_extra: dict[str, Any],
                 text_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments of the backbone: the latent geometry plus the model section (plus the
    text geometry, width and length, for a text-conditioned model)."""
    c, h, w = latents_extra["latent_shape"]
    if h != w:
        raise UsageError(f"latents are {h}x{w}; the backbones take square inputs")
    kwargs = {"input_size": int(h), "in_channels": int(c) // 2, "num_classes": cfg.model.num_classes,
              "class_dropout_prob": cfg.model.class_dropout, "use_rope": cfg.model.use_rope,
              "use_swiglu": cfg.model.use_swiglu}
    if text_extra is not None:
        kwargs.update(text_dim=int(text_extra["dim"]), text_len=int(text_extra["length"]))
    return {k: v for k, v in kwargs.items() if v is not None}


def check_text(cfg: ExperimentConfig) -> None:
    """A text-conditioned model trains on captions, and captions need a text-conditioned model."""
    text_model = cfg.model.name.startswith("MMDiT")
    if text_model and cfg.data.captions == "none":
        raise UsageError(f"model.name = {cfg.model.name} is conditioned on text: set data.captions = 'coco' or "
                         "'templates' (and the [text] encoder)")
    if cfg.data.captions != "none" and not text_model:
        raise UsageError(f"data.captions = {cfg.data.captions!r} trains a text-to-image model: set model.name to an "
                         "MMDiT (e.g. MMDiT-T/2), or data.captions = 'none' for class labels")


def check_manifests(cfg: ExperimentConfig, latents: dict[str, Any], teacher: dict[str, Any] | None,
               kwargs: dict[str, Any]) -> None:
    """Every compatibility check that needs no data: raises UsageError naming the key to change."""
    from pipeline.align.registry import check_compatible, objective_class
    from pipeline.align.student import AlignmentError
    from pipeline.models import build_model

    check_text(cfg)
    classes = int(latents["num_classes"])
    if cfg.model.num_classes and classes > cfg.model.num_classes:  # 0 = unconditional: labels are ignored
        raise UsageError(f"model.num_classes = {cfg.model.num_classes}, but the dataset has {classes} classes: "
                         f"set model.num_classes = {classes} (or more)")
    try:
        with torch.device("meta"):
            model = build_model(cfg.model.name, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"model: {exc}") from None
    objective = objective_class(cfg.train.align)
    if not objective.reads_teacher:
        return
    assert teacher is not None
    try:
        check_compatible(cfg.train.align, model, cfg.align, teacher_dim=int(teacher["dim"]),
                         teacher_grid=tuple(teacher["grid"]), teacher_heads=int(teacher["heads"]),
                         teacher_depth=int(teacher["depth"]))
    except AlignmentError as exc:
        raise UsageError(str(exc)) from None
    blocks = list(objective.teacher_blocks(cfg.align))
    if blocks and teacher["cache"] == "tokens":
        raise UsageError(
            f"align = {cfg.train.align} needs teacher attention maps of blocks {blocks}, which teacher.cache = "
            f"'tokens' does not store: set teacher.cache = 'hidden' (teacher.hidden_layer <= {min(blocks)}) or "
            "'online' and rerun `repa teacher`")
    if blocks and teacher["cache"] == "hidden" and min(blocks) < int(teacher["hidden_layer"]):
        raise UsageError(
            f"align.teacher_layers {blocks} start before the cached teacher.hidden_layer = "
            f"{teacher['hidden_layer']}: set teacher.hidden_layer <= {min(blocks)} and rerun `repa teacher`")


def predicted_geometry(cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(latents, teacher) manifest extras as the encode and teacher stages will write them for `cfg`."""
    channels, down = VAES[cfg.vae.name]  # the names were checked when the config loaded
    if cfg.data.resolution % down:
        raise UsageError(f"data.resolution = {cfg.data.resolution} is not divisible by the {cfg.vae.name} VAE's "
                         f"downsampling factor {down}")
    side = cfg.data.resolution // down
    classes = cfg.data.synthetic_classes if cfg.data.source == "synthetic" else KNOWN_CLASSES.get(cfg.data.source, 0)
    latents = {"latent_shape": [2 * channels, side, side], "num_classes": classes}
    teacher = teacher_geometry(cfg.teacher.name, cfg.teacher.resolution) | {"cache": cfg.teacher.cache, "hidden_layer": cfg.teacher.hidden_layer}
    return latents, teacher


def check_config(cfg: ExperimentConfig) -> None:
    """Every check that needs neither data nor weights; raises UsageError naming the key to change."""
    latents, teacher = predicted_geometry(cfg)
    text = {"dim": 768, "length": cfg.text.max_length} if cfg.data.captions != "none" else None  # width: any
    check_manifests(cfg, latents, teacher, model_kwargs(cfg, latents, text))
