#!/usr/bin/env bash
# Device calls I of 2026-12-06 (issue 17, the KV-ownership redesign), run as `bash .gpu/run-i.sh STAGE`
# after copying this file into .gpu/:
#   tests   every GPU test (tests/gpu_kv.rs included) into $OUT/tests.txt
#   model   vkv bench model --batch 1,64,128 --context 2048, the base binary (.gpu/base/vkv, built from
#           b54db2e, before the redesign) and this build alternating, twice each, into $OUT/model.txt
#   offline vkv bench offline --kv-mode both on sharegpt (llama-3-8b preset), base and this build
#           alternating, twice each, into $OUT/offline.txt
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
bin() { if [ "$1" = base ]; then echo .gpu/base/vkv; else echo .gpu/bin/vkv; fi; }
for stage in "$@"; do
case $stage in
tests) gpu_tests ;;
model)
  for who in base new new base; do
    echo "=== $who" >> $OUT/model.txt
    timeout 170 $(bin $who) bench model --batch 1,64,128 --context 2048 --steps 20 --json >> $OUT/model.txt 2>> $OUT/errors.txt
  done ;;
offline)
  o="--device cuda --model preset:llama-3-8b --max-num-seqs 128 --kv-mode both --workload sharegpt --num-prompts 300 --json"
  for who in base new new base; do
    echo "=== $who" >> $OUT/offline.txt
    timeout 140 $(bin $who) bench offline $o >> $OUT/offline.txt 2>> $OUT/errors.txt
  done ;;
esac
done
