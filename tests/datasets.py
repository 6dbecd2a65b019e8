"""Small deterministic labeled pools for tests: short topical sentences with their topic."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subject": [
            "the striker",
            "our goalkeeper",
            "the home team",
            "the coach",
            "a rookie",
            "the captain",
            "the sprinter",
            "the tennis champion",
        ],
        "verb": [
            "scored in",
            "trained hard before",
            "celebrated after",
            "was injured during",
            "dominated",
            "lost badly in",
        ],
        "object": [
            "the league final",
            "the penalty shootout",
            "the marathon",
            "extra time",
            "the championship match",
            "the derby",
            "the second half",
        ],
    },
    "finance": {
        "subject": [
            "the central bank",
            "investors",
            "the stock market",
            "a hedge fund",
            "the treasury",
            "shareholders",
            "the lender",
            "analysts",
        ],
        "verb": ["raised", "worried about", "cut", "reported", "bet against", "rallied on"],
        "object": [
            "interest rates",
            "quarterly earnings",
            "the bond yield",
            "inflation data",
            "the dividend",
            "a mortgage portfolio",
            "currency reserves",
        ],
    },
    "weather": {
        "subject": [
            "a cold front",
            "the storm",
            "heavy rain",
            "the heatwave",
            "thick fog",
            "strong winds",
            "the snowfall",
            "a tropical cyclone",
        ],
        "verb": [
            "swept across",
            "flooded",
            "brought frost to",
            "lingered over",
            "battered",
            "cooled",
        ],
        "object": [
            "the coast",
            "the mountain villages",
            "the northern valleys",
            "the airport",
            "the farmland",
            "the harbour",
            "the suburbs",
        ],
    },
    "cooking": {
        "subject": [
            "the chef",
            "my grandmother",
            "the baker",
            "a home cook",
            "the sous chef",
            "the pastry team",
            "our kitchen",
            "the food critic",
        ],
        "verb": ["roasted", "seasoned", "simmered", "baked", "whisked", "grilled"],
        "object": [
            "the garlic and onions",
            "a sourdough loaf",
            "the tomato sauce",
            "fresh salmon fillets",
            "the chocolate custard",
            "a lentil soup",
            "the vegetable stew",
        ],
    },
    "technology": {
        "subject": [
            "the startup",
            "engineers",
            "the chipmaker",
            "a software update",
            "the database team",
            "the new laptop",
            "the compiler",
            "our server",
        ],
        "verb": [
            "shipped",
            "patched",
            "benchmarked",
            "rewrote",
            "crashed while running",
            "optimised",
        ],
        "object": [
            "the kernel driver",
            "the mobile app",
            "a faster processor",
            "the cloud backend",
            "the encryption library",
            "the search index",
            "the network stack",
        ],
    },
}
EXTRAS = [
    "yesterday",
    "this morning",
    "last week",
    "again",
    "on Sunday",
    "for hours",
    "without warning",
    "as expected",
    "in the evening",
    "once more",
]


def topic_rows(n: int, *, seed: int = 7, unlabeled_every: int = 0) -> list[dict[str, Any]]:
    """`n` distinct rows {"id", "input", "output"}; every `unlabeled_every`-th has no output."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        topic = topics[len(rows) % len(topics)]
        parts = TOPICS[topic]
        text = (
            " ".join(
                [
                    rng.choice(parts["subject"]),
                    rng.choice(parts["verb"]),
                    rng.choice(parts["object"]),
                    rng.choice(EXTRAS),
                ]
            ).capitalize()
            + "."
        )
        if text in seen:
            text = text[:-1] + f" ({len(rows)})."
        seen.add(text)
        unlabeled = unlabeled_every and (len(rows) + 1) % unlabeled_every == 0
        rows.append({"id": f"r{len(rows)}", "input": text, "output": None if unlabeled else topic})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
