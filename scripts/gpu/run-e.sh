#!/usr/bin/env bash
# Device call E of 2026-11-27, session 2 (docs/benchmarks.md), run on the GPU machine as `bash .gpu/run-e.sh` after copying this file into .gpu/:
# GPU tests (decode CUDA graphs included), bench model with the graphs-vs-eager decode A/B, offline sharegpt A/B with
# graphs and with --enforce-eager, and vkv bench serve against vkv serve (vmm) with and without graphs.
cd "$(dirname "$0")/.."
[ -d .gpu/bin ] || tar xJf .gpu/bt.tar.xz -C .gpu
. .gpu/env
export VKV_TEST_GGUF=$PWD/.gpu/smol8.gguf VKV_KERNEL_CACHE=/tmp/vkv-kc
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } > $OUT/tests.txt
python3 scripts/make_hf_llama.py /tmp/hf >> $OUT/tests.txt 2>&1
VKV_HF_DIR=/tmp/hf timeout 240 .gpu/run-tests --nocapture >> $OUT/tests.txt 2>&1; echo "run-tests rc=$?" >> $OUT/tests.txt
timeout 150 .gpu/bin/vkv bench model --batch 1,8,64,128 --context 2048 --steps 20 --json > $OUT/model.json 2> $OUT/model.err
m="--device cuda --model preset:llama-3-8b --max-num-seqs 128"
timeout 200 .gpu/bin/vkv bench offline $m --kv-mode both --workload sharegpt --num-prompts 300 --json > $OUT/offline-graphs.json 2> $OUT/offline.err
timeout 200 .gpu/bin/vkv bench offline $m --enforce-eager --kv-mode both --workload sharegpt --num-prompts 300 --json > $OUT/offline-eager.json 2>> $OUT/offline.err
for eager in "" "--enforce-eager"; do
  .gpu/bin/vkv serve $m --kv-mode vmm $eager --port 8077 > /tmp/serve.log 2>&1 &
  pid=$!
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:8077/health > /dev/null && break; sleep 1; done
  echo "=== vmm $eager" >> $OUT/serve.txt
  timeout 60 .gpu/bin/vkv bench serve --url http://127.0.0.1:8077 --workload sharegpt --num-prompts 200 \
    --request-rate 8 --json >> $OUT/serve.txt 2>&1
  curl -s http://127.0.0.1:8077/metrics | grep -E "^vkv_(map|cuda_graph|num_pre)" >> $OUT/serve.txt
  kill -INT $pid; wait $pid; echo "serve rc=$?" >> $OUT/serve.txt
  tail -3 /tmp/serve.log >> $OUT/serve.txt
done
