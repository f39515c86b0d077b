#!/usr/bin/env bash
# Device call F of 2026-11-27, session 2 (docs/results/history.md), run as `bash .gpu/run-f.sh` after copying this file into .gpu/:
# bench model (graphs vs eager decode, copy bandwidth on the context), offline arxiv A/B with graphs and eager, and
# vkv bench serve against vkv serve in both KV modes with graphs and with --enforce-eager.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
timeout 150 .gpu/bin/vkv bench model --batch 1,8,64,128 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
timeout 150 .gpu/bin/vkv bench offline $m --kv-mode both --workload arxiv-summarization --num-prompts 64 --json > $OUT/offline-arxiv-graphs.json 2> $OUT/offline.err
timeout 150 .gpu/bin/vkv bench offline $m --enforce-eager --kv-mode both --workload arxiv-summarization --num-prompts 64 --json > $OUT/offline-arxiv-eager.json 2>> $OUT/offline.err
for mode in vmm paged; do
for eager in "" "--enforce-eager"; do
  serve_up $m --kv-mode $mode $eager
  echo "=== $mode $eager" >> $OUT/serve.txt
  bench_serve 120 200 "map|cuda_graph|num_pre"
  serve_down 0
done
done
