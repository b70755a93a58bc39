"""Load an experiment config from TOML, apply `--set dotted.key=value` overrides, validate.

Every failure raises ConfigError with one line that names the file or key, the bad value and what
is allowed; the CLI turns it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ValidationError

from schemas.config import ExperimentConfig


class ConfigError(ValueError):
    """A config file, key or value the user has to fix (exit code 2)."""


def parse_value(text: str) -> Any:
    """A TOML literal (`8`, `true`, `[4, 5]`, `"x"`), falling back to the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _section_for(path: list[str]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `path`, or None if a key along it is unknown."""
    model: type[BaseModel] = ExperimentConfig
    for key in path[:-1]:
        field = model.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` to the raw (unvalidated) config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set train.steps=1000")
    dotted, text = assignment.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {assignment!r}: empty key")
    owner = _section_for(path)
    if owner is None or path[-1] not in owner.model_fields:
        known = sorted(owner.model_fields) if owner is not None else sorted(ExperimentConfig.model_fields)
        raise ConfigError(f"--set {dotted}: unknown key; known keys here: {', '.join(known)}")
    value = parse_value(text.strip())
    if owner.model_fields[path[-1]].annotation is str and not isinstance(value, str):
        value = text.strip()  # a string field keeps its text even if it parses as a number
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[path[-1]] = value


def _describe(error: dict, raw: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _section_for([str(p) for p in error["loc"]])
        known = ", ".join(sorted(parent.model_fields)) if parent is not None else ""
        return f"unknown key {loc!r}" + (f"; known keys here: {known}" if known else "")
    value = error.get("input")
    if kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        return f"{loc} = {value!r} is not allowed; expected one of {allowed}"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if loc:
        return f"{loc} = {value!r}: {msg}"
    return msg


def validate(raw: dict, origin: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise ConfigError(f"{origin}: {_describe(first, raw)}{tail}") from None


def load_raw(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config PATH (e.g. configs/demo.toml)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read `path` (TOML), apply overrides in order, validate; raises ConfigError."""
    raw = load_raw(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw, origin=str(path) if path else "config")
