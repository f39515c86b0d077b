#!/usr/bin/env bash
# Device call B of 2026-11-27 (docs/results/history.md), run on the GPU machine as `bash .gpu/run-b.sh` after copying this file into .gpu/: offline A/B (sharegpt, arxiv) and vkv bench serve against vkv serve, both KV modes.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
timeout 200 .gpu/bin/vkv bench offline $m --kv-mode both --workload sharegpt --num-prompts 300 --json > $OUT/offline-sharegpt.json 2> $OUT/offline.err
timeout 150 .gpu/bin/vkv bench offline $m --kv-mode both --workload arxiv-summarization --num-prompts 64 --json > $OUT/offline-arxiv.json 2>> $OUT/offline.err
for mode in paged vmm; do
  serve_up $m --kv-mode $mode
  echo "=== $mode" >> $OUT/serve.txt
  bench_serve 120 200 "map|kv|pages|num_pre" --goodput ttft:1000 tpot:50
  serve_down 5
done
