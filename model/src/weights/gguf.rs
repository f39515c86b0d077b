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

mod dequant;
mod metadata;
mod parse;
pub use dequant::dequantize;
#[cfg(test)]
use metadata::GGML_TYPES;
pub use metadata::{GgmlType, MetadataValue, TensorInfo};
use parse::parse;

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

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
