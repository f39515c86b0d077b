//! vkv-kernels: device code and its CPU twin.
//!
//! This crate will own the CUDA C++ sources (`kernels/cuda/*.cu`), their run-time compilation by
//! NVRTC for the device's own architecture with an on-disk cache keyed by source, options,
//! architecture and NVRTC version, the Rust launchers with checked shapes, and a CPU reference of
//! every op (f32 accumulation) that is both the CPU device's implementation and the oracle of every
//! GPU test. Attention comes in two addressing modes: **strided** (base pointer + slot, token and
//! head strides: the contiguous kernel that serves both vmm layouts and plain tensors, as in
//! vAttention) and **paged** (a block table, as in vLLM's PagedAttention). It knows nothing about
//! KV modes beyond those two addressing modes. The CPU ops are in [`cpu`]; the CUDA kernels (NVRTC
//! build and cache, decode attention and KV append in both addressing modes) are in [`cuda`], behind
//! the `cuda` feature.

pub mod cpu;
pub mod switches;

pub use switches::{GemmLibrary, RuntimeSwitches};
#[cfg(feature = "cuda")]
pub mod cuda;

/// half, as this crate uses it (bf16 / f16 host values for tests and benchmarks).
pub use half;

/// Names of the two ways a kernel can address the KV cache; the engine picks one per KV mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvAddressing {
    /// Base pointer plus slot / token / head strides (the vmm `KvSpace` and plain tensors).
    Strided,
    /// A block table mapping each sequence's logical blocks to physical blocks.
    Paged,
}
