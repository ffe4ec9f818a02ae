#!/usr/bin/env bash
# The first thing to run on a machine with a GPU: one PASS/FAIL/SKIP line per check, exit 1 on any FAIL.
#
#     bash benchmarks/gpu_check.sh            # after `make .venv/.ready`; PYTHON=... to pick another interpreter
#
# NOT YET RUN ON A GPU: written and run on a CPU-only machine (where the CUDA checks print SKIP). Its first run
# on a GPU is the first time this code meets CUDA and NCCL; expect to fix what it finds. Budget: under
# 8 minutes on one GPU (the 8B throughput check takes most of it).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LOGS=$(mktemp -d)
failed=0

check() {  # check NAME TIMEOUT_S COMMAND...: PASS when the command exits 0 within TIMEOUT_S (a hang is a FAIL)
    local name=$1 limit=$2 log
    shift 2
    log="$LOGS/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log"
    if timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1; then
        echo "PASS $name"
    else
        echo "FAIL $name (exit $?; log: $log)"
        tail -n 15 "$log" | sed 's/^/    /'
        failed=1
    fi
}
skip() { echo "SKIP $1 ($2)"; }
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
echo "GPUs: $gpus  ($("$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"))"

# Checks with a meaning on CPU too (fakes stand in for torch.cuda and NCCL where needed).
check "exchange on the comm thread under bf16/fp16 default dtypes (gloo)" 300 "${PYTEST[@]}" tests/test_comm_thread_dtype.py
check "exchange over gloo on host copies, group timeout > comm_timeout, comm thread device, blocking events, checkpoint gather on host, idle turn under GradScaler" \
    300 "${PYTEST[@]}" tests/test_cuda_paths.py
check "bf16-true keeps RoPE inv_freq fp32" 300 "${PYTEST[@]}" tests/test_precision.py -k rope

cuda_tests=(
    "copy_to_host_lands_in_pinned_memory:side-stream copy lands pinned after its event"
    "side_stream_copies_are_exact_while_the_compute_stream_is_busy:side-stream copy exact while compute is busy, freed memory reused"
    "exchange_never_runs_on_the_compute_stream:the exchange's stream is not the compute stream"
    "offloaded_deltas_are_pinned_and_bit_identical:offloaded deltas pinned and bit-identical to kept on the GPU"
    "bf16_true_on_the_gpu:bf16-true fit: fp32 masters on the device, no half gradients"
    "gpu_run_times_turns_by_events:turn timing by events, no synchronize per turn"
    "comm_thread_exchanges_on_a_gpu_run_under_a_bf16_default_dtype:exchange on the comm thread under bf16, CUDA deltas"
    "gpu_run_resumed_from_a_round_boundary_is_bit_identical:resume on the GPU bit-identical"
)
for entry in "${cuda_tests[@]}"; do
    if [ "$gpus" -ge 1 ]; then
        check "${entry#*:}" 300 "${PYTEST[@]}" tests/test_cuda_overlap.py -k "${entry%%:*}"
    else
        skip "${entry#*:}" "no CUDA device"
    fi
done
if [ "$gpus" -ge 1 ]; then
    check "packing in bf16 on the GPU: SDPA and flash-attention (if installed) keep each example's loss" 300 \
        "${PYTEST[@]}" tests/test_packing.py -k on_a_gpu -rs
    check "precision matrix on the GPU, 16-mixed with CUDA's GradScaler" 300 \
        "${PYTEST[@]}" tests/test_precision_matrix.py -k cuda
else
    skip "packing in bf16 on the GPU (SDPA, flash-attention)" "no CUDA device"
fi

if [ "$gpus" -ge 1 ]; then
    # ParaBlock's peak against DESIGN §4's formula for the benchmark's setting (2 clients, s=1, 2-layer blocks of
    # Llama 3-8B, deltas on the GPU) plus 8 GiB for activations at batch 1 × 512 tokens.
    out="$LOGS/throughput.txt"
    check "gpu_throughput.py --shape llama3_8b runs (tokens/s: ParaBlock, full FT, LoRA)" 480 bash -o pipefail -c \
        "'$PYTHON' benchmarks/gpu_throughput.py --shape llama3_8b --steps 10 --warmup 2 > '$out'"
    sed 's/^/    /' "$out"
    check "ParaBlock bf16-true peak within the formula + 8 GiB activations" 60 "$PYTHON" - "$out" <<'PY'
import re, sys
sys.path.insert(0, "benchmarks")
from recipe_memory import ModelSize, footprint
size = ModelSize.of("meta-llama/Meta-Llama-3-8B")
bound = footprint(2 * size.total, 2 * size.layer, 2, 1, offload=False).gpu / 2**30 + 8
line = next(l for l in open(sys.argv[1]) if l.startswith("parablock"))
peak = float(re.search(r"peak\s+([\d.]+) GiB", line).group(1))
print(f"ParaBlock peak {peak:.1f} GiB, bound {bound:.1f} GiB")
sys.exit(0 if peak <= bound else 1)
PY
else
    check "gpu_throughput.py --shape works (tiny shape, ParaBlock, CPU)" 300 \
        "$PYTHON" benchmarks/gpu_throughput.py --shape tiny --steps 2 --warmup 1 --methods parablock
    skip "gpu_throughput.py --shape llama3_8b: ParaBlock bf16-true peak, tokens/s against full FT and LoRA" "no CUDA device"
fi

if [ "$gpus" -ge 2 ]; then
    check "2-process NCCL fit (a hang is a FAIL)" 300 "$PYTHON" tests/distributed_run.py --out "$LOGS/nccl.pt" --devices 2 --accelerator gpu
else
    skip "2-process NCCL fit" "needs 2 GPUs, found $gpus"
fi

[ "$failed" -eq 0 ] && echo "gpu_check: all checks passed (SKIPs above were not run)" || echo "gpu_check: FAILED"
exit "$failed"
