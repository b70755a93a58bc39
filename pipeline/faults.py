"""Crash points for the fault-injection tests: REPA_KILL_AT="<point>:<n>" SIGKILLs the job the n-th
time this process passes `point(<point>)`.

The whole process group is killed (as a scheduler kills a job), so worker processes die with their
parent. Without the variable a point costs one dictionary lookup. Points, in the order a job meets
them: ingest.shard (a shard published), store.publish (inside a store range's publication: some
shard files moved, no marker yet), store.range (a range published), train.step (an optimiser step
done), sample.batch (a batch file written), evaluate.batch (an Inception batch), manifest (all
outputs written, the manifest not yet).
"""

from __future__ import annotations

import os
import signal

ENV = "REPA_KILL_AT"
_passed: dict[str, int] = {}


def point(name: str) -> None:
    """Die here (SIGKILL to the process group) if REPA_KILL_AT names this point and this pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.killpg(os.getpgrp(), signal.SIGKILL)
