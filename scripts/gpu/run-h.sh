#!/usr/bin/env bash
# Device call H of 2026-11-27, session 2, run as `bash .gpu/run-h.sh` after copying this file into .gpu/:
# every GPU test and bench model --batch 1,64 after the review commit.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
timeout 120 .gpu/bin/vkv bench model --batch 1,64 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
