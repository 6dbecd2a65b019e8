"""A sentence-transformers model run by ONNX Runtime: the fast default query embedder.

On this class of machine (2 AVX2 cores) a forward pass of MiniLM through PyTorch eager costs
about three times what the same graph costs in ONNX Runtime, and a request pays it on every
cache miss. The graph is exported once from the model's own weights with `torch.onnx` and
cached on disk under a key derived from those weights, so later starts load it without
importing torch at all; the export itself runs in a child process, so that not even the
first start keeps torch in memory. Pooling and normalisation follow the model's
sentence-transformers configuration, and the vectors match `SentenceTransformer.encode` to
about 1e-6.

Only models made of Transformer -> Pooling (mean or CLS) -> optional Normalize, with a
`tokenizer.json`, can be run this way; `supports()` says whether a directory qualifies.

A second session serves `embed_alone`, the query of a request that has the server to itself.
It runs a copy of the graph with ONNX Runtime's transformer fusions (for MiniLM 46 operators,
against the 254 that ONNX Runtime's own optimizations leave, so fewer hand-offs between the
pass's two threads), and its threads spin between operators for the length of a pass instead
of sleeping. On 2 vCPUs that takes 0.8-1.1 ms off such a request. Spinning would waste a core
under load, when passes overlap the event loop's work, so batches and concurrent calls keep
to the first session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from retrievers.placement import IdlePassPinning, thread_ids
from retrievers.sentence_transformer import DEFAULT_MODEL_NAME, packaged_model_path

log = logging.getLogger("iclserve")

EXPORT_FORMAT = 1
"""Bumped when the exported graph changes, so that old cached files are not reused."""

_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}

FUSED_TOLERANCE = 1e-4
"""Largest difference allowed between a fused graph's vectors and the plain graph's (per
component); the fusions only reorder float arithmetic, measured differences are about 1e-7."""

CHILD_TIMEOUT_S = 600.0
"""How long the child process that exports or fuses a graph may take (seconds for MiniLM)."""

_FUSION_PROBES = (
    "dimension probe",
    "A longer probe sentence, with punctuation, numbers like 42 and a few rarer words.",
    "accents: café, naïve; CJK 日本語",
)


class UnsupportedModel(ValueError):
    """The model directory is not a layout this embedder can run."""


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def model_layout(path: Path) -> dict[str, Any]:
    """Pooling mode, normalisation and max length of a sentence-transformers directory.

    Raises UnsupportedModel naming what is missing or not supported.
    """
    if not (path / "modules.json").is_file():
        raise UnsupportedModel(f"{path} has no modules.json (not a sentence-transformers model)")
    if not (path / "tokenizer.json").is_file():
        raise UnsupportedModel(f"{path} has no tokenizer.json (a fast tokenizer is needed)")
    modules = _read_json(path / "modules.json")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise UnsupportedModel(f"{path}: modules {kinds} are not Transformer, Pooling[, Normalize]")
    pooling_cfg = _read_json(path / modules[1]["path"] / "config.json")
    modes = [mode for key, mode in _POOLING.items() if pooling_cfg.get(key)]
    other = [
        key
        for key, value in pooling_cfg.items()
        if key.startswith("pooling_mode") and value and key not in _POOLING
    ]
    if len(modes) != 1 or other:
        raise UnsupportedModel(f"{path}: pooling {pooling_cfg} is not mean or CLS alone")
    max_length = 512
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = int(_read_json(st_config).get("max_seq_length") or max_length)
    return {"pooling": modes[0], "normalize": "Normalize" in kinds, "max_length": max_length}


def _weights_key(path: Path) -> str:
    """A digest of everything the exported graph depends on."""
    digest = hashlib.sha256(f"iclserve-onnx-{EXPORT_FORMAT}".encode())
    for name in sorted(os.listdir(path)):
        full = path / name
        if full.is_file() and name.endswith((".safetensors", ".bin", ".json")):
            digest.update(name.encode())
            with open(full, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:32]


def export_onnx(path: Path) -> bytes:
    """The transformer of the model at `path` as an ONNX graph (last hidden state)."""
    # Set before the Hugging Face libraries are imported: they read it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    # Eager attention exports as plain MatMul/Softmax, which ONNX Runtime fuses well.
    model = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    sample = torch.ones(1, 8, dtype=torch.long)
    axes = {0: "batch", 1: "tokens"}
    with (
        tempfile.TemporaryDirectory() as tmp,
        torch.inference_mode(),
        warnings.catch_warnings(),
    ):
        # The tracer warns about shape-dependent Python branches of the model; the graph is
        # checked against the PyTorch model's output by the tests.
        warnings.simplefilter("ignore")
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(
            LastHiddenState(model),
            (sample, torch.ones_like(sample), torch.zeros_like(sample)),
            str(out),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "token_type_ids": axes,
                "last_hidden_state": axes,
            },
            opset_version=17,
            dynamo=False,
        )
        return out.read_bytes()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _store(target: Path, data: bytes) -> bool:
    """Write `data` at `target` atomically; False (logged) when the file system refuses."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then renamed: a reader never sees half a graph.
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private; the cache is read by other users too (an image
        # exports the graph at build time as root and serves it as an unprivileged user).
        os.chmod(tmp, 0o644 & ~_current_umask())
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("cannot cache the ONNX graph in %s (%s); it stays in memory", target, exc)
        return False
    return True


def _cached_file(target: Path | None, make: Callable[[], bytes]) -> Path | bytes:
    """`target` when it exists, else `make()`, stored at `target` if possible: the path when
    the graph is on disk, its bytes when it is not.

    A session made from a file path holds about 85 MiB less than one made from the same
    bytes (the default model, measured), so the path is preferred.
    """
    if target is not None and target.is_file():
        return target
    data = make()
    if target is not None and _store(target, data):
        return target
    return data


def _cached_graph(path: Path, cache_dir: Path | None) -> bytes:
    """The bytes of the model's exported graph, from the cache when present."""
    target = cache_dir / f"{_weights_key(path)}.onnx" if cache_dir is not None else None
    source = _cached_file(target, lambda: export_in_child(path))
    return source.read_bytes() if isinstance(source, Path) else source


def fuse_graph(source: Path, model_path: Path) -> bytes:
    """The graph in `source` with ONNX Runtime's transformer fusions (attention, skip layer
    norm, bias GELU, embedding layer norm), for the model at `model_path`."""
    import onnx
    from onnxruntime.transformers import optimizer

    config = model_path / "config.json"
    settings = _read_json(config) if config.is_file() else {}
    graph = onnx.load(str(source))
    fused = optimizer.optimize_model(
        graph,
        model_type="bert",
        num_heads=int(settings.get("num_attention_heads") or 0),
        hidden_size=int(settings.get("hidden_size") or 0),
        opt_level=0,
    )
    return bytes(fused.model.SerializeToString())


def _in_child(task: str, *args: str) -> bytes:
    """Run this module's `task` (export or fuse) in a fresh interpreter; the graph it writes.

    Both would leave hundreds of MiB behind in this process for good: the export imports
    torch (a process that exported its graph held 667 MiB instead of 286), and the fusion
    peaks at about 850 MiB and adds the optimizer's directories to `sys.path`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "graph.onnx"
        # The child imports this module by name, wherever the package was run from.
        package_root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        done = subprocess.run(
            [sys.executable, "-m", __name__, task, *args, str(out)],
            env={**os.environ, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            raise RuntimeError(f"the {task} failed: {lines[-1] if lines else done.returncode}")
        return out.read_bytes()


def export_in_child(path: Path) -> bytes:
    """`export_onnx(path)`, run by a fresh interpreter (see `_in_child`)."""
    return _in_child("export", str(path))


def fuse_in_child(source: Path | bytes, model_path: Path) -> bytes:
    """`fuse_graph(source, model_path)`, run by a fresh interpreter (see `_in_child`)."""
    if isinstance(source, Path):
        return _in_child("fuse", str(source), str(model_path))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        plain.write_bytes(source)
        return _in_child("fuse", str(plain), str(model_path))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iclserve" / "onnx"


class OnnxEmbedder:
    """Embeds texts with a sentence-transformers model exported to ONNX.

    `model` is a local sentence-transformers directory, or None for the packaged MiniLM;
    `name` is the same as `SentenceTransformerEmbedder`'s for the same model, because the
    vectors are the same (so pools embedded by either can be searched by the other).
    `threads` is ONNX Runtime's intra-op thread count (default: the CPU count). `cache_dir`
    holds exported graphs (None: no cache, export at every start). With `pin_threads`, a
    pass that follows an idle spell runs with its threads pinned to distinct CPUs
    (`retrievers.placement`); `pinning` is None where that cannot be arranged.

    `embed` sorts a call's texts by length and runs them in batches of `batch_size`, so that
    little padding is computed; it returns (len(texts), dim) float32 rows of unit norm.
    Thread safety: `embed` may be called from many threads at once (ONNX Runtime sessions and
    the Rust tokenizer are both safe for concurrent use); `open` is serialised.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 64,
        threads: int | None = None,
        cache_dir: Path | None = None,
        pin_threads: bool = True,
        lone_query_session: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.model = model
        self.batch_size = batch_size
        self.threads = threads or os.cpu_count() or 1
        self.cache_dir = cache_dir
        self.pin_threads = pin_threads
        self.lone_query_session = lone_query_session
        self.pinning: IdlePassPinning | None = None
        self.lone_pinning: IdlePassPinning | None = None
        self.lone_graph: str | None = None
        """Which graph the lone-query session runs: "fused", "plain", or None (no session)."""
        self.name = DEFAULT_MODEL_NAME if model is None else model
        self._lock = threading.Lock()
        self._session: Any = None
        self._lone_session: Any = None
        self._passes = 0
        self._passes_lock = threading.Lock()
        self._tokenizer: Any = None
        self._layout: dict[str, Any] = {}
        self._dim: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.model) if self.model is not None else packaged_model_path()

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.open()
        assert self._dim is not None
        return self._dim

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def open(self) -> None:
        """Export (or read the cached graph) and start the session; idempotent."""
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime as ort
            from tokenizers import Tokenizer

            path = self.path
            if not path.is_dir():
                raise UnsupportedModel(f"{path} is not a local model directory")
            layout = model_layout(path)
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            tokenizer.enable_truncation(max_length=layout["max_length"])
            tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
            key = _weights_key(path)
            source = _cached_file(self._cache_file(f"{key}.onnx"), lambda: export_in_child(path))
            before = thread_ids()
            session = ort.InferenceSession(
                source, self._options(spinning=False), providers=["CPUExecutionProvider"]
            )
            self.pinning = self._pinning(before)
            self._tokenizer, self._layout = tokenizer, layout
            self._session = session
            self._dim = int(self._run(["dimension probe"]).shape[1])
            if self.lone_query_session and self.threads >= 2:
                self._open_lone_session(path, key, source)

    def _cache_file(self, name: str) -> Path | None:
        return self.cache_dir / name if self.cache_dir is not None else None

    def _options(self, *, spinning: bool) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if spinning:
            # Spin between the operators of a pass, and stop as soon as it ends.
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            options.add_session_config_entry("session.force_spinning_stop", "1")
        else:
            # Idle worker threads would otherwise spin between requests and take the CPU
            # from the event loop and the index scan on a 2-core box.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _open_lone_session(self, path: Path, key: str, plain: Path | bytes) -> None:
        """The session of `embed_alone`: the fused graph when it gives the plain graph's
        vectors, else the plain graph (still with spinning threads)."""
        import onnxruntime as ort

        try:
            fused = _cached_file(
                self._cache_file(f"{key}-fused.onnx"), lambda: fuse_in_child(plain, path)
            )
        except Exception as exc:  # the fusions match BERT-like graphs only; or a timeout
            log.info("embedding: no fused graph for lone queries (%s)", exc)
            fused = None
        want = self._run(list(_FUSION_PROBES))
        for graph, name in ((fused, "fused"), (plain, "plain")):
            if graph is None:
                continue
            before = thread_ids()
            session = ort.InferenceSession(
                graph, self._options(spinning=True), providers=["CPUExecutionProvider"]
            )
            pinning = self._pinning(before)
            got = self._run(list(_FUSION_PROBES), session=session)
            if np.abs(got - want).max() <= FUSED_TOLERANCE:
                self._lone_session, self.lone_pinning, self.lone_graph = session, pinning, name
                return
            log.warning("embedding: the %s graph's vectors differ from the model's; not used", name)

    def _pinning(self, threads_before: set[int] | None) -> IdlePassPinning | None:
        """Pinning for the new session's pool: the threads its constructor started."""
        if not self.pin_threads or self.threads < 2 or threads_before is None:
            return None
        after = thread_ids()
        if after is None:
            return None
        pool = sorted(after - threads_before)
        if len(pool) != self.threads - 1:
            # Another thread started meanwhile, or this runtime manages its pool otherwise.
            log.info(
                "embedding: found %d new threads for a pool of %d; not pinning",
                len(pool),
                self.threads - 1,
            )
            return None
        return IdlePassPinning(pool, sorted(os.sched_getaffinity(0)))

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        batch = list(texts)
        if self._session is None:
            self.open()
        if not batch:
            return np.empty((0, self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in batch], kind="stable")
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for start in range(0, len(batch), self.batch_size):
            pick = order[start : start + self.batch_size]
            out[pick] = self._run([batch[i] for i in pick])
        return out

    def embed_alone(self, text: str) -> NDArray[np.float32]:
        """`text`'s vector, for a caller that is the only work in progress (`LoneEmbedder`).

        Runs on the lone-query session unless another pass is running here (an upload's
        batch, say), where it is `embed([text])[0]`.
        """
        if self._session is None:
            self.open()
        with self._passes_lock:
            lone = self._lone_session is not None and self._passes == 0
        rows = self._run([text], session=self._lone_session) if lone else self.embed([text])
        row: NDArray[np.float32] = rows[0]
        return row

    def _run(self, texts: list[str], *, session: Any = None) -> NDArray[np.float32]:
        encodings = self._tokenizer.encode_batch(texts)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
        if session is None:
            session, pinning = self._session, self.pinning
        else:
            pinning = self.lone_pinning if session is self._lone_session else None
        with self._passes_lock:
            self._passes += 1
        try:
            if pinning is not None:
                with pinning.during_pass():
                    (hidden,) = session.run(None, feeds)
            else:
                (hidden,) = session.run(None, feeds)
        finally:
            with self._passes_lock:
                self._passes -= 1
        if self._layout["pooling"] == "cls":
            pooled = hidden[:, 0, :]
        else:
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        # Unit rows whatever the model's own modules say: the `Embedder` contract.
        pooled = pooled.astype(np.float32, copy=False)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(pooled, dtype=np.float32)


if __name__ == "__main__":
    # The child of `_in_child`: export MODEL_DIR OUTPUT, or fuse PLAIN_GRAPH MODEL_DIR OUTPUT.
    task, *paths = sys.argv[1:]
    if task == "export":
        Path(paths[1]).write_bytes(export_onnx(Path(paths[0])))
    elif task == "fuse":
        Path(paths[2]).write_bytes(fuse_graph(Path(paths[0]), Path(paths[1])))
    else:
        sys.exit(f"unknown task {task!r}")
