"""Selection quality: accuracy and macro-F1 of every selector, through iclserve's HTTP API.

Run from the repository root:

    .venv/bin/python benchmarks/quality.py --stand-in --dataset rotten_tomatoes
    export ICLSERVE_EVAL_BASE_URL=http://127.0.0.1:8011/v1
    export ICLSERVE_EVAL_MODEL=qwen2.5-coder-0.5b-instruct
    .venv/bin/python benchmarks/quality.py --dataset rotten_tomatoes --dataset bbc_news

Same options as `iclserve eval` (see `--help` and benchmarks/QUALITY.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.evaluation.command import main

if __name__ == "__main__":
    sys.exit(main())
