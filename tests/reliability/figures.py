"""Figures measured by the reliability suite, collected into one JSON file per run.

Tests call `record(...)` through the `figures` fixture; at the end of the session the figures
are written to `$ICLSERVE_RELIABILITY_OUT/figures.json` (default `reliability-results/`).
`python -m tests.reliability.report` turns that file into the table of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = "reliability-results"


@dataclass(frozen=True)
class Figure:
    goal: str  # the RELIABILITY.md goal id it speaks to, e.g. "D1", "U5", "R1"
    what: str  # what was measured, in words
    value: str  # the measured figure, formatted
    target: str  # the pass threshold, in words
    passed: bool
    test: str  # the test that measured it


class Figures:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[Figure] = []

    def record(
        self, goal: str, what: str, value: Any, target: str, passed: bool, test: str = ""
    ) -> None:
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        with self._lock:
            self.items.append(Figure(goal, what, shown, target, bool(passed), test))

    def write(self, out_dir: Path) -> Path | None:
        if not self.items:
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "figures.json"
        previous: list[dict[str, Any]] = []
        if path.exists():
            # Several pytest sessions (CI, nightly) may add to one run's file: keep the
            # figures of tests that this session did not run.
            mine = {item.test for item in self.items}
            previous = [
                f for f in json.loads(path.read_text())["figures"] if f.get("test") not in mine
            ]
        payload = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}",
            "figures": previous + [asdict(item) for item in self.items],
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path


def out_dir() -> Path:
    return Path(os.environ.get("ICLSERVE_RELIABILITY_OUT", DEFAULT_OUT))


def scale(name: str, ci: int, nightly: int) -> int:
    """A count or duration of the suite: CI's by default, the nightly one when
    ICLSERVE_RELIABILITY_NIGHTLY=1, or the value of ICLSERVE_RELIABILITY_<NAME>."""
    given = os.environ.get(f"ICLSERVE_RELIABILITY_{name.upper()}")
    if given:
        return int(given)
    return nightly if os.environ.get("ICLSERVE_RELIABILITY_NIGHTLY") == "1" else ci
