"""Thread settings of the native libraries, applied before any of them is loaded.

OpenMP (FAISS, numba), BLAS and ONNX Runtime read their environment when their shared
library loads, so this module imports nothing heavy and must run before `app.main` is
imported.
"""

from __future__ import annotations

import os


def configure_threads() -> None:
    # One pool of workers sized to the cores, not one per library per request.
    cores = str(len(os.sched_getaffinity(0)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, cores)
    # Idle OpenMP workers sleep instead of spinning: a spinning pool left over from one
    # search takes the cores from the event loop and the embedder of the next request.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
