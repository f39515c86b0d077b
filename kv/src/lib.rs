//! KV memory: every KV cache the engine runs on, on every device, and the books the scheduler
//! keeps through them. This module is the one owner of KV memory; the forward passes only read
//! the addresses it hands out, and the scheduler is the only code that reserves.
//!
//! - [`KvManager`] (`manager.rs`): the books of any cache — capacity, `reserve` / `free` / `fork`
//!   per sequence, usage, audit — with [`MapAhead`], the vmm-only capabilities (map-ahead, warm
//!   slots, admission preparation), reached through [`KvManager::map_ahead`], and
//!   [`PrefixCache`], automatic prefix caching, reached through [`KvManager::prefix_cache`]. [`KvMode`] and its
//!   one sizing function ([`KvMode::units_for`]) turn a byte budget into blocks or pages.
//! - The PagedAttention path (vLLM, Kwon et al. 2023; `block.rs`, `paged.rs`): [`BlockAllocator`]
//!   (fixed-size blocks from one preallocated pool, reference-counted so that forks share them)
//!   and per-sequence [`BlockTable`]s, in [`PagedKv`], generic over where the pool's bytes are
//!   ([`BlockStorage`]: host memory here, device memory in `cuda.rs`).
//! - The vAttention path (`vmm.rs`): [`VmmManager`], a [`vkv_vmm::KvSpace`] (one contiguous
//!   virtual range per sequence, refcounted physical pages) driven by its `Mapper` thread, on any
//!   `PhysicalMemory` — [`VmmKv`] on host memory, the CUDA cache on `CudaVmm`.
//! - [`GpuKv`] (`cuda.rs`, feature `cuda`): the device caches of the CUDA forward pass, the same
//!   two books over device memory.
//! - [`ContiguousArena`] (`arena.rs`): one contiguous range per request inside a fixed arena,
//!   first fit — how engines before PagedAttention kept the KV cache. Serving never uses it;
//!   `vkv frag` does, as the baseline.
//! - [`PrefixIndex`] (`prefix.rs`): the prefix-cache index of automatic prefix caching (vLLM
//!   V1's chained block keys, LRU among unreferenced units), over any unit of memory — a block
//!   here, the pages of a page row of the vmm cache. [`PagedKv::with_prefix_caching`] and
//!   [`VmmManager::with_prefix_caching`] (`VmmKv`'s, `GpuKv`'s) use it.
//! - [`export_kv`] / [`import_kv`] (`handoff.rs`): a sequence's KV out of one host cache as a
//!   [`KvBlob`] and into another — the KV handoff of disaggregated prefill and decode.
//! - `conformance.rs`: the checks every cache must pass (random reserve / fork / free / preempt
//!   sequences, audited after every operation, empty at the end), run on the CPU caches in unit
//!   tests and on the GPU caches by `tests/gpu_kv.rs`.

mod arena;
mod block;
pub mod conformance;
#[cfg(feature = "cuda")]
mod cuda;
mod handoff;
mod manager;
mod paged;
mod prefix;
mod vmm;

pub use arena::ContiguousArena;
pub use block::{BlockAllocator, BlockId, BlockTable};
#[cfg(feature = "cuda")]
pub use cuda::{DevicePools, GpuKv, GpuKvAddressing};
pub use handoff::{
    export_kv, import_kv, prompt_hash, HandoffError, KvBlob, TransferStats, WireOrder,
};
pub use manager::{
    KvBudget, KvCache, KvCacheDtype, KvDims, KvManager, KvMode, KvUsage, LikelyAdmission, MapAhead,
    PrefixCache, SeqId, VmmShape,
};
pub use paged::{BlockStorage, HostPools, NoPools, PagedKv};
pub use prefix::{
    block_keys, BlockKey, CachedBlock, Inserted, PrefixError, PrefixIndex, PrefixMatch, PrefixStats,
};
pub use vmm::{VmmKv, VmmManager};

/// The small shape the unit tests of this module run their caches at.
#[cfg(test)]
const TEST_DIMS: KvDims = KvDims {
    num_layers: 2,
    num_kv_heads: 2,
    head_dim: 16,
};

/// Errors of the KV caches.
#[derive(Debug, thiserror::Error)]
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
    #[error("sequence {seq} already holds KV memory")]
    AlreadyAllocated { seq: SeqId },
    #[error("invalid KV configuration: {0}")]
    InvalidConfig(String),
    #[error("out of KV memory: {detail}")]
    OutOfMemory { detail: String },
    #[error("block {block} is {found}; expected a block {expected}")]
    BlockState {
        block: BlockId,
        expected: &'static str,
        found: String,
    },
    #[error("the KV books are inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Prefix(#[from] PrefixError),
    #[error(transparent)]
    Vmm(#[from] vkv_vmm::VmmError),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Device(#[from] vkv_kernels::cuda::KernelError),
}
