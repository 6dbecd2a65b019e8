from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import Server
from tests.fakes.upstream import FakeUpstream


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, FakeUpstream, Path]]:
    """A real `iclserve serve` (packaged MiniLM) wired to a loopback fake upstream."""
    root = tmp_path_factory.mktemp("served")
    with FakeUpstream(models=["fake-model"]) as upstream:
        server = Server(root / "data", upstream)
        server.start()
        try:
            yield server, upstream, root
        finally:
            server.stop()
            shutil.rmtree(root / "data", ignore_errors=True)
