"""A typed `njit`: numba compiles the inner loops of the pool-level algorithms.

numba ships no type information, and mypy's strict mode refuses untyped decorators; this
wrapper keeps the decorated function's own signature for the type checker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])


def njit(func: F) -> F:
    """Compile `func` in nopython mode on first call (cached in memory per process)."""
    return cast(F, numba.njit(cache=False, nogil=True)(func))
