#!/usr/bin/env bash
# Device call E of 2026-11-27, session 2 (docs/results/history.md), run on the GPU machine as `bash .gpu/run-e.sh` after copying this file into .gpu/:
# GPU tests (decode CUDA graphs included), bench model with the graphs-vs-eager decode A/B, offline sharegpt A/B with
# graphs and with --enforce-eager, and vkv bench serve against vkv serve (vmm) with and without graphs.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
timeout 150 .gpu/bin/vkv bench model --batch 1,8,64,128 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
timeout 200 .gpu/bin/vkv bench offline $m --kv-mode both --workload sharegpt --num-prompts 300 --json > $OUT/offline-graphs.json 2> $OUT/offline.err
timeout 200 .gpu/bin/vkv bench offline $m --enforce-eager --kv-mode both --workload sharegpt --num-prompts 300 --json > $OUT/offline-eager.json 2>> $OUT/offline.err
for eager in "" "--enforce-eager"; do
  serve_up $m --kv-mode vmm $eager
  echo "=== vmm $eager" >> $OUT/serve.txt
  bench_serve 60 200 "map|cuda_graph|num_pre"
  serve_down 3
done
