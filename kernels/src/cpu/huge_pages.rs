//! [`HugeBuffer`]: zeroed host memory for the large, long-lived buffers the CPU streams through
//! every step — the int8 kernels' packed weights and the KV cache pools — carved from 2 MiB-aligned
//! slabs advised for transparent huge pages (`madvise(MADV_HUGEPAGE)`).
//!
//! Why: a decode step streams ~100 MB of weights and tens of MB of KV. On 4 KiB pages every
//! 4 KiB of that stream is a TLB miss (a two-level page walk inside a virtual machine), and
//! the hardware prefetchers stop at each 4 KiB boundary. With THP in `madvise` mode (the common
//! distribution default) ordinary allocations stay on 4 KiB pages; only advised ranges get 2 MiB
//! ones. A model's matrices are 0.2–1.1 MB each, too small to hold a huge page of their own, so
//! they share slabs: a buffer is a 64-byte-aligned range bumped out of the current slab, and a
//! slab is unmapped when its last buffer drops (the allocator holds it weakly). Memory is
//! `mmap`ed anonymous, so it is zero and costs nothing until touched; an untouched slab tail
//! stays virtual. llama.cpp and ik_llama.cpp reach the same pages through `mmap` of the model
//! file and `--hugepages`-style options.
//!
//! `VKV_NO_HUGE_PAGES` (set to anything) skips the advice, to measure what it brings.
//!
//! Invariants: buffers never overlap; a buffer's memory lives as long as the buffer (each holds
//! its slab); the kernel may still back an advised range with 4 KiB pages (no free 2 MiB blocks),
//! which only costs speed. Elsewhere than Linux the advice is skipped.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};

use rayon::prelude::*;

/// The huge page size advised for (x86-64 and most aarch64 kernels).
const HUGE_PAGE: usize = 2 << 20;
/// Smallest slab: room for a small model's matrices in one, so they share huge pages.
const SLAB: usize = 32 << 20;
/// Alignment of every buffer in a slab: a cache line, so 64-byte vector loads do not straddle two.
const ALIGN: usize = 64;

/// One `mmap`ed region, 2 MiB-aligned, unmapped on drop.
#[derive(Debug)]
struct Slab {
    /// Start of the mapping.
    map: *mut u8,
    /// Bytes mapped (a multiple of [`HUGE_PAGE`]).
    map_len: usize,
    /// First 2 MiB-aligned byte in the mapping, where buffers start.
    base: *mut u8,
    /// Bytes usable from `base`.
    len: usize,
}

// SAFETY: a slab is plain memory; each buffer owns a disjoint range of it.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

impl Slab {
    /// A slab of at least `len` usable bytes.
    fn new(len: usize) -> Slab {
        let len = len.max(SLAB).next_multiple_of(HUGE_PAGE);
        let map_len = len + HUGE_PAGE;
        // SAFETY: an anonymous private mapping at an address the kernel picks.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            // What a `Vec` does when its allocation fails.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(map_len, HUGE_PAGE).expect("slab layout"),
            );
        }
        let map = map as *mut u8;
        let base = map.wrapping_add(map.align_offset(HUGE_PAGE));
        #[cfg(target_os = "linux")]
        if crate::RuntimeSwitches::get().huge_pages {
            // SAFETY: advice on a range inside the mapping just made; failure (THP compiled out
            // or disabled) leaves ordinary pages.
            unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
        }
        Slab {
            map,
            map_len,
            base,
            len,
        }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Slab::new`; every buffer in it has dropped (each holds
        // an `Arc` of its slab).
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}

/// Hands out buffers: the slab being filled (held weakly) and the bytes of it taken.
struct Slabs(Mutex<(Weak<Slab>, usize)>);

impl Slabs {
    const fn new() -> Slabs {
        Slabs(Mutex::new((Weak::new(), 0)))
    }

    /// A buffer of `len` zero bytes: from the current slab if it has room, else a new one.
    fn zeroed(&self, len: usize) -> HugeBuffer {
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (slab, used) = match current.0.upgrade() {
            Some(slab) if slab.len - current.1 >= len => (slab, current.1),
            _ => (Arc::new(Slab::new(len)), 0),
        };
        let end = (used + len).next_multiple_of(ALIGN).min(slab.len);
        *current = (Arc::downgrade(&slab), end);
        let ptr = slab.base.wrapping_add(used);
        HugeBuffer { slab, ptr, len }
    }
}

/// The process's slabs.
static SLABS: Slabs = Slabs::new();

/// `len` zeroed bytes in huge-page-advised memory (see the module docs).
pub struct HugeBuffer {
    slab: Arc<Slab>,
    /// Start of this buffer's range in the slab's mapping.
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer owns its range exclusively; shared access is read-only through `Deref`
// (writers through `as_mut_ptr` coordinate themselves, as for any raw memory).
unsafe impl Send for HugeBuffer {}
unsafe impl Sync for HugeBuffer {}

impl HugeBuffer {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> HugeBuffer {
        SLABS.zeroed(len)
    }

    /// Fault every page of the buffer in now, rather than on first use: a KV pool is memory the
    /// engine has promised, and its first-touch faults (a 2 MiB page zeroed each) would land
    /// inside a timed prefill.
    pub fn populate(&mut self) {
        // The kernel zeroes each page as it faults in: on every core at once.
        self.par_chunks_mut(HUGE_PAGE).for_each(|chunk| {
            for at in (0..chunk.len()).step_by(4096) {
                // SAFETY: inside this buffer, which `&mut self` holds exclusively; the byte is
                // written back as it was read (a write, so the page is faulted in writable).
                unsafe {
                    let byte = chunk.as_mut_ptr().add(at);
                    byte.write_volatile(byte.read_volatile());
                }
            }
        });
    }

    /// The first byte, for writers that share the buffer (a KV pool written by attention
    /// tasks): derived from the mapping, not from a reference, so writing through it is allowed
    /// while the buffer is shared — the writers must not overlap each other or readers.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Deref for HugeBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes from `ptr` lie in the slab, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for HugeBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and no other buffer covers these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Clone for HugeBuffer {
    fn clone(&self) -> Self {
        let mut copy = HugeBuffer::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl std::fmt::Debug for HugeBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeBuffer")
            .field("len", &self.len)
            .field("slab_bytes", &self.slab.len)
            .finish()
    }
}

/// How much of this process's memory is on huge pages now, and the kernel's THP settings that
/// decide it — so a benchmark can say what its KV memory and weights actually ran on (the paged
/// pools can get huge pages where the vmm mode's shared memory cannot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugePageUse {
    /// Anonymous memory on transparent huge pages (`AnonHugePages`: weights, paged pools).
    pub anon_bytes: u64,
    /// Shared memory mapped with huge pages (`ShmemPmdMapped`: the host VMM's memfd pages).
    pub shmem_bytes: u64,
    /// `/sys/kernel/mm/transparent_hugepage/enabled`'s selected mode (`always`, `madvise`, ...).
    pub anon_mode: String,
    /// `.../shmem_enabled`'s selected mode (`advise`, `never`, ...).
    pub shmem_mode: String,
}

impl HugePageUse {
    /// Now, from `/proc/self/smaps_rollup` and `/sys`; `None` where they cannot be read (not
    /// Linux).
    pub fn now() -> Option<HugePageUse> {
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
        let mode = |file: &str| {
            std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{file}"))
                .ok()
                .and_then(|s| selected_mode(&s))
                .unwrap_or_else(|| "unknown".into())
        };
        Some(HugePageUse {
            anon_bytes: kib_field(&rollup, "AnonHugePages:")?,
            shmem_bytes: kib_field(&rollup, "ShmemPmdMapped:").unwrap_or(0),
            anon_mode: mode("enabled"),
            shmem_mode: mode("shmem_enabled"),
        })
    }
}

/// Memory the host can still give this process without swapping (`MemAvailable` in
/// `/proc/meminfo`), to refuse a buffer that cannot be faulted in before the kernel's OOM killer
/// decides; `None` where it cannot be read.
pub fn available_bytes() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// The value of a `/proc` line `key   N kB`, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let kib = text.lines().find_map(|l| l.strip_prefix(key))?;
    let kib = kib
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// The bracketed choice of a `/sys` setting (`always [madvise] never` → `madvise`).
fn selected_mode(setting: &str) -> Option<String> {
    let start = setting.find('[')? + 1;
    let len = setting[start..].find(']')?;
    Some(setting[start..start + len].to_string())
}

impl std::fmt::Display for HugePageUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} MiB anonymous (THP {}), {} MiB shared memory (shmem THP {})",
            self.anon_bytes >> 20,
            self.anon_mode,
            self.shmem_bytes >> 20,
            self.shmem_mode
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_disjoint_and_share_slabs() {
        let slabs = Slabs::new();
        let mut a = slabs.zeroed(1000);
        let mut b = slabs.zeroed(3 << 20);
        assert!(Arc::ptr_eq(&a.slab, &b.slab));
        assert_eq!(a.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(b.as_ptr() as usize, a.as_ptr() as usize + 1024);
        assert!(a.iter().chain(b.iter()).all(|&x| x == 0));
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        // One that does not fit the rest of the slab starts a new one, 2 MiB-aligned.
        let big = slabs.zeroed(SLAB);
        assert!(!Arc::ptr_eq(&a.slab, &big.slab));
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(big.len(), SLAB);
        b.populate();
        assert!(b.iter().all(|&x| x == 2), "populating keeps the contents");
        let c = a.clone();
        assert!(c.iter().all(|&x| x == 1) && c.len() == 1000);
    }

    #[test]
    fn settings_and_use_are_read() {
        assert_eq!(
            selected_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(selected_mode("never").as_deref(), None);
        #[cfg(target_os = "linux")]
        {
            let now = HugePageUse::now().expect("Linux has smaps_rollup");
            assert!(!now.anon_mode.is_empty() && !now.shmem_mode.is_empty());
            assert!(available_bytes().expect("Linux has MemAvailable") > 0);
        }
    }

    #[test]
    fn a_slab_is_unmapped_with_its_last_buffer() {
        let slabs = Slabs::new();
        let a = slabs.zeroed(100);
        let b = slabs.zeroed(100);
        let slab = Arc::downgrade(&a.slab);
        drop(a);
        assert!(slab.upgrade().is_some(), "b still holds it");
        drop(b);
        assert!(slab.upgrade().is_none());
        // The next buffer takes a fresh slab.
        let c = slabs.zeroed(100);
        assert_eq!(c.as_ptr() as usize % HUGE_PAGE, 0);
    }
}
