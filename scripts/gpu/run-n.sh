#!/usr/bin/env bash
# Device call N of 2026-12-07 (issues 25, 18; the device time left could not hold issue 24's
# soak), one call within LIMIT seconds, after copying this file into .gpu/:
#   bash .gpu/run-n.sh LIMIT   every GPU test (at most 300 s) into $OUT/tests.txt, then, alone on
#                              the GPU, parallel sampling on alpaca (n = 4 shared and unshared,
#                              then 2 and 6; both modes, prefix caching off), then prefix-repetition
#                              caching on and off, each run cut to what is left before LIMIT − 15
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=300 gpu_tests
end=$(( ${1:-560} - 15 ))
left=$(( (end - SECONDS) / 5 ))
[ $left -gt 30 ] && parallel_sampling_runs 256 $left
DEADLINE=$end prefix_repetition_runs 128
