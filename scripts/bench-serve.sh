#!/usr/bin/env bash
# The runs behind docs/results/history.md's `vkv bench serve` section: `vkv serve` in each KV mode on
# this machine's CPU with the default model, loaded by `vkv bench serve` at two request rates.
# Each run's JSON goes to docs/results/DATE-cpu-bench-serve-MODE-rRATE.json.
#   scripts/bench-serve.sh [VKV_BINARY] [NUM_PROMPTS] [RATES...]
set -euo pipefail
cd "$(dirname "$0")/.."
vkv=${1:-target/release/vkv}
n=${2:-40}
shift $(($# < 2 ? $# : 2))
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(0.25 1)
[ -x "$vkv" ] || cargo build --release --bin vkv
date=$(date -u +%Y-%m-%d)
for mode in paged vmm; do
  log=$(mktemp)
  "$vkv" serve --port 0 --kv-mode "$mode" --max-model-len 2048 >"$log" &
  pid=$!
  until grep -q 'http://' "$log"; do
    kill -0 "$pid" || { echo "vkv serve did not start" >&2; exit 1; }
    sleep 0.2
  done
  url=$(grep -o 'http://[0-9.:]*' "$log")
  echo "== $mode: $(cat "$log")" >&2
  for rate in "${rates[@]}"; do
    out="docs/results/$date-cpu-bench-serve-$mode-r$rate.json"
    "$vkv" bench serve --url "$url" --workload sharegpt --num-prompts "$n" --request-rate "$rate" \
      --goodput ttft:2000 tpot:100 --seed 0 --json >"$out"
    echo "   rate $rate -> $out" >&2
  done
  kill -TERM "$pid"
  wait "$pid"
  rm -f "$log"
done
