#!/usr/bin/env bash
# Device call U (issue 20: `vkv plan` simulated against measured on the H100; the GPU tests on
# the final code), one call within LIMIT seconds, after copying this file into .gpu/:
#   bash .gpu/run-u.sh LIMIT [SECONDS]   every GPU test (at most 200 s), then the profile through
#                              the engine (at most 200 s), then vkv serve at 10, 20, 30 and 40
#                              sharegpt requests/s (SECONDS of arrivals each, default 30), then
#                              the simulation of each rate from the profile (prelude.sh's
#                              plan_check_runs). Needs LIMIT ≥ 590.
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=200 gpu_tests
plan_check_runs "10 20 30 40" ${2:-30}
