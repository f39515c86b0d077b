#!/usr/bin/env python3
"""Compare vkv's CUDA logits with HF transformers' on the same small random Llama.

`tests/gpu_model.rs` (test `gpu_llama_dump_for_transformers`, run with `VKV_HF_DUMP=DIR`) writes an
HF directory (config.json + model.safetensors, bf16) of a seeded random Llama, the prompt's token
ids (tokens.json) and vkv's bf16 CUDA logits for every prompt position (vkv_logits.f32, raw
little-endian f32 [tokens][vocab]). This script runs the directory through
`transformers.AutoModelForCausalLM` on the GPU in bf16 (and in f32 as the reference both are
measured against) and prints the relative L2 error per row and the argmax agreement.

    python3 scripts/compare_hf.py DIR [--tol 5e-2]

Exit code 1 when vkv's error against the f32 reference exceeds --tol on any row, or when it is
worse than 3x transformers' own bf16 error on the whole.
"""
import argparse
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--tol", type=float, default=5e-2)
    a = ap.parse_args()
    tokens = json.load(open(f"{a.dir}/tokens.json"))
    cfg = json.load(open(f"{a.dir}/config.json"))
    vocab = cfg["vocab_size"]
    vkv = np.fromfile(f"{a.dir}/vkv_logits.f32", dtype="<f4").reshape(len(tokens), vocab)
    ids = torch.tensor([tokens], device="cuda")
    out = {}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        m = AutoModelForCausalLM.from_pretrained(a.dir, torch_dtype=dtype).to("cuda").eval()
        with torch.no_grad():
            out[name] = m(ids).logits[0].float().cpu().numpy()
        del m
    ref = out["f32"]

    def rel(x):
        return np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)

    e_vkv, e_hf = rel(vkv), rel(out["bf16"])
    agree_vkv = float((vkv.argmax(1) == ref.argmax(1)).mean())
    agree_hf = float((out["bf16"].argmax(1) == ref.argmax(1)).mean())
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")
    print(f"rows {len(tokens)}, vocab {vocab}")
    print(f"vkv CUDA bf16 vs HF f32: max rel err {e_vkv.max():.2e}, mean {e_vkv.mean():.2e}, "
          f"argmax agreement {agree_vkv:.3f}")
    print(f"HF bf16       vs HF f32: max rel err {e_hf.max():.2e}, mean {e_hf.mean():.2e}, "
          f"argmax agreement {agree_hf:.3f}")
    ok = e_vkv.max() <= a.tol and e_vkv.mean() <= 3 * max(e_hf.mean(), 1e-4)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
