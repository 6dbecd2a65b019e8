"""The ONNX Runtime embedder against its reference, `SentenceTransformer.encode` (through
`SentenceTransformerEmbedder`), on the real packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import retrievers.onnx_embedder as onnx_module
from retrievers.onnx_embedder import OnnxEmbedder, UnsupportedModel, model_layout
from retrievers.sentence_transformer import (
    DEFAULT_MODEL_NAME,
    SentenceTransformerEmbedder,
    packaged_model_path,
)
from tests.datasets import topic_rows

TOLERANCE = 1e-5
"""Largest difference allowed per component; measured differences are about 3e-7."""

TEXTS = [
    *(r["input"] for r in topic_rows(120)),
    "",
    " ",
    "a",
    "UPPER and lower Case",
    "accents: café, naïve, Zürich; emoji 🎉🚀; CJK 日本語のテキスト",
    "tabs\tand\nnewlines\r\n",
    "word " * 600,  # truncated at the model's 256 tokens
    "x" * 5000,
    "{input} {{output}} %s ${HOME} <script>",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx(cache_dir: Path) -> OnnxEmbedder:
    emb = OnnxEmbedder(cache_dir=cache_dir, batch_size=16)
    emb.open()
    return emb


@pytest.fixture(scope="module")
def reference() -> SentenceTransformerEmbedder:
    emb = SentenceTransformerEmbedder()
    emb.open()
    return emb


def test_matches_sentence_transformers(
    onnx: OnnxEmbedder, reference: SentenceTransformerEmbedder
) -> None:
    assert onnx.name == reference.name == DEFAULT_MODEL_NAME
    assert onnx.dim == reference.dim == 384
    got, want = onnx.embed(TEXTS), reference.embed(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    assert np.abs(got - want).max() <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_batching_and_order_do_not_change_rows(onnx: OnnxEmbedder) -> None:
    whole = onnx.embed(TEXTS)
    one_by_one = np.concatenate([onnx.embed([t]) for t in TEXTS])
    assert np.abs(whole - one_by_one).max() <= TOLERANCE
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = onnx.embed([TEXTS[i] for i in perm])
    assert np.abs(shuffled - whole[perm]).max() <= TOLERANCE
    assert onnx.embed([]).shape == (0, 384)


def test_concurrent_calls_agree_with_serial(onnx: OnnxEmbedder) -> None:
    want = onnx.embed(TEXTS)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = onnx.embed(TEXTS[i::4])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(4):
        assert np.abs(results[i] - want[i::4]).max() <= TOLERANCE


def test_second_open_reads_the_cached_graphs(
    onnx: OnnxEmbedder, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sorted(cache_dir.glob("*.onnx"), key=lambda f: len(f.name))
    assert len(files) == 2 and files[1].name == files[0].name.replace(".onnx", "-fused.onnx")
    assert all(f.stat().st_size > 1_000_000 for f in files)
    assert not list(cache_dir.glob("*.tmp"))
    # Readable by everyone (within the umask): an image's build user is not its run user.
    umask = os.umask(0)
    os.umask(umask)
    assert all(f.stat().st_mode & 0o777 == 0o644 & ~umask for f in files)

    def no_export(*args: object) -> bytes:
        raise AssertionError("exported or fused again despite the cache")

    monkeypatch.setattr(onnx_module, "export_in_child", no_export)
    monkeypatch.setattr(onnx_module, "fuse_in_child", no_export)
    again = OnnxEmbedder(cache_dir=cache_dir)
    again.open()
    assert again.lone_graph == "fused"
    np.testing.assert_array_equal(again.embed(TEXTS[:5]), onnx.embed(TEXTS[:5]))


def test_unwritable_cache_still_works(tmp_path: Path, onnx: OnnxEmbedder) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    emb = OnnxEmbedder(cache_dir=blocker / "cache")
    emb.open()
    assert np.abs(emb.embed(TEXTS[:3]) - onnx.embed(TEXTS[:3])).max() <= TOLERANCE
    assert emb.lone_graph == "fused"
    assert np.abs(emb.embed_alone(TEXTS[0]) - onnx.embed([TEXTS[0]])[0]).max() <= TOLERANCE


def test_embed_alone_matches_embed(onnx: OnnxEmbedder) -> None:
    assert onnx.lone_graph == "fused"
    want = onnx.embed(TEXTS)
    got = np.stack([onnx.embed_alone(text) for text in TEXTS])
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= TOLERANCE


class _RecordingSession:
    """A session stand-in that records its name on every run; the first run after `gate` is
    set waits for it."""

    def __init__(self, inner: object, name: str, runs: list[str]) -> None:
        self.inner, self.name, self.runs = inner, name, runs
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def run(self, *args: object) -> object:
        gate, self.gate = self.gate, None
        self.runs.append(self.name)
        if gate is not None:
            self.entered.set()
            assert gate.wait(timeout=30)
        return self.inner.run(*args)  # type: ignore[attr-defined]


def test_embed_alone_uses_the_first_session_while_another_pass_runs(cache_dir: Path) -> None:
    emb = OnnxEmbedder(cache_dir=cache_dir)
    emb.open()
    runs: list[str] = []
    main = _RecordingSession(emb._session, "main", runs)
    emb._session = main
    emb._lone_session = _RecordingSession(emb._lone_session, "lone", runs)
    emb.lone_pinning = None
    want = emb.embed(TEXTS[:2])
    runs.clear()

    hold = threading.Event()
    main.gate = hold
    batch = threading.Thread(target=emb.embed, args=(TEXTS[:8],))
    batch.start()
    try:
        assert main.entered.wait(timeout=30)
        during = emb.embed_alone(TEXTS[0])  # an upload's batch, say, is running
        assert runs == ["main", "main"]
    finally:
        hold.set()
        batch.join(timeout=30)
    assert not batch.is_alive()
    after = emb.embed_alone(TEXTS[1])
    assert runs == ["main", "main", "lone"]
    assert np.abs(during - want[0]).max() <= TOLERANCE
    assert np.abs(after - want[1]).max() <= TOLERANCE


def _cache_with_the_plain_graph(cache_dir: Path, target: Path) -> Path:
    """A new cache directory holding only the exported graph (no export, no fused graph)."""
    target.mkdir()
    for graph in cache_dir.glob("*.onnx"):
        if not graph.name.endswith("-fused.onnx"):
            shutil.copy(graph, target / graph.name)
    return target


def _perturbed(source: Path | bytes, model_path: Path) -> bytes:
    """The plain graph with one weight matrix scaled by 1.01: a fusion gone wrong."""
    import onnx as onnx_lib
    from onnx import numpy_helper

    graph = onnx_lib.load_from_string(source if isinstance(source, bytes) else source.read_bytes())
    weight = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)) if t.dims else 0)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    return graph.SerializeToString()


@pytest.mark.parametrize("fusion", ["differs", "fails"])
def test_a_fused_graph_that_cannot_be_trusted_gives_way_to_the_plain_one(
    onnx: OnnxEmbedder,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fusion: str,
) -> None:
    def fails(source: Path | bytes, model_path: Path) -> bytes:
        raise ValueError("no pattern matched")

    monkeypatch.setattr(onnx_module, "fuse_in_child", _perturbed if fusion == "differs" else fails)
    emb = OnnxEmbedder(cache_dir=_cache_with_the_plain_graph(cache_dir, tmp_path / "c"))
    emb.open()
    assert emb.lone_graph == "plain"
    got = np.stack([emb.embed_alone(text) for text in TEXTS[:10]])
    assert np.abs(got - onnx.embed(TEXTS[:10])).max() <= TOLERANCE


@pytest.mark.parametrize("options", [{"lone_query_session": False}, {"threads": 1}])
def test_no_lone_session_when_off_or_single_threaded(
    onnx: OnnxEmbedder, cache_dir: Path, options: dict[str, object]
) -> None:
    emb = OnnxEmbedder(cache_dir=cache_dir, **options)  # type: ignore[arg-type]
    emb.open()
    assert emb.lone_graph is None
    assert np.abs(emb.embed_alone(TEXTS[0]) - onnx.embed([TEXTS[0]])[0]).max() <= TOLERANCE


def test_constructor_does_not_load() -> None:
    emb = OnnxEmbedder("some/dir", batch_size=8, threads=1)
    assert not emb.loaded and emb.name == "some/dir" and emb.threads == 1
    with pytest.raises(ValueError):
        OnnxEmbedder(batch_size=0)


def _copy_model(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(packaged_model_path(), target)
    return target


def test_layout_of_the_packaged_model() -> None:
    assert model_layout(packaged_model_path()) == {
        "pooling": "mean",
        "normalize": True,
        "max_length": 256,
    }


@pytest.mark.parametrize(
    "damage",
    ["no_modules", "no_tokenizer", "max_pooling", "extra_module", "not_a_dir"],
)
def test_unsupported_layouts_are_refused(tmp_path: Path, damage: str) -> None:
    model = _copy_model(tmp_path)
    if damage == "no_modules":
        (model / "modules.json").unlink()
    elif damage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
    elif damage == "max_pooling":
        cfg_path = model / "1_Pooling" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["pooling_mode_mean_tokens"] = False
        cfg["pooling_mode_max_tokens"] = True
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "extra_module":
        modules = json.loads((model / "modules.json").read_text())
        modules.append({"idx": 9, "name": "9", "path": "9_Dense", "type": "Dense"})
        (model / "modules.json").write_text(json.dumps(modules))
    else:
        model = tmp_path / "missing"
    with pytest.raises(UnsupportedModel):
        OnnxEmbedder(str(model), cache_dir=tmp_path / "c").open()


def test_a_fusion_that_fails_in_the_child_raises_with_its_last_error_line() -> None:
    with pytest.raises(RuntimeError, match=r"the fuse failed: .*DecodeError"):
        onnx_module.fuse_in_child(b"not an ONNX graph", packaged_model_path())


def test_an_export_that_fails_in_the_child_raises_with_its_last_error_line(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match=r"the export failed: \w+Error"):
        onnx_module.export_in_child(tmp_path)


def test_the_export_leaves_torch_out_of_this_process(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from retrievers.onnx_embedder import OnnxEmbedder; "
        f"OnnxEmbedder(cache_dir=Path({str(tmp_path)!r}), lone_query_session=False).open(); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert len(list(tmp_path.glob("*.onnx"))) == 1
