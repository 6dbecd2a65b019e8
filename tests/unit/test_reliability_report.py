"""The reliability report replaces only the figures table of docs/reliability.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.figures import Figures
from tests.reliability.report import BEGIN, END, main, update

RUN = {
    "date": "2026-01-01 00:00 UTC",
    "machine": "x86_64, 2 CPUs",
    "figures": [
        {"goal": "R1", "what": "load", "value": "0 errors", "target": "0", "passed": True},
        {"goal": "D1", "what": "kills | cycles", "value": "20", "target": ">= 20", "passed": False},
    ],
}


def test_update_replaces_the_table_and_keeps_the_rest() -> None:
    doc = f"# Title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n"
    new = update(doc, RUN)
    assert new.startswith("# Title\n\nintro\n\n" + BEGIN) and new.endswith(END + "\n\nafter\n")
    assert "old table" not in new
    rows = [line for line in new.splitlines() if line.startswith("| ") and "goal" not in line]
    assert rows[0].startswith("| D1 | kills \\| cycles |") and rows[0].endswith("**FAIL** |")
    assert rows[1].startswith("| R1 |") and rows[1].endswith("| pass |")
    assert update(new, RUN) == new


def test_update_needs_the_markers() -> None:
    with pytest.raises(ValueError, match="figures:begin"):
        update("# no markers\n", RUN)


def test_figures_written_and_merged_by_test(tmp_path: Path) -> None:
    first = Figures()
    first.record("D1", "a", 1.5, "t", True, test="t1")
    first.record("U1", "b", "x", "t", False, test="t2")
    path = first.write(tmp_path)
    assert path is not None
    second = Figures()
    second.record("U1", "b again", "y", "t", True, test="t2")
    second.write(tmp_path)
    figures = json.loads(path.read_text())["figures"]
    assert [(f["test"], f["value"]) for f in figures] == [("t1", "1.5"), ("t2", "y")]
    doc = tmp_path / "doc.md"
    doc.write_text(f"{BEGIN}\n{END}\n")
    assert main([str(path), str(doc)]) == 0
    assert "| U1 | b again | y | t | pass |" in doc.read_text()
    assert main([str(tmp_path / "missing.json"), str(doc)]) == 2
