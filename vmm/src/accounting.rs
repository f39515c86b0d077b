//! `AccountingVmm`: a backend that holds no bytes and only keeps the books.
//!
//! It hands out addresses and page handles from counters, so `vkv frag` and other studies can
//! drive the real [`crate::KvSpace`] and [`crate::PagePool`] code over KV memories far larger than
//! the machine (a 40 GiB budget of an 8B model on a laptop). It still checks what a driver would:
//! sizes aligned to its granularity, maps inside a reservation, no address mapped twice, no page
//! released while mapped — so it doubles as a strict referee in the property tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::physical::{check_page_size, Reservations};
use crate::{PhysicalMemory, PhysicalPage, Result, VmmError};

const NAME: &str = "accounting";

/// Counts pages and mappings without memory behind them (see the module docs).
#[derive(Debug)]
pub struct AccountingVmm {
    granularity: usize,
    books: Mutex<Books>,
}

#[derive(Debug, Default)]
struct Books {
    next_addr: u64,
    next_handle: u64,
    reservations: Reservations,
    /// Live pages: handle → number of addresses it is mapped at.
    pages: HashMap<u64, usize>,
    /// Mapped granules: address → the mapping that covers it.
    mapped: BTreeMap<u64, Mapping>,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    handle: u64,
    start: u64,
    size: usize,
}

impl AccountingVmm {
    /// A backend whose pages must be multiples of `granularity` bytes (a power of two).
    pub fn new(granularity: usize) -> Result<Self> {
        if granularity == 0 || !granularity.is_power_of_two() {
            return Err(VmmError::InvalidConfig(format!(
                "accounting granularity must be a power of two, got {granularity}"
            )));
        }
        Ok(AccountingVmm {
            granularity,
            books: Mutex::new(Books {
                next_addr: 1 << 40,
                ..Books::default()
            }),
        })
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pages created and not yet released.
    pub fn live_pages(&self) -> usize {
        self.books().pages.len()
    }

    /// Granule-sized mappings currently in place.
    pub fn mapped_granules(&self) -> usize {
        self.books().mapped.len()
    }

    fn check(&self, books: &Books, call: &'static str, addr: u64, bytes: usize) -> Result<()> {
        let g = self.granularity as u64;
        if !addr.is_multiple_of(g)
            || !(bytes as u64).is_multiple_of(g)
            || !books.reservations.contains(addr, bytes)
        {
            return Err(VmmError::Backend {
                backend: NAME,
                call,
                detail: format!(
                    "range {addr:#x}+{bytes:#x} is not granule-aligned inside a reservation"
                ),
            });
        }
        Ok(())
    }
}

impl PhysicalMemory for AccountingVmm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn granularity(&self) -> usize {
        self.granularity
    }

    fn holds_bytes(&self) -> bool {
        false
    }

    fn reserve(&self, bytes: usize, alignment: usize) -> Result<u64> {
        if bytes == 0 || !bytes.is_multiple_of(self.granularity) {
            return Err(VmmError::Backend {
                backend: NAME,
                call: "reserve",
                detail: format!(
                    "size {bytes} is not a positive multiple of {}",
                    self.granularity
                ),
            });
        }
        let mut books = self.books();
        let base = books
            .next_addr
            .next_multiple_of(alignment.max(self.granularity) as u64);
        books.next_addr = base + bytes as u64;
        books.reservations.insert(base, bytes);
        Ok(base)
    }

    fn free_reservation(&self, addr: u64, bytes: usize) -> Result<()> {
        let mut books = self.books();
        if !books.reservations.is_exactly(addr, bytes) {
            return Err(VmmError::OutsideReservation {
                backend: NAME,
                addr,
                bytes,
            });
        }
        if books
            .mapped
            .range(addr..addr + bytes as u64)
            .next()
            .is_some()
        {
            return Err(VmmError::Backend {
                backend: NAME,
                call: "free_reservation",
                detail: format!("reservation {addr:#x} still has mapped pages"),
            });
        }
        books.reservations.remove(addr);
        Ok(())
    }

    fn create_page(&self, size: usize) -> Result<PhysicalPage> {
        check_page_size(NAME, size, self.granularity)?;
        let mut books = self.books();
        let handle = books.next_handle;
        books.next_handle += 1;
        books.pages.insert(handle, 0);
        Ok(PhysicalPage { handle, size })
    }

    fn release_page(&self, page: PhysicalPage) -> Result<()> {
        let mut books = self.books();
        match books.pages.get(&page.handle) {
            Some(0) => {
                books.pages.remove(&page.handle);
                Ok(())
            }
            found => Err(VmmError::Backend {
                backend: NAME,
                call: "release_page",
                detail: format!(
                    "page {} is unknown or still mapped ({found:?})",
                    page.handle
                ),
            }),
        }
    }

    fn map(&self, page: PhysicalPage, addr: u64) -> Result<()> {
        let mut books = self.books();
        self.check(&books, "map", addr, page.size)?;
        if !books.pages.contains_key(&page.handle) {
            return Err(VmmError::Backend {
                backend: NAME,
                call: "map",
                detail: format!("page {} does not exist", page.handle),
            });
        }
        let end = addr + page.size as u64;
        if let Some((&at, _)) = books.mapped.range(addr..end).next() {
            return Err(VmmError::Backend {
                backend: NAME,
                call: "map",
                detail: format!("address {at:#x} is already mapped"),
            });
        }
        let mapping = Mapping {
            handle: page.handle,
            start: addr,
            size: page.size,
        };
        for granule in (addr..end).step_by(self.granularity) {
            books.mapped.insert(granule, mapping);
        }
        *books.pages.get_mut(&page.handle).expect("checked above") += 1;
        Ok(())
    }

    fn set_access(&self, addr: u64, bytes: usize) -> Result<()> {
        let books = self.books();
        self.check(&books, "set_access", addr, bytes)
    }

    fn unmap(&self, addr: u64, bytes: usize) -> Result<()> {
        let mut books = self.books();
        self.check(&books, "unmap", addr, bytes)?;
        let end = addr + bytes as u64;
        let granules: Vec<(u64, Mapping)> = books
            .mapped
            .range(addr..end)
            .map(|(&a, &m)| (a, m))
            .collect();
        // Like cuMemUnmap, a mapping is unmapped whole or not at all.
        if let Some((_, m)) = granules
            .iter()
            .find(|(_, m)| m.start < addr || m.start + m.size as u64 > end)
        {
            return Err(VmmError::Backend {
                backend: NAME,
                call: "unmap",
                detail: format!("range cuts the mapping at {:#x} in two", m.start),
            });
        }
        for (a, m) in granules {
            books.mapped.remove(&a);
            if a == m.start {
                if let Some(count) = books.pages.get_mut(&m.handle) {
                    *count -= 1;
                }
            }
        }
        Ok(())
    }

    unsafe fn copy(&self, _dst: u64, _src: u64, _bytes: usize) -> Result<()> {
        Err(VmmError::NoBytes {
            backend: NAME,
            op: "copy",
        })
    }

    unsafe fn write(&self, _addr: u64, _data: &[u8]) -> Result<()> {
        Err(VmmError::NoBytes {
            backend: NAME,
            op: "write",
        })
    }

    unsafe fn read(&self, _addr: u64, _out: &mut [u8]) -> Result<()> {
        Err(VmmError::NoBytes {
            backend: NAME,
            op: "read",
        })
    }
}
