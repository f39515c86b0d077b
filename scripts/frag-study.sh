#!/usr/bin/env bash
# The runs behind docs/frag.md: each writes its table (table.txt), JSON report and plots under
# docs/frag/NAME/. Takes a few minutes on a 2-core machine.
#   scripts/frag-study.sh [VKV_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
vkv=${1:-target/release/vkv}
[ -x "$vkv" ] || cargo build --release
run() {
  name=$1; shift
  mkdir -p "docs/frag/$name"
  echo "== $name: vkv frag $*" >&2
  "$vkv" frag "$@" --plot-dir "docs/frag/$name" --json-out "docs/frag/$name/report.json" --timeline-points 100 \
    > "docs/frag/$name/table.txt"
}
run llama-3-8b-sharegpt --model llama-3-8b --kv-memory 40GiB --workload sharegpt --num-requests 4000
run llama-3-8b-alpaca --model llama-3-8b --kv-memory 40GiB --workload alpaca --num-requests 10000
run llama-3-8b-humaneval --model llama-3-8b --kv-memory 40GiB --workload humaneval --num-requests 4000
run llama-3-8b-arxiv --model llama-3-8b --kv-memory 40GiB --workload arxiv-summarization --num-requests 1000
run llama-3-8b-longbench --model llama-3-8b --kv-memory 40GiB --workload longbench --num-requests 1000
# The vLLM paper's setting for Fig. 2: OPT-13B on an A100-40GB (about 12 GiB left for KV), max length 2048.
run opt-13b-sharegpt-2048 --model opt-13b --kv-memory 12GiB --max-len 2048 --workload sharegpt --num-requests 2000
# Poisson arrivals instead of a burst: 1.5 requests per decode step.
run llama-3-8b-sharegpt-poisson --model llama-3-8b --kv-memory 40GiB --workload sharegpt --num-requests 4000 --request-rate 1.5
