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

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};

use vkv_kernels::cpu::{KvDtype, KvRef};
use vkv_vmm::{
    HostVmm, KvSpace, KvSpaceConfig, LayerView, Mapper, MapperOptions, MapperStats, PhysicalMemory,
    SlotId, VmmError,
};

use super::manager::{unknown, KvCache, KvDims, KvManager, KvUsage, MapAhead, SeqId, VmmShape};
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

    /// The space, locked (statistics, audit).
    pub fn space(&self) -> MutexGuard<'_, KvSpace> {
        self.0.space()
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
        Ok(())
    }
}

impl MapAhead for VmmManager {
    fn map_ahead(&self, seq: SeqId, len: usize) {
        if let Some(&slot) = self.slots.get(&seq) {
            let len = len.min(self.config.max_tokens);
            // Only a stopped mapper fails here, and then `reserve` maps the pages itself.
            let _ = self.mapper.map_ahead(slot, len);
        }
    }

    fn prepare_admissions(&mut self, next: &[(SeqId, usize)]) {
        // Called every step: a Mapper thread that died (a panic in a driver call) starts again.
        // Only failing to spawn a thread fails here; `reserve` then maps what each step needs.
        let _ = self.mapper.revive();
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
mod tests {
    use super::*;
    use vkv_vmm::KvLayout;

    use crate::TEST_DIMS as DIMS;

    /// A token-major f32 cache of `slots` slots of 512 tokens, 64 pages of 4 KiB.
    fn token_major(slots: usize) -> VmmKv {
        let shape = VmmShape::new(KvLayout::TokenMajor, slots, 512, 4096, 64);
        VmmKv::with_dtype(DIMS, KvDtype::F32, shape).unwrap()
    }

    #[test]
    fn prepared_admissions_are_taken_over_or_given_back_and_never_block_a_reserve() {
        let mut kv = token_major(2);
        // Both slots prepared for queued sequences 1 and 2, their first pages mapped ahead.
        kv.0.prepare_admissions(&[(1, 40), (2, 40)]);
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
        kv.0.prepare_admissions(&[(4, 10)]);
        kv.audit().unwrap();
        for seq in [1, 3] {
            kv.free(seq).unwrap();
        }
        // A preparation dropped from the list is given back.
        kv.0.prepare_admissions(&[(5, 10)]);
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
