#!/usr/bin/env bash
# GPU check of the Triton backend, on a CUDA machine, from anywhere:   bash bench/gpu.sh
#
# 1. the tests selected by "triton or cuda" (compiled kernels, not the interpreter), including the
#    GPU-only ones in tests/test_kd_loss_triton.py (no host sync, CUDA-graph capture), the loss-contract
#    edges of tests/test_kd_loss_triton_edges.py (bad rows as NaN with zero gradient, the tail bucket of a
#    confident student, teacher_tail, strided inputs, fp16 under loss scaling, shift invariance, the ends
#    of the temperature range) and its CUDA-only V = 128256 test with N * V > 2^31 (16800 bf16 rows, each
#    checked against a float64 reference computed 512 rows at a time; 4.3 GB per bf16 [N, V] tensor);
# 2. the CUDA cases of bench/bench_kd_loss.py (kdfast vs torch eager / compile / Liger, GB/s against
#    the bytes the op must move and against the measured copy bandwidth), then its markdown table;
# 3. the CUDA run of bench/bench_fused_linear_kd_loss.py (the fused linear path on the Triton kernel).
# 4. the CUDA run of bench/bench_step.py (one distillation training step of a small Llama student:
#    kdfast's fused linear loss against full logits + a plain-PyTorch sparse KL, eager and compiled).
#
# Results, under bench/results/:
#   kd_loss-cuda-env.txt                       GPU, driver, torch / triton / python versions
#   kd_loss-cuda-tests.log                     pytest output of step 1
#   kd_loss-cuda.json, kd_loss-cuda.md         step 2 (pytest-benchmark JSON, table); kd_loss-cuda-bench.log
#   fused_linear_kd_loss-cuda.md               step 3; fused_linear_kd_loss-cuda.log
#   step-cuda.md                               step 4; step-cuda.log
# Every step runs even if an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
results=bench/results
mkdir -p "$results"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python - <<'EOF'
import platform, sys
import torch, triton
assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA device"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton.__version__}")
print(f"device: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs")
EOF
} 2>&1 | tee "$results/kd_loss-cuda-env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "bench/gpu.sh: no usable CUDA device" >&2; exit 1; }

failed=0
python -m pytest tests -k "triton or cuda" -q -rs -p no:cacheprovider 2>&1 | tee "$results/kd_loss-cuda-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

{
    python -m pytest bench/bench_kd_loss.py --benchmark-only -k cuda -p no:cacheprovider \
        --benchmark-json="$results/kd_loss-cuda.json" &&
        python bench/bench_kd_loss.py "$results/kd_loss-cuda.json" "$results/kd_loss-cuda.md" &&
        cat "$results/kd_loss-cuda.md"
} 2>&1 | tee "$results/kd_loss-cuda-bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

python bench/bench_fused_linear_kd_loss.py --device cuda --markdown "$results/fused_linear_kd_loss-cuda.md" 2>&1 |
    tee "$results/fused_linear_kd_loss-cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

python bench/bench_step.py --device cuda --markdown "$results/step-cuda.md" 2>&1 | tee "$results/step-cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

exit "$failed"
