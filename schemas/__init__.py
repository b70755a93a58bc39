"""Pydantic models: the experiment config and the stage manifests."""

from schemas.config import ExperimentConfig
from schemas.loading import ConfigError, load_config
from schemas.manifest import InputRef, Manifest

__all__ = ["ConfigError", "ExperimentConfig", "InputRef", "Manifest", "load_config"]
