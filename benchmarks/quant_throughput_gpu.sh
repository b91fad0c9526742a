#!/usr/bin/env bash
# Offline throughput of the 8B shape (dummy weights) for each weight scheme: 1000 x 256 / 256 and the mixed
# 256-prompt workload, one process each (the scheme's compiled programs shared through a compilation cache), then a
# table.   bash benchmarks/quant_throughput_gpu.sh OUT_DIR [schemes...]        (default: none int8 int4 fp8)
# Each run writes OUT_DIR/tp_<workload>_<scheme>.json (`jaxinfer bench throughput --json-out`).
set -u
out=${1:?OUT_DIR}; shift
schemes=${*:-none int8 int4 fp8}
mkdir -p "$out"
F="--model llama-3.1-8b --load-format dummy --quiet --engine-config h100-llama-3.1-8b --ignore-eos"
declare -A W=([1000x256]="--num-prompts 1000 --input-len 256 --output-len 256"
              [mixed256]="--num-prompts 256 --input-len-range 128,1025 --seed 1234 --output-len 128")
for q in $schemes; do
  for w in 1000x256 mixed256; do
    timeout 420 python3 -m jaxinfer bench throughput $F ${W[$w]} --quantization "$q" \
      --compilation-cache-dir "/tmp/cc_$q" --json-out "$out/tp_${w}_$q.json" >"$out/tp_${w}_$q.log" 2>&1 \
      || { echo "$q $w: failed (rc $?)"; tail -5 "$out/tp_${w}_$q.log"; }
  done
done
python3 - "$out" $schemes <<'PY'
import json, sys
out, schemes = sys.argv[1], sys.argv[2:]
print(f"{'weights':8s} {'1000x256':>9s} {'vs bf16':>7s} {'mixed256':>9s} {'vs bf16':>7s}")
base = {}
for q in schemes:
    cells = []
    for w in ("1000x256", "mixed256"):
        try:
            r = json.load(open(f"{out}/tp_{w}_{q}.json"))
            tok = r["results"]["output_tokens_per_s"]
        except Exception as e:
            cells += [float("nan"), float("nan")]; continue
        base.setdefault(w, tok if q == "none" else None)
        cells += [tok, tok / base[w] if base.get(w) else float("nan")]
    print(f"{q:8s} {cells[0]:9.0f} {cells[1]:7.2f} {cells[2]:9.0f} {cells[3]:7.2f}")
PY
