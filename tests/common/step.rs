//! One model step without the scheduler, for tests that drive a model directly: reserve the
//! batch's KV (what the scheduler does before every step; the forward passes never reserve),
//! then run the pass.
#![allow(dead_code)]

#[cfg(feature = "cuda")]
use vkv_engine::kv::GpuKv;
use vkv_engine::kv::KvCache;
#[cfg(feature = "cuda")]
use vkv_engine::model::cuda::{CudaLlama, CudaModelError};
use vkv_engine::model::{reserve_batch, Llama, ModelError, SeqChunk};

/// `reserve_batch`, then [`Llama::forward`].
pub trait CpuStep {
    fn step(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &mut dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}

impl CpuStep for Llama {
    fn step(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &mut dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        reserve_batch(kv.manager_mut(), batch)?;
        self.forward(batch, kv)
    }
}

/// `reserve_batch`, then the CUDA forward pass.
#[cfg(feature = "cuda")]
pub trait GpuStep {
    fn step(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &mut GpuKv,
    ) -> Result<Vec<Vec<f32>>, CudaModelError>;
    fn step_greedy(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &mut GpuKv,
    ) -> Result<Vec<u32>, CudaModelError>;
}

#[cfg(feature = "cuda")]
impl GpuStep for CudaLlama {
    fn step(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &mut GpuKv,
    ) -> Result<Vec<Vec<f32>>, CudaModelError> {
        reserve_batch(kv, batch)?;
        self.forward(batch, kv)
    }

    fn step_greedy(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &mut GpuKv,
    ) -> Result<Vec<u32>, CudaModelError> {
        reserve_batch(kv, batch)?;
        self.forward_greedy(batch, kv)
    }
}
