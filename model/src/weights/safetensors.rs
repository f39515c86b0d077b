//! HF safetensors checkpoints: the `*.safetensors` files of a model directory (one file, or the
//! shards `model-00001-of-0000N.safetensors` of a big model), memory-mapped, with every tensor
//! indexed by name across the files. Tensors are read on request and converted to f32 (from F32,
//! F16 or BF16); nothing else is copied.
//!
//! Invariants: a name is in at most one file (a repeated name is an error, not a silent choice);
//! every tensor's byte range lies within its file and holds exactly `shape`'s elements of its
//! dtype (the `safetensors` crate's header validation, run once per file at open).
//!
//! Format: an 8-byte little-endian header length, a JSON header mapping names to
//! `{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the data
//! (huggingface/safetensors). Errors of a corrupt file are put in words here: the crate's own
//! messages are the names of its enum variants.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensorError};
use safetensors::SafeTensors;

/// Errors of opening or reading a checkpoint; each names the file or tensor and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("reading {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("{dir}: no *.safetensors file")]
    NoFiles { dir: PathBuf },
    #[error("{path} is not a valid safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("tensor {name} is in both {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("tensor {name}: unsupported dtype {dtype:?} (expected F32, F16 or BF16)")]
    Dtype { name: String, dtype: Dtype },
}

/// Where one tensor lies.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    bytes: std::ops::Range<usize>,
}

/// The tensors of one or more safetensors files (see the module docs).
pub struct Checkpoint {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    index: HashMap<String, Entry>,
}

/// The crate's error in words.
fn describe(e: &SafeTensorError, file_len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            format!("{file_len} bytes: too short for the 8-byte header length")
        }
        SafeTensorError::InvalidHeaderLength => format!(
            "the header length (first 8 bytes) points past the end of the file ({file_len} bytes)"
        ),
        SafeTensorError::HeaderTooLarge => "the header is over 100 MB".into(),
        SafeTensorError::InvalidHeader => "the header is not UTF-8 text".into(),
        SafeTensorError::InvalidHeaderStart => "the header does not start with `{`".into(),
        SafeTensorError::InvalidHeaderDeserialization => {
            "the header is not the expected JSON (name → {dtype, shape, data_offsets})".into()
        }
        SafeTensorError::JsonError(j) => format!("the header is not valid JSON: {j}"),
        SafeTensorError::InvalidOffset(name) => format!(
            "the data offsets of tensor {name} do not follow the previous tensor's, or do not \
             match its shape and dtype"
        ),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's shape and dtype do not match its data offsets".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the tensors' data does not end where the file does ({file_len} bytes): truncated \
             or padded"
        ),
        SafeTensorError::ValidationOverflow => {
            "a tensor's shape overflows when multiplied out".into()
        }
        other => format!("{other:?}"),
    }
}

impl Checkpoint {
    /// Every `*.safetensors` file of `dir` (in name order).
    pub fn open_dir(dir: &Path) -> Result<Self, SafetensorsError> {
        let io = |e: std::io::Error| SafetensorsError::Io {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(SafetensorsError::NoFiles {
                dir: dir.to_path_buf(),
            });
        }
        Self::open(&files)
    }

    /// The given files, memory-mapped, their headers validated and indexed.
    pub fn open(paths: &[PathBuf]) -> Result<Self, SafetensorsError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index: HashMap<String, Entry> = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let io = |e: std::io::Error| SafetensorsError::Io {
                path: path.clone(),
                detail: e.to_string(),
            };
            let file = std::fs::File::open(path).map_err(io)?;
            // SAFETY: the file is only read; vkv does not write model files while it runs (a
            // file changed underneath by another program is the one case this cannot guard).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            // Validates the header and every tensor's offsets against the file's length.
            let st = SafeTensors::deserialize(&map).map_err(|e| SafetensorsError::Format {
                path: path.clone(),
                detail: describe(&e, map.len()),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                if let Some(prev) = index.insert(name.clone(), entry) {
                    return Err(SafetensorsError::Duplicate {
                        name,
                        first: paths[prev.file].clone(),
                        second: path.clone(),
                    });
                }
            }
            files.push((path.clone(), map));
        }
        Ok(Checkpoint { files, index })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor's shape and dtype, or `None` when there is no tensor of that name.
    pub fn info(&self, name: &str) -> Option<(&[usize], Dtype)> {
        self.index.get(name).map(|e| (e.shape.as_slice(), e.dtype))
    }

    /// A tensor's values as f32 (row-major, as stored), or `None` when there is no tensor of
    /// that name.
    pub fn to_f32(&self, name: &str) -> Result<Option<Vec<f32>>, SafetensorsError> {
        let Some(e) = self.index.get(name) else {
            return Ok(None);
        };
        let bytes = &self.files[e.file].1[e.bytes.clone()];
        Ok(Some(match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            dtype => {
                return Err(SafetensorsError::Dtype {
                    name: name.into(),
                    dtype,
                })
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// An empty directory, removed when dropped.
    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("vkv-st-{name}-"))
            .tempdir()
            .unwrap()
    }

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
    }

    #[test]
    fn reads_f32_f16_bf16_across_shards() {
        let tmp = scratch("shards");
        let dir = tmp.path();
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let f32b: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        write(
            &dir.join("model-00001-of-00002.safetensors"),
            &[
                ("a", Dtype::F32, vec![2, 2], f32b),
                ("b", Dtype::F16, vec![4], f16b),
            ],
        );
        write(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("c", Dtype::BF16, vec![1, 4], bf16b)],
        );
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let ck = Checkpoint::open_dir(dir).unwrap();
        assert_eq!(ck.names(), ["a", "b", "c"]);
        assert_eq!(ck.info("a"), Some((&[2usize, 2][..], Dtype::F32)));
        assert_eq!(ck.to_f32("a").unwrap().unwrap(), vals);
        let b = ck.to_f32("b").unwrap().unwrap();
        let c = ck.to_f32("c").unwrap().unwrap();
        for (i, x) in vals.iter().enumerate() {
            assert_eq!(b[i], half::f16::from_f32(*x).to_f32());
            assert_eq!(c[i], half::bf16::from_f32(*x).to_f32());
        }
        assert!(ck.to_f32("missing").unwrap().is_none());
    }

    #[test]
    fn corrupt_files_and_odd_contents_are_readable_errors() {
        let tmp = scratch("bad");
        let dir = tmp.path();
        let e = Checkpoint::open_dir(dir).err().unwrap();
        assert!(e.to_string().contains("no *.safetensors file"), "{e}");
        let ok: Vec<u8> = [1f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let good = dir.join("good.safetensors");
        write(&good, &[("w", Dtype::F32, vec![2], ok.clone())]);
        let bytes = std::fs::read(&good).unwrap();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("short", vec![1, 2, 3], "too short"),
            (
                "len",
                {
                    let mut b = bytes.clone();
                    b[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
                    b
                },
                "past the end",
            ),
            (
                "json",
                {
                    let mut b = bytes.clone();
                    b[8] = b'[';
                    b
                },
                "header",
            ),
            ("truncated", bytes[..bytes.len() - 3].to_vec(), "truncated"),
        ];
        for (name, b, needle) in cases {
            let p = dir.join(format!("{name}.safetensors"));
            std::fs::write(&p, b).unwrap();
            let e = Checkpoint::open(std::slice::from_ref(&p)).err().unwrap();
            let s = e.to_string();
            assert!(s.contains(needle) && s.contains(name), "{name}: {s}");
        }
        // The same name in two files.
        let other = dir.join("other.safetensors");
        write(&other, &[("w", Dtype::F32, vec![2], ok)]);
        let e = Checkpoint::open(&[good.clone(), other]).err().unwrap();
        assert!(matches!(e, SafetensorsError::Duplicate { .. }), "{e}");
        // An integer tensor is refused when read, by name.
        let ints = dir.join("ints.safetensors");
        write(&ints, &[("i", Dtype::I32, vec![1], vec![0, 0, 0, 0])]);
        let ck = Checkpoint::open(&[ints]).unwrap();
        let e = ck.to_f32("i").unwrap_err();
        assert!(
            e.to_string().contains("tensor i: unsupported dtype I32"),
            "{e}"
        );
    }
}
