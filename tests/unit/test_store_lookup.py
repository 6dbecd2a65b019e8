"""`PoolStore.examples_by_id` (an indexed lookup) against the full visible-rows listing it
replaces, at every version of a pool with appends, replaces and layered annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import Conflict
from app.ingest import ExampleRecord
from app.store import _VISIBLE, Annotation, ExampleRow, PoolStore, _row_to_example, _RowCache


def publish(store: PoolStore, pool: str, texts: list[str], mode: str) -> int:
    records = [
        ExampleRecord(
            input=t,
            output=None if i % 4 == 0 else f"out {t}",
            label=None,
            external_id=f"x-{t}",
            metadata={"n": i} if i % 2 else None,
            line=i + 1,
        )
        for i, t in enumerate(texts)
    ]
    job = store.stage_upload(pool, records, mode=mode, max_pool_rows=10_000)  # type: ignore[arg-type]
    store.start_job(job["id"])
    ids, _ = store.staged_rows(job["id"])
    vectors = np.random.default_rng(len(texts)).standard_normal((ids.size, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return store.publish_upload(job["id"], ids, vectors, embedder_name="test")


def annotate(store: PoolStore, pool: str, refs: list[int | str], output: str | None) -> int:
    items = [
        Annotation(ref=r, output=output, label=output, set_output=True, set_label=True)
        for r in refs
    ]
    return int(store.annotate(pool, items)["version"])


def listing(store: PoolStore, pool: str, version: int) -> dict[int, object]:
    with store.db.read() as conn:
        rows = conn.execute(
            "SELECT * FROM (" + _VISIBLE + ")", {"pool": pool, "v": version}
        ).fetchall()
    return {int(r["id"]): _row_to_example(r) for r in rows}


def test_lookup_matches_the_full_listing_at_every_version(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    try:
        v1 = publish(store, "p", [f"a{i}" for i in range(40)], "append")
        publish(store, "other", [f"a{i}" for i in range(10)], "append")
        first = sorted(listing(store, "p", v1))
        v2 = annotate(store, "p", first[:10], "label-one")
        v3 = annotate(store, "p", [*first[5:15], "x-a20"], "label-two")
        v4 = annotate(store, "p", first[:3], None)  # back to unlabeled
        v5 = publish(store, "p", [f"b{i}" for i in range(20)], "append")
        v6 = publish(store, "p", [f"c{i}" for i in range(15)], "replace")
        versions = [v1, v2, v3, v4, v5, v6]
        assert versions == sorted(set(versions))
        rng = np.random.default_rng(0)
        for version in versions:
            want = listing(store, "p", version)
            ids = [int(i) for i in rng.permutation(sorted(want))]
            assert store.examples_by_id("p", version, ids) == [want[i] for i in ids]
        # Rows not in a version: a conflict, or skipped on request.
        gone = sorted(listing(store, "p", v5))[0]
        assert gone not in listing(store, "p", v6)
        with pytest.raises(Conflict):
            store.examples_by_id("p", v6, [gone])
        other_id = sorted(listing(store, "other", 1))[0]
        assert store.examples_by_id("p", v6, [gone, other_id], skip_missing=True) == []
    finally:
        store.close()


def counting_reads(store: PoolStore) -> list[int]:
    """Counts `store.db.read()` blocks from now on (one element per read)."""
    reads: list[int] = []
    read = store.db.read

    def counted() -> object:
        reads.append(1)
        return read()

    store.db.read = counted  # type: ignore[method-assign, assignment]
    return reads


def test_rows_kept_from_earlier_lookups_match_the_listing_as_versions_pile_up(
    tmp_path: Path,
) -> None:
    store = PoolStore(tmp_path)
    try:
        v1 = publish(store, "p", [f"a{i}" for i in range(30)], "append")
        first = sorted(listing(store, "p", v1))
        steps = [
            lambda: annotate(store, "p", first[:10], "label-one"),
            lambda: annotate(store, "p", first[5:15], "label-two"),
            lambda: annotate(store, "p", first[:3], None),
            lambda: publish(store, "p", [f"b{i}" for i in range(10)], "append"),
            lambda: publish(store, "p", [f"c{i}" for i in range(12)], "replace"),
        ]
        versions = [v1]
        for step in [lambda: v1, *steps]:
            if versions[-1] != (version := step()):
                versions.append(version)
            for seen in versions:  # every version so far, as requests holding each would ask
                want = listing(store, "p", seen)
                ids = sorted(want)
                assert store.examples_by_id("p", seen, ids) == [want[i] for i in ids]
                reads = counting_reads(store)
                assert store.examples_by_id("p", seen, ids[::-1]) == [want[i] for i in ids[::-1]]
                assert reads == []  # the second time, from memory
                store.db.read = type(store.db).read.__get__(store.db)  # type: ignore[method-assign]
    finally:
        store.close()


def test_a_pool_deleted_and_made_again_never_serves_the_old_rows(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    try:
        v1 = publish(store, "p", [f"old{i}" for i in range(20)], "append")
        old = listing(store, "p", v1)
        assert store.examples_by_id("p", v1, sorted(old)) == [old[i] for i in sorted(old)]
        store.delete_pool("p")
        v1_again = publish(store, "p", [f"new{i}" for i in range(20)], "append")
        new = listing(store, "p", v1_again)
        assert v1_again == v1  # versions start again; row ids do not
        assert store.examples_by_id("p", v1, sorted(new)) == [new[i] for i in sorted(new)]
        with pytest.raises(Conflict):
            store.examples_by_id("p", v1, sorted(old))
        assert store.examples_by_id("p", v1, sorted(old), skip_missing=True) == []
    finally:
        store.close()


def test_unpublished_versions_are_not_kept(tmp_path: Path) -> None:
    store = PoolStore(tmp_path)
    try:
        v1 = publish(store, "p", [f"a{i}" for i in range(5)], "append")
        ids = sorted(listing(store, "p", v1))
        # Asked about the next version before it exists: rows as of then, not kept for later.
        assert len(store.examples_by_id("p", v1 + 1, ids)) == 5
        v2 = annotate(store, "p", ids[:2], "late")
        assert v2 == v1 + 1
        assert [r.label for r in store.examples_by_id("p", v2, ids[:2])] == ["late", "late"]
    finally:
        store.close()


def row(row_id: int, chars: int = 10) -> ExampleRow:
    return ExampleRow(
        id=row_id, external_id=None, input="x" * chars, output=None, label=None, metadata=None
    )


def test_row_cache_bounds_and_generations() -> None:
    by_rows = _RowCache(max_rows=3, max_chars=10**6)
    generation = by_rows.generation
    by_rows.store("p", 1, [row(1), row(2), row(3)], generation)
    assert sorted(by_rows.lookup("p", 1, [1, 2, 3, 4])) == [1, 2, 3]
    by_rows.lookup("p", 1, [1])  # now the most recently used
    by_rows.store("p", 1, [row(4)], generation)
    assert sorted(by_rows.lookup("p", 1, [1, 2, 3, 4])) == [1, 3, 4]  # 2 was the oldest
    assert by_rows.lookup("p", 2, [1]) == {} and by_rows.lookup("q", 1, [1]) == {}

    by_chars = _RowCache(max_rows=100, max_chars=1_600)  # rows of 10 characters count 74
    by_chars.store("p", 1, [row(i) for i in range(22)], by_chars.generation)
    assert sorted(by_chars.lookup("p", 1, range(22))) == list(range(1, 22))  # 21 * 74 <= 1600
    by_chars.store("p", 1, [row(99, chars=40)], by_chars.generation)  # over 1600 / 16: not kept
    assert by_chars.lookup("p", 1, [99]) == {}

    by_rows.forget("p")
    assert by_rows.lookup("p", 1, [1, 3, 4]) == {}
    by_rows.store("p", 1, [row(7)], generation)  # read before the forget: dropped
    assert by_rows.lookup("p", 1, [7]) == {}
    by_rows.store("p", 1, [row(7)], by_rows.generation)
    assert list(by_rows.lookup("p", 1, [7])) == [7]

    by_rows.store("p", 2, [row(8)], by_rows.generation)
    by_rows.store("q", 1, [row(9)], by_rows.generation)
    by_rows.forget("p", before=2)  # old versions collected: 1 goes, 2 stays, q untouched
    assert by_rows.lookup("p", 1, [7]) == {}
    assert list(by_rows.lookup("p", 2, [8])) == [8] and list(by_rows.lookup("q", 1, [9])) == [9]
