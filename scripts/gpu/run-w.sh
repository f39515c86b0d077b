#!/usr/bin/env bash
# Device call W (prepared 2026-12-08 for the next session; issue 18's remaining vmm gap), one
# call within LIMIT seconds, after copying this file into .gpu/:
#   bash .gpu/run-w.sh LIMIT   every GPU test (at most 200 s); then the decode kernel with 128
#                              sequences of 2,304 tokens, their first 2,048 shared with the
#                              batch's first sequence or not (`--shared-prefix 0,2048`), in vmm
#                              token-major (32 layers, the model's token stride) and paged-16 —
#                              does reading one prefix through 128 aliases slow vmm's decode?;
#                              then prefix repetition with caching on, paged and vmm, 256 requests.
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
limit=${1:-590}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=200 gpu_tests
timeout 120 .gpu/bin/vkv bench kernels --modes vmm-token-major,paged16 --batch 64,128 \
  --context 2304 --shared-prefix 0,2048 --token-major-layers 32 --prefill-batch 0 --json \
  > $OUT/kernels-shared.json 2> $OUT/kernels-shared.err
pack
PCS=enable DEADLINE=$(( limit - 10 )) prefix_repetition_runs 256
