#!/usr/bin/env bash
# 4-bit weights at batch 1 on the GPU: each form's GEMMs of the 8B shape at 1-4 tokens, then batch-1 decode of the
# engine (512 / 256, dummy weights) with each 1-token form, bf16 beside them.
#   bash benchmarks/int4_b1_forms_gpu.sh OUT_DIR [gemm] [e2e]
# Forms at one token: kernel (the tensor-core Pallas kernel, quant.GPU_KERNEL_MIN_TOKENS_4BIT = 1, the default), xla
# (scaled_after_dot: XLA's group dots, a reduction at one token). A word-wise CUDA-core GEMV (quant_gemv4) was
# measured here and dropped (benchmarks/RESULTS.md; code in the history at 78cd663).
set -u
out=${1:?OUT_DIR}; shift
parts=${*:-gemm e2e}
mkdir -p "$out"
if [[ $parts == *gemm* ]]; then
  timeout 300 python3 benchmarks/quant_gemm_gpu.py --schemes int4 --ms 1,2,4 --no-sweep \
    --json-out "$out/gemm_int4.json" 2>&1 | grep -v "^shape="
fi
declare -A SET=([none]="" [kernel]="" [xla]="quant.GPU_KERNEL_MIN_TOKENS_4BIT = 2")
if [[ $parts == *e2e* ]]; then
  for form in none xla kernel; do
    q=int4; [[ $form == none ]] && q=none
    timeout 150 python3 -c "import runpy, sys
from jaxinfer import quant
${SET[$form]}
sys.argv = ['jaxinfer'] + sys.argv[1:]
runpy.run_module('jaxinfer', run_name='__main__')" bench --model llama-3.1-8b --load-format dummy --quiet --no-peers \
      --input-len 512 --output-len 256 --batch-size 1 --max-num-seqs 64 --token-buckets 1,16,64,512 \
      --seq-buckets 1,16,64 --max-model-len 2048 --quantization $q --json-out "$out/b1_$form.json" >"$out/b1_$form.log" 2>&1 \
      || { echo "$form: failed (rc $?)"; tail -5 "$out/b1_$form.log"; }
    python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['results'][0]
print(f\"{sys.argv[2]:7s} {r['single']['decode_tok_s']:7.1f} tok/s  start-up {r['startup']['total_s']:.1f} s\")" \
      "$out/b1_$form.json" "$form" 2>/dev/null
  done
fi
