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


def model_kwargs(cfg: ExperimentConfig, latents_extra: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the backbone: the latent geometry plus the model section."""
    c, h, w = latents_extra["latent_shape"]
    if h != w:
        raise UsageError(f"latents are {h}x{w}; the backbones take square inputs")
    kwargs = {"input_size": int(h), "in_channels": int(c) // 2, "num_classes": cfg.model.num_classes,
              "class_dropout_prob": cfg.model.class_dropout, "use_rope": cfg.model.use_rope,
              "use_swiglu": cfg.model.use_swiglu}
    return {k: v for k, v in kwargs.items() if v is not None}


def check_manifests(cfg: ExperimentConfig, latents: dict[str, Any], teacher: dict[str, Any] | None,
               kwargs: dict[str, Any]) -> None:
    """Every compatibility check that needs no data: raises UsageError naming the key to change."""
    from pipeline.align.registry import check_compatible, objective_class
    from pipeline.align.student import AlignmentError
    from pipeline.models import build_model

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
    check_manifests(cfg, latents, teacher, model_kwargs(cfg, latents))
