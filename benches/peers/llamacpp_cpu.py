#!/usr/bin/env python3
"""llama.cpp's CPU throughput on the same model and measurements as `vkv bench generate`.

Through llama-cpp-python's low-level API (built from source: CMAKE_ARGS="-DGGML_NATIVE=OFF"
pip install llama-cpp-python): prefill of a 128-token prompt (median of 3), greedy decode of
64 tokens for one sequence, and 8 sequences decoding together in one llama_batch per step —
the same prompts' shape (seeded random token ids) and thread count as vkv's measurement.

    python3 benches/peers/llamacpp_cpu.py MODEL.gguf [--threads 2] [--prompt-tokens 128]
        [--decode-tokens 64] [--batch 8] [--json]
"""
import argparse
import ctypes
import json
import random
import statistics
import time

import llama_cpp as L
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    L.llama_backend_init()
    model = L.llama_model_load_from_file(a.model.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    seqs = max(a.batch, 3)
    p = L.llama_context_default_params()
    p.n_seq_max = seqs
    p.n_ctx = seqs * (a.prompt_tokens + a.decode_tokens + 16)
    p.n_batch = p.n_ubatch = max(a.prompt_tokens, seqs)
    p.n_threads = p.n_threads_batch = a.threads
    p.kv_unified = True
    ctx = L.llama_init_from_model(model, p)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(max(a.prompt_tokens, seqs), 0, seqs)
    rng = random.Random(7)
    prompts = [[rng.randrange(256, n_vocab) for _ in range(a.prompt_tokens)] for _ in range(seqs)]

    def decode(entries):
        """entries: (token, pos, seq, want_logits)."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if out else 0
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode failed: {rc}")

    def argmax(i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def prefill(seq):
        n = len(prompts[seq])
        decode([(t, j, seq, j == n - 1) for j, t in enumerate(prompts[seq])])
        return argmax(n - 1)

    rates = []
    for s in range(3):
        t = time.perf_counter()
        prefill(s)
        rates.append(a.prompt_tokens / (time.perf_counter() - t))
        L.llama_memory_seq_rm(mem, s, -1, -1)
    prefill_rate = statistics.median(rates)

    def decode_rate(n):
        nxt = [prefill(s) for s in range(n)]
        t = time.perf_counter()
        for step in range(a.decode_tokens):
            decode([(nxt[s], a.prompt_tokens + step, s, True) for s in range(n)])
            nxt = [argmax(s) for s in range(n)]
        rate = n * a.decode_tokens / (time.perf_counter() - t)
        for s in range(n):
            L.llama_memory_seq_rm(mem, s, -1, -1)
        return rate

    single = decode_rate(1)
    batched = decode_rate(a.batch)
    result = {
        "peer": f"llama.cpp (llama-cpp-python {L.__version__})",
        "threads": a.threads,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "batch": a.batch,
        "prefill_tokens_per_s": prefill_rate,
        "decode_tokens_per_s": single,
        "batch_decode_tokens_per_s": batched,
    }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"llama.cpp on the CPU ({a.threads} threads)")
        print(f"prefill ({a.prompt_tokens} tokens):           {prefill_rate:8.1f} tokens/s")
        print(f"decode, 1 sequence:            {single:8.1f} tokens/s")
        print(f"decode, {a.batch} sequences together: {batched:8.1f} tokens/s")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
