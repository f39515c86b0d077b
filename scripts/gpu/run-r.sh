#!/usr/bin/env bash
# Device call R (issues 25, 20, 18), one call within LIMIT seconds (give the limit the call
# really has: `status`'s budget_left_s less the start), after copying this file into .gpu/:
#   bash .gpu/run-r.sh LIMIT   every GPU test (at most 300 s), then `vkv profile` of the
#                              llama-3-8b preset (paged, into profile-llama-3-8b.json), then
#                              beam search and parallel sampling on alpaca (64 requests each),
#                              then prefix-repetition caching on and off, each cut to what is left.
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=300 gpu_tests
end=$(( ${1:-560} - 15 ))
left=$(( end - SECONDS ))
[ $left -gt 60 ] && timeout $(( left < 150 ? left : 150 )) .gpu/bin/vkv profile --device cuda \
  --model preset:llama-3-8b --kv-mode paged --prefill-lens 512,1024,2048,4096,8192 \
  --prefill-batches 1,4 --decode-batches 1,8,32,64,128 --contexts 512,2048,8192 --repeats 3 \
  --out $OUT/profile-llama-3-8b.json > /dev/null 2> $OUT/profile.err
pack
left=$(( (end - SECONDS) / 6 ))
[ $left -gt 30 ] && beam_search_runs 64 $left
left=$(( (end - SECONDS) / 5 ))
[ $left -gt 30 ] && parallel_sampling_runs 64 $left
DEADLINE=$end prefix_repetition_runs 128
