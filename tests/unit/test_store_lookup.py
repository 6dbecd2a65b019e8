"""`PoolStore.examples_by_id` (an indexed lookup) against the full visible-rows listing it
replaces, at every version of a pool with appends, replaces and layered annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import Conflict
from app.ingest import ExampleRecord
from app.store import _VISIBLE, Annotation, PoolStore, _row_to_example


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
