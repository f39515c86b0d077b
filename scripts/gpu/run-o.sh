#!/usr/bin/env bash
# Device call O of 2026-12-07: the GPU tests alone, most relevant to this session's changes
# first (KV books and forks, the engine, faults, HF agreement with logprobs, then the model, vmm
# and kernel tests), each binary's output into $OUT/tests.txt, stopping before LIMIT seconds:
#   bash .gpu/run-o.sh LIMIT
cd "$(dirname "$0")/.."
. scripts/gpu/prelude.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; } > $OUT/tests.txt
for t in gpu_kv gpu_engine gpu_faults gpu_hf gpu_model gpu_vmm gpu_attention; do
  left=$(( ${1:-240} - 5 - SECONDS ))
  [ $left -gt 5 ] || { echo "== $t: not run (time)" >> $OUT/tests.txt; continue; }
  [ $t = gpu_hf ] && python3 scripts/make_hf_llama.py /tmp/hf >> $OUT/tests.txt 2>&1
  left=$(( ${1:-240} - 5 - SECONDS ))
  echo "== $t ($left s left)" >> $OUT/tests.txt
  VKV_HF_DIR=/tmp/hf timeout $left .gpu/tests/$t --test-threads=1 --nocapture >> $OUT/tests.txt 2>&1
  echo "== $t rc=$?" >> $OUT/tests.txt
done
