#!/usr/bin/env bash
# Device calls K of 2026-12-07 (issue 24's 10-minute GPU soak, longer than one call may run), as
# two calls back to back on the same warm machine, after copying this file into .gpu/:
#   bash .gpu/run-k.sh start MINUTES   every GPU test into $OUT/tests.txt, then scripts/soak.py
#                                      against `vkv serve --device cuda` in both KV modes at once
#                                      (two servers, 8 GiB of KV each, SmolLM2 cut to 8 layers,
#                                      prefix caching off: every page must go back to the pool),
#                                      started in a session of its own (setsid) so that it outlives
#                                      the call; its files go to /tmp/soak
#   bash .gpu/run-k.sh collect [N]     wait for that soak to end, then copy its files to $OUT; in
#                                      the time left, `bench offline` on prefix-repetition (N
#                                      requests) with prefix caching on and off
cd "$(dirname "$0")/.."
case $1 in
start)
  . scripts/gpu/prelude.sh
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
  VKV_TEST_TIMEOUT=400 gpu_tests
  # The servers run from copies, so that a later call's carried .gpu cannot touch them.
  rm -rf /tmp/soak && mkdir -p /tmp/soak && cp .gpu/bin/vkv .gpu/smol8.gguf scripts/soak.py \
    scripts/vkv_serve.py /tmp/soak/
  for mode in paged vmm; do
    RUST_LOG=warn setsid python3 /tmp/soak/soak.py --vkv /tmp/soak/vkv --minutes "$2" --every 30 \
      --clients 32 --json /tmp/soak/soak-$mode.json -- --device cuda --model /tmp/soak/smol8.gguf \
      --kv-mode $mode --kv-memory 8GiB --no-enable-prefix-caching > /tmp/soak/soak-$mode.txt 2>&1 < /dev/null &
  done
  date -u > /tmp/soak/started
  # Hold the call until near its 600 s limit: the machine stays warm between calls for only 30 s.
  sleep $(( 570 - SECONDS ))
  tail -3 /tmp/soak/soak-*.txt > $OUT/progress.txt ;;
collect)
  while pgrep -f /tmp/soak/soak.py > /dev/null; do sleep 5; done
  date -u > /tmp/soak/ended
  cp /tmp/soak/soak-* /tmp/soak/started /tmp/soak/ended $OUT/
  # What is left of the call: prefix caching on and off, both KV modes, on the llama-3-8b preset
  # (a first look for issue 18; each run cut at its share of the time left).
  . scripts/gpu/prelude.sh
  prefix_repetition_runs ${2:-256} ;;
*) echo "usage: run-k.sh start MINUTES | collect" >&2; exit 2 ;;
esac
