#!/usr/bin/env bash
# Today's three bf16 rows of the 8B shape (dummy weights) for one or more source trees, run in turns on one card:
# batch 1 (512 / 256), 1000 x 256 / 256 and the mixed 256-prompt workload (/ 128). An A/B of a change that should
# cost nothing: pass the tree before it (e.g. `git archive REV | tar -x -C DIR`) and `.` for this one.
#   bash benchmarks/three_rows_gpu.sh OUT_DIR ROWS TREE...     ROWS: a comma list of b1,1000x256,mixed256
# Each run writes OUT_DIR/<row>_<n>.json (n: the tree's place in the list); a table comes last.
set -u
out=$(realpath -m "${1:?OUT_DIR}"); rows=${2:?ROWS}; shift 2
mkdir -p "$out"
F="--model llama-3.1-8b --load-format dummy --quiet"
declare -A R=(
  [b1]="bench --no-peers --input-len 512 --output-len 256 --batch-size 1 --max-num-seqs 64 --token-buckets 1,16,64,512 --seq-buckets 1,16,64 --max-model-len 2048"
  [1000x256]="bench throughput --engine-config h100-llama-3.1-8b --ignore-eos --num-prompts 1000 --input-len 256 --output-len 256"
  [mixed256]="bench throughput --engine-config h100-llama-3.1-8b --ignore-eos --num-prompts 256 --input-len-range 128,1025 --seed 1234 --output-len 128")
for row in ${rows//,/ }; do
  n=0
  for tree in "$@"; do
    n=$((n + 1))
    (cd "$tree" && timeout 300 python3 -m jaxinfer ${R[$row]} $F --compilation-cache-dir "/tmp/cc_tree$n" \
       --json-out "$out/${row}_$n.json" >"$out/${row}_$n.log" 2>&1) || { echo "$row $tree: failed (rc $?)"; tail -5 "$out/${row}_$n.log"; }
  done
done
python3 - "$out" "$rows" "$@" <<'PY'
import json, sys
out, rows, trees = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
def tok(row, n):
    try:
        r = json.load(open(f"{out}/{row}_{n}.json"))
    except (OSError, ValueError):
        return float("nan")
    return r["results"][0]["single"]["decode_tok_s"] if row == "b1" else r["results"]["output_tokens_per_s"]
print(f"{'tree':24s}" + "".join(f"{row:>12s}" for row in rows))
for n, tree in enumerate(trees, 1):
    base = [tok(row, 1) for row in rows]
    cells = [tok(row, n) for row in rows]
    print(f"{tree[-24:]:24s}" + "".join(f"{c:9.1f}" + (f" {c / b:.3f}"[1:] if n > 1 else "     ") for c, b in zip(cells, base)))
PY
