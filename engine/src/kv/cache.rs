//! `KvCache`: the one interface the forward pass uses to store and read K and V, with its two
//! implementations — [`PagedKv`] (a preallocated pool of blocks and a block table per sequence,
//! vLLM's PagedAttention) and [`VmmKv`] (a [`KvSpace`]: one contiguous virtual range per
//! sequence, backed page by page, vAttention) — so the model code is the same in both modes and a
//! difference between them is the KV design's.
//!
//! Both hand out [`KvRef`]s, the addressing the attention ops take: `Paged` (block table) or
//! `Strided` (base pointer and strides into the sequence's slot, for either vmm layout). On the CPU
//! device the elements are f16 by default (half the memory and half the bytes a decode step reads;
//! the reference tests hold with it), f32, or FP8 E4M3 ([`KvCacheDtype`], `--kv-cache-dtype`);
//! capacity — tokens per block or page, bytes per token — follows the element size.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use vkv_kernels::cpu::{self, HugeBuffer, KvDtype, KvRef};
use vkv_vmm::{
    HostVmm, KvLayout, KvSpace, KvSpaceConfig, LayerView, Mapper, MapperOptions, MapperStats,
    PhysicalMemory, SlotId, VmmError,
};

use super::{BlockAllocator, BlockTable, KvError};

/// A sequence's id in a KV cache.
pub type SeqId = u64;

/// What every layer stores per token: `num_kv_heads × head_dim` elements for K and as many for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvDims {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvDims {
    /// Bytes of K and V of one token over all layers (f32).
    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_token_in(KvDtype::F32)
    }

    /// Bytes of K and V of one token over all layers in `dtype`.
    pub fn bytes_per_token_in(&self, dtype: KvDtype) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.bytes()
    }
}

/// The element type asked of the CPU KV cache (`--kv-cache-dtype`, as vLLM's): `auto` is f16 on
/// the CPU; the CUDA cache stores bf16 and takes only `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    #[default]
    Auto,
    F32,
    F16,
    /// FP8 E4M3 ([`vkv_kernels::cpu::fp8`]).
    Fp8,
}

impl KvCacheDtype {
    /// The element type of the CPU cache.
    pub fn cpu(self) -> KvDtype {
        match self {
            KvCacheDtype::Auto | KvCacheDtype::F16 => KvDtype::F16,
            KvCacheDtype::F32 => KvDtype::F32,
            KvCacheDtype::Fp8 => KvDtype::Fp8,
        }
    }
}

/// Memory use of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct KvUsage {
    /// Bytes set aside for sequences (blocks held, pages mapped).
    pub bytes_allocated: usize,
    /// Bytes of the tokens the sequences hold.
    pub bytes_holding_tokens: usize,
    pub sequences: usize,
}

/// The book-keeping side of a KV cache — what the scheduler and the engine need, on any device
/// (vLLM's `KVCacheManager`): capacity, reserving and freeing tokens per sequence, usage, the
/// map-ahead hint and the audit. Where the bytes are, and how a kernel addresses them, is the
/// device's business ([`KvCache::layer`] on the CPU; the CUDA cache's own addressing on the GPU).
pub trait KvManager: Send {
    fn dims(&self) -> KvDims;
    /// `paged-16`, `vmm-token-major-2MiB`, ...
    fn name(&self) -> String;
    /// Tokens the whole cache can hold.
    fn capacity_tokens(&self) -> usize;
    /// Bytes of K and V of one token over all layers (f32 unless the device stores less).
    fn bytes_per_token(&self) -> usize {
        self.dims().bytes_per_token()
    }
    /// Back `seq` for `len` tokens (creating it if new). All or nothing: on
    /// [`KvError::OutOfMemory`] the sequence is unchanged (a new one is not created).
    fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), KvError>;
    /// Forget `seq` and free its memory.
    fn free(&mut self, seq: SeqId) -> Result<(), KvError>;
    /// Tokens `seq` is backed for.
    fn reserved(&self, seq: SeqId) -> Option<usize>;
    fn usage(&self) -> KvUsage;
    /// Hint that `seq` will soon need `len` tokens backed, so the memory can be prepared while
    /// the current step computes (the vmm `Mapper`); a no-op where there is nothing to prepare.
    fn map_ahead(&self, _seq: SeqId, _len: usize) {}
    /// Hint that these waiting sequences are likely admitted by the next step, each reserving
    /// `len` tokens, so their memory can be prepared while the current step computes (vmm: a
    /// slot acquired and its first pages mapped by the `Mapper`). Preparations of sequences no
    /// longer listed are dropped; prepared memory never blocks a `reserve` of another sequence.
    /// A no-op where there is nothing to prepare.
    fn prepare_admissions(&mut self, _next: &[(SeqId, usize)]) {}
    /// Eager allocation (vAttention §6): back the first `tokens[i]` tokens of free slot `i`
    /// now, before any request, so that the first admissions of an idle engine find their pages
    /// mapped (an admission takes the free slot with the most pages, so list the largest
    /// first). The pages belong to no sequence: they are surplus, reclaimed under pressure like
    /// a released slot's. Returns the pages mapped; a no-op (0) where nothing is mapped.
    fn warm_free_slots(&mut self, _tokens: &[usize]) -> usize {
        0
    }
    /// Check the cache's own books: every block or page is either free or held by exactly the
    /// sequences that hold it. The error says what is inconsistent.
    fn audit(&self) -> Result<(), String>;
    /// The map-ahead thread's counters (waits must stay 0), for caches that have one.
    fn mapper_stats(&self) -> Option<MapperStats> {
        None
    }
    /// Of the map waits, those of sequences already holding memory (growth: decode steps and
    /// later prefill chunks) — the ones map-ahead exists to remove; the rest are admissions.
    fn growth_map_waits(&self) -> Option<u64> {
        None
    }
}

/// Storage of K and V for the CPU forward pass (see the module docs): the books plus host
/// addressing.
pub trait KvCache: KvManager {
    /// Where `seq`'s K and V of `layer` live; valid until the next `reserve` or `free`.
    fn layer(&self, seq: SeqId, layer: usize) -> Result<KvRef<'_>, KvError>;
    /// This cache as its books (what the scheduler takes), without trait upcasting (MSRV 1.85).
    fn manager(&self) -> &dyn KvManager;
    fn manager_mut(&mut self) -> &mut dyn KvManager;
}

fn unknown(seq: SeqId) -> KvError {
    KvError::NotAllocated {
        what: format!("sequence {seq}"),
    }
}

/// The paged KV cache: per layer a K and a V pool of `num_blocks × block_size` tokens, each block
/// `[kv_head][token][head_dim]`.
///
/// The pools are one [`HugeBuffer`] (huge pages: a decode step reads tens of MB of it; one
/// buffer, so only its last huge page is partly unused), faulted in at creation — vLLM allocates
/// its KV cache up front for the same reason: the budget is memory the server holds, not memory a
/// later request may fail to get — and written by attention through raw pointers while the cache
/// is shared.
pub struct PagedKv {
    dims: KvDims,
    dtype: KvDtype,
    alloc: BlockAllocator,
    tables: HashMap<SeqId, BlockTable>,
    /// Layer `l`'s K pool at `2l · pool_bytes`, its V pool at `(2l + 1) · pool_bytes`.
    pools: HugeBuffer,
    pool_bytes: usize,
}

impl PagedKv {
    /// An f32 cache (the exact reference).
    pub fn new(dims: KvDims, num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        Self::with_dtype(dims, KvDtype::F32, num_blocks, block_size)
    }

    /// A cache storing `dtype`.
    pub fn with_dtype(
        dims: KvDims,
        dtype: KvDtype,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, KvError> {
        let alloc = BlockAllocator::new(num_blocks, block_size)?;
        // Cache-line aligned pools (f32 and f16 elements are then aligned).
        let pool_bytes =
            (num_blocks * block_size * dims.num_kv_heads * dims.head_dim * dtype.bytes())
                .next_multiple_of(64);
        let bytes = 2 * dims.num_layers * pool_bytes;
        // Faulting in more than the host has would end in the OOM killer, not an error.
        if let Some(available) = cpu::available_bytes().filter(|&a| bytes as u64 > a) {
            return Err(KvError::OutOfMemory {
                detail: format!(
                    "the paged KV pools need {} MiB but the host has {} MiB available; lower --kv-memory",
                    bytes >> 20,
                    available >> 20
                ),
            });
        }
        let mut pools = HugeBuffer::zeroed(bytes);
        pools.populate();
        Ok(PagedKv {
            dims,
            dtype,
            alloc,
            tables: HashMap::new(),
            pools,
            pool_bytes,
        })
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.num_free()
    }
}

impl KvManager for PagedKv {
    fn dims(&self) -> KvDims {
        self.dims
    }

    fn name(&self) -> String {
        format!("paged-{}", self.alloc.block_size())
    }

    fn capacity_tokens(&self) -> usize {
        self.alloc.num_blocks() * self.alloc.block_size()
    }

    fn bytes_per_token(&self) -> usize {
        self.dims.bytes_per_token_in(self.dtype)
    }

    fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        // The common case, every decode step: the sequence exists and grows in place.
        let result = match self.tables.get_mut(&seq) {
            Some(table) => table.grow_to(len, &mut self.alloc).map(drop),
            None => {
                let mut table = BlockTable::new();
                let grown = table.grow_to(len, &mut self.alloc).map(drop);
                if grown.is_ok() {
                    self.tables.insert(seq, table);
                }
                grown
            }
        };
        result.map_err(|e| match e {
            KvError::OutOfBlocks {
                needed,
                free,
                total,
            } => KvError::OutOfMemory {
                detail: format!("{needed} blocks needed, {free} free of {total}"),
            },
            other => other,
        })
    }

    fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        let mut table = self.tables.remove(&seq).ok_or_else(|| unknown(seq))?;
        table.release(&mut self.alloc)
    }

    fn reserved(&self, seq: SeqId) -> Option<usize> {
        self.tables.get(&seq).map(BlockTable::len)
    }

    fn audit(&self) -> Result<(), String> {
        let held: usize = self.tables.values().map(|t| t.blocks().len()).sum();
        let (total, free) = (self.alloc.num_blocks(), self.alloc.num_free());
        if held + free != total {
            return Err(format!(
                "{held} blocks in tables + {free} free != {total} blocks"
            ));
        }
        Ok(())
    }

    fn usage(&self) -> KvUsage {
        let block_bytes = self.alloc.block_size() * self.bytes_per_token();
        KvUsage {
            bytes_allocated: (self.alloc.num_blocks() - self.alloc.num_free()) * block_bytes,
            bytes_holding_tokens: self.tables.values().map(BlockTable::len).sum::<usize>()
                * self.bytes_per_token(),
            sequences: self.tables.len(),
        }
    }
}

impl KvCache for PagedKv {
    fn manager(&self) -> &dyn KvManager {
        self
    }

    fn manager_mut(&mut self) -> &mut dyn KvManager {
        self
    }

    fn layer(&self, seq: SeqId, layer: usize) -> Result<KvRef<'_>, KvError> {
        let table = self.tables.get(&seq).ok_or_else(|| unknown(seq))?;
        // Head-major blocks (`[block][kv_head][token][head_dim]`, vLLM's block layout): a GQA
        // group's K (or V) rows of a block are one contiguous run of `block_size · head_dim`
        // elements, which the hardware prefetchers follow; token-major rows were `kv_heads`
        // rows apart. Measured on the 2-core EPYC: decode attention of 16 sequences 25-30 %
        // faster (`attention_timings` in the kernels crate).
        let (bs, hd) = (self.alloc.block_size(), self.dims.head_dim);
        Ok(KvRef::Paged {
            k_pool: self
                .pools
                .as_mut_ptr()
                .wrapping_add(2 * layer * self.pool_bytes),
            v_pool: self
                .pools
                .as_mut_ptr()
                .wrapping_add((2 * layer + 1) * self.pool_bytes),
            dtype: self.dtype,
            blocks: table.blocks(),
            block_size: bs,
            block_stride: bs * self.dims.num_kv_heads * hd,
            token_stride: hd,
            head_stride: bs * hd,
        })
    }
}

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
        })
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

    /// A slot for a sequence being admitted: the one prepared for it, else a free one — taking
    /// back the slots prepared for others when none is free. The bool says whether the slot was
    /// prepared.
    fn admission_slot(&mut self, seq: SeqId) -> Result<(SlotId, bool), KvError> {
        if let Some((slot, _)) = self.prepared.remove(&seq) {
            return Ok((slot, true));
        }
        let first = self.mapper.space().acquire();
        match first {
            Ok(slot) => Ok((slot, false)),
            Err(VmmError::NoFreeSlot { .. }) if !self.prepared.is_empty() => {
                let others: Vec<SeqId> = self.prepared.keys().copied().collect();
                for other in others {
                    self.drop_prepared(other)?;
                }
                let slot = self.mapper.space().acquire().map_err(vmm_error)?;
                Ok((slot, false))
            }
            Err(e) => Err(vmm_error(e)),
        }
    }
}

/// The vmm KV cache of the CPU device: a [`VmmManager`] on real host memory ([`HostVmm`]), its
/// elements of one [`KvDtype`].
pub struct VmmKv(VmmManager, KvDtype);

impl VmmKv {
    /// `max_seqs` slots of `max_tokens` tokens, at most `max_pages` pages of `page_size` bytes;
    /// f32 (the exact reference).
    pub fn new(
        dims: KvDims,
        layout: KvLayout,
        max_seqs: usize,
        max_tokens: usize,
        page_size: usize,
        max_pages: usize,
    ) -> Result<Self, KvError> {
        Self::with_dtype(
            dims,
            KvDtype::F32,
            layout,
            max_seqs,
            max_tokens,
            page_size,
            max_pages,
        )
    }

    /// As [`VmmKv::new`], storing `dtype`.
    pub fn with_dtype(
        dims: KvDims,
        dtype: KvDtype,
        layout: KvLayout,
        max_seqs: usize,
        max_tokens: usize,
        page_size: usize,
        max_pages: usize,
    ) -> Result<Self, KvError> {
        let config = KvSpaceConfig {
            layout,
            num_layers: dims.num_layers,
            num_kv_heads: dims.num_kv_heads,
            head_dim: dims.head_dim,
            dtype_bytes: dtype.bytes(),
            max_slots: max_seqs,
            max_tokens,
            page_size,
            max_pages,
        };
        let backend = Arc::new(HostVmm::new().map_err(vmm_error)?);
        // A few pages created ahead: on the CPU creating is cheap next to a forward pass.
        let options = MapperOptions {
            pool_low_water: 8,
            ..MapperOptions::default()
        };
        Ok(VmmKv(VmmManager::new(config, backend, options)?, dtype))
    }

    /// The space, locked (statistics, audit).
    pub fn space(&self) -> MutexGuard<'_, KvSpace> {
        self.0.space()
    }
}

fn vmm_error(e: VmmError) -> KvError {
    match e {
        VmmError::PoolExhausted { .. }
        | VmmError::NoFreeSlot { .. }
        | VmmError::TooManyTokens { .. } => KvError::OutOfMemory {
            detail: e.to_string(),
        },
        other => KvError::Vmm(other.to_string()),
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

    fn prepare_admissions(&mut self, next: &[(SeqId, usize)]) {
        let stale: Vec<SeqId> = self
            .prepared
            .keys()
            .filter(|seq| !next.iter().any(|(n, _)| n == *seq))
            .copied()
            .collect();
        for seq in stale {
            // Only a slot the space no longer knows fails here; nothing to undo then.
            let _ = self.drop_prepared(seq);
        }
        for &(seq, len) in next {
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
            // Only a stopped mapper fails here, and then `reserve` maps the pages itself.
            let _ = self.mapper.map_ahead(slot, len);
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

    fn map_ahead(&self, seq: SeqId, len: usize) {
        if let Some(&slot) = self.slots.get(&seq) {
            let len = len.min(self.config.max_tokens);
            // Only a stopped mapper fails here, and then `reserve` maps the pages itself.
            let _ = self.mapper.map_ahead(slot, len);
        }
    }

    fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        if self.prepared.contains_key(&seq) {
            return self.drop_prepared(seq);
        }
        let slot = self.slots.remove(&seq).ok_or_else(|| unknown(seq))?;
        self.mapper.space().release(slot).map_err(vmm_error)
    }

    fn reserved(&self, seq: SeqId) -> Option<usize> {
        let slot = *self.slots.get(&seq)?;
        Some(self.mapper.space().len(slot))
    }

    fn usage(&self) -> KvUsage {
        let s = self.mapper.space().stats();
        KvUsage {
            bytes_allocated: s.bytes_in_use(),
            bytes_holding_tokens: s.bytes_holding_tokens,
            sequences: self.slots.len(),
        }
    }

    fn audit(&self) -> Result<(), String> {
        let space = self.mapper.space();
        space.audit()?;
        let active = space.stats().active_slots;
        if active != self.slots.len() + self.prepared.len() {
            return Err(format!(
                "{active} active slots but {} sequences and {} prepared admissions",
                self.slots.len(),
                self.prepared.len()
            ));
        }
        Ok(())
    }

    fn mapper_stats(&self) -> Option<MapperStats> {
        Some(self.mapper.stats())
    }

    fn growth_map_waits(&self) -> Option<u64> {
        Some(self.growth_waits)
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
    fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        self.0.free(seq)
    }
    fn reserved(&self, seq: SeqId) -> Option<usize> {
        self.0.reserved(seq)
    }
    fn usage(&self) -> KvUsage {
        self.0.usage()
    }
    fn map_ahead(&self, seq: SeqId, len: usize) {
        self.0.map_ahead(seq, len)
    }
    fn warm_free_slots(&mut self, tokens: &[usize]) -> usize {
        self.0.warm_free_slots(tokens)
    }
    fn prepare_admissions(&mut self, next: &[(SeqId, usize)]) {
        self.0.prepare_admissions(next)
    }
    fn audit(&self) -> Result<(), String> {
        self.0.audit()
    }
    fn mapper_stats(&self) -> Option<MapperStats> {
        self.0.mapper_stats()
    }
    fn growth_map_waits(&self) -> Option<u64> {
        self.0.growth_map_waits()
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

/// Which KV cache to build: the command line's `--kv-mode`, `--block-size`, `--vmm-layout`,
/// `--page-size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMode {
    Paged { block_size: usize },
    Vmm { layout: KvLayout, page_size: usize },
}

impl KvMode {
    /// A cache of `dtype` elements for `max_seqs` sequences of up to `max_tokens` tokens in
    /// `kv_bytes` of memory.
    pub fn build(
        self,
        dims: KvDims,
        dtype: KvDtype,
        max_seqs: usize,
        max_tokens: usize,
        kv_bytes: usize,
    ) -> Result<Box<dyn KvCache>, KvError> {
        Ok(match self {
            KvMode::Paged { block_size } => {
                let blocks = kv_bytes / (block_size * dims.bytes_per_token_in(dtype)).max(1);
                Box::new(PagedKv::with_dtype(dims, dtype, blocks, block_size)?)
            }
            KvMode::Vmm { layout, page_size } => Box::new(VmmKv::with_dtype(
                dims,
                dtype,
                layout,
                max_seqs,
                max_tokens,
                page_size,
                kv_bytes / page_size.max(1),
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use vkv_kernels::cpu::{attention, kv_append, Heads};

    use super::*;

    const DIMS: KvDims = KvDims {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 16,
    };

    fn caches_of(d: KvDtype) -> Vec<Box<dyn KvCache>> {
        vec![
            Box::new(PagedKv::with_dtype(DIMS, d, 64, 16).unwrap()),
            Box::new(VmmKv::with_dtype(DIMS, d, KvLayout::PerLayer, 4, 512, 4096, 64).unwrap()),
            Box::new(VmmKv::with_dtype(DIMS, d, KvLayout::TokenMajor, 4, 512, 4096, 64).unwrap()),
        ]
    }

    fn caches() -> Vec<Box<dyn KvCache>> {
        let mut all = caches_of(KvDtype::F32);
        all.extend(caches_of(KvDtype::F16));
        all.extend(caches_of(KvDtype::Fp8));
        all
    }

    #[test]
    fn paged_pools_larger_than_the_host_are_an_error_not_the_oom_killer() {
        // Llama-3-8B-like: 2 MiB of f16 K and V per 16-token block over its 32 layers.
        let dims = KvDims {
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
        };
        let available = cpu::available_bytes().expect("Linux reports MemAvailable");
        let blocks = (2 * available / (2 << 20)) as usize;
        let err = PagedKv::with_dtype(dims, KvDtype::F16, blocks, 16)
            .err()
            .expect("twice the host's memory");
        let message = err.to_string();
        assert!(
            matches!(err, KvError::OutOfMemory { .. }) && message.contains("--kv-memory"),
            "{message}"
        );
    }

    #[test]
    fn capacity_and_bytes_per_token_follow_the_element_type() {
        for (mode, name) in [
            (KvMode::Paged { block_size: 16 }, "paged"),
            (
                KvMode::Vmm {
                    layout: KvLayout::PerLayer,
                    page_size: 4096,
                },
                "vmm per-layer",
            ),
            (
                KvMode::Vmm {
                    layout: KvLayout::TokenMajor,
                    page_size: 4096,
                },
                "vmm token-major",
            ),
        ] {
            let build = |d| mode.build(DIMS, d, 64, 4096, 1 << 20).unwrap();
            let (c32, c16) = (build(KvDtype::F32), build(KvDtype::F16));
            assert_eq!(c32.bytes_per_token(), DIMS.bytes_per_token(), "{name}");
            assert_eq!(2 * c16.bytes_per_token(), c32.bytes_per_token(), "{name}");
            assert_eq!(
                4 * build(KvDtype::Fp8).bytes_per_token(),
                c32.bytes_per_token(),
                "{name}"
            );
            // The same memory holds twice the tokens (up to the slots' limit in vmm).
            assert_eq!(
                c16.capacity_tokens(),
                (2 * c32.capacity_tokens()).min(64 * 4096),
                "{name}"
            );
            assert_eq!(
                c16.capacity_tokens() * c16.bytes_per_token(),
                1 << 20,
                "{name}"
            );
        }
    }

    #[test]
    fn every_cache_stores_and_attends_the_same() {
        let mut rng = StdRng::seed_from_u64(5);
        let width = DIMS.num_kv_heads * DIMS.head_dim;
        let tokens: Vec<(Vec<f32>, Vec<f32>)> = (0..100)
            .map(|_| {
                let r =
                    |rng: &mut StdRng| (0..width).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                (r(&mut rng), r(&mut rng))
            })
            .collect();
        let q: Vec<f32> = (0..4 * DIMS.head_dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        // Within one element type, every mode and layout gives the same bits.
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Fp8] {
            every_cache_of_one_dtype_attends_the_same(dtype, &tokens, &q);
        }
    }

    fn every_cache_of_one_dtype_attends_the_same(
        dtype: KvDtype,
        tokens: &[(Vec<f32>, Vec<f32>)],
        q: &[f32],
    ) {
        let mut outputs = Vec::new();
        for mut cache in caches_of(dtype) {
            // Two sequences interleaved, so blocks and pages of both alternate.
            for seq in [7, 9] {
                cache.reserve(seq, 1).unwrap();
            }
            for (t, (k, v)) in tokens.iter().enumerate() {
                for seq in [7, 9] {
                    cache.reserve(seq, t + 1).unwrap();
                    for layer in 0..DIMS.num_layers {
                        let r = cache.layer(seq, layer).unwrap();
                        let k: Vec<f32> = k.iter().map(|x| x + seq as f32 + layer as f32).collect();
                        unsafe { kv_append(&r, t, &k, v, DIMS.num_kv_heads, DIMS.head_dim) };
                    }
                }
            }
            let mut out = vec![0f32; 4 * DIMS.head_dim];
            let r = cache.layer(9, 1).unwrap();
            unsafe {
                attention(
                    q,
                    &r,
                    100,
                    Heads {
                        n_heads: 4,
                        n_kv_heads: 2,
                        head_dim: DIMS.head_dim,
                    },
                    0.25,
                    &mut out,
                )
            };
            outputs.push((cache.name(), out));
            let usage = cache.usage();
            assert_eq!(
                usage.bytes_holding_tokens,
                200 * DIMS.bytes_per_token_in(dtype),
                "{}",
                cache.name()
            );
            assert!(usage.bytes_allocated >= usage.bytes_holding_tokens);
            cache.free(7).unwrap();
            cache.free(9).unwrap();
            assert!(cache.free(9).is_err());
            assert_eq!(cache.usage().bytes_allocated, 0, "{}", cache.name());
        }
        for (name, out) in &outputs[1..] {
            assert_eq!(out, &outputs[0].1, "{name} differs from {}", outputs[0].0);
        }
    }

    #[test]
    fn prepared_admissions_are_taken_over_or_given_back_and_never_block_a_reserve() {
        let mut kv = VmmKv::new(DIMS, KvLayout::TokenMajor, 2, 512, 4096, 64).unwrap();
        // Both slots prepared for queued sequences 1 and 2, their first pages mapped ahead.
        kv.prepare_admissions(&[(1, 40), (2, 40)]);
        kv.0.mapper.sync().unwrap();
        assert_eq!(kv.usage().sequences, 0);
        assert_eq!(
            kv.usage().bytes_allocated,
            0,
            "prepared pages hold no token"
        );
        kv.audit().unwrap();
        // Sequence 1 is admitted into its prepared slot without waiting.
        let waits = kv.mapper_stats().unwrap().waits;
        kv.reserve(1, 40).unwrap();
        assert_eq!(kv.mapper_stats().unwrap().waits, waits);
        // Sequence 3 arrives instead of 2: the slot prepared for 2 is taken back for it.
        kv.reserve(3, 40).unwrap();
        kv.audit().unwrap();
        assert_eq!(kv.usage().sequences, 2);
        // No free slot: nothing to prepare, nothing changes.
        kv.prepare_admissions(&[(4, 10)]);
        kv.audit().unwrap();
        for seq in [1, 3] {
            kv.free(seq).unwrap();
        }
        // A preparation dropped from the list is given back.
        kv.prepare_admissions(&[(5, 10)]);
        kv.prepare_admissions(&[]);
        kv.audit().unwrap();
        assert_eq!(kv.0.mapper.space().stats().active_slots, 0);
        assert_eq!(kv.usage(), KvUsage::default());
    }

    #[test]
    fn warmed_slots_admit_without_waiting_and_their_pages_are_reclaimable() {
        let mut kv = VmmKv::new(DIMS, KvLayout::TokenMajor, 3, 512, 4096, 64).unwrap();
        let mapped = kv.warm_free_slots(&[300, 40]);
        assert!(mapped > 0);
        assert_eq!(kv.usage(), KvUsage::default(), "warm pages hold no token");
        assert_eq!(kv.0.mapper.space().stats().active_slots, 0);
        kv.audit().unwrap();
        // The first admission gets the largest warm slot, the second the other: no wait.
        kv.reserve(1, 300).unwrap();
        kv.reserve(2, 40).unwrap();
        assert_eq!(kv.mapper_stats().unwrap().waits, 0);
        // The cold third slot waits.
        kv.reserve(3, 40).unwrap();
        assert_eq!(kv.mapper_stats().unwrap().waits, 1);
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

    #[test]
    fn running_out_is_out_of_memory_and_changes_nothing() {
        for mut cache in caches() {
            let cap = cache.capacity_tokens();
            cache.reserve(1, 10).unwrap();
            let err = cache.reserve(2, cap + 1).unwrap_err();
            assert!(
                matches!(err, KvError::OutOfMemory { .. }),
                "{}: {err}",
                cache.name()
            );
            assert_eq!(cache.reserved(2), None, "{}", cache.name());
            assert_eq!(cache.reserved(1), Some(10));
        }
    }
}
