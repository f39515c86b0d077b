#!/usr/bin/env bash
# Device call D of 2026-11-27 (docs/benchmarks.md), run on the GPU machine as `bash .gpu/run-d.sh` after copying this file into .gpu/: the GPU tests on the final merged main, and vkv serve --device cuda smoke (paged and vmm).
cd "$(dirname "$0")/.."
[ -d .gpu/bin ] || tar xJf .gpu/bt.tar.xz -C .gpu
. .gpu/env
export VKV_TEST_GGUF=$PWD/.gpu/smol8.gguf VKV_KERNEL_CACHE=/tmp/vkv-kc
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; git log -1 --format=%h 2>/dev/null; } > $OUT/tests.txt
python3 scripts/make_hf_llama.py /tmp/hf >> $OUT/tests.txt 2>&1
VKV_HF_DIR=/tmp/hf timeout 240 .gpu/run-tests --nocapture >> $OUT/tests.txt 2>&1; echo "run-tests rc=$?" >> $OUT/tests.txt
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
for mode in paged vmm; do
  .gpu/bin/vkv serve $m --kv-mode $mode --port 8077 > /tmp/serve-$mode.log 2>&1 &
  pid=$!
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:8077/health > /dev/null && break; sleep 1; done
  echo "=== $mode" >> $OUT/serve.txt
  timeout 60 .gpu/bin/vkv bench serve --url http://127.0.0.1:8077 --workload sharegpt --num-prompts 60 \
    --request-rate 8 --json >> $OUT/serve.txt 2>&1
  curl -s http://127.0.0.1:8077/metrics | grep -E "^vkv_(map|kv|pages|num_pre)" >> $OUT/serve.txt
  kill -INT $pid; wait $pid; echo "serve rc=$?" >> $OUT/serve.txt
  tail -3 /tmp/serve-$mode.log >> $OUT/serve.txt
done
