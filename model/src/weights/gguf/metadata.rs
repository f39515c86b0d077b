//! The values a GGUF file describes: metadata values ([`MetadataValue`], arrays nested at most
//! [`super::MAX_ARRAY_DEPTH`] deep), ggml tensor types ([`GgmlType`] with ggml's type table of block
//! sizes) and tensor-directory entries ([`TensorInfo`]). Types ggml names but we do not decode are
//! `GgmlType::Other(id)`; sizes are checked arithmetic, so a corrupt dims list is an error, not an
//! overflow. The table follows ggml's `ggml_type_traits` and gguf-py's `GGML_QUANT_SIZES`.

use std::fmt;

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
    pub(super) fn describe(&self) -> String {
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
pub(super) const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
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
