#!/usr/bin/env python3
"""Write a smaller copy of a Llama GGUF for GPU test machines that cannot download models: the
first N transformer blocks only (block_count set to N), the token embedding requantized to Q4_0,
every other tensor and all metadata (tokenizer included) as they are. The result is a real model's
weights (peaked, stable argmaxes), small enough to travel with a GPU bundle.

    python3 scripts/gguf_truncate.py IN.gguf OUT.gguf --layers 8
"""
import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    r = GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(a.dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = f.contents()
        if name == f"{arch}.block_count":
            value = a.layers
        vtype = f.types[0]
        sub = f.types[1] if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= a.layers:
            continue
        shape = [int(x) for x in reversed(t.shape)]  # row-major, outermost first
        if t.name == "token_embd.weight" and t.tensor_type != GGMLQuantizationType.Q4_0:
            dense = quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            data = quants.quantize(dense, GGMLQuantizationType.Q4_0)
            w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
