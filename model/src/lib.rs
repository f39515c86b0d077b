//! Models: everything about a model that is not serving it — the Llama family (Llama 2/3,
//! Mistral, SmolLM2) configuration and named presets (`config`, [`presets`]), weights from GGUF
//! ([`weights::gguf`]) or safetensors ([`weights::safetensors`]) or seeded random, the tokenizer
//! and chat templates ([`tokenizer`]), fetching the default model ([`fetch`]), loading all of it
//! ([`loaded`]), the batched CPU forward pass (`llama`) and, with the `cuda` feature, the bf16
//! GPU forward pass ([`cuda`]). Both forward passes read KV memory the `vkv-kv` crate owns and
//! the scheduler reserved: a forward pass never reserves, it checks that every chunk's tokens are
//! backed ([`reserve_batch`] is the reservation for callers that run a model without the
//! scheduler: single-sequence generation, tests, benchmarks). This crate knows nothing of
//! requests, scheduling or HTTP.

mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fetch;
mod llama;
pub mod loaded;
pub mod presets;
pub mod tokenizer;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{DenseLayer, Llama, SeqChunk};
pub use loaded::{load_model, load_preset, LoadError, LoadedModel, ModelWeights};

use vkv_kv::{KvCache, KvDims, KvError, KvManager};

use crate::weights::gguf::GgufError;
use crate::weights::safetensors::SafetensorsError;

/// The next token of a chunk, or the logits to sample it from: what a forward pass gives the
/// engine per sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Picked on the device (greedy).
    Token(u32),
    /// Logits (`vocab_size` f32 per row), for the host's sampler: the chunk's last token's, or
    /// with [`SeqChunk::all_logits`] every token's, in order (the last row samples).
    Logits(Vec<f32>),
}

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

impl LlamaConfig {
    /// The shape of the KV cache this model needs.
    pub fn kv_dims(&self) -> KvDims {
        KvDims {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// Reserve every chunk's tokens in `kv` (what the scheduler does before each step), for callers
/// that run a model without the scheduler. A chunk must start at or before what its sequence
/// already holds (its earlier tokens are in the cache). All or nothing per chunk; an
/// out-of-memory error leaves earlier chunks reserved (the caller frees).
pub fn reserve_batch(kv: &mut dyn KvManager, batch: &[SeqChunk<'_>]) -> Result<(), ModelError> {
    for chunk in batch {
        let held = kv.reserved(chunk.seq).unwrap_or(0);
        if chunk.start > held {
            return Err(ModelError::Batch(format!(
                "sequence {} starts at {} but its cache holds {held} tokens",
                chunk.seq, chunk.start
            )));
        }
        kv.reserve(chunk.seq, chunk.start + chunk.tokens.len())?;
    }
    Ok(())
}

/// One step for callers that run a model without the scheduler (single-sequence generation,
/// tests, benchmarks): [`reserve_batch`], then the forward pass.
impl Llama {
    pub fn step(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &mut dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        reserve_batch(kv.manager_mut(), batch)?;
        self.forward(batch, kv)
    }
}

#[cfg(feature = "cuda")]
impl cuda::CudaLlama {
    /// [`reserve_batch`], then [`cuda::CudaLlama::forward`].
    pub fn step(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &mut vkv_kv::GpuKv,
    ) -> Result<Vec<Vec<f32>>, cuda::CudaModelError> {
        reserve_batch(kv, batch)?;
        self.forward(batch, kv)
    }

    /// [`reserve_batch`], then [`cuda::CudaLlama::forward_greedy`].
    pub fn step_greedy(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &mut vkv_kv::GpuKv,
    ) -> Result<Vec<u32>, cuda::CudaModelError> {
        reserve_batch(kv, batch)?;
        self.forward_greedy(batch, kv)
    }
}
