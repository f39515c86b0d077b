//! `KvSpace`: the KV cache of `max_slots` requests × `max_tokens` tokens as contiguous virtual
//! ranges, backed by physical pages only as far as tokens have arrived (vAttention, Prabhu et al.
//! 2024).
//!
//! Two layouts ([`KvLayout`]):
//! - `per-layer` (vAttention's default): for every layer one K and one V *region*, each
//!   `[slot][token][kv_head][head_dim]`; a slot grows by one page in each of the `2 · layers`
//!   regions at a time, so a 2 MiB page holds `2 MiB / (kv_heads · head_dim · dtype)` tokens of one
//!   layer (1024 for Llama-3-8B) and the granularity of growth is large.
//! - `token-major` (vAttention's "megacache", vLLM PR #6102): one region
//!   `[slot][token][layer][K|V][kv_head][head_dim]`; one page holds all layers of a few tokens
//!   (16 for Llama-3-8B at 2 MiB) — block-16 granularity without a block table.
//!
//! A region reserves `max_slots × slot_stride` bytes of address space, `slot_stride` being
//! `max_tokens` tokens rounded up to whole pages; page `i` of slot `s` in region `r` lives at
//! `base[r] + s · slot_stride + i · page_size`. Kernels get [`LayerView`]s: base pointers and
//! element strides, nothing else.
//!
//! Life of a slot: [`acquire`](KvSpace::acquire) → [`ensure`](KvSpace::ensure) as tokens arrive →
//! [`release`](KvSpace::release). Release is *deferred reclamation*: the slot's pages stay mapped and
//! the next `acquire` prefers a slot that still has pages, so a new request often needs no mapping
//! call at all; [`reclaim`](KvSpace::reclaim) (also called by `ensure` when the pool runs dry)
//! unmaps pages of released slots and returns them to the pool.
//!
//! Prefix sharing ([`share_prefix`](KvSpace::share_prefix)): the pages that hold only prefix bytes
//! are mapped a second time into the destination slot (one physical page at several addresses,
//! refcounted); the page holding the end of the prefix is copied, because both slots go on writing
//! into it. The invariant that makes this safe: **a slot only writes at or after its length, and
//! every page covering bytes at or after its length is exclusive to it** (reference count 1).
//! `share_prefix` and `release` keep it; `ensure` never shrinks a length.
//!
//! Pages kept for a prefix cache (`cached.rs`): a [`PageCache`] installed in the space (the kv
//! crate's prefix index) *pins* the pages of full, computed units; a pinned page is never
//! exclusive (never written again), is unmapped from a slot when the slot is released, and when
//! mapped nowhere is *kept* — out of the pool — until the cache evicts it, which `ensure`,
//! map-ahead and `reclaim` make it do (after the released slots' pages) when the pool is short.
//! [`map_cached`](KvSpace::map_cached) maps kept or shared cached pages into a new slot.
//!
//! Invariants checked by [`audit`](KvSpace::audit) and the property tests: a page is either free
//! in the pool, mapped, or kept, mapped pages with a reference count equal to the number of places
//! they are mapped; no address holds two pages; `created = free + distinct mapped pages + kept`;
//! a pinned page lies only below the lengths of the slots that map it.
//!
//! Child modules: `layout` (the layouts and the config's byte arithmetic), `page_table` (the
//! slots' page tables and reference counts, and the map / unmap that change them), `cached`
//! (pinned and kept pages) and `audit`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::{PagePool, PhysicalMemory, PhysicalPage, Result, VmmError};

mod audit;
mod cached;
mod layout;
mod page_table;

pub use audit::AuditError;
pub use cached::PageCache;
pub use layout::{KvLayout, KvPart, KvSpaceConfig};
use page_table::Slot;

/// Index of a request slot in a [`KvSpace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub usize);

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a strided kernel needs to address one layer's K and V: the element at
/// `(slot, token, head, d)` is at `k + (slot·slot_stride + token·token_stride + head·head_stride + d)
/// · dtype_bytes` (likewise `v`). Strides are in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerView {
    pub k: u64,
    pub v: u64,
    pub slot_stride: usize,
    pub token_stride: usize,
    pub head_stride: usize,
    pub dtype_bytes: usize,
}

/// A snapshot of a [`KvSpace`]'s memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvStats {
    pub page_size: usize,
    /// Pages in existence (free in the pool + mapped + kept).
    pub pages_created: usize,
    /// Pages waiting in the pool.
    pub pages_free: usize,
    /// Distinct physical pages mapped somewhere.
    pub pages_mapped: usize,
    /// Page-table entries: a page shared by two slots counts twice.
    pub mappings: usize,
    /// Pages mapped at more than one address.
    pub pages_shared: usize,
    /// Pages still mapped in released slots (deferred reclamation).
    pub pages_cached: usize,
    /// Pages mapped in active slots past their length (a reused slot's surplus, map-ahead).
    pub pages_surplus: usize,
    /// Prefix-cache pages mapped nowhere (kept): evictable on demand, counted as neither in use
    /// nor free in the pool.
    pub pages_kept: usize,
    /// Pages the prefix cache pins, mapped or kept.
    pub pages_pinned: usize,
    /// Physical bytes mapped: `pages_mapped · page_size`.
    pub bytes_backed: usize,
    /// Bytes of K and V of the tokens active slots hold (a shared prefix counts once per slot).
    pub bytes_holding_tokens: usize,
    pub active_slots: usize,
    /// Virtual address space reserved.
    pub bytes_reserved: usize,
}

impl KvStats {
    /// Pages that hold no token — cached in released slots or past an active slot's length —
    /// and are reclaimed on demand.
    pub fn pages_reclaimable(&self) -> usize {
        self.pages_cached + self.pages_surplus
    }

    /// Physical bytes active slots hold for their tokens: backed minus reclaimable.
    pub fn bytes_in_use(&self) -> usize {
        self.bytes_backed - self.pages_reclaimable() * self.page_size
    }
}

/// The virtual-memory KV cache (see the module docs).
#[derive(Debug)]
pub struct KvSpace {
    config: KvSpaceConfig,
    backend: Arc<dyn PhysicalMemory>,
    pool: PagePool,
    bases: Vec<u64>,
    slot_stride: usize,
    slots: Vec<Slot>,
    /// Reference count (number of addresses mapped) of every mapped page, by handle.
    refs: HashMap<u64, u32>,
    /// The prefix cache's index, when prefix caching is on (`cached.rs`).
    cache: Option<Box<dyn PageCache>>,
    /// Pages the cache pins, by handle: kept when their last mapping goes.
    pinned: HashSet<u64>,
    /// Pinned pages mapped nowhere: out of the pool, evictable through the cache.
    kept: BTreeMap<u64, PhysicalPage>,
    /// Pinned pages that lost their last mapping, not yet told to the cache.
    unreferenced: Vec<PhysicalPage>,
    /// Kept pages mapped again, not yet told to the cache.
    rereferenced: Vec<PhysicalPage>,
}

impl KvSpace {
    /// Reserve the address space of `config` on `backend`; no page is created yet (see
    /// [`create_ahead`](Self::create_ahead)).
    pub fn new(config: KvSpaceConfig, backend: Arc<dyn PhysicalMemory>) -> Result<Self> {
        config.validate()?;
        let pool = PagePool::new(backend.clone(), config.page_size, config.max_pages)?;
        let slot_stride = config.slot_stride();
        let region_bytes = slot_stride
            .checked_mul(config.max_slots)
            .ok_or_else(|| VmmError::InvalidConfig("slot_stride × max_slots overflows".into()))?;
        let mut bases = Vec::with_capacity(config.num_regions());
        for _ in 0..config.num_regions() {
            match backend.reserve(region_bytes, config.page_size) {
                Ok(base) => bases.push(base),
                Err(e) => {
                    for &base in &bases {
                        let _ = backend.free_reservation(base, region_bytes);
                    }
                    return Err(e);
                }
            }
        }
        let slot = Slot {
            active: false,
            len: 0,
            pages: vec![Vec::new(); config.num_regions()],
            mapped: 0,
            backed: 0,
        };
        Ok(KvSpace {
            slots: vec![slot; config.max_slots],
            config,
            backend,
            pool,
            bases,
            slot_stride,
            refs: HashMap::new(),
            cache: None,
            pinned: HashSet::new(),
            kept: BTreeMap::new(),
            unreferenced: Vec::new(),
            rereferenced: Vec::new(),
        })
    }

    pub fn config(&self) -> &KvSpaceConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn PhysicalMemory> {
        &self.backend
    }

    /// Create pages into the pool until `free` are waiting (bounded by the budget).
    pub fn create_ahead(&mut self, free: usize) -> Result<usize> {
        self.pool.create_ahead(free)
    }

    /// Pages waiting in the pool.
    pub fn pool_free(&self) -> usize {
        self.pool.free()
    }

    /// Pages that could still be handed out without reclaiming (free + creatable).
    pub fn pool_available(&self) -> usize {
        self.pool.available()
    }

    /// Take a free slot, preferring one that still has pages mapped from an earlier request.
    pub fn acquire(&mut self) -> Result<SlotId> {
        let best = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.active)
            .max_by_key(|(i, s)| (s.mapped, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        let Some(i) = best else {
            return Err(VmmError::NoFreeSlot {
                max_slots: self.config.max_slots,
            });
        };
        let slot = &mut self.slots[i];
        slot.active = true;
        slot.len = 0;
        Ok(SlotId(i))
    }

    /// End a request. Its exclusive pages stay mapped for the next request in this slot (deferred
    /// reclamation); pages it shares with other slots, and pages the prefix cache pins, are
    /// unmapped from it (a pinned page mapped nowhere else is kept, and the cache told).
    pub fn release(&mut self, slot: SlotId) -> Result<()> {
        self.active_slot(slot)?;
        for region in 0..self.bases.len() {
            for i in 0..self.slots[slot.0].pages[region].len() {
                if self.page(slot, region, i).is_some() && !self.is_exclusive(slot, region, i) {
                    self.unmap_page(slot, region, i)?;
                }
            }
        }
        let s = &mut self.slots[slot.0];
        s.active = false;
        s.len = 0;
        self.notify_unreferenced()
    }

    /// Whether `slot` is currently acquired.
    pub fn is_active(&self, slot: SlotId) -> bool {
        self.slots.get(slot.0).is_some_and(|s| s.active)
    }

    /// Tokens `slot` holds.
    pub fn len(&self, slot: SlotId) -> usize {
        self.slots.get(slot.0).map_or(0, |s| s.len)
    }

    /// Whether `slot`'s pages cover `tokens` tokens in every region.
    pub fn is_backed(&self, slot: SlotId, tokens: usize) -> bool {
        let need = self.config.pages_for(tokens.min(self.config.max_tokens));
        self.slots.get(slot.0).is_some_and(|s| {
            need <= s.backed
                || (0..s.pages.len()).all(|r| (0..need).all(|i| self.page(slot, r, i).is_some()))
        })
    }

    /// Back `slot` up to `tokens` tokens and record that it holds them (lengths only grow).
    /// Returns the number of pages mapped by this call. When the pool cannot supply the pages,
    /// pages of released slots are reclaimed; if that is not enough the call fails with
    /// [`VmmError::PoolExhausted`] having changed nothing.
    pub fn ensure(&mut self, slot: SlotId, tokens: usize) -> Result<usize> {
        let mapped = self.back(slot, 0, tokens, usize::MAX)?;
        let s = &mut self.slots[slot.0];
        s.len = s.len.max(tokens);
        Ok(mapped)
    }

    /// Map at most `max_new_pages` of the pages `slot` needs for `tokens` tokens, without changing
    /// its length (the [`crate::Mapper`]'s map-ahead), from the page that holds token `from` on:
    /// 0 for all of them; a prepared admission whose first `from` tokens a prefix-cache hit will
    /// map ([`KvSpace::map_cached`]) leaves those pages to it. Returns the pages mapped.
    pub fn prefetch(
        &mut self,
        slot: SlotId,
        from: usize,
        tokens: usize,
        max_new_pages: usize,
    ) -> Result<usize> {
        let first = from * self.config.region_bytes_per_token() / self.config.page_size;
        self.back(slot, first, tokens, max_new_pages)
    }

    /// Unmap at most `max_pages` of the pages `slot` maps below the page that holds token `hit`
    /// and past its length (pages that hold no token: a prepared slot's surplus), so that a
    /// prefix-cache hit of `hit` tokens maps its pages there without unmapping anything on the
    /// admission's critical path. Returns the pages unmapped.
    pub fn clear_for_hit(&mut self, slot: SlotId, hit: usize, max_pages: usize) -> Result<usize> {
        self.active_slot(slot)?;
        let below = hit.min(self.config.max_tokens) * self.config.region_bytes_per_token()
            / self.config.page_size;
        let first = self.config.pages_for(self.slots[slot.0].len);
        let mut unmapped = 0;
        'pages: for region in 0..self.bases.len() {
            for i in first..below.min(self.slots[slot.0].pages[region].len()) {
                if unmapped == max_pages {
                    break 'pages;
                }
                if self.page(slot, region, i).is_some() {
                    self.unmap_page(slot, region, i)?;
                    unmapped += 1;
                }
            }
        }
        self.notify_unreferenced()?;
        Ok(unmapped)
    }

    /// Back pages `first..` of those `slot` needs for `tokens` tokens (at most `max_new_pages`).
    fn back(
        &mut self,
        slot: SlotId,
        first: usize,
        tokens: usize,
        max_new_pages: usize,
    ) -> Result<usize> {
        self.active_slot(slot)?;
        if tokens > self.config.max_tokens {
            return Err(VmmError::TooManyTokens {
                slot: slot.0,
                requested: tokens,
                max_tokens: self.config.max_tokens,
            });
        }
        let need = self.config.pages_for(tokens);
        if need <= self.slots[slot.0].backed {
            return Ok(0);
        }
        let missing: usize = (0..self.bases.len())
            .map(|r| {
                (first..need)
                    .filter(|&i| self.page(slot, r, i).is_none())
                    .count()
            })
            .sum();
        // Check the whole request can be met before mapping any of it, so an impossible request
        // (also a map-ahead done a few pages at a time) takes no pages.
        self.make_available(missing, slot)?;
        let todo = missing.min(max_new_pages);
        // Page by page across regions, so that a partial (map-ahead) call backs the soonest
        // tokens in every layer first; then each region's pages are mapped as runs of
        // consecutive indices (one set-access per run).
        let mut wanted = vec![Vec::new(); self.bases.len()];
        let mut mapped = 0;
        'pages: for i in first..need {
            for (region, indices) in wanted.iter_mut().enumerate() {
                if mapped == todo {
                    break 'pages;
                }
                if self.page(slot, region, i).is_none() {
                    indices.push(i);
                    mapped += 1;
                }
            }
        }
        for (region, indices) in wanted.iter().enumerate() {
            for run in indices.chunk_by(|a, b| a + 1 == *b) {
                let pages = self.pool.take_many(run.len())?;
                self.map_run(slot, region, run[0], &pages)?;
            }
        }
        if mapped == missing && first == 0 {
            let s = &mut self.slots[slot.0];
            s.backed = s.backed.max(need);
        }
        Ok(mapped)
    }

    /// Make `pages` pages available in the pool for `slot`, reclaiming from other slots and
    /// evicting cached pages if needed — or fail having reclaimed and evicted nothing.
    fn make_available(&mut self, pages: usize, slot: SlotId) -> Result<()> {
        let available = self.pool.available();
        if available >= pages {
            return Ok(());
        }
        let reclaimable = (0..self.slots.len())
            .filter(|&s| s != slot.0)
            .map(|s| self.reclaimable_pages(SlotId(s)))
            .sum::<usize>()
            + self.evictable_pages();
        if available + reclaimable < pages {
            return Err(self.pool.exhausted(pages));
        }
        self.reclaim_from(pages - available, Some(slot))?;
        Ok(())
    }

    /// Pages of `slot` that hold no token: all of a released slot's, and an active slot's past
    /// its length (a reused slot's surplus, or pages mapped ahead). An active slot is backed
    /// exactly up to its length (`ensure` and `share_prefix` back it; only pages past it are
    /// ever reclaimed), so this is a count, not a scan.
    fn reclaimable_pages(&self, slot: SlotId) -> usize {
        let s = &self.slots[slot.0];
        if !s.active {
            return s.mapped;
        }
        s.mapped - self.config.pages_for(s.len) * self.bases.len()
    }

    /// Unmap up to `pages` pages that hold no token and return them to the pool (memory
    /// pressure): first those of released slots (deferred reclamation), then cached pages no
    /// slot maps (evicted through the page cache, least recently released first), then those
    /// of active slots past their length. Returns how many pages went back.
    pub fn reclaim(&mut self, pages: usize) -> Result<usize> {
        let returned = self.reclaim_from(pages, None);
        self.notify_unreferenced()?;
        returned
    }

    fn reclaim_from(&mut self, pages: usize, keep: Option<SlotId>) -> Result<usize> {
        let mut returned = 0;
        for active in [false, true] {
            if active {
                returned += self.evict_cached(pages - returned);
            }
            for s in 0..self.slots.len() {
                let slot = &self.slots[s];
                if slot.active != active || slot.mapped == 0 || keep == Some(SlotId(s)) {
                    continue;
                }
                let first = if active {
                    self.config.pages_for(slot.len)
                } else {
                    0
                };
                for region in 0..self.bases.len() {
                    for i in (first..self.slots[s].pages[region].len()).rev() {
                        if returned == pages {
                            return Ok(returned);
                        }
                        if self.page(SlotId(s), region, i).is_some()
                            && self.unmap_page(SlotId(s), region, i)?
                        {
                            returned += 1;
                        }
                    }
                }
            }
        }
        Ok(returned)
    }

    /// Reclaim every page that holds no token of a running sequence, the prefix cache's
    /// evictable pages included; returns how many went back to the pool.
    pub fn reclaim_all(&mut self) -> Result<usize> {
        self.reclaim(usize::MAX)
    }

    /// Give the pool's free pages back to the backend (releasing physical memory); returns how
    /// many were released.
    pub fn trim_pool(&mut self) -> Result<usize> {
        self.pool.shrink(usize::MAX)
    }

    /// Make the first `tokens` tokens of `dst` the same as those of `src`: pages holding only
    /// prefix bytes are mapped into `dst` (shared, refcounted); the page holding the end of the
    /// prefix is copied. `dst`'s length becomes `tokens`; what it held past that is dropped.
    /// `tokens` must not exceed the length of `src`.
    pub fn share_prefix(&mut self, src: SlotId, dst: SlotId, tokens: usize) -> Result<()> {
        self.active_slot(src)?;
        self.active_slot(dst)?;
        if src == dst {
            return Err(VmmError::ShareIntoSelf { slot: src.0 });
        }
        let held = self.slots[src.0].len;
        if tokens > held {
            return Err(VmmError::ShareBeyondSource {
                src: src.0,
                tokens,
                backed: held,
            });
        }
        let bytes = tokens * self.config.region_bytes_per_token();
        let (full, rem) = (bytes / self.config.page_size, bytes % self.config.page_size);
        // Fresh pages needed: one per region for the copied partial page, unless dst already
        // has an exclusive page there.
        let fresh = if rem == 0 {
            0
        } else {
            (0..self.bases.len())
                .filter(|&r| !self.is_exclusive(dst, r, full))
                .count()
        };
        self.make_available(fresh, dst)?;
        let shared = self.share_pages(src, dst, tokens, (full, rem));
        let notified = self.notify_unreferenced();
        shared.and(notified)
    }

    /// The mapping and copying of [`KvSpace::share_prefix`], its checks done and its fresh
    /// pages available.
    fn share_pages(
        &mut self,
        src: SlotId,
        dst: SlotId,
        tokens: usize,
        (full, rem): (usize, usize),
    ) -> Result<()> {
        for region in 0..self.bases.len() {
            for i in 0..full {
                let page = self.page(src, region, i).expect("src holds its prefix");
                if self.page(dst, region, i) == Some(page) {
                    continue;
                }
                if self.page(dst, region, i).is_some() {
                    self.unmap_page(dst, region, i)?;
                }
                self.map_page(dst, region, i, page)?;
            }
            // Every page dst will write into from now on must be exclusive to it.
            for i in full..self.slots[dst.0].pages[region].len() {
                if self.page(dst, region, i).is_some() && !self.is_exclusive(dst, region, i) {
                    self.unmap_page(dst, region, i)?;
                }
            }
            if rem > 0 {
                if self.page(dst, region, full).is_none() {
                    let page = self.pool.take()?;
                    self.map_page(dst, region, full, page)?;
                }
                if self.backend.holds_bytes() {
                    let at = |s: SlotId| self.page_addr(s, region, full);
                    // SAFETY: both pages are mapped (src holds its prefix; dst's was just
                    // ensured) and distinct (dst's page at `full` is exclusive).
                    unsafe { self.backend.copy(at(dst), at(src), rem)? };
                }
            }
        }
        let backed = (0..)
            .take_while(|&i| (0..self.bases.len()).all(|r| self.page(dst, r, i).is_some()))
            .count();
        let d = &mut self.slots[dst.0];
        d.len = tokens;
        d.backed = backed;
        Ok(())
    }

    /// Base pointers and element strides of `layer`'s K and V, for strided kernels.
    pub fn layer_view(&self, layer: usize) -> LayerView {
        let c = &self.config;
        let elems = |bytes: usize| bytes / c.dtype_bytes;
        let (k, v, token_stride) = match c.layout {
            KvLayout::PerLayer => (
                self.bases[2 * layer],
                self.bases[2 * layer + 1],
                c.head_bytes(),
            ),
            KvLayout::TokenMajor => {
                let base = self.bases[0] + (2 * layer * c.head_bytes()) as u64;
                (base, base + c.head_bytes() as u64, c.bytes_per_token())
            }
        };
        LayerView {
            k,
            v,
            slot_stride: elems(self.slot_stride),
            token_stride: elems(token_stride),
            head_stride: c.head_dim,
            dtype_bytes: c.dtype_bytes,
        }
    }

    /// Region and byte offset (within a slot's range) of one token's K or V in one layer.
    pub fn locate(&self, layer: usize, part: KvPart, token: usize) -> (usize, usize) {
        let c = &self.config;
        match c.layout {
            KvLayout::PerLayer => (2 * layer + part as usize, token * c.head_bytes()),
            KvLayout::TokenMajor => (
                0,
                token * c.bytes_per_token() + (2 * layer + part as usize) * c.head_bytes(),
            ),
        }
    }

    /// Write one token's K or V of one layer (`num_kv_heads · head_dim · dtype_bytes` bytes).
    pub fn write_token(
        &self,
        slot: SlotId,
        layer: usize,
        part: KvPart,
        token: usize,
        data: &[u8],
    ) -> Result<()> {
        self.check_token(layer, token, data.len())?;
        let (region, offset) = self.locate(layer, part, token);
        self.write_bytes(slot, region, offset, data)
    }

    /// Read one token's K or V of one layer into `out`.
    pub fn read_token(
        &self,
        slot: SlotId,
        layer: usize,
        part: KvPart,
        token: usize,
        out: &mut [u8],
    ) -> Result<()> {
        self.check_token(layer, token, out.len())?;
        let (region, offset) = self.locate(layer, part, token);
        self.read_bytes(slot, region, offset, out)
    }

    /// Write raw bytes at `offset` of `slot`'s range in `region`; fails unless mapped.
    pub fn write_bytes(
        &self,
        slot: SlotId,
        region: usize,
        offset: usize,
        data: &[u8],
    ) -> Result<()> {
        let addr = self.checked_addr(slot, region, offset, data.len())?;
        // SAFETY: checked_addr verified that every page under the range is mapped.
        unsafe { self.backend.write(addr, data) }
    }

    /// Read raw bytes at `offset` of `slot`'s range in `region`; fails unless mapped.
    pub fn read_bytes(
        &self,
        slot: SlotId,
        region: usize,
        offset: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let addr = self.checked_addr(slot, region, offset, out.len())?;
        // SAFETY: checked_addr verified that every page under the range is mapped.
        unsafe { self.backend.read(addr, out) }
    }

    /// Virtual address of byte `offset` of `slot`'s range in `region` (mapped or not).
    pub fn addr(&self, slot: SlotId, region: usize, offset: usize) -> u64 {
        self.bases[region] + (slot.0 * self.slot_stride + offset) as u64
    }

    pub fn stats(&self) -> KvStats {
        let c = &self.config;
        let mappings: usize = self.slots.iter().map(|s| s.mapped).sum();
        let pages_cached = self
            .slots
            .iter()
            .filter(|s| !s.active)
            .map(|s| s.mapped)
            .sum();
        let active: Vec<&Slot> = self.slots.iter().filter(|s| s.active).collect();
        KvStats {
            page_size: c.page_size,
            pages_created: self.pool.created(),
            pages_free: self.pool.free(),
            pages_mapped: self.refs.len(),
            mappings,
            pages_shared: self.refs.values().filter(|&&r| r > 1).count(),
            pages_cached,
            pages_surplus: (0..self.slots.len())
                .filter(|&s| self.slots[s].active)
                .map(|s| self.reclaimable_pages(SlotId(s)))
                .sum(),
            pages_kept: self.kept.len(),
            pages_pinned: self.pinned.len(),
            bytes_backed: self.refs.len() * c.page_size,
            bytes_holding_tokens: active.iter().map(|s| s.len).sum::<usize>() * c.bytes_per_token(),
            active_slots: active.len(),
            bytes_reserved: self.bases.len() * self.slot_stride * c.max_slots,
        }
    }

    fn active_slot(&self, slot: SlotId) -> Result<()> {
        match self.slots.get(slot.0) {
            None => Err(VmmError::UnknownSlot {
                slot: slot.0,
                max_slots: self.config.max_slots,
            }),
            Some(s) if !s.active => Err(VmmError::SlotNotActive { slot: slot.0 }),
            Some(_) => Ok(()),
        }
    }

    fn check_token(&self, layer: usize, token: usize, len: usize) -> Result<()> {
        let c = &self.config;
        if layer >= c.num_layers || token >= c.max_tokens || len != c.head_bytes() {
            return Err(VmmError::InvalidConfig(format!(
                "token access: layer {layer} (of {}), token {token} (of {}), {len} bytes (expected {})",
                c.num_layers,
                c.max_tokens,
                c.head_bytes()
            )));
        }
        Ok(())
    }

    fn checked_addr(&self, slot: SlotId, region: usize, offset: usize, len: usize) -> Result<u64> {
        self.active_slot(slot)?;
        let end = offset + len;
        let not_backed = VmmError::NotBacked {
            slot: slot.0,
            region,
            offset,
            end,
        };
        if region >= self.bases.len() || end > self.slot_stride {
            return Err(not_backed);
        }
        if len > 0 {
            let (first, last) = (
                offset / self.config.page_size,
                (end - 1) / self.config.page_size,
            );
            if (first..=last).any(|i| self.page(slot, region, i).is_none()) {
                return Err(not_backed);
            }
        }
        Ok(self.addr(slot, region, offset))
    }
}

impl Drop for KvSpace {
    fn drop(&mut self) {
        // Every page goes back to the pool, which releases it: nothing is kept any more.
        self.pinned.clear();
        for (_, page) in std::mem::take(&mut self.kept) {
            self.pool.put(page);
        }
        for s in 0..self.slots.len() {
            for region in 0..self.bases.len() {
                for i in 0..self.slots[s].pages[region].len() {
                    let _ = self.unmap_page(SlotId(s), region, i);
                }
            }
        }
        let bytes = self.slot_stride * self.config.max_slots;
        for &base in &self.bases {
            let _ = self.backend.free_reservation(base, bytes);
        }
        // The pool releases its (now all free) pages when it drops.
    }
}

#[cfg(test)]
#[path = "space_tests.rs"]
mod tests;
