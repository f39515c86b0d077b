#!/usr/bin/env python3
"""A `vkv plan` profile from `vkv bench model --json` rows, for a card where `vkv profile` has
not run yet (docs/plan.md's H100 profile of llama-3-8b comes from here).

`vkv bench model` times whole forward passes without the engine around them:
- prefill: `batch` prompts of `context` tokens in calls of `prefill_call_tokens` tokens — each
  call is one prefill sample (lens = the call's prompts), its seconds = call tokens / the row's
  prefill tokens/s; these are fitted by `vkv plan` as any measured samples;
- decode: one step of `batch` sequences at ~`context` tokens. Every row has the same context,
  so the context term cannot be fitted from them: it is set to the KV bytes a token adds to a
  step's reads over the copy bandwidth measured in the same run, and the constant and the
  per-sequence term are fitted (least squares) to the steps less that term. The profile says
  so in its `modelled` field, and every plan made with it repeats it.

Usage: profile_from_bench_model.py --kv-mode paged --kv-capacity-tokens N --max-num-seqs S
           --out P.json ROWS.json [ROWS.json ...]
"""

import argparse
import json
import sys

# llama-3-8b (meta-llama/Meta-Llama-3-8B config.json), as `vkv profile` records it.
SHAPES = {
    "llama-3-8b": {
        "layers": 32,
        "hidden": 4096,
        "intermediate": 14336,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 128256,
        "parameters": 8030261248,
    }
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="vkv bench model --json outputs")
    ap.add_argument("--kv-mode", default="paged")
    ap.add_argument("--kv-capacity-tokens", type=int, required=True)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--date", required=True, help="the date of the measurements")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    device, preset, copy_bw = None, None, None
    prefill, decode = {}, {}
    for path in args.rows:
        with open(path) as f:
            doc = json.load(f)
        device = device or doc["device"]
        preset = preset or doc["preset"]
        if doc["preset"] != preset or doc["device"] != device:
            sys.exit(f"{path}: {doc['preset']} on {doc['device']}, not {preset} on {device}")
        copy_bw = copy_bw or doc["copy_tb_per_s"] * 1e12
        for r in doc["rows"]:
            if r["kv_mode"] != args.kv_mode:
                continue
            call = r["prefill_call_tokens"]
            lens = [r["context"]] * (call // r["context"])
            prefill.setdefault(tuple(lens), call / r["prefill_tokens_per_s"])
            decode.setdefault(r["batch"], (r["context"], r["decode_step_ms"] / 1e3))
    if preset not in SHAPES:
        sys.exit(f"no shape for {preset}")
    shape = SHAPES[preset]
    token_bytes = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2
    # The context term: a token's K and V read once per step at the measured copy bandwidth.
    b = token_bytes / copy_bw
    rows = [(batch, batch * ctx, s - b * batch * ctx) for batch, (ctx, s) in decode.items()]
    if len(rows) < 2:
        sys.exit("need decode rows at two batch sizes at least")
    n = len(rows)
    mx = sum(r[0] for r in rows) / n
    my = sum(r[2] for r in rows) / n
    c = sum((r[0] - mx) * (r[2] - my) for r in rows) / sum((r[0] - mx) ** 2 for r in rows)
    a = my - c * mx
    profile = {
        "device": f"cuda ({device})",
        "model": preset,
        "date": args.date,
        "tensor_parallel": 1,
        "kv_bytes_per_token": token_bytes,
        "kv_capacity_tokens": args.kv_capacity_tokens,
        "max_model_len": args.max_model_len,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "kv_block_tokens": 16 if args.kv_mode == "paged" else 0,
        "shape": shape,
        "modelled": (
            f"from vkv bench model rows ({', '.join(args.rows)}): prefill calls measured and "
            f"fitted; decode steps measured at one context, so the context term is the KV "
            f"bytes per token over the copy bandwidth of the same run ({copy_bw / 1e12:.2f} TB/s); "
            f"forward passes without the engine's scheduling and sampling"
        ),
        "prefill_samples": [{"lens": list(k), "seconds": v} for k, v in sorted(prefill.items())],
        "decode_samples": [],
        # Refitted by `vkv plan` from the samples.
        "prefill": {"a": 0.0, "b": 0.0, "c": 0.0},
        "decode": {"a": a, "b": b, "c": c},
    }
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    print(json.dumps(profile, indent=1))


if __name__ == "__main__":
    main()
