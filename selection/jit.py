"""A typed `njit`: numba compiles the inner loops of the pool-level algorithms.

numba ships no type information, and mypy's strict mode refuses untyped decorators; this
wrapper keeps the decorated function's own signature for the type checker.

Compiled code is cached on disk when numba finds a writable place (next to the sources, or
NUMBA_CACHE_DIR), so the few seconds of compilation are paid once per installation rather
than once per process; on a read-only install it compiles in memory instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

F = TypeVar("F", bound=Callable[..., Any])


def njit(func: F) -> F:
    """Compile `func` in nopython mode on first call."""
    try:
        return cast(F, numba.njit(cache=True, nogil=True)(func))
    except RuntimeError:  # numba found no writable cache location
        return cast(F, numba.njit(cache=False, nogil=True)(func))
