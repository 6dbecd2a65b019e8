"""`PoolStore.settings_of` keeps what it read: every write must show through at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.errors import NotFound
from app.ingest import ExampleRecord
from app.store import PoolSettingsUpdate, PoolStore


def put(store: PoolStore, pool: str, **fields: object) -> None:
    store.put_pool(pool, PoolSettingsUpdate.model_validate(fields))


def test_every_write_shows_through(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    put(store, "p", k=3)
    assert store.settings_of("p").k == 3
    assert store.settings_of("p") is store.settings_of("p")  # kept, not read again
    put(store, "p", k=5, description="five")
    assert (store.settings_of("p").k, store.settings_of("p").description) == (5, "five")
    put(store, "p", k=None)  # an explicit null: back to the default
    assert store.settings_of("p").k is None

    store.delete_pool("p")
    with pytest.raises(NotFound):
        store.settings_of("p")
    # Created again by an upload, with the defaults.
    record = ExampleRecord(
        input="a", output="b", label=None, external_id=None, metadata=None, line=1
    )
    store.stage_upload("p", [record], mode="append", max_pool_rows=10)
    assert store.settings_of("p").k is None
    put(store, "p", k=7)
    assert store.settings_of("p").k == 7


def test_a_read_that_overlaps_a_write_is_not_kept(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    put(store, "p", k=3)
    read = store.db.read

    @contextmanager
    def read_then_write() -> Iterator[object]:
        with read() as conn:
            yield conn
        store.db.read = read  # type: ignore[method-assign]
        put(store, "p", k=9)  # commits after the reader saw k=3

    store.db.read = read_then_write  # type: ignore[method-assign]
    assert store.settings_of("p").k == 3  # what it read
    assert store.settings_of("p").k == 9  # but it did not keep it


def test_settings_handed_out_are_frozen(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    put(store, "p", k=3)
    with pytest.raises(ValidationError):
        store.settings_of("p").k = 4  # type: ignore[misc]
    assert store.settings_of("p").k == 3
