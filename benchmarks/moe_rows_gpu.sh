#!/usr/bin/env bash
# A mixture-of-experts preset on one GPU, dummy bf16 weights (issue 26's rows): the MLP's grouped matmuls against
# their floor per step size (benchmarks/moe_gemm_gpu.py: jax.lax.ragged_dot, jax's Mosaic GPU ragged dot, the
# gather form), then batch 1 (512 / 256) and 1000 x 256 / 256 with the same flags as the 8B rows
# (benchmarks/three_rows_gpu.sh). vLLM beside it: `python3 benchmarks/vllm_peer_shape.py configs/models/PRESET.json
# --out OUT --skip c --max-model-len 2048` (the peer staged as ../shared/peers/vllm/README.md says).
#   bash benchmarks/moe_rows_gpu.sh OUT_DIR [ROWS: gemm,b1,1000x256] [PRESET: qwen3-30b-a3b] [extra bench flags]
set -u
out=$(realpath -m "${1:?OUT_DIR}"); rows=${2:-gemm,b1,1000x256}; preset=${3:-qwen3-30b-a3b}; shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
F="--model $preset --load-format dummy --quiet --compilation-cache-dir /tmp/cc_moe $*"
declare -A R=(
  [b1]="bench --no-peers --input-len 512 --output-len 256 --batch-size 1 --max-num-seqs 64 --token-buckets 1,16,64,512 --seq-buckets 1,16,64 --max-model-len 2048"
  [1000x256]="bench throughput --engine-config h100-llama-3.1-8b --ignore-eos --num-prompts 1000 --input-len 256 --output-len 256")
for row in ${rows//,/ }; do
  t0=$(date +%s)
  if [ "$row" = gemm ]; then
    timeout 240 python3 benchmarks/moe_gemm_gpu.py --preset "$preset" --tokens 1,8,64,512,2048,8192 \
      --json-out "$out/moe_gemm.json" >"$out/gemm.log" 2>&1 || echo "gemm: rc $?"
    grep '^{' "$out/gemm.log" | cut -c1-400
  else
    timeout 300 python3 -m jaxinfer ${R[$row]} $F --json-out "$out/$row.json" >"$out/$row.log" 2>&1 \
      || { echo "$row: failed (rc $?)"; tail -5 "$out/$row.log"; }
    python3 -c "
import json, sys
r = json.load(open('$out/$row.json'))
print('$row', round(r['results'][0]['single']['decode_tok_s'] if '$row' == 'b1' else r['results']['output_tokens_per_s'], 1))" 2>/dev/null
  fi
  echo "$row took $(( $(date +%s) - t0 )) s"
done
