//! The self-check of a [`KvSpace`]: [`KvSpace::audit`] walks every slot's page tables and the
//! page pool and reports the first broken invariant as an [`AuditError`] (slot, region, page and
//! counts). The property tests, the conformance runs and the engine's KV audit call it; it only
//! reads.
//!
//! The invariants, from the parent's docs: pages `0..backed` of a slot are mapped in every
//! region, and a slot's count of mapped pages matches its tables; an active slot is backed up to
//! its length and a released one has length 0; every page covering bytes at or after an active
//! slot's length is exclusive to it (reference count 1) — what makes prefix sharing safe, as a
//! slot only writes at or after its length — and a released slot maps no shared page; each
//! page's reference count equals the places it is mapped; and the pool's created pages are its
//! free ones plus the distinct mapped ones plus the kept ones. Prefix caching (`cached.rs`):
//! a pinned page lies only below the lengths of the active slots that map it (never where a
//! slot writes, never in a released slot); a kept page is pinned, mapped nowhere and not free;
//! a pinned page is mapped or kept. It is the bookkeeping check of vAttention's design
//! (one physical page mapped at several addresses, refcounted) made executable.

use std::collections::{BTreeMap, HashMap};

use super::{KvSpace, SlotId};

/// The first invariant [`KvSpace::audit`] found broken; each variant gives the slot, region, page
/// and counts involved. Slots, regions and pages are indices; handles are the backend's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// A page below the slot's backed count is missing in one region.
    #[error("slot {slot}: expected region {region} mapped below backed = {backed}, found a hole")]
    HoleBelowBacked {
        slot: usize,
        region: usize,
        backed: usize,
    },
    /// The pages in a slot's tables differ from the slot's own count of mapped pages.
    #[error("slot {slot}: {in_tables} pages in its tables, but its mapped count says {recorded}")]
    MappedCount {
        slot: usize,
        in_tables: usize,
        recorded: usize,
    },
    /// An active slot without pages up to its length.
    #[error("active slot {slot} is not backed up to its length {len}")]
    NotBacked { slot: usize, len: usize },
    /// A released slot whose length is not 0.
    #[error("released slot {slot} has length {len}, expected 0")]
    ReleasedWithLength { slot: usize, len: usize },
    /// A page at or after an active slot's length that is not exclusive to it.
    #[error(
        "slot {slot} region {region} page {page} at/after its length has {references} references, \
         expected 1 (exclusive)"
    )]
    SharedPastLength {
        slot: usize,
        region: usize,
        page: usize,
        references: u32,
    },
    /// A released slot still mapping a page other places map too.
    #[error("released slot {slot} still maps shared page {handle} ({references} references, expected 1)")]
    ReleasedMapsShared {
        slot: usize,
        handle: u64,
        references: u32,
    },
    /// The recorded reference counts differ from the mappings in the page tables (handle →
    /// count).
    #[error("reference counts {recorded:?} differ from page tables {in_tables:?}")]
    RefCounts {
        recorded: BTreeMap<u64, u32>,
        in_tables: BTreeMap<u64, u32>,
    },
    /// Pages created by the pool differ from free plus distinctly mapped plus kept pages.
    #[error("{created} pages created, expected {free} free + {mapped} mapped + {kept} kept")]
    PageCount {
        created: usize,
        free: usize,
        mapped: usize,
        kept: usize,
    },
    /// A pinned (cached) page mapped in a slot where the slot may write: at or after an active
    /// slot's length, or in a released slot.
    #[error(
        "slot {slot} region {region} page {page} is pinned by the prefix cache but lies at/after \
         the slot's length {len} (or the slot is released); expected cached pages only below it"
    )]
    PinnedWhereWritten {
        slot: usize,
        region: usize,
        page: usize,
        len: usize,
    },
    /// A kept page that is not pinned, still mapped, or in the pool's free list.
    #[error("kept page {handle} is {found}; expected a pinned page mapped nowhere and not free")]
    Kept { handle: u64, found: &'static str },
    /// A pinned page neither mapped nor kept (lost, or freed while pinned).
    #[error("pinned page {handle} is neither mapped nor kept")]
    PinnedLost { handle: u64 },
}

impl KvSpace {
    /// Check the internal invariants (see the module docs); `Err` is the first violation.
    pub fn audit(&self) -> std::result::Result<(), AuditError> {
        let mut counted: HashMap<u64, u32> = HashMap::new();
        for (s, slot) in self.slots.iter().enumerate() {
            let mut n = 0;
            for region in &slot.pages {
                for page in region.iter().flatten() {
                    *counted.entry(page.handle).or_default() += 1;
                    n += 1;
                }
            }
            if let Some(r) = (0..slot.pages.len())
                .find(|&r| (0..slot.backed).any(|i| self.page(SlotId(s), r, i).is_none()))
            {
                return Err(AuditError::HoleBelowBacked {
                    slot: s,
                    region: r,
                    backed: slot.backed,
                });
            }
            if n != slot.mapped {
                return Err(AuditError::MappedCount {
                    slot: s,
                    in_tables: n,
                    recorded: slot.mapped,
                });
            }
            if slot.active && !self.is_backed(SlotId(s), slot.len) {
                return Err(AuditError::NotBacked {
                    slot: s,
                    len: slot.len,
                });
            }
            if !slot.active && slot.len != 0 {
                return Err(AuditError::ReleasedWithLength {
                    slot: s,
                    len: slot.len,
                });
            }
            // Below `written`, a page holds only bytes of tokens before the slot's length.
            let written = if slot.active {
                slot.len * self.config.region_bytes_per_token() / self.config.page_size
            } else {
                0
            };
            for (r, region) in slot.pages.iter().enumerate() {
                if let Some((i, _)) = region
                    .iter()
                    .enumerate()
                    .skip(written)
                    .find(|(_, p)| p.is_some_and(|p| self.pinned.contains(&p.handle)))
                {
                    return Err(AuditError::PinnedWhereWritten {
                        slot: s,
                        region: r,
                        page: i,
                        len: slot.len,
                    });
                }
            }
            if slot.active {
                let first = written;
                for (r, region) in slot.pages.iter().enumerate() {
                    for (i, page) in region.iter().enumerate().skip(first) {
                        let Some(p) = page else { continue };
                        let references = self.refs.get(&p.handle).copied().unwrap_or(0);
                        if references != 1 {
                            return Err(AuditError::SharedPastLength {
                                slot: s,
                                region: r,
                                page: i,
                                references,
                            });
                        }
                    }
                }
            } else if let Some(p) = slot
                .pages
                .iter()
                .flatten()
                .flatten()
                .find(|p| self.refs[&p.handle] != 1)
            {
                return Err(AuditError::ReleasedMapsShared {
                    slot: s,
                    handle: p.handle,
                    references: self.refs[&p.handle],
                });
            }
        }
        if counted != self.refs {
            return Err(AuditError::RefCounts {
                recorded: self.refs.iter().map(|(&h, &r)| (h, r)).collect(),
                in_tables: counted.into_iter().collect(),
            });
        }
        let free: std::collections::HashSet<u64> = self.pool.free_handles().collect();
        for &handle in self.kept.keys() {
            let found = if !self.pinned.contains(&handle) {
                "not pinned"
            } else if self.refs.contains_key(&handle) {
                "mapped"
            } else if free.contains(&handle) {
                "free in the pool"
            } else {
                continue;
            };
            return Err(AuditError::Kept { handle, found });
        }
        if let Some(&handle) = self
            .pinned
            .iter()
            .find(|h| !self.refs.contains_key(h) && !self.kept.contains_key(h))
        {
            return Err(AuditError::PinnedLost { handle });
        }
        if self.pool.created() != self.pool.free() + self.refs.len() + self.kept.len() {
            return Err(AuditError::PageCount {
                created: self.pool.created(),
                free: self.pool.free(),
                mapped: self.refs.len(),
                kept: self.kept.len(),
            });
        }
        Ok(())
    }
}
