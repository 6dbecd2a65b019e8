"""Write the figures of a reliability run into docs/reliability.md.

    python -m tests.reliability.report reliability-results/figures.json docs/reliability.md

The table between the `<!-- figures:begin -->` and `<!-- figures:end -->` lines is replaced;
the rest of the document is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- figures:begin -->"
END = "<!-- figures:end -->"
GOAL_ORDER = ("D", "U", "F", "S", "R", "C")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(run: dict[str, Any]) -> str:
    figures = sorted(
        run["figures"],
        key=lambda f: (
            GOAL_ORDER.index(f["goal"][0]) if f["goal"][0] in GOAL_ORDER else 9,
            f["goal"],
        ),
    )
    lines = [
        f"Last run: {run['date']}, {run['machine']} (`bash scripts/reliability --update-docs`).",
        "",
        "| goal | what | measured | target | result |",
        "|---|---|---|---|---|",
    ]
    for f in figures:
        verdict = "pass" if f["passed"] else "**FAIL**"
        lines.append(
            f"| {_cell(f['goal'])} | {_cell(f['what'])} | {_cell(f['value'])} | "
            f"{_cell(f['target'])} | {verdict} |"
        )
    return "\n".join(lines)


def update(doc: str, run: dict[str, Any]) -> str:
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(run)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.reliability.report FIGURES_JSON DOC_MD", file=sys.stderr)
        return 2
    figures_path, doc_path = Path(argv[0]), Path(argv[1])
    if not figures_path.exists():
        print(f"error: no {figures_path}: run scripts/reliability first", file=sys.stderr)
        return 2
    run = json.loads(figures_path.read_text())
    doc_path.write_text(update(doc_path.read_text(), run))
    print(f"wrote {len(run['figures'])} figures into {doc_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
