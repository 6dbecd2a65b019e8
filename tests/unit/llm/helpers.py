"""Helpers for the upstream client tests."""

from __future__ import annotations

from typing import Any

from app.settings import Upstream
from tests.fakes.upstream import FakeUpstream


def make_upstream(fake: FakeUpstream, **overrides: Any) -> Upstream:
    """An upstream pointing at `fake` with test-sized clocks (seconds, not minutes)."""
    fields: dict[str, Any] = {
        "name": "fake",
        "base_url": fake.base_url,
        "models": ["*"],
        "connect_timeout": 1.0,
        "first_byte_timeout": 1.0,
        "idle_timeout": 1.0,
        "total_timeout": 5.0,
        "max_retries": 2,
        "max_retry_wait": 10.0,
    }
    fields.update(overrides)
    return Upstream(**fields)
