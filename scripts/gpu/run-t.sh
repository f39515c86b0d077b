#!/usr/bin/env bash
# Device call T (issues 25, 18; the GPU tests on the final code), one call within LIMIT seconds
# (the limit the call really has), after copying this file into .gpu/:
#   bash .gpu/run-t.sh LIMIT   every GPU test (at most 280 s); then, alone on the GPU, parallel
#                              sampling n = 4 shared and unshared and beam search of width 4
#                              (alpaca, 48 requests, paged and vmm token-major), then
#                              prefix-repetition caching on and off (paged, vmm), each cut to
#                              its share of what is left.
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=280 gpu_tests
end=$(( ${1:-560} - 10 ))
runs=3
for spec in 4 4u b4; do
  left=$(( (end - SECONDS) * 6 / 10 / runs )); runs=$((runs - 1))
  [ $left -gt 25 ] || continue
  case $spec in
    b*) beam_search_runs 48 $left ${spec#b} ;;
    *) parallel_sampling_runs 48 $left $spec ;;
  esac
done
DEADLINE=$end prefix_repetition_runs 128
