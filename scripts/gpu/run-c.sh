#!/usr/bin/env bash
# Device call C of 2026-11-27 (docs/results/history.md), run on the GPU machine as `bash .gpu/run-c.sh` after copying this file into .gpu/: GPU tests, compute-sanitizer on the attention kernels, bench model (CUDA graphs A/B),
# offline A/B with the warm plan.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
{
  which compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer
  export PATH=/usr/local/cuda/bin:$PATH
  VKV_ATTENTION_SMALL=1 timeout 200 compute-sanitizer --tool memcheck .gpu/tests/gpu_attention --test-threads=1 2>&1 | tail -15
  echo "memcheck rc=${PIPESTATUS[0]}"
  timeout 120 compute-sanitizer --tool racecheck .gpu/bin/vkv bench kernels --batch 1,16 --context 512 \
    --modes plain,paged16 --iters 2 --prefill-batch 2 --prefill-context 600 --prefill-chunk 0,300 2>&1 | tail -8
  echo "racecheck rc=${PIPESTATUS[0]}"
} > $OUT/sanitizer.txt 2>&1
timeout 150 .gpu/bin/vkv bench model --batch 1,64,128 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
timeout 200 .gpu/bin/vkv bench offline $m --kv-mode both --workload sharegpt --num-prompts 300 --json > $OUT/offline-sharegpt.json 2> $OUT/offline.err
timeout 150 .gpu/bin/vkv bench offline $m --kv-mode both --workload arxiv-summarization --num-prompts 64 --json > $OUT/offline-arxiv.json 2>> $OUT/offline.err
