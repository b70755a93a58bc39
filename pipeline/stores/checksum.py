"""Content checksums of published files: sha256 of a file, and one digest for a list of them.

Ingest shards and every shard file of a feature store are hashed when they are published; manifests
record the digests so `repa status --deep` can tell a store whose bytes changed on disk from one
that only has the right sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pipeline.stores.atomic import PathLike

HASH_BLOCK = 1 << 20  # bytes read at a time


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (md5: to compare with an S3 object's ETag)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path, "sha256")


def combined_digest(named: Iterable[tuple[str, str]]) -> str:
    """One hex sha256 for (name, hex digest) pairs, in the given order: "name sha\\n" lines hashed."""
    digest = hashlib.sha256()
    for name, sha in named:
        digest.update(f"{name} {sha}\n".encode())
    return digest.hexdigest()
