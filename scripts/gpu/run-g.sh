#!/usr/bin/env bash
# Device call G of 2026-11-27, session 2 (docs/results/history.md), run as `bash .gpu/run-g.sh` after copying this file into .gpu/:
# every GPU test on main after the CPU-scaling merge (the GPU tests compare against the CPU forward pass), and bench model.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
gpu_tests
timeout 120 .gpu/bin/vkv bench model --batch 1,64 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
