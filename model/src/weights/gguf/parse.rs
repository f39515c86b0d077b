//! Parsing the GGUF header: a bounds-checked little-endian [`Reader`] over the bytes, the metadata
//! value types, and [`parse`], which reads the header, metadata and tensor directory and checks every
//! tensor against the data section. Invariant: every count is checked against the bytes left before
//! anything is allocated for it, and all offset arithmetic is checked, so a corrupt file is a
//! [`GgufError`] and never a panic or a huge allocation (the cargo-fuzz target in `fuzz/` drives this).

use std::collections::BTreeMap;

use super::{
    GgmlType, GgufError, MetadataValue, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH,
    MAX_DIMS,
};

/// Bounds-checked little-endian cursor over the file. `what` closures describe the field for error
/// messages and run only on error.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(super) fn take(&mut self, n: u64, what: What) -> Result<&'a [u8], GgufError> {
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

    pub(super) fn bytes<const N: usize>(&mut self, what: What) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u8(&mut self, what: What) -> Result<u8, GgufError> {
        Ok(self.bytes::<1>(what)?[0])
    }
    pub(super) fn u16(&mut self, what: What) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.bytes(what)?))
    }
    pub(super) fn u32(&mut self, what: What) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }
    pub(super) fn u64(&mut self, what: What) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    pub(super) fn string(&mut self, what: What) -> Result<String, GgufError> {
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

    pub(super) fn value(
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
    pub(super) fn from_id(id: u32) -> Option<Self> {
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

    pub(super) fn name(self) -> &'static str {
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

pub(super) fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
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

pub(super) struct Parsed {
    pub(super) version: u32,
    pub(super) metadata: BTreeMap<String, MetadataValue>,
    pub(super) tensors: Vec<TensorInfo>,
    pub(super) index: BTreeMap<String, usize>,
    pub(super) alignment: u64,
    pub(super) data_offset: u64,
}
