#!/usr/bin/env bash
# Device call G of 2026-11-27, session 2 (docs/benchmarks.md), run as `bash .gpu/run-g.sh` after copying this file into .gpu/:
# every GPU test on main after the CPU-scaling merge (the GPU tests compare against the CPU forward pass), and bench model.
cd "$(dirname "$0")/.."
[ -d .gpu/bin ] || tar xJf .gpu/bt.tar.xz -C .gpu
. .gpu/env
export VKV_TEST_GGUF=$PWD/.gpu/smol8.gguf VKV_KERNEL_CACHE=/tmp/vkv-kc
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } > $OUT/tests.txt
python3 scripts/make_hf_llama.py /tmp/hf >> $OUT/tests.txt 2>&1
VKV_HF_DIR=/tmp/hf timeout 240 .gpu/run-tests --nocapture >> $OUT/tests.txt 2>&1; echo "run-tests rc=$?" >> $OUT/tests.txt
timeout 120 .gpu/bin/vkv bench model --batch 1,64 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
