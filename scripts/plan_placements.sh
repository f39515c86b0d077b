#!/usr/bin/env bash
# docs/plan.md's placement searches: llama-3-8b and llama-3-70b on 8 and 32 H100s for the
# chatbot (sharegpt), code (humaneval) and summarization (arxiv-summarization) workloads, from
# the profiles in docs/plan/ (see docs/plan.md for how each was made). Writes
# docs/plan/<model>-<gpus>gpu-<workload>.{cmd,json} and, for 8 GPUs, the attainment curves (.svg).
#
# Usage: scripts/plan_placements.sh [VKV]   (default target/release/vkv; ~30 min on 2 cores)
set -euo pipefail
vkv=${1:-target/release/vkv}
dir=docs/plan

# Latency targets (seconds), TTFT and TPOT per workload: DistServe's shapes — code completion
# the tightest TTFT, summarization a loose TTFT and a tight TPOT, chatbot both moderate — set
# for llama-3-8b on an H100 and doubled for llama-3-70b.
slo() { # model workload -> "ttft tpot"
  local k=1
  [ "$1" = llama-3-70b ] && k=2
  case $2 in
    sharegpt) python3 -c "print(0.25*$k, 0.02*$k)" ;;
    humaneval) python3 -c "print(0.125*$k, 0.04*$k)" ;;
    arxiv-summarization) python3 -c "print(2.0*$k, 0.02*$k)" ;;
  esac
}

profiles() { # model -> --profile args
  case $1 in
    llama-3-8b) echo "--profile $dir/llama-3-8b-h100.json --profile $dir/llama-3-8b-h100-tp2.json --profile $dir/llama-3-8b-h100-tp4.json" ;;
    llama-3-70b) echo "--profile $dir/llama-3-70b-h100-tp2.json --profile $dir/llama-3-70b-h100-tp4.json --profile $dir/llama-3-70b-h100-tp8.json" ;;
  esac
}

for model in llama-3-8b llama-3-70b; do
  for gpus in 8 32; do
    for workload in sharegpt humaneval arxiv-summarization; do
      read -r ttft tpot < <(slo $model $workload)
      out=$dir/$model-${gpus}gpu-$workload
      duration=60
      svg=()
      if [ "$gpus" = 8 ]; then svg=(--svg "$out.svg"); else duration=30; fi
      args=($(profiles $model) --workload $workload --ttft "$ttft" --tpot "$tpot"
        --gpus $gpus --gpus-per-node 8 --num-requests 500 --min-duration $duration)
      echo "vkv plan ${args[*]}" | sed "s#$dir/##g" > "$out.cmd"
      "$vkv" plan "${args[@]}" "${svg[@]}" --json > "$out.json"
      echo "$out done"
    done
  done
done
