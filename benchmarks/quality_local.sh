#!/usr/bin/env bash
# The full quality protocol against a real LLM on this machine: Qwen2.5-Coder-0.5B-Instruct
# served by llama.cpp on 127.0.0.1 (benchmarks/local_llm.sh), on Rotten Tomatoes and BBC News,
# 200 test items, seeds 0,1,2. Resumable: answers already in the output folder are kept, so
# rerunning after an interruption goes on where it stopped. Extra arguments go to
# benchmarks/quality.py (e.g. --config knn_last --config ease to run a part first).
#
#   bash benchmarks/quality_local.sh                # foreground
#   nohup bash benchmarks/quality_local.sh > quality.log 2>&1 &   # background
#
# Output: $ICLSERVE_QUALITY_OUT (default benchmarks/results/quality-qwen): report.md,
# report.json, report.png, answers.jsonl. See benchmarks/QUALITY.md for times.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup
bash benchmarks/local_llm.sh setup
bash benchmarks/local_llm.sh serve
OUT=${ICLSERVE_QUALITY_OUT:-benchmarks/results/quality-qwen}
export ICLSERVE_EVAL_BASE_URL="http://127.0.0.1:${ICLSERVE_LLM_PORT:-8011}/v1"
export ICLSERVE_EVAL_MODEL=qwen2.5-coder-0.5b-instruct
exec .venv/bin/python benchmarks/quality.py --dataset rotten_tomatoes --dataset bbc_news \
  --out "$OUT" --resume --no-progress "$@"
