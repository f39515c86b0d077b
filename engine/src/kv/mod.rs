//! KV-cache memory managers of the engine.
//!
//! - [`BlockAllocator`] and [`BlockTable`]: the PagedAttention path (vLLM, Kwon et al. 2023) —
//!   fixed-size blocks of `block_size` tokens from one preallocated pool, a table per sequence
//!   mapping its logical blocks to physical ones, allocated as tokens arrive; reference counts
//!   let blocks be shared between sequences (prefix sharing).
//! - [`ContiguousArena`]: one contiguous range per request inside a fixed arena, first fit — how
//!   engines before PagedAttention (FasterTransformer, Orca) kept the KV cache. Serving never uses
//!   it; `vkv frag` does, as the baseline the other two are measured against.
//! - The vmm path is [`vkv_vmm::KvSpace`], used directly.
//!
//! All three are the code that both serving and the fragmentation study run.

mod arena;
mod block;
mod cache;

pub use arena::ContiguousArena;
pub use block::{BlockAllocator, BlockId, BlockTable};
pub use cache::{
    KvCache, KvCacheDtype, KvDims, KvManager, KvMode, KvUsage, PagedKv, SeqId, VmmKv, VmmManager,
};

/// Errors of the KV managers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("out of KV blocks: {needed} needed, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("no contiguous range of {len} units: {free} free in all, the largest hole is {largest_hole}")]
    NoContiguousSpace {
        len: usize,
        free: usize,
        largest_hole: usize,
    },
    #[error("{what} is not allocated")]
    NotAllocated { what: String },
    #[error("invalid KV configuration: {0}")]
    InvalidConfig(String),
    #[error("out of KV memory: {detail}")]
    OutOfMemory { detail: String },
    #[error("vmm: {0}")]
    Vmm(String),
}
