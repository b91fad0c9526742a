#!/usr/bin/env bash
# Speculation at batch 1 (8B shape, dummy weights) with the sampler program run as a CUDA graph (XLA's default) and
# without one (runner.SAMPLER_COMPILER_OPTIONS = {"xla_gpu_graph_min_graph_size": 1000000}), in one call: the host
# phases of draft-carrying steps (benchmarks/spec_host_phases.py --fixed-drafts: the sampler program's call took
# 0.57 ms of GPU-side runtime work on an H100, 0.07 on a CPU) and the issue-20 point, k = 4 at acceptance 0.7, three
# times in one engine (benchmarks/spec_replay.py). If "nograph" cuts the sampler call and raises the speed-up, make
# the option the default for GPUs.
#   bash benchmarks/spec_sampler_graph_gpu.sh OUT_DIR      (MODEL=smollm2-135m-instruct KV=1GiB: a CPU dry run)
set -u
O=$(realpath -m "${1:?OUT_DIR}"); mkdir -p "$O"
OPT='{"xla_gpu_graph_min_graph_size": 1000000}'
for v in graph nograph; do
  a=(); [ $v = nograph ] && a=(--sampler-options "$OPT")
  t0=$(date +%s)
  timeout 150 python3 benchmarks/spec_host_phases.py --model "${MODEL:-llama-3.1-8b}" --load-format dummy --fixed-drafts "${a[@]}" \
    --json-out "$O/phases_$v.json" > "$O/phases_$v.log" 2>&1 || echo "phases $v: rc $?"
  grep -E "launch|forward_call|sampler_call|readback|serial|wall" "$O/phases_$v.log" | tail -6 | tr -s ' ' | paste -sd ';'
  timeout 170 python3 benchmarks/spec_replay.py --model "${MODEL:-llama-3.1-8b}" --load-format dummy --ks 4 --batches 1 \
    --seq-buckets 1 --rates 0.7,0.7,0.7 --token-buckets 512,2048 --kv-cache-memory "${KV:-16GiB}" "${a[@]}" \
    --json-out "$O/replay_$v.json" > "$O/replay_$v.log" 2>&1 || echo "replay $v: rc $?"
  python3 -c "import json, sys; d = json.load(open(sys.argv[1]))
print(sys.argv[2], 'decode', round(d['off']['1']['tok_s'], 1), 'tok/s; k=4 at 0.7:',
      [round(r['speedup'], 3) for r in d['rows']], 'x, steps', [round(r['step_ms'], 2) for r in d['rows']], 'ms')" \
    "$O/replay_$v.json" $v
  echo "$v took $(( $(date +%s) - t0 )) s"
done
