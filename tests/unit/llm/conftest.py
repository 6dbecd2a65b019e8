"""Fixtures for the upstream client tests: a real fake upstream on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.upstream import FakeUpstream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=["fake-model", "fake-other"]) as server:
        yield server
