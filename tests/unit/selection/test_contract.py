"""The Selector / Orderer contract, checked for every strategy in the registry union."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, get_args

import numpy as np
import pytest
from pydantic import BaseModel

import selection
from selection.base import Candidates
from selection.ordering import ORDER_NAMES, build_orderer
from selection.specs import SELECTOR_METHODS, SelectorSpec

from .pools import make_ctx, make_pool

SPEC_CLASSES: tuple[Any, ...] = get_args(get_args(SelectorSpec)[0])
LABEL_NAMES = ("a", "b", "c", "d", "e")
REQUIRED_FIELDS = {"name": "s1"}


def make_spec(spec_cls: Any) -> Any:
    """A spec with example values for its required fields (e.g. a subset's name)."""
    required = {
        f: REQUIRED_FIELDS[f] for f, info in spec_cls.model_fields.items() if info.is_required()
    }
    return spec_cls.model_validate(required)


def _selection_modules() -> list[Any]:
    return [
        importlib.import_module(f"selection.{m.name}")
        for m in pkgutil.iter_modules(selection.__path__)
    ]


def test_registry_covers_every_strategy_module() -> None:
    specs_found: set[type] = set()
    selectors_found: set[type] = set()
    for module in _selection_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            private = cls.__name__.startswith("_")
            if cls.__module__ != module.__name__ or private or getattr(cls, "_is_protocol", False):
                continue
            if issubclass(cls, BaseModel) and hasattr(cls, "candidate_request"):
                specs_found.add(cls)
            elif callable(getattr(cls, "select", None)):
                selectors_found.add(cls)
    assert specs_found == set(SPEC_CLASSES)
    assert {type(make_spec(cls).build(LABEL_NAMES)) for cls in SPEC_CLASSES} == selectors_found
    methods = [get_args(cls.model_fields["method"].annotation)[0] for cls in SPEC_CLASSES]
    assert tuple(methods) == SELECTOR_METHODS
    assert len(set(methods)) == len(methods)


@pytest.mark.parametrize("spec_cls", SPEC_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("seed", range(8))
def test_selector_contract(spec_cls: Any, seed: int) -> None:
    spec = make_spec(spec_cls)
    pool = make_pool(seed)
    c = pool.candidates
    pos_of = {int(i): p for p, i in enumerate(c.ids)}
    for k in (0, 1, 3, 7, pool.n, pool.n + 5):
        req = spec.candidate_request(k)
        assert req.everything or req.fixed or req.top_n >= k

        results = []
        for _ in range(2):
            ctx = make_ctx(seed, LABEL_NAMES[: pool.n_labels])
            results.append(spec.build(LABEL_NAMES[: pool.n_labels]).select(pool.query, c, k, ctx))
        got, again = results
        ids = got.ids.tolist()
        assert len(ids) == min(k, pool.n)
        assert len(set(ids)) == len(ids)
        assert set(ids) <= set(pos_of)
        assert ids == again.ids.tolist(), "not deterministic under the same seed"
        for j, i in enumerate(ids):  # rows stay aligned
            assert got.scores[j] == c.scores[pos_of[i]]
            assert got.labels[j] == c.labels[pos_of[i]]

        for name in ORDER_NAMES:
            ordered = build_orderer(name).order(pool.query, got, make_ctx(seed))
            assert sorted(ordered.ids.tolist()) == sorted(ids), name
            for j, i in enumerate(ordered.ids.tolist()):
                assert ordered.scores[j] == c.scores[pos_of[i]]


@pytest.mark.parametrize("spec_cls", SPEC_CLASSES, ids=lambda c: c.__name__)
def test_selector_contract_on_empty_candidates(spec_cls: Any) -> None:
    got = (
        make_spec(spec_cls)
        .build()
        .select(np.zeros(8, np.float32), Candidates.empty(8), 4, make_ctx())
    )
    assert len(got) == 0


def test_context_rng_is_the_seeded_generator_made_once() -> None:
    ctx = make_ctx(seed=42)
    first = ctx.rng
    assert ctx.rng is first
    want = np.random.default_rng(42)
    assert first.permutation(50).tolist() == want.permutation(50).tolist()


@pytest.mark.parametrize("method", ["knn", "mmr", "balanced"])
@pytest.mark.parametrize("order", ["nearest_last", "nearest_first", "as_selected"])
def test_deterministic_strategies_never_make_the_generator(method: str, order: str) -> None:
    # Making one is most of a kNN request's selection cost on an idle server.
    pool = make_pool(seed=3, n=40, n_labels=4)
    spec = next(cls for cls in SPEC_CLASSES if cls.model_fields["method"].default == method)
    ctx = make_ctx(seed=3, label_names=LABEL_NAMES[:4])
    chosen = make_spec(spec).build(LABEL_NAMES[:4]).select(pool.query, pool.candidates, 5, ctx)
    build_orderer(order).order(pool.query, chosen, ctx)
    assert ctx._rng is None
