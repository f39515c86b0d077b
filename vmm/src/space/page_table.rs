//! The page tables of a [`KvSpace`]: per slot and region, which physical page is mapped at each
//! page of the slot's virtual range ([`Slot`]), the reference count of every mapped page (the
//! space's `refs`, by handle), and the only two operations that change them,
//! [`KvSpace::map_page`] and [`KvSpace::unmap_page`], with the lookups the rest of the space
//! reads them through.
//!
//! Invariants the two operations keep together: a page's reference count is the number of table
//! entries that hold it (prefix sharing maps one physical page at several addresses); a slot's
//! `mapped` is its number of entries; `backed` is a lower bound — pages `0..backed` are mapped in
//! every region — which an unmap below it lowers; a page whose count falls to 0 goes back to the
//! pool — unless the page cache pins it: then it is *kept* (mapped nowhere, out of the pool) —
//! and one that failed to map goes back only if no other address holds it and it is not pinned.
//! Mapping is the backend's map at each page's address, then one set-access over the run of
//! consecutive pages mapped together (the CUDA driver's `cuMemMap` and `cuMemSetAccess`, as
//! vAttention uses them; `mmap(MAP_FIXED)` and `mprotect` on the host).

use super::{KvSpace, SlotId};
use crate::{PhysicalPage, Result};

/// One request slot: whether it is acquired, its length, and its page tables.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) active: bool,
    /// Tokens the slot holds (written or about to be written this step).
    pub(super) len: usize,
    /// `pages[region][i]`: the page mapped at page `i` of this slot's range in `region`. Grown on
    /// demand: an index past the end is unmapped.
    pub(super) pages: Vec<Vec<Option<PhysicalPage>>>,
    pub(super) mapped: usize,
    /// Pages `0..backed` are mapped in every region (a lower bound; the fast path of `ensure`).
    pub(super) backed: usize,
}

impl KvSpace {
    pub(super) fn page_addr(&self, slot: SlotId, region: usize, index: usize) -> u64 {
        self.addr(slot, region, index * self.config.page_size)
    }

    /// The page mapped at page `index` of `slot` in `region`, if any.
    pub(super) fn page(&self, slot: SlotId, region: usize, index: usize) -> Option<PhysicalPage> {
        self.slots[slot.0].pages[region]
            .get(index)
            .copied()
            .flatten()
    }

    /// Whether the page at `index` of `slot` in `region` is the slot's alone to write: mapped
    /// nowhere else and not pinned by the page cache (a cached page is never written again).
    pub(super) fn is_exclusive(&self, slot: SlotId, region: usize, index: usize) -> bool {
        self.page(slot, region, index)
            .is_some_and(|p| self.refs[&p.handle] == 1 && !self.pinned.contains(&p.handle))
    }

    /// Map `page` at page `index` of `slot` in `region` and enable access. On failure the page
    /// goes back to the pool if nothing else maps it.
    pub(super) fn map_page(
        &mut self,
        slot: SlotId,
        region: usize,
        index: usize,
        page: PhysicalPage,
    ) -> Result<()> {
        self.map_run(slot, region, index, &[page])
    }

    /// Map `pages` at the consecutive page indices `start..` of `slot` in `region` (all unmapped),
    /// then enable access over the whole run in one call: `cuMemSetAccess` costs about as much for
    /// a run of pages as for one, so a prefix hit of 128 pages makes one call, not 128 (PyTorch's
    /// expandable segments set access the same way). All or nothing: on failure nothing of the run
    /// stays mapped, and each page goes back to the pool if nothing else maps it and it is not
    /// pinned.
    pub(super) fn map_run(
        &mut self,
        slot: SlotId,
        region: usize,
        start: usize,
        pages: &[PhysicalPage],
    ) -> Result<()> {
        let base = self.page_addr(slot, region, start);
        let mut mapped = 0;
        let mut offset = 0u64;
        let mut result = Ok(());
        for &page in pages {
            result = self.backend.map(page, base + offset);
            if result.is_err() {
                break;
            }
            mapped += 1;
            offset += page.size as u64;
        }
        if result.is_ok() && !pages.is_empty() {
            result = self.backend.set_access(base, offset as usize);
        }
        if let Err(e) = result {
            let mut at = base;
            for page in &pages[..mapped] {
                let _ = self.backend.unmap(at, page.size);
                at += page.size as u64;
            }
            // A pinned page stays where it was (kept, or mapped elsewhere).
            for page in pages {
                if !self.refs.contains_key(&page.handle) && !self.pinned.contains(&page.handle) {
                    self.pool.put(*page);
                }
            }
            return Err(e);
        }
        for (n, &page) in pages.iter().enumerate() {
            if self.kept.remove(&page.handle).is_some() {
                self.rereferenced.push(page);
            }
            *self.refs.entry(page.handle).or_default() += 1;
            let s = &mut self.slots[slot.0];
            let table = &mut s.pages[region];
            if table.len() <= start + n {
                table.resize(start + n + 1, None);
            }
            table[start + n] = Some(page);
            s.mapped += 1;
        }
        Ok(())
    }

    /// Unmap page `index` of `slot` in `region`; returns true if it went back to the pool (no
    /// other address maps it). A pinned page mapped nowhere any more is kept instead, and the
    /// page cache is told at the end of the public call ([`KvSpace::notify_unreferenced`]).
    pub(super) fn unmap_page(&mut self, slot: SlotId, region: usize, index: usize) -> Result<bool> {
        let Some(page) = self.page(slot, region, index) else {
            return Ok(false);
        };
        self.backend
            .unmap(self.page_addr(slot, region, index), page.size)?;
        let s = &mut self.slots[slot.0];
        s.pages[region][index] = None;
        s.mapped -= 1;
        s.backed = s.backed.min(index);
        let refs = self
            .refs
            .get_mut(&page.handle)
            .expect("mapped page has a count");
        *refs -= 1;
        if *refs == 0 {
            self.refs.remove(&page.handle);
            if self.pinned.contains(&page.handle) {
                self.kept.insert(page.handle, page);
                self.unreferenced.push(page);
                return Ok(false);
            }
            self.pool.put(page);
            return Ok(true);
        }
        Ok(false)
    }
}
