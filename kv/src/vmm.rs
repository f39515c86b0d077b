//! The vmm KV cache (vAttention, Prabhu et al. 2024): each sequence is one slot of a
//! [`KvSpace`] — one contiguous virtual range per sequence (per layer, or one for all layers in
//! the token-major layout), backed by physical pages only as its tokens arrive. [`VmmManager`]
//! keeps the books on any [`PhysicalMemory`] and drives the space through a [`Mapper`] thread,
//! so the pages the next step needs are mapped while this one computes ([`MapAhead`]); released
//! slots keep their pages for the next sequence (deferred reclamation). [`VmmKv`] is it on host
//! memory ([`HostVmm`]), the CPU device's cache; the CUDA cache is it on `CudaVmm`.
//!
//! Sharing is physical: a fork maps the source's whole prefix pages into the new slot
//! (refcounted by the space) and copies the page the prefix ends inside
//! ([`KvSpace::share_prefix`]), so the two sequences read one copy of the prefix.
//!
//! # Automatic prefix caching
//!
//! Built with [`VmmManager::with_prefix_caching`] / [`VmmKv::with_prefix_caching`] (off by
//! default), the cache implements [`PrefixCache`] over physical memory. The cached *unit* is
//! [`KvSpaceConfig::prefix_unit`]: the pages at the same indices of every region of a slot —
//! one page row whenever a page holds whole tokens: in the token-major layout one page (all
//! layers of `page_size / bytes_per_token` tokens), in the per-layer layout one page of each of
//! the `2 · layers` regions (`page_size / head_bytes` tokens) — or the fewest pages that hold
//! whole tokens when one does not (a 28-layer model's token-major 2 MiB pages: 7 pages of 256
//! tokens). The [`PrefixIndex`]'s block size is the unit's tokens, sharing is page-granular,
//! and only full units are cached. A unit is named by its first page's handle.
//!
//! - `cache_computed` records each full unit of the sequence's computed tokens past its chain
//!   (per-sequence progress, as the paged cache's): the unit's pages are *pinned* in the space
//!   ([`KvSpace::pin`]). A unit whose pages are pinned already (it came from a hit or a fork) is
//!   followed in the index instead; one equal to a cached unit stays the sequence's own.
//! - `match_prefix` looks the tokens up (never all of them: at most the largest multiple of the
//!   unit below their count), takes a slot (the one prepared for the sequence, if any) and maps
//!   the hit's pages at the slot's first addresses ([`KvSpace::map_cached`], one more reference
//!   each): unmodified strided kernels read the prefix, and the sequence writes from there on,
//!   into pages of its own. Lookup and mapping happen under one hold of the space's lock.
//!   A hit is mapped on the admission's critical path, so it is made cheap ahead of time: the
//!   scheduler guesses each likely admission's hit (`cached_tokens`, a lookup that references
//!   nothing), and `prepare_admissions` has the mapper thread unmap the prepared slot's surplus
//!   pages where the hit will go and back only the pages past it; the hit then only maps its
//!   pages, one set-access per run of pages.
//! - `free` releases the slot: the space unmaps the pinned pages from it (they never stay in a
//!   released slot, whose next sequence would write them); a pinned page mapped nowhere any more
//!   is *kept* — out of the pool, counted as neither in use nor free — and a unit whose pages are
//!   all kept becomes evictable in the index (its sequence's units tail first). The other pages
//!   stay mapped in the released slot as before (deferred reclamation).
//! - Eviction happens inside the space, whoever holds its lock: the index is installed in the
//!   [`KvSpace`] as its [`PageCache`], so `reserve`, the mapper thread's map-ahead,
//!   `prepare_admissions`, `warm_free_slots` and [`KvSpace::reclaim`] all evict (least recently
//!   released unit first, its pages back to the pool) when the pool and the released slots are
//!   short, and fail with out-of-memory, evicting nothing, only when free, reclaimable and
//!   evictable pages together are too few. It is the same code on `HostVmm` and `CudaVmm`:
//!   unmapping and mapping pooled pages, never a device synchronize nor a page created while
//!   the pool has one.
//!
//! Invariants (the space's audit and [`KvManager::audit`], property-tested in
//! `vmm_prefix_tests.rs`): a pinned page lies only below the lengths of the active slots that
//! map it — never where a slot writes, never in a released slot — so a page mapped in a running
//! sequence is never evicted nor written by another; a cached unit's pages are all pinned and
//! every pinned page belongs to one unit; a unit is evictable exactly when none of its pages is
//! mapped (all kept); kept pages are never in the free pool, and the pages created are the
//! free, the mapped and the kept ones; every chain belongs to a sequence and covers no more than
//! it holds. For admission kept pages are free memory: `usage().bytes_allocated` counts mapped
//! pages holding tokens only, so after every sequence is freed it is 0 and only evictable units
//! remain.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use vkv_kernels::cpu::{KvDtype, KvRef};
use vkv_vmm::{
    HostVmm, KvSpace, KvSpaceConfig, LayerView, Mapper, MapperOptions, MapperStats, PageCache,
    PhysicalMemory, PhysicalPage, SlotId, VmmError,
};

use super::manager::{
    caching_off, enable_before_use, unknown, unreserved, KvCache, KvDims, KvManager, KvUsage,
    LikelyAdmission, MapAhead, PrefixCache, SeqId, VmmShape,
};
use super::paged::Chain;
use super::prefix::{Inserted, PrefixIndex, PrefixStats};
use super::KvError;

/// The vmm KV books on any [`PhysicalMemory`]: a [`KvSpace`], one slot per sequence, driven
/// through a [`Mapper`] thread so that pages the next step needs can be mapped while this one
/// computes ([`KvManager::map_ahead`]); a `reserve` that finds its pages missing counts as a map
/// wait. Released slots keep their pages (deferred reclamation) for the next sequence. The CPU's
/// [`VmmKv`] is this on host memory; the CUDA cache is this on `CudaVmm`.
pub struct VmmManager {
    mapper: Mapper,
    /// Per layer: the space's base addresses and strides (fixed for its lifetime).
    views: Vec<LayerView>,
    config: KvSpaceConfig,
    slots: HashMap<SeqId, SlotId>,
    /// Slots acquired for waiting sequences about to be admitted, their first pages mapped ahead
    /// ([`KvManager::prepare_admissions`]); such a slot holds no token, so its pages are surplus
    /// the space reclaims under pressure.
    /// With the tokens its pages were last asked for.
    prepared: HashMap<SeqId, (SlotId, usize)>,
    /// Map waits of sequences that already had a slot (see [`KvManager::growth_map_waits`]).
    growth_waits: u64,
    /// Automatic prefix caching is on (its state, [`VmmPrefix`], lives in the space).
    prefix_caching: bool,
}

/// One cached unit: its pages (as [`KvSpace::unit_pages`] lists them) and its position (unit
/// index) in the sequences that hold it.
#[derive(Debug, Clone)]
struct CachedUnit {
    pages: Box<[PhysicalPage]>,
    position: usize,
}

/// The prefix cache of a [`VmmManager`], installed in its [`KvSpace`] as the space's
/// [`PageCache`] so that whoever holds the space's lock — the engine's thread or the mapper's —
/// evicts through the same index (see the module docs). A unit is named by the handle of its
/// first page.
#[derive(Debug)]
struct VmmPrefix {
    index: PrefixIndex<u64>,
    units: HashMap<u64, CachedUnit>,
    /// The unit of every pinned page, by handle.
    owner: HashMap<u64, u64>,
    chains: HashMap<SeqId, Chain>,
    /// Pages per unit, all regions together.
    unit_len: usize,
}

impl VmmPrefix {
    /// Forget cached unit `unit` (evicted, or its pinning failed); returns its pages.
    fn forget(&mut self, unit: u64) -> Vec<PhysicalPage> {
        self.index.forget(unit);
        let pages = self
            .units
            .remove(&unit)
            .map(|u| u.pages)
            .unwrap_or_default();
        for p in pages.iter() {
            self.owner.remove(&p.handle);
        }
        pages.into_vec()
    }
}

impl PageCache for VmmPrefix {
    fn unreferenced(
        &mut self,
        pages: &[PhysicalPage],
        kept: &dyn Fn(u64) -> bool,
    ) -> Result<(), String> {
        let mut released: Vec<(usize, u64)> = Vec::new();
        for p in pages {
            let Some(&unit) = self.owner.get(&p.handle) else {
                return Err(format!(
                    "pinned page {} belongs to no cached unit",
                    p.handle
                ));
            };
            if released.iter().any(|&(_, u)| u == unit) || self.index.is_evictable(unit) {
                continue;
            }
            let cached = &self.units[&unit];
            if cached.pages.iter().all(|p| kept(p.handle)) {
                released.push((cached.position, unit));
            }
        }
        // First unit first: the index queues a sequence's tail ahead of its head.
        released.sort_unstable();
        let units: Vec<u64> = released.into_iter().map(|(_, u)| u).collect();
        self.index.release(&units).map_err(|e| e.to_string())
    }

    fn referenced(&mut self, pages: &[PhysicalPage]) -> Result<(), String> {
        for p in pages {
            let Some(&unit) = self.owner.get(&p.handle) else {
                return Err(format!("kept page {} belongs to no cached unit", p.handle));
            };
            self.index.acquire(unit).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn evict(&mut self) -> Option<Vec<PhysicalPage>> {
        let unit = self.index.evict()?;
        // `evict` forgot the entry already; drop the pages' books.
        Some(self.forget(unit))
    }

    fn evictable_pages(&self) -> usize {
        self.index.stats().evictable_units * self.unit_len
    }
}

/// The prefix cache installed in `space`, if any.
fn prefix_in(space: &mut KvSpace) -> Option<&mut VmmPrefix> {
    let cache: &mut dyn Any = space.page_cache_mut()?;
    cache.downcast_mut()
}

/// The prefix cache installed in `space`, if any, to read.
fn prefix_of(space: &KvSpace) -> Option<&VmmPrefix> {
    let cache: &dyn Any = space.page_cache()?;
    cache.downcast_ref()
}

/// A slot for `seq`, being admitted: the one prepared for it, else a free one — taking back the
/// slots prepared for others when none is free. The bool says whether the slot was prepared.
fn admission_slot_in(
    space: &mut KvSpace,
    prepared: &mut HashMap<SeqId, (SlotId, usize)>,
    seq: SeqId,
) -> Result<(SlotId, bool), KvError> {
    if let Some((slot, _)) = prepared.remove(&seq) {
        return Ok((slot, true));
    }
    match space.acquire() {
        Ok(slot) => Ok((slot, false)),
        Err(VmmError::NoFreeSlot { .. }) if !prepared.is_empty() => {
            let others: Vec<SeqId> = prepared.keys().copied().collect();
            for other in others {
                if let Some((slot, _)) = prepared.remove(&other) {
                    space.release(slot).map_err(vmm_error)?;
                }
            }
            let slot = space.acquire().map_err(vmm_error)?;
            Ok((slot, false))
        }
        Err(e) => Err(vmm_error(e)),
    }
}

impl VmmManager {
    /// A space of `config` on `backend`, its mapper started with `options`.
    pub fn new(
        config: KvSpaceConfig,
        backend: Arc<dyn PhysicalMemory>,
        options: MapperOptions,
    ) -> Result<Self, KvError> {
        let space = KvSpace::new(config.clone(), backend).map_err(vmm_error)?;
        let views = (0..config.num_layers)
            .map(|l| space.layer_view(l))
            .collect();
        Ok(VmmManager {
            mapper: Mapper::spawn(space, options).map_err(vmm_error)?,
            views,
            config,
            slots: HashMap::new(),
            prepared: HashMap::new(),
            growth_waits: 0,
            prefix_caching: false,
        })
    }

    /// The same cache with automatic prefix caching on (see the module docs).
    pub fn with_prefix_caching(mut self) -> Self {
        self.turn_on_prefix_caching();
        self
    }

    fn turn_on_prefix_caching(&mut self) {
        if self.prefix_caching {
            return;
        }
        let (_, unit_tokens) = self.config.prefix_unit();
        let index = PrefixIndex::new(unit_tokens).expect("a unit holds at least one token");
        let mut space = self.mapper.space();
        let unit_len = space.unit_len();
        space.set_page_cache(Box::new(VmmPrefix {
            index,
            units: HashMap::new(),
            owner: HashMap::new(),
            chains: HashMap::new(),
            unit_len,
        }));
        drop(space);
        self.prefix_caching = true;
    }

    /// Whether automatic prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Tokens of one cached unit: the prefix index's block size (the tokens one page row holds,
    /// when pages hold whole tokens; see [`KvSpaceConfig::prefix_unit`]).
    pub fn prefix_unit_tokens(&self) -> usize {
        self.config.prefix_unit().1
    }

    /// Cached pages no sequence holds (evicted on demand); 0 without prefix caching.
    pub fn evictable_pages(&self) -> usize {
        self.mapper.space().stats().pages_kept
    }

    /// Check the prefix cache against the space (the space's own audit checks pins and kept
    /// pages): every cached unit's pages are pinned and its; a unit is evictable in the index
    /// exactly when all its pages are kept (mapped by no slot); every pinned page belongs to a
    /// unit; every chain belongs to a sequence and covers no more than it holds.
    fn audit_prefix(&self, space: &KvSpace) -> Result<(), KvError> {
        let bad = |what: String| Err(KvError::Inconsistent(what));
        let Some(prefix) = prefix_of(space) else {
            return bad("prefix caching is on, but the space has no vmm prefix cache".into());
        };
        prefix.index.audit()?;
        if prefix.units.len() != prefix.index.len() {
            return bad(format!(
                "{} units have pages recorded but the prefix index caches {}",
                prefix.units.len(),
                prefix.index.len()
            ));
        }
        let mut pinned = 0;
        for (&unit, cached) in &prefix.units {
            if !prefix.index.is_cached(unit)
                || cached.pages.len() != prefix.unit_len
                || cached.pages.first().map(|p| p.handle) != Some(unit)
            {
                return bad(format!(
                    "unit {unit} at position {} has {} pages (expected {}, the first {unit}) \
                     and is {}cached in the index",
                    cached.position,
                    cached.pages.len(),
                    prefix.unit_len,
                    if prefix.index.is_cached(unit) {
                        ""
                    } else {
                        "not "
                    }
                ));
            }
            pinned += cached.pages.len();
            for p in cached.pages.iter() {
                if !space.is_pinned(p.handle) || prefix.owner.get(&p.handle) != Some(&unit) {
                    return bad(format!(
                        "page {} of cached unit {unit} is {}pinned and owned by {:?}",
                        p.handle,
                        if space.is_pinned(p.handle) {
                            ""
                        } else {
                            "not "
                        },
                        prefix.owner.get(&p.handle)
                    ));
                }
            }
            let held = cached
                .pages
                .iter()
                .filter(|p| !space.is_kept(p.handle))
                .count();
            if (held == 0) != prefix.index.is_evictable(unit) {
                return bad(format!(
                    "unit {unit}: {held} of its pages are mapped, yet it is {}evictable",
                    if prefix.index.is_evictable(unit) {
                        ""
                    } else {
                        "not "
                    }
                ));
            }
        }
        if pinned != space.pinned_pages() || prefix.owner.len() != pinned {
            return bad(format!(
                "cached units hold {pinned} pages, the space pins {} and {} have an owner",
                space.pinned_pages(),
                prefix.owner.len()
            ));
        }
        let unit_tokens = self.prefix_unit_tokens();
        for (seq, chain) in &prefix.chains {
            let held = self.slots.get(seq).map(|&slot| space.len(slot));
            if held.is_none_or(|held| chain.recorded * unit_tokens > held) {
                return bad(format!(
                    "sequence {seq} has {} units of {unit_tokens} tokens recorded in the prefix \
                     cache but holds {held:?} tokens",
                    chain.recorded
                ));
            }
        }
        Ok(())
    }

    /// The space, locked (statistics, audit, creating pages ahead).
    pub fn space(&self) -> MutexGuard<'_, KvSpace> {
        self.mapper.space()
    }

    pub fn config(&self) -> &KvSpaceConfig {
        &self.config
    }

    /// Layer `l`'s base addresses and strides.
    pub fn view(&self, layer: usize) -> &LayerView {
        &self.views[layer]
    }

    /// The slot `seq` holds.
    pub fn slot(&self, seq: SeqId) -> Option<SlotId> {
        self.slots.get(&seq).copied()
    }

    /// Release the slot prepared for `seq`, if any (its pages stay mapped, reclaimable).
    fn drop_prepared(&mut self, seq: SeqId) -> Result<(), KvError> {
        match self.prepared.remove(&seq) {
            Some((slot, _)) => self.mapper.space().release(slot).map_err(vmm_error),
            None => Ok(()),
        }
    }

    /// A slot for a sequence being admitted (see [`admission_slot_in`]).
    fn admission_slot(&mut self, seq: SeqId) -> Result<(SlotId, bool), KvError> {
        let mut space = self.mapper.space();
        admission_slot_in(&mut space, &mut self.prepared, seq)
    }
}

/// The vmm KV cache of the CPU device: a [`VmmManager`] on real host memory ([`HostVmm`]), its
/// elements of one [`KvDtype`].
pub struct VmmKv(VmmManager, KvDtype);

impl VmmKv {
    /// A cache of `shape` holding `dtype` elements.
    pub fn with_dtype(dims: KvDims, dtype: KvDtype, shape: VmmShape) -> Result<Self, KvError> {
        let config = dims.space_config(dtype.bytes(), shape);
        let huge_pages = vkv_kernels::RuntimeSwitches::get().huge_pages;
        let backend = Arc::new(HostVmm::with_huge_pages(huge_pages).map_err(vmm_error)?);
        // A few pages created ahead: on the CPU creating is cheap next to a forward pass.
        let options = MapperOptions {
            pool_low_water: 8,
            ..MapperOptions::default()
        };
        Ok(VmmKv(VmmManager::new(config, backend, options)?, dtype))
    }

    /// The same cache with automatic prefix caching on (see the module docs).
    pub fn with_prefix_caching(self) -> Self {
        VmmKv(self.0.with_prefix_caching(), self.1)
    }

    /// The space, locked (statistics, audit).
    pub fn space(&self) -> MutexGuard<'_, KvSpace> {
        self.0.space()
    }

    /// The books (map-ahead, prefix caching, the space).
    pub fn books(&self) -> &VmmManager {
        &self.0
    }
}

/// Running out of pages (the budget's, or the device's own memory), slots or a slot's tokens is
/// `OutOfMemory` (what the scheduler preempts on); anything else keeps its `VmmError`.
fn vmm_error(e: VmmError) -> KvError {
    match e {
        VmmError::PoolExhausted { .. }
        | VmmError::DeviceOutOfMemory { .. }
        | VmmError::NoFreeSlot { .. }
        | VmmError::TooManyTokens { .. } => KvError::OutOfMemory {
            detail: e.to_string(),
        },
        other => KvError::Vmm(other),
    }
}

impl KvManager for VmmManager {
    fn dims(&self) -> KvDims {
        KvDims {
            num_layers: self.config.num_layers,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    fn name(&self) -> String {
        let c = &self.config;
        let size = if c.page_size.is_multiple_of(1 << 20) {
            format!("{}MiB", c.page_size >> 20)
        } else {
            format!("{}KiB", c.page_size >> 10)
        };
        format!("vmm-{}-{size}", c.layout)
    }

    fn bytes_per_token(&self) -> usize {
        let c = &self.config;
        2 * c.num_layers * c.num_kv_heads * c.head_dim * c.dtype_bytes
    }

    fn capacity_tokens(&self) -> usize {
        let c = &self.config;
        let pages_per_token =
            c.num_regions() as f64 * c.region_bytes_per_token() as f64 / c.page_size as f64;
        ((c.max_pages as f64 / pages_per_token) as usize).min(c.max_slots * c.max_tokens)
    }

    fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        let (slot, new) = match self.slots.get(&seq) {
            Some(&slot) => (slot, false),
            None => (self.admission_slot(seq)?.0, true),
        };
        match self.mapper.ensure(slot, len) {
            Ok(waited) => {
                self.growth_waits += u64::from(waited && !new);
                self.slots.insert(seq, slot);
                Ok(())
            }
            Err(e) => {
                if new {
                    self.mapper.space().release(slot).map_err(vmm_error)?;
                }
                Err(vmm_error(e))
            }
        }
    }

    fn fork(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), KvError> {
        if self.slots.contains_key(&dst) {
            return Err(KvError::AlreadyAllocated { seq: dst });
        }
        let from = *self.slots.get(&src).ok_or_else(|| unknown(src))?;
        let (slot, _) = self.admission_slot(dst)?;
        let shared = self.mapper.space().share_prefix(from, slot, tokens);
        match shared {
            Ok(()) => {
                self.slots.insert(dst, slot);
                Ok(())
            }
            Err(e) => {
                self.mapper.space().release(slot)?;
                Err(vmm_error(e))
            }
        }
    }

    fn map_ahead(&self) -> Option<&dyn MapAhead> {
        Some(self)
    }

    fn map_ahead_mut(&mut self) -> Option<&mut dyn MapAhead> {
        Some(self)
    }

    fn prefix_cache(&self) -> Option<&dyn PrefixCache> {
        self.prefix_caching.then_some(self as &dyn PrefixCache)
    }

    fn prefix_cache_mut(&mut self) -> Option<&mut dyn PrefixCache> {
        match self.prefix_caching {
            true => Some(self),
            false => None,
        }
    }

    fn enable_prefix_caching(&mut self) -> Result<(), KvError> {
        enable_before_use(self.slots.len())?;
        self.turn_on_prefix_caching();
        Ok(())
    }

    /// The slot's cached units stay in the space, kept, and become evictable (tail first) once
    /// no other slot maps them; the rest goes as without caching.
    fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        if self.prepared.contains_key(&seq) {
            return self.drop_prepared(seq);
        }
        let slot = self.slots.remove(&seq).ok_or_else(|| unknown(seq))?;
        let mut space = self.mapper.space();
        if let Some(prefix) = prefix_in(&mut space) {
            prefix.chains.remove(&seq);
        }
        space.release(slot).map_err(vmm_error)
    }

    fn reserved(&self, seq: SeqId) -> Option<usize> {
        let slot = *self.slots.get(&seq)?;
        Some(self.mapper.space().len(slot))
    }

    /// Pages mapped for tokens only: kept (evictable) prefix-cache pages are free memory.
    fn usage(&self) -> KvUsage {
        let s = self.mapper.space().stats();
        // Active slots' mappings of pages holding tokens: a shared page once per slot.
        let mappings = s.mappings - s.pages_cached - s.pages_surplus;
        KvUsage {
            bytes_allocated: s.bytes_in_use(),
            bytes_holding_tokens: s.bytes_holding_tokens,
            bytes_without_sharing: mappings * s.page_size,
            sequences: self.slots.len(),
        }
    }

    fn audit(&self) -> Result<(), KvError> {
        let space = self.mapper.space();
        space
            .audit()
            .map_err(|e| KvError::Inconsistent(e.to_string()))?;
        let active = space.stats().active_slots;
        if active != self.slots.len() + self.prepared.len() {
            return Err(KvError::Inconsistent(format!(
                "{active} active slots but {} sequences and {} prepared admissions",
                self.slots.len(),
                self.prepared.len()
            )));
        }
        if self.prefix_caching {
            self.audit_prefix(&space)?;
        } else if space.pinned_pages() > 0 {
            return Err(KvError::Inconsistent(format!(
                "{} pages are pinned for a prefix cache, but caching is off",
                space.pinned_pages()
            )));
        }
        Ok(())
    }
}

impl VmmManager {
    /// The tokens at the start of `tokens` a prefix hit may cover: whole units, never the last
    /// token (it is always computed: its logits are the next token's), at most a slot's
    /// `max_tokens`.
    fn matchable(&self, tokens: &[u32]) -> usize {
        let unit_tokens = self.prefix_unit_tokens();
        tokens.len().saturating_sub(1).min(self.config.max_tokens) / unit_tokens * unit_tokens
    }
}

impl PrefixCache for VmmManager {
    fn cached_tokens(&self, tokens: &[u32], salt: Option<&[u8]>) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        let most = self.matchable(tokens);
        let space = self.mapper.space();
        prefix_of(&space).map_or(0, |prefix| {
            prefix.index.lookup(&tokens[..most], salt).blocks() * self.prefix_unit_tokens()
        })
    }

    /// A hit maps the cached units' physical pages at the new slot's first addresses (one more
    /// reference each): `seq` then holds their tokens, read by the same strided kernels. Needs
    /// a slot: with none free (even after taking back prepared ones) it is
    /// [`KvError::OutOfMemory`], not counted, and `seq` holds nothing.
    fn match_prefix(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        salt: Option<&[u8]>,
    ) -> Result<usize, KvError> {
        if self.slots.contains_key(&seq) {
            return Err(KvError::AlreadyAllocated { seq });
        }
        if !self.prefix_caching {
            return Err(caching_off("vmm"));
        }
        let unit_tokens = self.prefix_unit_tokens();
        let most = self.matchable(tokens);
        // One lock for the lookup and the mapping: the mapper's thread evicts under it too.
        let mut space = self.mapper.space();
        let prefix = prefix_in(&mut space).ok_or_else(|| caching_off("vmm"))?;
        let hit = prefix.index.lookup(&tokens[..most], salt);
        let covered = hit.blocks() * unit_tokens;
        if covered == 0 {
            prefix.index.record_lookup(tokens.len(), 0);
            return Ok(0);
        }
        let units = hit
            .units
            .iter()
            .map(|u| prefix.units.get(u).map(|c| c.pages.clone()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                KvError::Inconsistent(format!(
                    "a prefix hit of units {:?} names a unit with no pages recorded",
                    hit.units
                ))
            })?;
        let (slot, _) = admission_slot_in(&mut space, &mut self.prepared, seq)?;
        let pages: Vec<&[PhysicalPage]> = units.iter().map(|u| &**u).collect();
        if let Err(e) = space.map_cached(slot, &pages) {
            space.release(slot).map_err(vmm_error)?;
            return Err(vmm_error(e));
        }
        // The space told the index of the evictable units mapped again (`referenced`); a unit
        // that had holders stays as it was.
        let prefix = prefix_in(&mut space).ok_or_else(|| caching_off("vmm"))?;
        if let Some(unit) = hit.units.iter().find(|&&u| prefix.index.is_evictable(u)) {
            let e = KvError::Inconsistent(format!(
                "unit {unit} is mapped in slot {slot} by a hit but still evictable"
            ));
            space.release(slot).map_err(vmm_error)?;
            return Err(e);
        }
        prefix.index.record_lookup(tokens.len(), covered);
        prefix.chains.insert(seq, Chain::after(&hit));
        drop(space);
        self.slots.insert(seq, slot);
        Ok(covered)
    }

    /// A unit is recorded by pinning its pages where the sequence holds them; one whose pages
    /// are pinned already (shared by a hit or a fork) is followed in the index, not recorded.
    fn cache_computed(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        salt: Option<&[u8]>,
    ) -> Result<(), KvError> {
        let slot = *self.slots.get(&seq).ok_or_else(|| unknown(seq))?;
        if !self.prefix_caching {
            return Err(caching_off("vmm"));
        }
        let unit_tokens = self.prefix_unit_tokens();
        let mut space = self.mapper.space();
        let len = space.len(slot);
        if tokens.len() > len {
            return Err(unreserved(seq, len, tokens.len()));
        }
        let full = tokens.len() / unit_tokens;
        let mut chain = prefix_in(&mut space)
            .ok_or_else(|| caching_off("vmm"))?
            .chains
            .get(&seq)
            .copied()
            .unwrap_or_default();
        let result = record_units(
            &mut space,
            slot,
            &mut chain,
            &tokens[..full * unit_tokens],
            salt,
        );
        prefix_in(&mut space)
            .ok_or_else(|| caching_off("vmm"))?
            .chains
            .insert(seq, chain);
        result
    }

    fn retract_lookup(&mut self, queried_tokens: usize, hit_tokens: usize) {
        let mut space = self.mapper.space();
        if let Some(prefix) = prefix_in(&mut space) {
            prefix.index.retract_lookup(queried_tokens, hit_tokens);
        }
    }

    fn prefix_stats(&self) -> PrefixStats {
        let space = self.mapper.space();
        prefix_of(&space)
            .map(|p| p.index.stats())
            .unwrap_or_default()
    }
}

/// Record in the index the units of `slot` that `tokens` (whole units) cover past what `chain`
/// recorded, advancing `chain` (see [`PrefixCache::cache_computed`]).
fn record_units(
    space: &mut KvSpace,
    slot: SlotId,
    chain: &mut Chain,
    tokens: &[u32],
    salt: Option<&[u8]>,
) -> Result<(), KvError> {
    let unit_tokens = space.config().prefix_unit().1;
    let full = tokens.len() / unit_tokens;
    while chain.recorded < full && !chain.broken {
        let j = chain.recorded;
        let end = (j + 1) * unit_tokens;
        let pages = space.unit_pages(slot, j).ok_or_else(|| {
            KvError::Inconsistent(format!(
                "unit {j} of slot {slot} is not mapped though it lies below the slot's length {}",
                space.len(slot)
            ))
        })?;
        let unit = pages[0].handle;
        let shared = pages.iter().any(|p| space.is_pinned(p.handle));
        let prefix = prefix_in(space).ok_or_else(|| caching_off("vmm"))?;
        if shared {
            // Pages a hit or a fork shared, cached already: follow the index's entry for these
            // tokens (the next unit's K and V were computed after exactly them), else stop.
            let found = prefix.index.lookup(&tokens[..end], salt);
            match found.blocks() > j {
                true => chain.parent = found.last,
                false => chain.broken = true,
            }
        } else {
            let block = &tokens[j * unit_tokens..end];
            match prefix.index.insert(chain.parent, block, salt, unit)? {
                Inserted::Cached(cached) => {
                    prefix.units.insert(
                        unit,
                        CachedUnit {
                            pages: pages.clone().into(),
                            position: j,
                        },
                    );
                    prefix.owner.extend(pages.iter().map(|p| (p.handle, unit)));
                    if let Err(e) = space.pin(&pages) {
                        if let Some(prefix) = prefix_in(space) {
                            prefix.forget(unit);
                        }
                        return Err(vmm_error(e));
                    }
                    chain.parent = Some(cached);
                }
                Inserted::Duplicate { block, .. } => chain.parent = Some(block),
                Inserted::ParentGone => chain.broken = true,
            }
        }
        chain.recorded += usize::from(!chain.broken);
    }
    Ok(())
}

impl MapAhead for VmmManager {
    fn map_ahead(&self, seq: SeqId, len: usize) {
        if let Some(&slot) = self.slots.get(&seq) {
            let len = len.min(self.config.max_tokens);
            // Only a stopped mapper fails here, and then `reserve` maps the pages itself.
            let _ = self.mapper.map_ahead(slot, len);
        }
    }

    fn prepare_admissions(&mut self, next: &[LikelyAdmission]) {
        // Called every step: a Mapper thread that died (a panic in a driver call) starts again.
        // Only failing to spawn a thread fails here; `reserve` then maps what each step needs.
        let _ = self.mapper.revive();
        let stale: Vec<SeqId> = self
            .prepared
            .keys()
            .filter(|seq| !next.iter().any(|n| n.seq == **seq))
            .copied()
            .collect();
        for seq in stale {
            // Only a slot the space no longer knows fails here; nothing to undo then.
            let _ = self.drop_prepared(seq);
        }
        for &LikelyAdmission { seq, hit, len } in next {
            if self.slots.contains_key(&seq) {
                continue;
            }
            let len = len.min(self.config.max_tokens);
            let slot = match self.prepared.get(&seq) {
                // Already asked for (this is called every step and at every request's end).
                Some(&(_, asked)) if asked >= len => continue,
                Some(&(slot, _)) => slot,
                None => {
                    // No free slot: the running sequences hold them all; nothing to prepare.
                    let Ok(slot) = self.mapper.space().acquire() else {
                        break;
                    };
                    slot
                }
            };
            self.prepared.insert(seq, (slot, len));
            // The pages a likely hit covers are left to it (their surplus unmapped now, not at
            // admission). Only a stopped mapper fails here, and then `reserve` maps the pages
            // itself.
            let _ = self.mapper.map_ahead_after_hit(slot, hit.min(len), len);
        }
    }

    fn warm_free_slots(&mut self, tokens: &[usize]) -> usize {
        let mut space = self.mapper.space();
        // Hold every slot warmed until the end, so that `acquire` (which prefers slots with
        // pages) hands out a cold one each time.
        let mut warmed = Vec::new();
        let mut mapped = 0;
        for &t in tokens {
            let Ok(slot) = space.acquire() else { break };
            warmed.push(slot);
            match space.ensure(slot, t.min(self.config.max_tokens)) {
                Ok(n) => mapped += n,
                // Out of pages: what is mapped stays.
                Err(_) => break,
            }
        }
        for slot in warmed {
            // Acquired just above: releasing cannot fail.
            let _ = space.release(slot);
        }
        mapped
    }

    fn mapper_stats(&self) -> MapperStats {
        self.mapper.stats()
    }

    fn growth_map_waits(&self) -> u64 {
        self.growth_waits
    }
}

impl KvManager for VmmKv {
    fn dims(&self) -> KvDims {
        self.0.dims()
    }
    fn name(&self) -> String {
        self.0.name()
    }
    fn capacity_tokens(&self) -> usize {
        self.0.capacity_tokens()
    }
    fn bytes_per_token(&self) -> usize {
        self.0.bytes_per_token()
    }
    fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        self.0.reserve(seq, len)
    }
    fn fork(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), KvError> {
        self.0.fork(src, dst, tokens)
    }
    fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        self.0.free(seq)
    }
    fn reserved(&self, seq: SeqId) -> Option<usize> {
        self.0.reserved(seq)
    }
    fn usage(&self) -> KvUsage {
        self.0.usage()
    }
    fn audit(&self) -> Result<(), KvError> {
        self.0.audit()
    }
    fn map_ahead(&self) -> Option<&dyn MapAhead> {
        Some(&self.0)
    }
    fn map_ahead_mut(&mut self) -> Option<&mut dyn MapAhead> {
        Some(&mut self.0)
    }
    fn prefix_cache(&self) -> Option<&dyn PrefixCache> {
        self.0.prefix_cache()
    }
    fn prefix_cache_mut(&mut self) -> Option<&mut dyn PrefixCache> {
        self.0.prefix_cache_mut()
    }
    fn enable_prefix_caching(&mut self) -> Result<(), KvError> {
        self.0.enable_prefix_caching()
    }
}

impl PrefixCache for VmmKv {
    fn match_prefix(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        salt: Option<&[u8]>,
    ) -> Result<usize, KvError> {
        self.0.match_prefix(seq, tokens, salt)
    }
    fn cache_computed(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        salt: Option<&[u8]>,
    ) -> Result<(), KvError> {
        self.0.cache_computed(seq, tokens, salt)
    }
    fn retract_lookup(&mut self, queried_tokens: usize, hit_tokens: usize) {
        self.0.retract_lookup(queried_tokens, hit_tokens)
    }
    fn cached_tokens(&self, tokens: &[u32], salt: Option<&[u8]>) -> usize {
        self.0.cached_tokens(tokens, salt)
    }
    fn prefix_stats(&self) -> PrefixStats {
        self.0.prefix_stats()
    }
}

impl KvCache for VmmKv {
    fn manager(&self) -> &dyn KvManager {
        self
    }

    fn manager_mut(&mut self) -> &mut dyn KvManager {
        self
    }

    fn layer(&self, seq: SeqId, layer: usize) -> Result<KvRef<'_>, KvError> {
        let slot = self.0.slot(seq).ok_or_else(|| unknown(seq))?;
        let view = self.0.view(layer);
        let at = slot.0 * view.slot_stride * self.1.bytes();
        Ok(KvRef::Strided {
            // The slot's range is mapped up to its reserved length (ensure), in every region, and
            // the backend is host memory holding elements of `self.1`.
            k: (view.k as *mut u8).wrapping_add(at),
            v: (view.v as *mut u8).wrapping_add(at),
            dtype: self.1,
            token_stride: view.token_stride,
            head_stride: view.head_stride,
        })
    }
}

#[cfg(test)]
#[path = "vmm_prefix_tests.rs"]
mod prefix_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use vkv_vmm::KvLayout;

    use crate::TEST_DIMS as DIMS;

    /// A likely admission of `len` tokens with no prefix-cache hit.
    fn likely(seq: SeqId, len: usize) -> LikelyAdmission {
        LikelyAdmission { seq, hit: 0, len }
    }

    /// A token-major f32 cache of `slots` slots of 512 tokens, 64 pages of 4 KiB.
    fn token_major(slots: usize) -> VmmKv {
        let shape = VmmShape::new(KvLayout::TokenMajor, slots, 512, 4096, 64);
        VmmKv::with_dtype(DIMS, KvDtype::F32, shape).unwrap()
    }

    #[test]
    fn prepared_admissions_are_taken_over_or_given_back_and_never_block_a_reserve() {
        let mut kv = token_major(2);
        // Both slots prepared for queued sequences 1 and 2, their first pages mapped ahead.
        kv.0.prepare_admissions(&[likely(1, 40), likely(2, 40)]);
        kv.0.mapper.sync().unwrap();
        assert_eq!(kv.usage().sequences, 0);
        assert_eq!(
            kv.usage().bytes_allocated,
            0,
            "prepared pages hold no token"
        );
        kv.audit().unwrap();
        // Sequence 1 is admitted into its prepared slot without waiting.
        let waits = kv.0.mapper_stats().waits;
        kv.reserve(1, 40).unwrap();
        assert_eq!(kv.0.mapper_stats().waits, waits);
        // Sequence 3 arrives instead of 2: the slot prepared for 2 is taken back for it.
        kv.reserve(3, 40).unwrap();
        kv.audit().unwrap();
        assert_eq!(kv.usage().sequences, 2);
        // No free slot: nothing to prepare, nothing changes.
        kv.0.prepare_admissions(&[likely(4, 10)]);
        kv.audit().unwrap();
        for seq in [1, 3] {
            kv.free(seq).unwrap();
        }
        // A preparation dropped from the list is given back.
        kv.0.prepare_admissions(&[likely(5, 10)]);
        kv.0.prepare_admissions(&[]);
        kv.audit().unwrap();
        assert_eq!(kv.0.mapper.space().stats().active_slots, 0);
        assert_eq!(kv.usage(), KvUsage::default());
    }

    #[test]
    fn warmed_slots_admit_without_waiting_and_their_pages_are_reclaimable() {
        let mut kv = token_major(3);
        let mapped = kv.0.warm_free_slots(&[300, 40]);
        assert!(mapped > 0);
        assert_eq!(kv.usage(), KvUsage::default(), "warm pages hold no token");
        assert_eq!(kv.0.mapper.space().stats().active_slots, 0);
        kv.audit().unwrap();
        // The first admission gets the largest warm slot, the second the other: no wait.
        kv.reserve(1, 300).unwrap();
        kv.reserve(2, 40).unwrap();
        assert_eq!(kv.0.mapper_stats().waits, 0);
        // The cold third slot waits.
        kv.reserve(3, 40).unwrap();
        assert_eq!(kv.0.mapper_stats().waits, 1);
        for seq in [1, 2, 3] {
            kv.free(seq).unwrap();
        }
        // All memory can still be taken by one sequence: warm pages are reclaimed for it.
        let cap = kv.capacity_tokens().min(512);
        kv.reserve(4, cap).unwrap();
        kv.audit().unwrap();
        kv.free(4).unwrap();
        assert_eq!(kv.usage(), KvUsage::default());
    }
}
