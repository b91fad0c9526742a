#!/usr/bin/env bash
# fp8's cold start on the H100 preset: XLA's autotune results for the fp8 programs, made once and shipped.
#   bash benchmarks/fp8_autotune_gpu.sh search OUT_DIR 1,32,64,128,256   # the fp8 programs of those token counts
#   bash benchmarks/fp8_autotune_gpu.sh search OUT_DIR 512,2048,8192     # (two calls: ~7 min of search in all on a
#                                                         # fresh H100); each writes OUT_DIR/h100-llama-3.1-8b.json, the
#                                                         # shipped bundle with these results merged in: copy it to
#                                                         # configs/autotune/ before the next call
#   bash benchmarks/fp8_autotune_gpu.sh measure OUT_DIR   # with that bundle in configs/autotune: fp8 cold and warm
#                                                         # start and the mixed workload, one empty cache
# A program's GEMM fusions depend on its token count (and the lm_head's on its sequences): the preset's decode
# programs have the seq buckets' counts, its others the token buckets'; both calls together cover every fp8 GEMM
# fusion the preset compiles. The bf16 results already shipped are kept.
set -u
what=${1:?search|measure}; out=${2:?OUT_DIR}
mkdir -p "$out"
F="--model llama-3.1-8b --load-format dummy --quiet --engine-config h100-llama-3.1-8b --ignore-eos"
buckets=${3:-}
case $what in
  search)
    rm -rf /tmp/tune_fp8
    timeout 560 python3 benchmarks/gemm_autotune.py search --model llama-3.1-8b --engine-config h100-llama-3.1-8b \
      --quantization fp8 --token-buckets "${buckets:?token counts}" --cache-dir /tmp/tune_fp8 2>&1 | tail -20
    python3 benchmarks/gemm_autotune.py bundle --cache-dir /tmp/tune_fp8 --merge-into configs/autotune/h100-llama-3.1-8b.json \
      --out "$out/h100-llama-3.1-8b.json" --note "fp8 W8A8 programs of the preset: gemm_autotune.py search --quantization fp8"
    ;;
  measure)
    rm -rf /tmp/cc_fp8m
    timeout 560 python3 -m jaxinfer bench throughput $F --warm-start --quantization fp8 --compilation-cache-dir /tmp/cc_fp8m \
      --num-prompts 256 --input-len-range 128,1025 --seed 1234 --output-len 128 --json-out "$out/fp8_mixed_startup.json" \
      2>&1 | tail -25
    ;;
esac
