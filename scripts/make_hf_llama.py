#!/usr/bin/env python3
"""Write small random Llamas with HF transformers, and transformers' own logits for them.

The other direction of `scripts/compare_hf.py`: here transformers makes the model
(`LlamaForCausalLM`, fixed seed, `save_pretrained` as safetensors), so vkv's HF loader
(`model/src/weights/safetensors.rs`, `Llama::from_hf_dir`) is checked against checkpoints
written the way real ones are, Q/K row order and all. `tests/gpu_hf.rs` (with `VKV_HF_DIR=OUT`)
loads each directory and compares vkv's CPU (f32) and CUDA (bf16; paged and vmm KV) logits and
greedy tokens with these.

    python3 scripts/make_hf_llama.py OUT

Writes OUT/<name>/ for two models:
  gqa-llama3-bf16: hidden 512, 4 layers, 8 query heads of 64, 2 KV heads (GQA), vocab 1000,
                   rope_theta 10000 with llama3 rope scaling (factor 8, original context 64),
                   untied output head, saved in bf16;
  gqa-tied-f32:    the same shape, no rope scaling, tied embeddings, saved in f32.
Each holds config.json, model.safetensors (no tokenizer: token-id prompts only), and
  reference.json: prompts (token ids), greedy continuations by transformers in f32, versions, GPU;
  logits_f32_<i>.bin, logits_bf16_<i>.bin: little-endian f32 [len(prompt i)][vocab], transformers'
  logits for every position of prompt i, computed on the GPU in f32 (TF32 off, eager attention)
  and with the model cast to bf16.
Weights are re-drawn after init with unit-variance scales (Linear uniform in +-sqrt(3/fan_in),
embedding N(0, 1), norm weights 1 + U(-0.1, 0.1)), so logits spread over several units and
greedy choices are not near-ties, as they would be with HF's default init (std 0.02).
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 1000
GREEDY_TOKENS = 16


def prompts():
    # Fixed token ids, lengths 1, 7, 64 and 200 (past the original context of the rope scaling).
    out = []
    for seed, n in [(1, 1), (2, 7), (3, 64), (4, 200)]:
        out.append([(seed * 7919 + i * 104729 + i * i * 31) % VOCAB for i in range(n)])
    return out


def load(d, dtype):
    # transformers 5 renamed `torch_dtype` to `dtype`; 4.x knows only the old name.
    kw = {"attn_implementation": "eager"}
    try:
        m = LlamaForCausalLM.from_pretrained(d, dtype=dtype, **kw)
        if m.dtype == dtype:
            return m
    except TypeError:
        pass
    return LlamaForCausalLM.from_pretrained(d, torch_dtype=dtype, **kw)


def make(name, out_dir, scaling, tied, dtype):
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=(
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
            if scaling
            else None
        ),
        tie_word_embeddings=tied,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for mod_name, p in model.named_parameters():
            if p.dim() == 2 and "embed_tokens" in mod_name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2:
                bound = (3.0 / p.shape[1]) ** 0.5
                p.uniform_(-bound, bound)
            else:
                p.uniform_(0.9, 1.1)
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    if dtype == torch.bfloat16:
        # Round in place so the saved bf16 checkpoint is exactly the f32 model evaluated below.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    try:
        model.to(dtype).save_pretrained(d, safe_serialization=True)
    except TypeError:  # a transformers without the argument writes safetensors anyway
        model.to(dtype).save_pretrained(d)
    assert os.path.exists(os.path.join(d, "model.safetensors")), os.listdir(d)
    model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ps = prompts()
    ref = {
        "prompts": ps,
        "vocab_size": VOCAB,
        "saved_dtype": str(dtype),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "greedy_f32": [],
    }
    f32 = load(d, torch.float32).to("cuda").eval()
    bf16 = load(d, torch.bfloat16).to("cuda").eval()
    assert f32.dtype == torch.float32 and bf16.dtype == torch.bfloat16, (f32.dtype, bf16.dtype)
    with torch.no_grad():
        for i, p in enumerate(ps):
            ids = torch.tensor([p], device="cuda")
            for tag, m in [("f32", f32), ("bf16", bf16)]:
                logits = m(ids).logits[0].float().cpu().numpy().astype("<f4")
                assert logits.shape == (len(p), VOCAB), logits.shape
                logits.tofile(os.path.join(d, f"logits_{tag}_{i}.bin"))
            # Greedy continuation in f32, recomputing the whole sequence each step (no cache).
            seq = list(p)
            for _ in range(GREEDY_TOKENS):
                nxt = int(f32(torch.tensor([seq], device="cuda")).logits[0, -1].argmax())
                seq.append(nxt)
            ref["greedy_f32"].append(seq[len(p):])
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    files = sorted(os.listdir(d))
    print(f"{name}: {', '.join(files)}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")
    make("gqa-llama3-bf16", out, scaling=True, tied=False, dtype=torch.bfloat16)
    make("gqa-tied-f32", out, scaling=False, tied=True, dtype=torch.float32)


if __name__ == "__main__":
    main()
