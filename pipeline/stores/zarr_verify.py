"""Verification of a store: every range published, every shard file present with its recorded size,
and (deep) its recorded sha256."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.progress import progress_bar
from pipeline.stores.checksum import sha256_file
from pipeline.stores.mirror import remote_file
from pipeline.stores.zarr_layout import RANGES_DIR, ArraySpec, range_markers


def file_size(path: Path) -> int | None:
    """The size of a local file, or of the object it stands for (pipeline.stores.mirror), or None."""
    if path.is_file():
        return path.stat().st_size
    remote = remote_file(path)
    return remote[1] if remote is not None else None


def verify_ranges(path: Path, specs: Sequence[ArraySpec], ranges: list[tuple[int, int]], deep: bool = False) -> str | None:
    """None when every range of `ranges` is published with every array's shard files at their recorded
    sizes (and, `deep`, their recorded sha256), else what is wrong, in one line."""
    if not (path / "zarr.json").is_file():
        return f"store {path} does not exist"
    marked = set(range_markers(path))
    missing = [r for r in ranges if r not in marked]
    if missing:
        shown = ", ".join(f"[{a}, {b})" for a, b in missing[:5])
        more = ", ..." if len(missing) > 5 else ""
        return f"{len(missing)} of {len(ranges)} ranges not written ({shown}{more})"
    to_hash: list[tuple[Path, dict[str, Any]]] = []
    for start, stop in ranges:
        marker = json.loads((path / RANGES_DIR / f"{start}-{stop}").read_text())
        for spec in specs:
            entries = marker.get("files", {}).get(spec.name)
            if not entries:
                return f"range [{start}, {stop}) records no shard file for array {spec.name!r}"
            for entry in entries:
                f = path / spec.name / entry["key"]
                if file_size(f) != entry["bytes"]:
                    return f"shard file {f} is missing or does not have the {entry['bytes']} bytes its marker records"
                if deep and "sha256" not in entry:
                    return f"shard file {f} was published without a checksum; rerun its stage with --force to add checksums"
                to_hash.append((f, entry))
    if not deep:
        return None
    if any(not f.is_file() for f, _ in to_hash):
        return f"store {path} is on object storage: verify it deeply where its shard files are pulled (repa status --deep)"
    with progress_bar(total=sum(e["bytes"] for _, e in to_hash), unit="B", unit_scale=True, desc=f"sha256 {path.name}",
              dynamic_ncols=True, leave=False, disable=None) as bar:  # disable=None: only on a terminal
        for f, entry in to_hash:
            if sha256_file(f) != entry["sha256"]:
                return f"shard file {f} does not have the sha256 its marker records (its bytes changed)"
            bar.update(entry["bytes"])
    return None
