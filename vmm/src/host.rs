//! `HostVmm`: CUDA-style virtual memory management on the CPU, with real memory.
//!
//! - reserve: `mmap(NULL, n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)` — address
//!   space only, like `cuMemAddressReserve`;
//! - a physical page is a range of one memfd (`memfd_create`), grown with `ftruncate`; releasing a
//!   page punches a hole (`fallocate(PUNCH_HOLE)`) so its memory goes back to the kernel, and the
//!   offset is reused by the next page of that size;
//! - map: `mmap(addr, size, PROT_NONE, MAP_FIXED | MAP_SHARED, memfd, offset)` — so one page
//!   mapped at two addresses shows the same bytes at both, exactly as on the GPU;
//! - set access: `mprotect(PROT_READ | PROT_WRITE)`, like `cuMemSetAccess` (mapped memory is not
//!   accessible until then, on both backends, so a missing set-access fails here too);
//! - unmap: map the range back to an anonymous `PROT_NONE` reservation (`munmap` would give the
//!   addresses back to the process, where another allocation could land).
//!
//! A mapping of whole 2 MiB pages is advised for transparent huge pages (`MADV_HUGEPAGE`), as
//! the paged cache's pools are (`vkv_kernels::cpu::HugeBuffer`). For memfd memory the kernel
//! honours it only when `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows `advise`
//! (many distributions default to `never`), so the two KV modes can differ in TLB reach on the
//! CPU; `VKV_NO_HUGE_PAGES` turns both advices off to compare them on equal pages.
//!
//! Every map, unmap and set-access is checked to lie inside one of this backend's reservations and
//! to be aligned to the OS page size (its granularity), so no call can clobber other memory.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use crate::faults::{self, Fault};
use crate::physical::{check_page_size, Reservations};
use crate::{PhysicalMemory, PhysicalPage, Result, VmmError};

const NAME: &str = "host";
/// Pages of this size and alignment are advised for transparent huge pages.
const HUGE_PAGE: usize = 2 << 20;

/// Host memory with CUDA VMM semantics (see the module docs).
#[derive(Debug)]
pub struct HostVmm {
    memfd: OwnedFd,
    granularity: usize,
    /// Advise whole 2 MiB pages for huge pages.
    huge_pages: bool,
    state: Mutex<HostState>,
}

#[derive(Debug, Default)]
struct HostState {
    /// Current length of the memfd.
    file_len: u64,
    /// Released page offsets, by page size, ready for reuse.
    free_offsets: HashMap<usize, Vec<u64>>,
    reservations: Reservations,
}

impl HostVmm {
    /// A new backend with its own memfd, advising huge pages.
    pub fn new() -> Result<Self> {
        HostVmm::with_huge_pages(true)
    }

    /// A new backend with its own memfd; `huge_pages` says whether whole 2 MiB pages are
    /// advised for transparent huge pages (the engine passes its runtime switch).
    pub fn with_huge_pages(huge_pages: bool) -> Result<Self> {
        let name = c"vkv-kv-pages";
        // SAFETY: plain system call with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(VmmError::os(NAME, "memfd_create"));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let granularity = if page > 0 { page as usize } else { 4096 };
        Ok(HostVmm {
            memfd,
            granularity,
            huge_pages,
            state: Mutex::new(HostState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        // A panic while holding this lock leaves the state consistent (every update is one
        // statement after the system call), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_aligned(&self, what: &'static str, value: u64) -> Result<()> {
        if !value.is_multiple_of(self.granularity as u64) {
            return Err(VmmError::Backend {
                backend: NAME,
                call: what,
                detail: format!(
                    "{value:#x} is not aligned to the OS page size {}",
                    self.granularity
                ),
            });
        }
        Ok(())
    }

    /// Check that `[addr, addr + bytes)` is inside one reservation and aligned.
    fn check_range(&self, call: &'static str, addr: u64, bytes: usize) -> Result<()> {
        self.check_aligned(call, addr)?;
        self.check_aligned(call, bytes as u64)?;
        if !self.state().reservations.contains(addr, bytes) {
            return Err(VmmError::OutsideReservation {
                backend: NAME,
                addr,
                bytes,
            });
        }
        Ok(())
    }
}

impl PhysicalMemory for HostVmm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn granularity(&self) -> usize {
        self.granularity
    }

    fn reserve(&self, bytes: usize, alignment: usize) -> Result<u64> {
        self.check_aligned("reserve", bytes as u64)?;
        let alignment = alignment.max(self.granularity);
        if bytes == 0 || !alignment.is_power_of_two() {
            return Err(VmmError::Backend {
                backend: NAME,
                call: "reserve",
                detail: format!(
                    "size {bytes} must be > 0 and alignment {alignment} a power of two"
                ),
            });
        }
        let padded = bytes.checked_add(alignment).ok_or_else(|| {
            VmmError::InvalidConfig(format!("reservation of {bytes} B overflows"))
        })?;
        // SAFETY: an anonymous PROT_NONE mapping at an address of the kernel's choosing.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                padded,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(VmmError::os(NAME, "mmap(reserve)"));
        }
        let raw = raw as usize;
        let base = raw.next_multiple_of(alignment);
        let head = base - raw;
        let tail = padded - head - bytes;
        // SAFETY: both trims are inside the mapping just made and belong to nobody else.
        unsafe {
            if head > 0 {
                libc::munmap(raw as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((base + bytes) as *mut libc::c_void, tail);
            }
        }
        self.state().reservations.insert(base as u64, bytes);
        Ok(base as u64)
    }

    fn free_reservation(&self, addr: u64, bytes: usize) -> Result<()> {
        let mut state = self.state();
        if !state.reservations.is_exactly(addr, bytes) {
            return Err(VmmError::OutsideReservation {
                backend: NAME,
                addr,
                bytes,
            });
        }
        // SAFETY: the range is exactly one reservation of ours.
        if unsafe { libc::munmap(addr as *mut libc::c_void, bytes) } != 0 {
            return Err(VmmError::os(NAME, "munmap"));
        }
        state.reservations.remove(addr);
        Ok(())
    }

    fn create_page(&self, size: usize) -> Result<PhysicalPage> {
        check_page_size(NAME, size, self.granularity)?;
        faults::plan().check(Fault::CreatePage, NAME, "create_page")?;
        let mut state = self.state();
        if let Some(offset) = state.free_offsets.get_mut(&size).and_then(Vec::pop) {
            return Ok(PhysicalPage {
                handle: offset,
                size,
            });
        }
        let offset = state.file_len;
        let new_len = offset + size as u64;
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(self.memfd.as_raw_fd(), new_len as libc::off_t) } != 0 {
            return Err(VmmError::os(NAME, "ftruncate(memfd)"));
        }
        state.file_len = new_len;
        Ok(PhysicalPage {
            handle: offset,
            size,
        })
    }

    fn release_page(&self, page: PhysicalPage) -> Result<()> {
        // Give the memory back to the kernel; the offset stays reserved in the file for reuse.
        // SAFETY: fallocate on our own memfd, inside its length.
        let rc = unsafe {
            libc::fallocate(
                self.memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                page.handle as libc::off_t,
                page.size as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(VmmError::os(NAME, "fallocate(PUNCH_HOLE)"));
        }
        self.state()
            .free_offsets
            .entry(page.size)
            .or_default()
            .push(page.handle);
        Ok(())
    }

    fn map(&self, page: PhysicalPage, addr: u64) -> Result<()> {
        self.check_range("map", addr, page.size)?;
        faults::plan().check(Fault::Map, NAME, "mmap")?;
        // SAFETY: the range lies inside one of our PROT_NONE reservations (checked above), so
        // MAP_FIXED replaces only memory this backend owns.
        let got = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                page.size,
                libc::PROT_NONE,
                libc::MAP_FIXED | libc::MAP_SHARED,
                self.memfd.as_raw_fd(),
                page.handle as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED || got as u64 != addr {
            return Err(VmmError::os(NAME, "mmap(MAP_FIXED, memfd)"));
        }
        if self.huge_pages
            && page.size.is_multiple_of(HUGE_PAGE)
            && addr.is_multiple_of(HUGE_PAGE as u64)
        {
            // SAFETY: advice on the range just mapped; it fails harmlessly where shared memory
            // takes no huge pages.
            unsafe { libc::madvise(addr as *mut libc::c_void, page.size, libc::MADV_HUGEPAGE) };
        }
        Ok(())
    }

    fn set_access(&self, addr: u64, bytes: usize) -> Result<()> {
        self.check_range("set_access", addr, bytes)?;
        // SAFETY: inside one of our reservations (checked above).
        let rc = unsafe {
            libc::mprotect(
                addr as *mut libc::c_void,
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            return Err(VmmError::os(NAME, "mprotect"));
        }
        Ok(())
    }

    fn unmap(&self, addr: u64, bytes: usize) -> Result<()> {
        self.check_range("unmap", addr, bytes)?;
        // SAFETY: inside one of our reservations (checked above); the range becomes an anonymous
        // PROT_NONE reservation again.
        let got = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                bytes,
                libc::PROT_NONE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(VmmError::os(NAME, "mmap(unmap)"));
        }
        Ok(())
    }

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller guarantees both ranges are mapped and disjoint.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        // SAFETY: the caller guarantees the range is mapped.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
        Ok(())
    }

    unsafe fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: the caller guarantees the range is mapped.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

impl Drop for HostVmm {
    fn drop(&mut self) {
        let state = self.state();
        for (base, len) in state.reservations.iter() {
            // SAFETY: each is a reservation of ours that nobody else can use after drop.
            unsafe { libc::munmap(base as *mut libc::c_void, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_at_two_addresses_shows_the_same_bytes() {
        let vmm = HostVmm::new().unwrap();
        let size = 64 << 10;
        let a = vmm.reserve(size, size).unwrap();
        let b = vmm.reserve(size, size).unwrap();
        assert_eq!(a % size as u64, 0);
        let page = vmm.create_page(size).unwrap();
        for addr in [a, b] {
            vmm.map(page, addr).unwrap();
            vmm.set_access(addr, size).unwrap();
        }
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut back = vec![0u8; size];
        unsafe {
            vmm.write(a, &data).unwrap();
            vmm.read(b, &mut back).unwrap();
        }
        assert_eq!(back, data);
        vmm.unmap(a, size).unwrap();
        vmm.unmap(b, size).unwrap();
        vmm.release_page(page).unwrap();
        // The released offset is reused, and its old bytes are gone (hole punched).
        let again = vmm.create_page(size).unwrap();
        assert_eq!(again.handle, page.handle);
        vmm.map(again, a).unwrap();
        vmm.set_access(a, size).unwrap();
        unsafe { vmm.read(a, &mut back).unwrap() };
        assert!(back.iter().all(|&x| x == 0));
        vmm.unmap(a, size).unwrap();
        vmm.release_page(again).unwrap();
        vmm.free_reservation(a, size).unwrap();
        vmm.free_reservation(b, size).unwrap();
    }

    #[test]
    fn calls_outside_a_reservation_or_misaligned_are_errors() {
        let vmm = HostVmm::new().unwrap();
        let g = vmm.granularity();
        let base = vmm.reserve(4 * g, g).unwrap();
        let page = vmm.create_page(g).unwrap();
        assert!(matches!(
            vmm.map(page, base + 4 * g as u64),
            Err(VmmError::OutsideReservation { .. })
        ));
        assert!(vmm.map(page, base + 1).is_err());
        assert!(matches!(
            vmm.create_page(g + 1),
            Err(VmmError::PageSizeNotAligned { .. })
        ));
        assert!(vmm.free_reservation(base, g).is_err());
        vmm.release_page(page).unwrap();
        vmm.free_reservation(base, 4 * g).unwrap();
    }
}
