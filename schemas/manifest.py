"""Stage manifests: what a stage produced, from what, and how to check it is still valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputRef(Strict):
    stage: str
    path: str
    fingerprint: str


class OutputEntry(Strict):
    """One produced artefact: an array of a store, a shard, a file."""

    name: str
    kind: str  # "array" | "shard" | "file"
    shape: list[int] = []
    dtype: str = ""
    count: int = 0
    bytes: int = 0
    sha256: str = ""  # of the file, or of the per-shard checksums for an array


class Manifest(Strict):
    stage: str
    format_version: int
    fingerprint: str
    config: dict[str, Any]
    inputs: list[InputRef] = []
    outputs: list[OutputEntry] = []
    created: str
    code_version: str
    stats: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)  # stage-specific facts downstream stages read

    def output(self, name: str) -> OutputEntry:
        for entry in self.outputs:
            if entry.name == name:
                return entry
        raise KeyError(f"manifest of stage {self.stage} has no output {name!r}")


def read_manifest(directory: str | Path) -> Manifest:
    """Parse `directory/manifest.json`; raises FileNotFoundError or ValueError."""
    path = Path(directory) / MANIFEST_NAME
    text = path.read_text()
    return Manifest.model_validate(json.loads(text))
