//! Pages kept for a prefix cache: the space's half of automatic prefix caching in the vmm KV
//! cache (the other half, the index of which tokens a page holds, is the kv crate's
//! `PrefixIndex`, installed here as a [`PageCache`]).
//!
//! The cached *unit* is [`KvSpaceConfig::prefix_unit`](super::KvSpaceConfig::prefix_unit): the
//! pages at the same page indices `j·k .. (j+1)·k` of every region of a slot — one page row
//! (`k = 1`) whenever a page holds whole tokens — which together hold unit `j`'s tokens of
//! every layer's K and V. A unit's pages, listed region by region, are what
//! [`KvSpace::unit_pages`] returns, what [`KvSpace::pin`] pins and what
//! [`KvSpace::map_cached`] maps back at the same indices of another slot.
//!
//! A page is then one of:
//! - *free*: in the pool (never pinned);
//! - *mapped*: at one or more addresses, reference-counted as always; a pinned mapped page is
//!   never written again (it is not exclusive: `share_prefix` copies rather than writes into
//!   it, a slot's release unmaps it, and it only ever lies below its slots' lengths);
//! - *kept*: pinned and mapped nowhere (its last holder released it) — out of the pool,
//!   counted as neither in use nor free, evictable through the page cache.
//!
//! When a pinned page's last mapping goes, the space tells the cache
//! ([`PageCache::unreferenced`]), and when a kept page is mapped again
//! ([`PageCache::referenced`]); when the space needs pages (`ensure`, the mapper's map-ahead,
//! `reclaim`) and the pool and the released slots are short, it asks the cache for its least
//! recently released unit ([`PageCache::evict`]), unpins the unit's pages and puts them back in
//! the pool. The space never evicts a page a slot maps.

use std::any::Any;
use std::fmt::Debug;

use super::{KvSpace, SlotId};
use crate::{PhysicalPage, Result, VmmError};

/// The index a [`KvSpace`] keeps pages for (see the module docs). Called under the space's
/// lock, by whichever thread holds it (the engine's or the mapper's).
pub trait PageCache: Any + Send + Debug {
    /// These pinned pages lost their last mapping (now kept), in the order they were unmapped;
    /// `kept` says whether a page (by handle) is kept. The cache makes every unit whose pages are
    /// now all kept evictable. An error is a disagreement of the books.
    fn unreferenced(
        &mut self,
        pages: &[PhysicalPage],
        kept: &dyn Fn(u64) -> bool,
    ) -> std::result::Result<(), String>;
    /// These kept pages were mapped again ([`KvSpace::map_cached`]: a hit), in the order they
    /// were mapped: the units they belong to have a holder again and are no longer evictable.
    fn referenced(&mut self, pages: &[PhysicalPage]) -> std::result::Result<(), String>;
    /// Forget the least recently released evictable unit and return its pages (all kept);
    /// `None` when nothing is evictable.
    fn evict(&mut self) -> Option<Vec<PhysicalPage>>;
    /// Pages all evictable units hold together (what [`PageCache::evict`] can give back).
    fn evictable_pages(&self) -> usize;
}

impl KvSpace {
    /// Install the page cache (replacing any other; pages it pinned stay pinned).
    pub fn set_page_cache(&mut self, cache: Box<dyn PageCache>) {
        self.cache = Some(cache);
    }

    /// The page cache, if installed.
    pub fn page_cache(&self) -> Option<&dyn PageCache> {
        self.cache.as_deref()
    }

    /// The page cache, if installed, mutably.
    pub fn page_cache_mut(&mut self) -> Option<&mut dyn PageCache> {
        self.cache.as_deref_mut()
    }

    /// Pages per unit in all regions together: `regions × k`.
    pub fn unit_len(&self) -> usize {
        self.bases.len() * self.config.prefix_unit().0
    }

    /// The pages of unit `j` of `slot` (indices `j·k..(j+1)·k` of region 0, then of region 1,
    /// ...); `None` unless every one is mapped.
    pub fn unit_pages(&self, slot: SlotId, j: usize) -> Option<Vec<PhysicalPage>> {
        let k = self.config.prefix_unit().0;
        let first = j.checked_mul(k)?;
        (0..self.bases.len())
            .flat_map(|r| (first..first + k).map(move |i| (r, i)))
            .map(|(r, i)| self.slots.get(slot.0).and_then(|_| self.page(slot, r, i)))
            .collect()
    }

    /// Mappings of the page `handle` (0 when kept, free or unknown).
    pub fn references(&self, handle: u64) -> u32 {
        self.refs.get(&handle).copied().unwrap_or(0)
    }

    /// Whether the page cache pins page `handle`.
    pub fn is_pinned(&self, handle: u64) -> bool {
        self.pinned.contains(&handle)
    }

    /// Whether page `handle` is kept: pinned and mapped nowhere.
    pub fn is_kept(&self, handle: u64) -> bool {
        self.kept.contains_key(&handle)
    }

    /// Pages pinned by the page cache (mapped or kept).
    pub fn pinned_pages(&self) -> usize {
        self.pinned.len()
    }

    /// Pin `pages` for the page cache: from now on their last unmapping keeps them instead of
    /// freeing them, until the cache evicts them. All or nothing: every page must be mapped and
    /// not yet pinned, and a page cache installed.
    pub fn pin(&mut self, pages: &[PhysicalPage]) -> Result<()> {
        if self.cache.is_none() {
            return Err(VmmError::NoPageCache);
        }
        for (n, p) in pages.iter().enumerate() {
            if !self.refs.contains_key(&p.handle) {
                return Err(VmmError::PinUnmapped { handle: p.handle });
            }
            if self.pinned.contains(&p.handle) || pages[..n].contains(p) {
                return Err(VmmError::AlreadyPinned { handle: p.handle });
            }
        }
        self.pinned.extend(pages.iter().map(|p| p.handle));
        Ok(())
    }

    /// Unpin `pages` (the cache forgot them): a kept one goes back to the pool, a mapped one
    /// goes back when its last mapping does. Returns how many went back to the pool. All or
    /// nothing: every page must be pinned.
    pub fn unpin(&mut self, pages: &[PhysicalPage]) -> Result<usize> {
        if let Some(p) = pages.iter().find(|p| !self.pinned.contains(&p.handle)) {
            return Err(VmmError::NotPinned { handle: p.handle });
        }
        let mut freed = 0;
        for p in pages {
            self.pinned.remove(&p.handle);
            if let Some(page) = self.kept.remove(&p.handle) {
                self.pool.put(page);
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Evict cached units, least recently released first, until `pages` pages went back to the
    /// pool or nothing is evictable; returns the pages that went back.
    pub(super) fn evict_cached(&mut self, pages: usize) -> usize {
        let mut freed = 0;
        while freed < pages {
            let Some(unit) = self.cache.as_mut().and_then(|c| c.evict()) else {
                break;
            };
            for p in unit {
                self.pinned.remove(&p.handle);
                if let Some(page) = self.kept.remove(&p.handle) {
                    self.pool.put(page);
                    freed += 1;
                }
            }
        }
        freed
    }

    /// Pages the page cache could evict.
    pub(super) fn evictable_pages(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.evictable_pages())
    }

    /// Tell the page cache which kept pages were mapped again, then which pinned pages lost
    /// their last mapping, since the last call.
    pub(super) fn notify_unreferenced(&mut self) -> Result<()> {
        if self.unreferenced.is_empty() && self.rereferenced.is_empty() {
            return Ok(());
        }
        let again = std::mem::take(&mut self.rereferenced);
        let pages = std::mem::take(&mut self.unreferenced);
        let Some(cache) = self.cache.as_mut() else {
            return Ok(());
        };
        if !again.is_empty() {
            cache.referenced(&again).map_err(VmmError::PageCache)?;
        }
        if pages.is_empty() {
            return Ok(());
        }
        let kept = &self.kept;
        cache
            .unreferenced(&pages, &|h| kept.contains_key(&h))
            .map_err(VmmError::PageCache)
    }

    /// Start `slot` (active, holding nothing) with cached `units`: unit `j`'s pages (as
    /// [`KvSpace::unit_pages`] lists them, each pinned) mapped at unit `j`'s indices, one more
    /// reference each (the cache is told of kept pages mapped again), replacing what the slot
    /// had there; its length becomes the units' tokens,
    /// which it returns. Pages past them that the slot shares are unmapped, so it writes only
    /// pages of its own. All or nothing: on an error the slot holds nothing, as before.
    pub fn map_cached(&mut self, slot: SlotId, units: &[&[PhysicalPage]]) -> Result<usize> {
        self.active_slot(slot)?;
        let len = self.slots[slot.0].len;
        if len != 0 {
            return Err(VmmError::SlotNotEmpty { slot: slot.0, len });
        }
        let (k, unit_tokens) = self.config.prefix_unit();
        let expected = self.unit_len();
        if let Some(u) = units.iter().find(|u| u.len() != expected) {
            return Err(VmmError::UnitShape {
                expected,
                found: u.len(),
            });
        }
        if let Some(p) = units
            .iter()
            .flat_map(|u| u.iter())
            .find(|p| !self.pinned.contains(&p.handle))
        {
            return Err(VmmError::NotPinned { handle: p.handle });
        }
        let tokens = units.len() * unit_tokens;
        if tokens > self.config.max_tokens {
            return Err(VmmError::TooManyTokens {
                slot: slot.0,
                requested: tokens,
                max_tokens: self.config.max_tokens,
            });
        }
        let full = units.len() * k;
        // Region by region, in index order: the pages not already where they belong.
        let mut wanted = vec![Vec::new(); self.bases.len()];
        for (j, unit) in units.iter().enumerate() {
            for (n, &page) in unit.iter().enumerate() {
                let (region, i) = (n / k, j * k + n % k);
                if self.page(slot, region, i) != Some(page) {
                    wanted[region].push((i, page));
                }
            }
        }
        // Unmap what a region holds there, then map the hit as runs of consecutive pages (one
        // set-access per run: a hit is mapped on the admission's critical path).
        let mut done = Vec::new();
        let mut result = Ok(());
        'regions: for (region, list) in wanted.iter().enumerate() {
            for &(i, _) in list {
                result = self.unmap_page(slot, region, i).map(|_| ());
                if result.is_err() {
                    break 'regions;
                }
            }
            for run in list.chunk_by(|a, b| a.0 + 1 == b.0) {
                let pages: Vec<PhysicalPage> = run.iter().map(|&(_, p)| p).collect();
                result = self.map_run(slot, region, run[0].0, &pages);
                if result.is_err() {
                    break 'regions;
                }
                done.extend(run.iter().map(|&(i, _)| (region, i)));
            }
        }
        if result.is_ok() {
            // Every page the slot will write into from now on must be exclusive to it.
            for region in 0..self.bases.len() {
                for i in full..self.slots[slot.0].pages[region].len() {
                    if self.page(slot, region, i).is_some() && !self.is_exclusive(slot, region, i) {
                        if let Err(e) = self.unmap_page(slot, region, i) {
                            result = Err(e);
                        }
                    }
                }
            }
        }
        if let Err(e) = result {
            for &(region, i) in done.iter().rev() {
                let _ = self.unmap_page(slot, region, i);
            }
            self.notify_unreferenced()?;
            return Err(e);
        }
        let backed = (0..)
            .take_while(|&i| (0..self.bases.len()).all(|r| self.page(slot, r, i).is_some()))
            .count();
        let s = &mut self.slots[slot.0];
        s.len = tokens;
        s.backed = backed;
        self.notify_unreferenced()?;
        Ok(tokens)
    }
}
