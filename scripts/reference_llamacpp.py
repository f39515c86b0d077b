#!/usr/bin/env python3
"""Record llama.cpp's outputs on SmolLM2 as the reference vkv is checked against.

llama.cpp (through llama-cpp-python, built from source: `CMAKE_ARGS="-DGGML_NATIVE=OFF"
pip install llama-cpp-python`) is an independent implementation of the same GGUF model: its own
tokenizer, dequantization and forward pass. For each prompt this records

- the token ids llama.cpp's tokenizer gives (vkv's tokenizer must agree),
- the logits at the last prompt position for the 64 most likely tokens and for 1024 fixed
  random token ids (seeded), so the comparison covers the whole vocabulary's range,
- the first 32 tokens of llama.cpp's greedy continuation,
- log-probabilities for the first 8 of them (`greedy_logprobs`): for each, the log-softmax of the
  full logit row it was chosen from (the last prompt position, then each greedy step's), computed
  here in float64 over the whole vocabulary: the token's log-probability and the 5 most likely
  tokens with theirs, most likely first.

It does this twice:

- `f32`: on an F32 copy of the model that llama.cpp's own quantize tool writes by dequantizing
  the Q4_1 file (`allow_requantize`). Same weights as vkv uses, computed in f32 on both sides:
  the strict comparison.
- `q4_1`: on the Q4_1 file itself, where llama.cpp quantizes activations to 8 bits for its
  Q4_1 x Q8_1 dot products, so logits move by up to a few tenths and greedy choices at near-ties
  can differ: the loose comparison.

Output: model/tests/fixtures/reference/smollm2_llamacpp.json (committed; the Rust test
`tests/model_reference.rs` reads it, so CI needs neither llama.cpp nor Python).

    python3 scripts/reference_llamacpp.py [PATH_TO_GGUF]
"""
import json
import os
import random
import sys

import llama_cpp
import numpy as np

LOGPROB_STEPS = 8
LOGPROB_TOP = 5

DEFAULT = os.path.expanduser("~/.cache/vkv/models/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat are three uses of a paperclip?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived",
]


def logprobs(row, token):
    """`token`'s log-probability in the logit row and the LOGPROB_TOP most likely (ties: lower id
    first), from a float64 log-softmax over the whole row."""
    row = np.array(row, dtype=np.float64)
    m = row.max()
    lp = row - (m + np.log(np.exp(row - m).sum()))
    top = np.argsort(-lp, kind="stable")[:LOGPROB_TOP]
    return {
        "token": token,
        "logprob": float(lp[token]),
        "top": [[int(i), float(lp[i])] for i in top],
    }


def record(path, sample_ids):
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    cases = []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
        top = [int(i) for i in np.argsort(-logits)[:64]]
        # Greedy: evaluate token by token so llama.cpp's own logits choose each next token.
        greedy = []
        greedy_logprobs = []
        for step in range(32):
            row = llm.scores[llm.n_tokens - 1]
            nxt = int(np.argmax(row))
            greedy.append(nxt)
            if step < LOGPROB_STEPS:
                greedy_logprobs.append(logprobs(row, nxt))
            llm.eval([nxt])
        cases.append({
            "prompt": prompt,
            "ids": ids,
            "top_ids": top,
            "top_logits": [float(logits[i]) for i in top],
            "sample_ids": sample_ids,
            "sample_logits": [float(logits[i]) for i in sample_ids],
            "greedy": greedy,
            "greedy_logprobs": greedy_logprobs,
        })
    return cases


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("VKV_TEST_GGUF", DEFAULT)
    f32_path = "/tmp/vkv-reference-smollm2-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(path.encode(), f32_path.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize to F32 failed: {rc}")
    n_vocab = llama_cpp.Llama(model_path=path, n_ctx=16, vocab_only=True, verbose=False).n_vocab()
    sample_ids = sorted(random.Random(1234).sample(range(n_vocab), 1024))
    out = {
        "reference": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, n_threads=2, CPU",
        "model": os.path.basename(path),
        "f32": record(f32_path, sample_ids),
        "q4_1": record(path, sample_ids),
    }
    os.remove(f32_path)
    dest = os.path.join(os.path.dirname(__file__), "..", "model", "tests", "fixtures", "reference", "smollm2_llamacpp.json")
    with open(dest, "w") as f:
        json.dump(out, f)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
