#!/usr/bin/env bash
# Device call P of 2026-12-07 (issues 25, 18), one call within LIMIT seconds, after copying this
# file into .gpu/:
#   bash .gpu/run-p.sh LIMIT   every GPU test (at most 300 s) into $OUT/tests.txt, then, alone on
#                              the GPU, beam search (width 4, 2, 6) and parallel sampling (n = 4
#                              shared and unshared, 2, 6) on alpaca, both modes, then
#                              prefix-repetition caching on and off, each cut to what is left
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=300 gpu_tests
end=$(( ${1:-560} - 15 ))
left=$(( (end - SECONDS) / 8 ))
[ $left -gt 20 ] && beam_search_runs 128 $left
left=$(( (end - SECONDS) / 5 ))
[ $left -gt 20 ] && parallel_sampling_runs 128 $left
DEADLINE=$end prefix_repetition_runs 128
