#!/usr/bin/env bash
# Seconds from launching `jaxinfer serve` to /ready answering 200, then the latency of one 8-token completion.
#   bash benchmarks/serve_ready.sh CACHE_DIR LABEL [serve options...]
# e.g. bash benchmarks/serve_ready.sh /tmp/ccs cold --model llama-3.1-8b --load-format dummy \
#          --engine-config h100-llama-3.1-8b        (then the same again: a warm start)
# The prompt is token ids, so models without a tokenizer (presets with dummy weights) answer too.
set -u
cache=$1 label=$2
shift 2
port=${PORT:-8011}
t0=$(date +%s.%N)
python3 -m jaxinfer serve --port "$port" --compilation-cache-dir "$cache" --quiet "$@" > "/tmp/serve_ready_$label.log" 2>&1 &
pid=$!
until curl -sf "localhost:$port/ready" > /dev/null; do
  kill -0 $pid 2> /dev/null || { echo "$label: the server exited (log: /tmp/serve_ready_$label.log)"; exit 1; }
  sleep 0.1
done
t1=$(date +%s.%N)
model=$(curl -s "localhost:$port/v1/models" | python3 -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])")
curl -sf "localhost:$port/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"prompt\": [1, 2, 3, 4, 5, 6, 7, 8], \"max_tokens\": 8}" > /dev/null || echo "$label: completion failed"
t2=$(date +%s.%N)
python3 -c "print('$label: ready after %.1f s, first completion %.2f s' % ($t1 - $t0, $t2 - $t1))"
kill -TERM $pid
wait $pid
