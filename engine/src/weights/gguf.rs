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
#[path = "gguf_tests.rs"]
mod tests;
