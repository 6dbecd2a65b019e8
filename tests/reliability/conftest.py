from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.figures import Figures, out_dir

_FIGURES = Figures()


# Every module here sets `pytestmark = pytest.mark.reliability`, so that `scripts/test`
# leaves the suite out and `scripts/reliability` runs it.


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    yield _FIGURES
    _FIGURES.write(out_dir())
