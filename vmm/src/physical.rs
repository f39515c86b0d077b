//! `PhysicalMemory`: the one trait every backend implements — reserve virtual address ranges,
//! create physical pages, map a page at an address, enable access, unmap, release.
//!
//! The verbs are the CUDA driver's virtual memory management API (`cuMemAddressReserve`,
//! `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`, `cuMemUnmap`, `cuMemRelease`, `cuMemAddressFree`),
//! which vAttention uses; the host backend reproduces them with `mmap` and a memfd so that the
//! whole KV machinery runs, for real, on a machine without a GPU.
//!
//! Safety model: mapping and unmapping are safe to call — backends check that the range lies in
//! one of their own reservations (the host backend) or the driver checks (CUDA). Moving bytes
//! (`read`, `write`, `copy`) is `unsafe`: the caller guarantees the range is mapped, which
//! [`crate::KvSpace`] does for its checked accessors.

use crate::Result;

/// A physical page created by a backend: an opaque handle (a memfd offset on the host, a
/// `CUmemGenericAllocationHandle` on CUDA, a counter for accounting) and its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhysicalPage {
    pub handle: u64,
    pub size: usize,
}

/// A backend of physical memory with virtual address reservations (see the module docs).
pub trait PhysicalMemory: Send + Sync + std::fmt::Debug {
    /// Short name for messages and benchmark tables: `host`, `cuda`, `accounting`.
    fn name(&self) -> &'static str;

    /// The smallest page size (and alignment of sizes and offsets) the backend can map, in bytes.
    fn granularity(&self) -> usize;

    /// Whether pages hold real bytes (false for the accounting backend).
    fn holds_bytes(&self) -> bool {
        true
    }

    /// Reserve `bytes` of virtual address space (a multiple of the granularity), aligned to
    /// `alignment`; nothing is backed yet. Returns the base address.
    fn reserve(&self, bytes: usize, alignment: usize) -> Result<u64>;

    /// Give back a reservation made by [`reserve`](Self::reserve); its pages must be unmapped.
    fn free_reservation(&self, addr: u64, bytes: usize) -> Result<()>;

    /// Create one physical page of `size` bytes (a multiple of the granularity).
    fn create_page(&self, size: usize) -> Result<PhysicalPage>;

    /// Release a page; it must not be mapped anywhere.
    fn release_page(&self, page: PhysicalPage) -> Result<()>;

    /// Map `page` at `addr` (inside a reservation, aligned to the granularity, not mapped).
    fn map(&self, page: PhysicalPage, addr: u64) -> Result<()>;

    /// Make `[addr, addr + bytes)` readable and writable by the device that computes on it.
    fn set_access(&self, addr: u64, bytes: usize) -> Result<()>;

    /// Unmap `[addr, addr + bytes)`; the pages stay alive and can be mapped again.
    fn unmap(&self, addr: u64, bytes: usize) -> Result<()>;

    /// Copy `bytes` from `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges must be mapped and must not overlap.
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;

    /// Write `data` at `addr`.
    ///
    /// # Safety
    /// `[addr, addr + data.len())` must be mapped.
    unsafe fn write(&self, addr: u64, data: &[u8]) -> Result<()>;

    /// Read `out.len()` bytes at `addr` into `out`.
    ///
    /// # Safety
    /// `[addr, addr + out.len())` must be mapped.
    unsafe fn read(&self, addr: u64, out: &mut [u8]) -> Result<()>;
}

/// What [`probe_cuda`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaProbe {
    /// Number of CUDA devices the driver reports.
    pub devices: usize,
    /// Name of device 0.
    pub name: String,
    /// Driver version as `major.minor`.
    pub driver: String,
}

/// Look for a usable CUDA driver and device without ever panicking.
///
/// cudarc's dynamic loader panics when `libcuda` is missing, so the library is first probed with
/// `libloading`; only then is the driver initialised and asked for its devices. Returns
/// [`crate::VmmError::NoCuda`] with the reason when there is no GPU (or the crate was built without
/// the `cuda` feature).
pub fn probe_cuda() -> Result<CudaProbe> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(crate::VmmError::NoCuda(
            "vkv was built without the `cuda` feature".into(),
        ))
    }
}

/// Check that `page_size` is a positive multiple of `granularity` (every backend's rule).
pub(crate) fn check_page_size(
    backend: &'static str,
    page_size: usize,
    granularity: usize,
) -> Result<()> {
    if page_size == 0 || !page_size.is_multiple_of(granularity) {
        return Err(crate::VmmError::PageSizeNotAligned {
            backend,
            page_size,
            granularity,
        });
    }
    Ok(())
}

/// The virtual ranges a backend has reserved (base → length), for backends that must check
/// themselves that a call stays inside its own reservations (the host and accounting ones).
#[derive(Debug, Default)]
pub(crate) struct Reservations(std::collections::BTreeMap<u64, usize>);

impl Reservations {
    pub(crate) fn insert(&mut self, base: u64, bytes: usize) {
        self.0.insert(base, bytes);
    }

    /// Whether `[addr, addr + bytes)` is non-empty and lies inside one reservation.
    pub(crate) fn contains(&self, addr: u64, bytes: usize) -> bool {
        bytes > 0
            && self
                .0
                .range(..=addr)
                .next_back()
                .is_some_and(|(&base, &len)| addr + bytes as u64 <= base + len as u64)
    }

    /// Whether exactly this reservation exists.
    pub(crate) fn is_exactly(&self, base: u64, bytes: usize) -> bool {
        self.0.get(&base) == Some(&bytes)
    }

    pub(crate) fn remove(&mut self, base: u64) {
        self.0.remove(&base);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.0.iter().map(|(&b, &l)| (b, l))
    }
}
