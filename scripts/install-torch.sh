#!/usr/bin/env bash
# Install torch into the given python's environment: a CUDA build when an NVIDIA GPU is present,
# otherwise the CPU build (a local wheel when pip's find-links has one, else PyTorch's CPU index).
set -euo pipefail
PY=${1:-python3}
if "$PY" -c "import torch" 2>/dev/null; then exit 0; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec "$PY" -m pip install "torch>=2.4"          # PyPI's Linux wheels are CUDA builds
fi
# A CPU wheel on local disk (pip's find-links)? Then take it, with its dependencies from PyPI.
if "$PY" -m pip install -q --no-deps --no-index "torch==2.13.0" >/dev/null 2>&1; then
    exec "$PY" -m pip install "torch==2.13.0"
fi
exec "$PY" -m pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
