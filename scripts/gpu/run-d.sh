#!/usr/bin/env bash
# Device call D of 2026-11-27 (docs/results/history.md), run on the GPU machine as `bash .gpu/run-d.sh` after copying this file into .gpu/: the GPU tests on the final merged main, and vkv serve --device cuda smoke (paged and vmm).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
for mode in paged vmm; do
  serve_up $m --kv-mode $mode
  echo "=== $mode" >> $OUT/serve.txt
  timeout 60 .gpu/bin/vkv bench serve --url http://127.0.0.1:8077 --workload sharegpt --num-prompts 60 \
    --request-rate 8 --json >> $OUT/serve.txt 2>&1
  curl -s http://127.0.0.1:8077/metrics | grep -E "^vkv_(map|kv|pages|num_pre)" >> $OUT/serve.txt
  serve_down 3
done
