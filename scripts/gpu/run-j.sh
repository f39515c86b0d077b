#!/usr/bin/env bash
# Device call J of 2026-12-07 (issue 24, hardening), run as `bash .gpu/run-j.sh STAGE...` after
# copying this file into .gpu/:
#   tests        every GPU test (tests/gpu_faults.rs included) into $OUT/tests.txt
#   soak MINUTES scripts/soak.py against `vkv serve --device cuda` in both KV modes at once (two
#                servers of 8 GiB of KV each, SmolLM2 cut to 8 layers), MINUTES long, into
#                $OUT/soak-{paged,vmm}.{txt,json}
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
while [ $# -gt 0 ]; do
case $1 in
tests) gpu_tests; shift ;;
soak)
  minutes=$2; shift 2
  for mode in paged vmm; do
    RUST_LOG=warn python3 scripts/soak.py --vkv .gpu/bin/vkv --minutes "$minutes" --every 30 \
      --clients 32 --json $OUT/soak-$mode.json -- --device cuda --model .gpu/smol8.gguf \
      --kv-mode $mode --kv-memory 8GiB > $OUT/soak-$mode.txt 2>&1 &
  done
  wait ;;
*) echo "unknown stage $1" >&2; exit 2 ;;
esac
done
