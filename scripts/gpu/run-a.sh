#!/usr/bin/env bash
# Device call A of 2026-11-27 (docs/results/history.md), run on the GPU machine as `bash .gpu/run-a.sh` after copying this file into .gpu/: GPU tests, decode kernels A/B (block table in registers vs per token), the PyTorch peer
# with paged FlexAttention, bench model (cuBLASLt vs cuBLAS GEMMs).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
# VKV_PAGED_DECODE_TABLE=per-token selected the old paged decode in the A/B binary; the switch
# went with the reverted kernel, so both halves of the loop now run the same (per-token) kernel.
grid="--batch 1,16,64 --context 512,2048,8192 --prefill-batch 0 --json"
for i in 1 2; do
  echo "=== new $i" >> $OUT/kernels-ab.txt
  timeout 90 .gpu/bin/vkv bench kernels $grid >> $OUT/kernels-ab.txt 2>&1
  echo "=== per-token $i" >> $OUT/kernels-ab.txt
  VKV_PAGED_DECODE_TABLE=per-token timeout 90 .gpu/bin/vkv bench kernels $grid >> $OUT/kernels-ab.txt 2>&1
done
timeout 150 .gpu/bin/vkv bench model --batch 1,64,128 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
timeout 200 python3 benches/peers/torch_attention.py --flex --json-out $OUT/peer.json > $OUT/peer.txt 2>&1
echo "peer rc=$?" >> $OUT/peer.txt
