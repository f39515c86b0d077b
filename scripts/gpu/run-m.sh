#!/usr/bin/env bash
# Device calls M of 2026-12-07 (issues 24, 18 and 25), two calls back to back on the same warm
# machine, after copying this file into .gpu/:
#   bash .gpu/run-m.sh start MINUTES   the soak of issue 24 first — scripts/soak.py against two
#                                      `vkv serve --device cuda` (paged and vmm, 8 GiB of KV
#                                      each, SmolLM2 cut to 8 layers, prefix caching off: every
#                                      page must go back) in a session of its own (setsid) so it
#                                      outlives the call, files in /tmp/soak — and, while it
#                                      runs, every GPU test into $OUT/tests.txt (correctness
#                                      only: nothing timed shares the GPU with the soak)
#   bash .gpu/run-m.sh collect         wait for the soak to end, copy its files to $OUT, then
#                                      the benchmarks, alone on the GPU: parallel sampling
#                                      (alpaca, n = 2, 4, 6 shared and 4 unshared, both modes),
#                                      then prefix-repetition caching on and off in what is left
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
case $1 in
start)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
  soak_start "$2"
  VKV_TEST_TIMEOUT=480 gpu_tests
  # Hold the call until near its 600 s limit: the machine stays warm between calls for only 30 s.
  sleep $(( 575 - SECONDS ))
  tail -3 /tmp/soak/soak-*.txt > $OUT/progress.txt ;;
collect)
  soak_collect
  parallel_sampling_runs 256 70
  DEADLINE=565 prefix_repetition_runs 192 ;;
*) echo "usage: run-m.sh start MINUTES | collect" >&2; exit 2 ;;
esac
