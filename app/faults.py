"""Deterministic crash points for the durability tests.

`ICLSERVE_FAULT_AT=<point>` makes the process die with SIGKILL semantics (os._exit) when it
reaches that point, so tests can prove that a crash at every step of publishing leaves the
old version or the new one. `ICLSERVE_FAULT_FILE=<path>` does the same for the point named
in that file, read at each point, so a test can arm the next crash in a server that is
already running instead of starting one more process per point. Both are unset in
production; checking them then costs one dict lookup each.

This module is the single registry of points: every `fault_point(...)` call names one of
`ALL_POINTS`, and the tuples below say which write path reaches each.
"""

from __future__ import annotations

import os
from typing import Final

UPLOAD_POINTS: Final = (
    "upload_staged",  # rows and job inserted, the staging transaction not yet committed
    "upload_committed",  # staging committed (durable), the 202 not yet sent
    "embedded",  # the job embedded every row, nothing of the new version written yet
    "vectors_written",  # new vector file written and fsynced under its temporary name
    "vectors_renamed",  # vector file renamed into place and its directory fsynced
    "before_commit",  # publish transaction done but not committed
    "after_commit",  # new version committed, the in-process snapshot not yet swapped
    "garbage_committed",  # old versions forgotten in SQLite, their files not yet removed
    "garbage_file_removed",  # the first unreferenced vector file removed, others remain
)
"""Every step of publishing an upload (append or replace), in the order they are reached."""

PUBLISH_POINTS: Final = tuple(p for p in UPLOAD_POINTS if p != "garbage_file_removed")
"""The points any one upload to a published pool reaches. The last upload point is reached
only when a version is collected: the process must have published the pool twice before."""

ANNOTATE_POINTS: Final = (
    "annotate_before_commit",  # annotations and the version inserted, not committed
    "annotate_after_commit",  # annotated version committed, snapshot not yet swapped
)
"""Every step of publishing an annotation (PATCH); it reuses the vector file."""

DELETE_POINTS: Final = (
    "delete_before_commit",  # the pool's rows deleted in the transaction, not committed
    "delete_after_commit",  # the deletion committed, the pool's files not yet removed
)
"""Every step of deleting a pool."""

RECOVERY_POINTS: Final = (
    "recovery_committed",  # startup repair committed in SQLite, orphan files not yet removed
)
"""Steps of startup recovery: a crash there must be repaired by the next start."""

ALL_POINTS: Final = UPLOAD_POINTS + ANNOTATE_POINTS + DELETE_POINTS + RECOVERY_POINTS


def fault_point(name: str) -> None:
    if os.environ.get("ICLSERVE_FAULT_AT") == name:
        os._exit(137)
    armed_file = os.environ.get("ICLSERVE_FAULT_FILE")
    if armed_file:
        try:
            with open(armed_file, encoding="utf-8") as fh:
                armed = fh.read().strip()
        except OSError:
            return
        if armed == name:
            os._exit(137)
