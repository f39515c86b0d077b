#!/usr/bin/env bash
# Device calls Q of 2026-12-07 (issues 24 and 25), two calls back to back on the same warm
# machine, after copying this file into .gpu/:
#   bash .gpu/run-q.sh start MINUTES   as run-m.sh's start: the soak of issue 24 (scripts/soak.py
#                                      against two `vkv serve --device cuda`, paged and vmm, 8 GiB
#                                      of KV each, SmolLM2 cut to 8 layers, prefix caching off) in
#                                      a session of its own so it outlives the call, and while it
#                                      runs every GPU test into $OUT/tests.txt (correctness only)
#   bash .gpu/run-q.sh collect LIMIT   wait for the soak to end and copy its files to $OUT first;
#                                      then, alone on the GPU and cut to LIMIT seconds of the
#                                      call, beam search (width 4, 2, 6) and parallel sampling
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
  end=$(( ${2:-560} - 10 ))
  left=$(( (end - SECONDS) / 3 ))
  [ $left -gt 20 ] && beam_search_runs 64 $left
  left=$(( (end - SECONDS) / 4 ))
  [ $left -gt 20 ] && parallel_sampling_runs 64 $left ;;
*) echo "usage: run-q.sh start MINUTES | collect LIMIT" >&2; exit 2 ;;
esac
