#!/usr/bin/env bash
# Batch-1 decode of the 8B shape (dummy weights) for each weight scheme, one process each, then a table.
#   bash benchmarks/quant_batch1_gpu.sh OUT_DIR [schemes...]        (default: none int8 int4 fp8)
# Each run writes OUT_DIR/b1_<scheme>.json (`jaxinfer bench --json-out`).
set -u
out=${1:?OUT_DIR}; shift
schemes=${*:-none int8 int4 fp8}
mkdir -p "$out"
for q in $schemes; do
  timeout 240 python3 -m jaxinfer bench --model llama-3.1-8b --load-format dummy --quiet --no-peers \
    --input-len 512 --output-len 256 --batch-size 1 --max-num-seqs 64 --token-buckets 1,16,64,512 \
    --seq-buckets 1,16,64 --max-model-len 2048 --quantization "$q" --json-out "$out/b1_$q.json" >"$out/b1_$q.log" 2>&1 \
    || { echo "$q: failed (rc $?)"; tail -5 "$out/b1_$q.log"; }
done
python3 - "$out" $schemes <<'PY'
import json, sys
out, schemes = sys.argv[1], sys.argv[2:]
base = None
print(f"{'weights':8s} {'GB':>6s} {'tok/s':>7s} {'vs bf16':>7s} {'TTFT ms':>8s} {'start s':>7s}")
for q in schemes:
    try:
        r = json.load(open(f"{out}/b1_{q}.json"))["results"][0]
    except Exception as e:
        print(f"{q:8s} no result ({e})"); continue
    tok = r["single"]["decode_tok_s"]
    base = tok if q == "none" else base
    print(f"{q:8s} {r['weight_bytes'] / 1e9:6.2f} {tok:7.1f} {tok / base if base else float('nan'):7.2f} "
          f"{r['single']['ttft_s'] * 1e3:8.1f} {r['startup']['total_s']:7.1f}")
PY
