#!/usr/bin/env bash
# Where a batch-1 step of the 8B shape goes with 4-bit weights (dummy, int4 g128 quantized at load), next to bf16:
# benchmarks/step_profile.py (engine / synchronous phases / device-only step) and a profiler trace of 10 steps,
# summarised per kernel by benchmarks/trace_summary.py, for each 1-token form of the 4-bit matmul:
#   int4k  the tensor-core Pallas kernel (quant.GPU_KERNEL_MIN_TOKENS_4BIT = 1, the default)
#   int4x  XLA's group dots, a reduction at one token (GPU_KERNEL_MIN_TOKENS_4BIT = 2)
#   none   bf16
# Standalone, the int4x form's GEMVs sum to ~3.7 ms a step (benchmarks/RESULTS.md), yet both forms measured ~7.6 ms
# end to end: the trace says which kernels take the rest.
#   bash benchmarks/int4_b1_profile_gpu.sh OUT_DIR [FORMS: int4k int4x none]     (MODEL=smollm2-135m-instruct: a CPU dry run)
set -u
O=$(realpath -m "${1:?OUT_DIR}"); shift; mkdir -p "$O"
forms=("$@"); [ ${#forms[@]} -gt 0 ] || forms=(int4k int4x none)
for f in "${forms[@]}"; do
  q=int4; [ "$f" = none ] && q=none; pre=""; [ "$f" = int4x ] && pre="quant.GPU_KERNEL_MIN_TOKENS_4BIT = 2"
  t0=$(date +%s)
  timeout 170 python3 -c "import runpy, sys
from jaxinfer import quant
$pre
sys.argv = ['step_profile'] + sys.argv[1:]
runpy.run_path('benchmarks/step_profile.py', run_name='__main__')" --model "${MODEL:-llama-3.1-8b}" --load-format dummy --batch-sizes 1 \
    --steps 48 --quantization $q --json-out "$O/prof_$f.json" --trace "/tmp/tr_$f" --trace-steps 10 > "$O/prof_$f.log" 2>&1 \
    || echo "$f: rc $?"
  grep -A3 "^| batch" "$O/prof_$f.log"
  python3 benchmarks/trace_summary.py "/tmp/tr_$f" --steps 10 --top 14 > "$O/trace_$f.txt" 2>&1
  head -24 "$O/trace_$f.txt" | cut -c1-150
  echo "$f took $(( $(date +%s) - t0 )) s"
done
