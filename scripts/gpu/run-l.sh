#!/usr/bin/env bash
# Device call L of 2026-12-07 (issues 18 and 24), as `bash .gpu/run-l.sh [N]` after copying this
# file into .gpu/: every GPU test into $OUT/tests.txt (gpu_engine's prefix-caching test
# included), then, in the time left before 560 s, `vkv bench offline` on the llama-3-8b preset
# with prefix-repetition:8,2048,128,128 (N requests, default 256), prefix caching on and off,
# paged and vmm token-major, each run cut at its share of the time left, into
# $OUT/prefix-rep-MODE-{enable,no-enable}.{json,err}.
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
VKV_TEST_TIMEOUT=330 gpu_tests
prefix_repetition_runs ${1:-256}
