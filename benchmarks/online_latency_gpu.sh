#!/usr/bin/env bash
# Online latency of one engine on this GPU: its OpenAI server in its own process, measured from the client side by
# `jaxinfer bench serve` (the same client, prompts and arrivals for both engines; token-id prompts, greedy,
# ignore_eos, streaming). Llama-3.1-8B shape, dummy bf16 weights, ShareGPT-like lengths (medians 128 / 128).
#   bash benchmarks/online_latency_gpu.sh jaxinfer OUT_DIR "N:RATES" ["N:RATES" ...]
#   bash benchmarks/online_latency_gpu.sh vllm OUT_DIR "N:RATES" ...    (vLLM importable: see ../shared/peers/vllm)
# Each "N:RATES" is one `bench serve` run: N requests at each rate of RATES (e.g. "500:4,16,64,inf" "150:1").
# Writes OUT_DIR/<engine>_<i>.json per run and OUT_DIR/<engine>_server.log. Both servers report max_model_len 2048,
# so the client clips lengths alike; each takes its own defaults for an 8B model on one H100 otherwise (ours: the
# h100-llama-3.1-8b preset, 8192-token steps of up to 512 rows; vLLM's API server: 8192 tokens, 1024 rows).
# JAXINFER_MODEL / JAXINFER_ENGINE_CONFIG change our side (a CPU dry run: smollm2-135m-instruct / cpu-default);
# JAXINFER_SERVE_FLAGS adds server flags (e.g. "--mixed-step-token-budget 2048").
set -u
engine=${1:?jaxinfer or vllm}; out=$(realpath -m "${2:?OUT_DIR}"); shift 2
mkdir -p "$out"
port=8100
case $engine in
  jaxinfer)
    python3 -m jaxinfer serve --model "${JAXINFER_MODEL:-llama-3.1-8b}" --load-format dummy \
      --engine-config "${JAXINFER_ENGINE_CONFIG:-h100-llama-3.1-8b}" \
      --port $port --max-queued-requests 4096 --compilation-cache-dir /tmp/cc_online ${JAXINFER_SERVE_FLAGS:-} \
      >"$out/${engine}_server.log" 2>&1 &
    ready=/ready ;;
  vllm)
    mdir=/tmp/vllm_llama8b
    python3 -c "import sys; sys.path.insert(0, '.peers'); from bench import write_model_dir; write_model_dir('$mdir')"
    python3 -m vllm.entrypoints.openai.api_server --model $mdir --load-format dummy --skip-tokenizer-init \
      --max-model-len 2048 --gpu-memory-utilization 0.9 --port $port >"$out/${engine}_server.log" 2>&1 &
    ready=/v1/models ;;
  *) echo "engine: jaxinfer or vllm" >&2; exit 2 ;;
esac
server=$!
t0=$(date +%s.%N)
until curl -sf "http://127.0.0.1:$port$ready" >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "$engine server exited"; tail -30 "$out/${engine}_server.log"; exit 1; }
  sleep 1
done
echo "$engine server ready in $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s"
i=0
for level in "$@"; do
  i=$((i + 1))
  python3 -m jaxinfer bench serve --base-url "http://127.0.0.1:$port" --dataset sharegpt-like \
    --num-prompts "${level%%:*}" --request-rate "${level#*:}" --json-out "$out/${engine}_$i.json" 2>&1 | tail -8
done
kill -TERM $server; wait $server 2>/dev/null
true
