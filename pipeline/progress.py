"""Progress bars: tqdm with a rate and an ETA, redrawn in place on a terminal and sparse in a log.

Written to a file or a pipe (stderr is not a terminal), a bar redraws at most once every
LOG_INTERVAL seconds instead of several times a second, so a log of a long run keeps a handful of
lines per stage rather than megabytes of carriage returns.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between redraws when stderr is not a terminal


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) with dynamic width, and LOG_INTERVAL between redraws outside a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL, kwargs["mininterval"]))
    return tqdm(iterable, **kwargs)
