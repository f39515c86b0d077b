#!/usr/bin/env bash
# Device calls S of 2026-12-07 (issues 24, 25 and 18), three calls on the same warm machine,
# after copying this file into .gpu/:
#   bash .gpu/run-s.sh start MINUTES   the soak of issue 24 (soak_start: two `vkv serve --device
#                                      cuda`, paged and vmm, SmolLM2 cut to 8 layers) and, while it
#                                      runs, every GPU test, then the vmm per-layer runs whose
#                                      numbers are counts, not times (prefix-repetition hit rate,
#                                      parallel sampling and beam search memory saved): their
#                                      timings share the GPU with the soak and are not quoted
#   bash .gpu/run-s.sh collect LIMIT   wait for the soak, collect it; then alone on the GPU,
#                                      parallel sampling (n = 4, 4 unshared, 2, 6) and beam search
#                                      (width 4, 2, 6), paged and vmm token-major
#   bash .gpu/run-s.sh prefix LIMIT    prefix-repetition caching on/off (paged, vmm), the 0 %-hit
#                                      overhead on sharegpt, then multi-turn chat (closed loop)
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
case $1 in
start)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
  soak_start "$2"
  VKV_TEST_TIMEOUT=330 gpu_tests
  tail -n 3 /tmp/soak/soak-*.txt > $OUT/progress.txt
  KV="--kv-mode vmm --vmm-layout per-layer" NAME=-per-layer
  left=$(( (560 - SECONDS) / 3 ))
  [ $left -gt 30 ] && MODES=per-layer PCS=enable DEADLINE=$(( SECONDS + left )) prefix_repetition_runs 128
  left=$(( (560 - SECONDS) / 2 ))
  [ $left -gt 30 ] && parallel_sampling_runs 64 $left 4
  left=$(( 560 - SECONDS ))
  [ $left -gt 30 ] && beam_search_runs 64 $left 4
  # Hold the call until near its 600 s limit: the machine stays warm between calls for only 30 s.
  [ $SECONDS -lt 575 ] && sleep $(( 575 - SECONDS ))
  tail -n 3 /tmp/soak/soak-*.txt >> $OUT/progress.txt ;;
collect)
  soak_collect
  end=$(( ${2:-560} - 10 ))
  runs=7
  for spec in 4 4u 2 6 b4 b2 b6; do
    left=$(( (end - SECONDS) / runs )); runs=$((runs - 1))
    [ $left -gt 30 ] || continue
    case $spec in
      b*) beam_search_runs 64 $left ${spec#b} ;;
      *) parallel_sampling_runs 64 $left $spec ;;
    esac
  done ;;
prefix)
  end=$(( ${2:-560} - 10 ))
  DEADLINE=$(( end * 5 / 10 )) prefix_repetition_runs 256
  left=$(( (end - SECONDS) * 6 / 10 / 2 ))
  [ $left -gt 30 ] && caching_overhead_runs 200 $left
  left=$(( (end - SECONDS) / 2 ))
  [ $left -gt 30 ] && multi_turn_runs $left ;;
*) echo "usage: run-s.sh start MINUTES | collect LIMIT | prefix LIMIT" >&2; exit 2 ;;
esac
