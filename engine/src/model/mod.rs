//! Models: the Llama family (Llama 2/3, Mistral, SmolLM2) — configuration and named presets
//! (`config`), weights from GGUF or safetensors or seeded random, the batched CPU forward pass
//! (`llama`) and, with the `cuda` feature, the bf16 GPU forward pass with its own KV cache
//! (`cuda`).

mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod llama;

pub use config::LlamaConfig;
pub use llama::{DenseLayer, Llama, SeqChunk};

use crate::kv::KvError;
use crate::weights::gguf::GgufError;
use crate::weights::safetensors::SafetensorsError;

/// Errors of loading or running a model; each names what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture {0}: vkv runs the Llama family (llama, mistral)")]
    UnsupportedArchitecture(String),
    #[error("model configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("tensor {name}: {detail}")]
    Tensor { name: String, detail: String },
    #[error("reading {path}: {detail}")]
    Io { path: String, detail: String },
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("batch: {0}")]
    Batch(String),
}
