//! vkv-vmm: the virtual-memory KV space.
//!
//! This crate owns virtual address reservations, physical page pools and the mapping between them,
//! and nothing about models or kernels. It is the vAttention design (Prabhu et al., 2024): each
//! request slot of the KV cache is one contiguous range of *virtual* memory reserved up front for
//! the maximum context, and physical pages are mapped into it only as tokens arrive, so ordinary
//! contiguous (strided) attention kernels read it unmodified while the memory actually committed
//! grows page by page, as with vLLM's PagedAttention blocks.
//!
//! The layers, bottom up:
//! - [`PhysicalMemory`]: the backend — reserve a range, create a page, map it at an address, set
//!   access, unmap, release. [`HostVmm`] does it for real on the CPU (an `mmap(PROT_NONE)`
//!   reservation and memfd pages mapped `MAP_FIXED | MAP_SHARED`), [`CudaVmm`] through the CUDA
//!   driver's virtual memory management API, [`AccountingVmm`] only counts (studies of memory far
//!   larger than the machine).
//! - [`PagePool`]: pages created ahead of need (creation is the slow call), handed out and taken
//!   back; every page it created is either free in it or handed out.
//! - [`KvSpace`]: `max_slots × max_tokens` of KV cache in one of two [`KvLayout`]s, with slots,
//!   ensure-backed, release with deferred reclamation, reclaim under pressure, prefix sharing (one
//!   physical page mapped at several addresses), pages kept for a prefix cache ([`PageCache`]:
//!   pinned, evicted on demand) and per-layer [`LayerView`]s for kernels.
//! - [`Mapper`]: a background thread that maps ahead of need and counts every time a caller had to
//!   wait for a page.
//!
//! Invariants (property-tested in `space.rs`): a page is either free in the pool or mapped, with a
//! reference count equal to the number of addresses it is mapped at; no address is mapped twice;
//! once every slot is released and reclaimed the pool holds every page it created.

mod accounting;
pub mod conformance;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
pub mod faults;
mod host;
mod mapper;
mod physical;
mod pool;
mod space;

pub use accounting::AccountingVmm;
#[cfg(feature = "cuda")]
pub use cuda::CudaVmm;
pub use error::{Result, VmmError};
pub use host::HostVmm;
pub use mapper::{Mapper, MapperOptions, MapperStats};
pub use physical::{probe_cuda, CudaProbe, PhysicalMemory, PhysicalPage};
pub use pool::PagePool;
pub use space::{
    AuditError, KvLayout, KvPart, KvSpace, KvSpaceConfig, KvStats, LayerView, PageCache, SlotId,
};

/// cudarc, as this crate uses it (for tests and tools that launch kernels on `CudaVmm` memory).
#[cfg(feature = "cuda")]
pub use cudarc;

/// 2 MiB: the CUDA VMM granularity on current NVIDIA GPUs and the default page size everywhere.
pub const DEFAULT_PAGE_SIZE: usize = 2 << 20;
