# Sourced by the device-call scripts, from the repository root on the GPU machine: unpack the
# bundle if it came packed, load its environment, and define the steps the calls share.
[ -d .gpu/bin ] || tar xJf .gpu/bt.tar.xz -C .gpu
. .gpu/env
# At most 8 files come back from a call: the steps write to a folder of this machine (kept
# between calls on a warm machine), packed whole into $OUT/results.tgz after every step and at
# exit — so a call cut at its limit still brings back what was done.
RESULTS_TGZ=$OUT/results.tgz
export OUT=/tmp/vkv-out
mkdir -p $OUT
pack() { tar czf "$RESULTS_TGZ" -C "$OUT" . 2>/dev/null; }
trap pack EXIT
export VKV_TEST_GGUF=$PWD/.gpu/smol8.gguf VKV_KERNEL_CACHE=/tmp/vkv-kc

# Every GPU test (the HF checkpoints written by transformers first) into $OUT/tests.txt, after the
# card, the date and the commit.
gpu_tests() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u; git log -1 --format=%h 2>/dev/null; } > $OUT/tests.txt
  python3 scripts/make_hf_llama.py /tmp/hf >> $OUT/tests.txt 2>&1
  VKV_HF_DIR=/tmp/hf timeout ${VKV_TEST_TIMEOUT:-240} .gpu/run-tests --nocapture >> $OUT/tests.txt 2>&1
  echo "run-tests rc=$?" >> $OUT/tests.txt
  pack
}

# `vkv serve ARGS` on port 8077, returning once /health answers (log: /tmp/serve.log).
serve_up() {
  .gpu/bin/vkv serve "$@" --port 8077 > /tmp/serve.log 2>&1 &
  serve_pid=$!
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:8077/health > /dev/null && break; sleep 1; done
}

# `vkv bench serve` (sharegpt at 8 requests/s, ARGS added) against the server serve_up started,
# then the metrics named by REGEX, into $OUT/serve.txt: bench_serve TIMEOUT PROMPTS REGEX [ARGS]
bench_serve() {
  timeout "$1" .gpu/bin/vkv bench serve --url http://127.0.0.1:8077 --workload sharegpt \
    --num-prompts "$2" --request-rate 8 "${@:4}" --json >> $OUT/serve.txt 2>&1
  curl -s http://127.0.0.1:8077/metrics | grep -E "^vkv_($3)" >> $OUT/serve.txt
}

# Stop it with SIGINT; its exit status and the last N lines of its log go to $OUT/serve.txt.
serve_down() {
  kill -INT $serve_pid; wait $serve_pid; echo "serve rc=$?" >> $OUT/serve.txt
  tail -"$1" /tmp/serve.log >> $OUT/serve.txt
}

# `vkv bench offline` on the llama-3-8b preset with prefix-repetition:8,2048,128,128 (N requests),
# prefix caching on and off (PCS, default "enable no-enable") in each KV mode of MODES (default
# "paged vmm"; per-layer is vmm with per-layer pages), each run cut at its share of the time left
# before $DEADLINE seconds of the call (default 560), EXTRA options added, into $OUT/prefix-rep-MODE-{enable,no-enable}.*:
# prefix_repetition_runs N
prefix_repetition_runs() {
  local modes=(${MODES:-paged vmm}) pcs=(${PCS:-enable no-enable}) left pc mode kv
  local runs=$(( ${#modes[@]} * ${#pcs[@]} ))
  for pc in "${pcs[@]}"; do
    for mode in "${modes[@]}"; do
      left=$(( (${DEADLINE:-560} - SECONDS) / runs )); runs=$((runs - 1))
      [ $left -gt 30 ] || return 0
      kv="--kv-mode $mode"
      [ $mode = per-layer ] && kv="--kv-mode vmm --vmm-layout per-layer"
      timeout $left .gpu/bin/vkv bench offline --device cuda --model preset:llama-3-8b \
        --max-num-seqs 128 $kv $EXTRA --$pc-prefix-caching \
        --workload prefix-repetition:8,2048,128,128 --num-prompts "$1" --json \
        > $OUT/prefix-rep-$mode-$pc.json 2> $OUT/prefix-rep-$mode-$pc.err
      pack
    done
  done
}

# `vkv bench offline` on the llama-3-8b preset, sharegpt (N requests, all hitting nothing),
# prefix caching on then off, paged then vmm token-major, each cut at SECONDS, into
# $OUT/sharegpt-{enable,no-enable}.{json,err}: caching_overhead_runs N SECONDS
caching_overhead_runs() {
  local pc
  for pc in enable no-enable; do
    timeout "$2" .gpu/bin/vkv bench offline --device cuda --model preset:llama-3-8b \
      --max-num-seqs 128 --kv-mode both --$pc-prefix-caching --workload sharegpt \
      --num-prompts "$1" --json > $OUT/sharegpt-$pc.json 2> $OUT/sharegpt-$pc.err
    pack
  done
}

# `vkv bench offline` on the llama-3-8b preset, alpaca (N requests), parallel sampling: n = 2, 4,
# 6 samples sharing the prompt and n = 4 unshared (the baseline), prefix caching off (forks are
# the only sharing), paged then vmm token-major
# (`--kv-mode both`; KV="ARGS" NAME=SUFFIX for other KV modes), each cut at SECONDS, into
# $OUT/parallel-n{N}[-unshared]$NAME.{json,err}: parallel_sampling_runs N SECONDS [SPECS]
# (SPECS: default "4 4u 2 6", a u marking the unshared baseline)
parallel_sampling_runs() {
  local spec n extra name
  for spec in ${3:-4 4u 2 6}; do
    n=${spec%u}; extra=; name=parallel-n$n
    [ "$spec" != "$n" ] && extra=--unshared-samples && name=$name-unshared
    name=$name$NAME
    timeout "$2" .gpu/bin/vkv bench offline --device cuda --model preset:llama-3-8b \
      --max-num-seqs 256 ${KV:---kv-mode both} --no-enable-prefix-caching --workload alpaca \
      --num-prompts "$1" --n $n $extra \
      --json > $OUT/$name.json 2> $OUT/$name.err
    pack
  done
}

# `vkv bench offline` on the llama-3-8b preset, alpaca (N requests), beam search of width 4, 2
# and 6 (prefix caching off: forks are the only sharing; the report's kv_sharing_saving_mean is
# against every beam holding its own copy), paged then vmm token-major (`--kv-mode both`; KV and
# NAME as for parallel_sampling_runs), each cut at SECONDS, into $OUT/beam-w{W}$NAME.{json,err}:
# beam_search_runs N SECONDS [WIDTHS] (default "4 2 6")
beam_search_runs() {
  local w
  for w in ${3:-4 2 6}; do
    timeout "$2" .gpu/bin/vkv bench offline --device cuda --model preset:llama-3-8b \
      --max-num-seqs 256 ${KV:---kv-mode both} --no-enable-prefix-caching --workload alpaca \
      --num-prompts "$1" --n $w --beam-search \
      --json > $OUT/beam-w$w$NAME.json 2> $OUT/beam-w$w$NAME.err
    pack
  done
}

# The soak of issue 24 in a session of its own (setsid), so that it outlives the call: scripts/soak.py
# against two `vkv serve --device cuda` (paged and vmm, 8 GiB of KV each, SmolLM2 cut to 8 layers,
# prefix caching off: every page must go back), files in /tmp/soak: soak_start MINUTES
soak_start() {
  rm -rf /tmp/soak && mkdir -p /tmp/soak && cp .gpu/bin/vkv .gpu/smol8.gguf scripts/soak.py \
    scripts/vkv_serve.py /tmp/soak/
  date -u > /tmp/soak/started
  for mode in paged vmm; do
    RUST_LOG=warn setsid python3 /tmp/soak/soak.py --vkv /tmp/soak/vkv --minutes "$1" --every 30 \
      --clients 32 --json /tmp/soak/soak-$mode.json -- --device cuda --model /tmp/soak/smol8.gguf \
      --kv-mode $mode --kv-memory 8GiB --no-enable-prefix-caching > /tmp/soak/soak-$mode.txt 2>&1 < /dev/null &
  done
}

# Wait for the soak to end and copy its files to $OUT.
soak_collect() {
  while pgrep -f /tmp/soak/soak.py > /dev/null; do sleep 2; done
  date -u > /tmp/soak/ended
  cp /tmp/soak/soak-* /tmp/soak/started /tmp/soak/ended $OUT/
  pack
}

# Multi-turn chat on the llama-3-8b preset: `vkv bench offline --workload multi-turn:32,4,512,128`
# (closed loop, token ids: each turn's prompt is the last one, the tokens generated and a new user
# message; a preset has no chat template, so HTTP chat is measured on the CPU model), paged then
# vmm token-major, caching on then off, each cut at SECONDS, into
# $OUT/multi-turn-{enable,no-enable}.{json,err}: multi_turn_runs SECONDS
multi_turn_runs() {
  local pc
  for pc in enable no-enable; do
    timeout "$1" .gpu/bin/vkv bench offline --device cuda --model preset:llama-3-8b \
      --max-num-seqs 128 --kv-mode both --$pc-prefix-caching --workload multi-turn:32,4,512,128 \
      --json > $OUT/multi-turn-$pc.json 2> $OUT/multi-turn-$pc.err
    pack
  done
}

# Issue 20's check of `vkv plan` against measured serving on the llama-3-8b preset: `vkv profile`
# through the engine (paged, --max-num-seqs 128) into $OUT/plan-profile.json; one `vkv serve`
# with the same options and `vkv bench serve` (sharegpt, SECONDS of arrivals, default 45) at each
# rate of RATES into $OUT/plan-measured-R.json, the server's /metrics after each (cumulative:
# steps, busy seconds, server-side TPOT / inter-token / TTFT sums, to set against the client's
# and the profile's); then
# `vkv plan --rates R` on the profile with the same request count into $OUT/plan-simulated.txt:
# plan_check_runs "10 20 30 40" [SECONDS]
plan_check_runs() {
  local m="--device cuda --model preset:llama-3-8b --kv-mode paged --max-num-seqs 128"
  local secs=${2:-45}
  timeout 200 .gpu/bin/vkv profile $m --prefill-lens 128,512,1024,2048,4096 \
    --prefill-batches 1,4 --decode-batches 1,8,32,64,128 --contexts 256,1024,4096 --repeats 2 \
    --mixed-chunks 256,1024,1920 --mixed-batch 32 --mixed-context 1024 \
    --out $OUT/plan-profile.json > $OUT/plan-profile.log 2>&1
  pack
  serve_up $m
  for r in $1; do
    timeout $(( secs * 3 )) .gpu/bin/vkv bench serve --url http://127.0.0.1:8077 --workload sharegpt \
      --num-prompts $(( r * secs )) --request-rate $r --goodput ttft:250 tpot:20 --json > $OUT/plan-measured-$r.json 2>&1
    curl -s http://127.0.0.1:8077/metrics | grep -E "^vkv_(num_preemptions|engine_steps|engine_busy|request_success|(time_per_output_token|inter_token_latency|time_to_first_token)_seconds_(sum|count))" > $OUT/plan-metrics-$r.txt
    pack
  done
  kill -INT $serve_pid; wait $serve_pid
  for r in $1; do
    .gpu/bin/vkv plan --profile $OUT/plan-profile.json --rates $r --workload sharegpt \
      --ttft 0.25 --tpot 0.02 --num-requests $(( r * secs )) --min-duration 0 >> $OUT/plan-simulated.txt 2>&1
  done
  pack
}
