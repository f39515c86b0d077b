#!/usr/bin/env bash
# Device calls V of 2026-12-07 (issues 20, 24, 25), three calls on the same warm machine, after
# copying this file into .gpu/:
#   bash .gpu/run-v.sh first LIMIT    every GPU test (at most 200 s, alone on the GPU); `vkv bench
#                                     vmm` (driver calls, one set-access over a run); issue 20's
#                                     planner check (prelude.sh's plan_check_runs, 30 s of
#                                     arrivals at 10/20/30/40 req/s, alone); then the 10-minute
#                                     soak of issue 24 starts in its own session (soak_start) and
#                                     the call fills its time with count-only runs (COUNTS below)
#   bash .gpu/run-v.sh second LIMIT   count-only runs while the soak goes on, then soak_collect
#   bash .gpu/run-v.sh third LIMIT    soak_collect if the soak is still going; then, alone, issue
#                                     18's prefix-repetition runs with caching on, paged and vmm
#                                     token-major (256 requests), and the same with caching off
# COUNTS: runs whose numbers are counts, not times (prefix-repetition hit rate in vmm per-layer;
# parallel sampling n = 2, 4, 6 and beam search width 2, 4, 6 memory saved, paged, vmm token-major
# and vmm per-layer). They share the GPU with the soak, so their timings are not quoted, and each
# gets a fixed 20 GiB of KV so that neither process starves the other.
# Everything comes back packed in results.tgz (see prelude.sh).
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
limit=${2:-590}
# Run COUNT specs in order while time is left: "pl" prefix-repetition per-layer; "nK[-MODE]" /
# "bK[-MODE]" parallel sampling / beam search with K samples, MODE per-layer or both (default).
counts() {
  local spec k mode left
  for spec in "$@"; do
    [ -e $OUT/done-$spec ] && continue
    left=$(( limit - 30 - SECONDS ))
    [ $left -gt 40 ] || return 0
    [ $left -gt 150 ] && left=150
    mode=${spec#*-}; k=${spec%%-*}; k=${k:1}
    case $spec in
      pl) EXTRA="--kv-memory 20GiB" MODES=per-layer PCS=enable DEADLINE=$(( SECONDS + left )) \
            prefix_repetition_runs 128 ;;
      n*-per-layer) KV="--kv-mode vmm --vmm-layout per-layer --kv-memory 20GiB" NAME=-per-layer \
            parallel_sampling_runs 64 $left $k ;;
      n*) KV="--kv-mode both --kv-memory 20GiB" parallel_sampling_runs 64 $left $k ;;
      b*-per-layer) KV="--kv-mode vmm --vmm-layout per-layer --kv-memory 20GiB" NAME=-per-layer \
            beam_search_runs 64 $left $k ;;
      b*) KV="--kv-mode both --kv-memory 20GiB" beam_search_runs 64 $left $k ;;
    esac
    touch $OUT/done-$spec
  done
}
ALL="pl n4-per-layer b4-per-layer n2 n6 b2 b6 n2-per-layer n6-per-layer b2-per-layer b6-per-layer"
hold() { [ $SECONDS -lt $(( limit - 20 )) ] && sleep $(( limit - 20 - SECONDS )); tail -n 3 /tmp/soak/soak-*.txt >> $OUT/progress.txt; pack; }
case $1 in
first)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
  VKV_TEST_TIMEOUT=200 gpu_tests
  timeout 60 .gpu/bin/vkv bench vmm --device cuda --json > $OUT/bench-vmm.json 2> $OUT/bench-vmm.err
  plan_check_runs "10 20 30 40" 30
  soak_start 10
  echo "soak started at call-1 second $SECONDS" > $OUT/progress.txt
  counts $ALL
  hold ;;
second)
  counts $ALL
  if pgrep -f /tmp/soak/soak.py > /dev/null; then
    left=$(( limit - 20 - SECONDS ))
    timeout $left bash -c 'while pgrep -f /tmp/soak/soak.py > /dev/null; do sleep 2; done'
  fi
  pgrep -f /tmp/soak/soak.py > /dev/null || soak_collect
  tail -n 3 /tmp/soak/soak-*.txt >> $OUT/progress.txt; pack ;;
third)
  pgrep -f /tmp/soak/soak.py > /dev/null && soak_collect
  end=$(( limit - 10 ))
  PCS=enable DEADLINE=$(( SECONDS + (end - SECONDS) * 6 / 10 )) prefix_repetition_runs 256
  PCS=no-enable DEADLINE=$end prefix_repetition_runs 256 ;;
*) echo "usage: run-v.sh first|second|third LIMIT" >&2; exit 2 ;;
esac
