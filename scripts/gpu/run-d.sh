#!/usr/bin/env bash
# Device call D of 2026-11-27 (docs/results/history.md), run on the GPU machine as `bash .gpu/run-d.sh` after copying this file into .gpu/: the GPU tests on the final merged main, and vkv serve --device cuda smoke (paged and vmm).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
for mode in paged vmm; do
  serve_up $m --kv-mode $mode
  echo "=== $mode" >> $OUT/serve.txt
  bench_serve 60 60 "map|kv|pages|num_pre"
  serve_down 3
done
