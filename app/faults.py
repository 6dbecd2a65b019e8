"""Deterministic crash points for the durability tests.

`ICLSERVE_FAULT_AT=<point>` makes the process die with SIGKILL semantics (os._exit) when it
reaches that point, so tests can prove that a crash at every step of publishing leaves the
old version or the new one. Unset in production; checking it costs one dict lookup.
"""

from __future__ import annotations

import os

PUBLISH_POINTS = (
    "upload_staged",
    "embedded",
    "vectors_written",
    "vectors_renamed",
    "before_commit",
    "after_commit",
)


def fault_point(name: str) -> None:
    if os.environ.get("ICLSERVE_FAULT_AT") == name:
        os._exit(137)
