"""Binary max-heap primitives for the lazy-greedy (CELF) loops, compiled with numba.

A heap is two parallel arrays: keys (gains or scores) and positions. Order: the larger key
first, then the lower position, the canonical tie-break of ALGORITHMS.md 0.3. numba compiles
one specialisation per key dtype, so integer gains (IDEAL) and float gains (MFL, vote-k)
share the code.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import NDArray

from selection.jit import njit


@njit
def before(key_a: Any, pos_a: int, key_b: Any, pos_b: int) -> bool:
    """Whether entry a comes out of the heap before entry b."""
    return bool(key_a > key_b or (key_a == key_b and pos_a < pos_b))


@njit
def sift_down(keys: NDArray[Any], positions: NDArray[Any], size: int, i: int) -> None:
    """Restore heap order below slot i of a heap holding `size` entries."""
    key = keys[i]
    pos = positions[i]
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and before(
            keys[child + 1], positions[child + 1], keys[child], positions[child]
        ):
            child += 1
        if not before(keys[child], positions[child], key, pos):
            break
        keys[i] = keys[child]
        positions[i] = positions[child]
        i = child
    keys[i] = key
    positions[i] = pos
