//! The books every KV cache keeps, whatever its design and device ([`KvManager`], vLLM's
//! `KVCacheManager`), the vmm-only capabilities beside them ([`MapAhead`]), the CPU forward
//! pass's host addressing ([`KvCache`]), and how a byte budget becomes a cache ([`KvMode`]).
//!
//! Invariants every implementation keeps (checked by `conformance.rs` on every cache):
//! a sequence's reserved length only grows until it is freed; a failed `reserve` or `fork`
//! changes nothing; memory is shared only through reference counts (a forked block or page is
//! freed by its last holder); after every sequence is freed the cache holds nothing.

use vkv_kernels::cpu::{KvDtype, KvRef};
use vkv_vmm::{KvLayout, KvSpaceConfig, MapperStats};

use super::paged::{HostPools, PagedKv};
use super::prefix::PrefixStats;
use super::vmm::VmmKv;
use super::KvError;

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
        self.bytes_per_token_of(dtype.bytes())
    }

    /// Bytes of K and V of one token over all layers, elements of `elem_bytes` bytes.
    pub fn bytes_per_token_of(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes
    }

    /// A vmm space of these dims in `shape`, elements of `elem_bytes` bytes.
    pub fn space_config(&self, elem_bytes: usize, shape: VmmShape) -> KvSpaceConfig {
        KvSpaceConfig {
            layout: shape.layout,
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            dtype_bytes: elem_bytes,
            max_slots: shape.max_seqs,
            max_tokens: shape.max_tokens,
            page_size: shape.page_size,
            max_pages: shape.max_pages,
        }
    }
}

/// The shape of a vmm cache on any device: its layout, `max_seqs` slots of `max_tokens` tokens of
/// virtual space, and its physical budget of at most `max_pages` pages of `page_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmShape {
    pub layout: KvLayout,
    pub max_seqs: usize,
    pub max_tokens: usize,
    pub page_size: usize,
    pub max_pages: usize,
}

impl VmmShape {
    pub const fn new(
        layout: KvLayout,
        max_seqs: usize,
        max_tokens: usize,
        page_size: usize,
        max_pages: usize,
    ) -> Self {
        VmmShape {
            layout,
            max_seqs,
            max_tokens,
            page_size,
            max_pages,
        }
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
    /// Bytes set aside for sequences (blocks held, pages mapped; shared ones once).
    pub bytes_allocated: usize,
    /// Bytes of the tokens the sequences hold (a shared prefix counted for every holder).
    pub bytes_holding_tokens: usize,
    /// What the sequences would take with nothing shared: every block or page a sequence holds
    /// counted for it (a shared one for each holder). `bytes_without_sharing −
    /// bytes_allocated` is what sharing saves (forks, prefix caching).
    pub bytes_without_sharing: usize,
    pub sequences: usize,
}

impl KvUsage {
    /// The share of [`KvUsage::bytes_without_sharing`] that sharing saves (0 when nothing is
    /// held): the PagedAttention paper's "memory saving" (§6.3, parallel sampling and beam
    /// search).
    pub fn sharing_saving(&self) -> f64 {
        match self.bytes_without_sharing {
            0 => 0.0,
            w => 1.0 - self.bytes_allocated.min(w) as f64 / w as f64,
        }
    }
}

/// The books of a KV cache — what the scheduler and the engine need, on any device: capacity,
/// reserving, forking and freeing tokens per sequence, usage and the audit. Where the bytes are,
/// and how a kernel addresses them, is the cache's own business ([`KvCache::layer`] on the CPU,
/// `GpuKv`'s addressing on CUDA).
pub trait KvManager: Send {
    fn dims(&self) -> KvDims;
    /// `paged-16`, `vmm-token-major-2MiB`, ...
    fn name(&self) -> String;
    /// Tokens the whole cache can hold.
    fn capacity_tokens(&self) -> usize;
    /// Bytes of K and V of one token over all layers, in the cache's element type.
    fn bytes_per_token(&self) -> usize;
    /// Back `seq` for `len` tokens (creating it if new; lengths only grow). All or nothing: on
    /// [`KvError::OutOfMemory`] the sequence is unchanged (a new one is not created).
    fn reserve(&mut self, seq: SeqId, len: usize) -> Result<(), KvError>;
    /// Start `dst` (which must hold nothing) with the first `tokens` tokens of `src` (at most
    /// what `src` holds), sharing `src`'s memory where whole units (blocks, pages) lie inside
    /// the prefix — one more reference each — and copying the unit the prefix ends inside, so
    /// both sequences write only memory of their own from then on. All or nothing.
    fn fork(&mut self, src: SeqId, dst: SeqId, tokens: usize) -> Result<(), KvError>;
    /// Forget `seq` and drop its references (memory no other sequence holds is free again).
    fn free(&mut self, seq: SeqId) -> Result<(), KvError>;
    /// Tokens `seq` is backed for.
    fn reserved(&self, seq: SeqId) -> Option<usize>;
    fn usage(&self) -> KvUsage;
    /// Check the cache's own books: every block or page is either free or held by exactly the
    /// sequences that hold it, with reference counts to match. The error says what is wrong.
    fn audit(&self) -> Result<(), KvError>;
    /// The vmm capabilities, for caches that map memory as it is needed (see [`MapAhead`]).
    fn map_ahead(&self) -> Option<&dyn MapAhead> {
        None
    }
    fn map_ahead_mut(&mut self) -> Option<&mut dyn MapAhead> {
        None
    }
    /// Automatic prefix caching, for caches built with it (see [`PrefixCache`]).
    fn prefix_cache(&self) -> Option<&dyn PrefixCache> {
        None
    }
    fn prefix_cache_mut(&mut self) -> Option<&mut dyn PrefixCache> {
        None
    }
    /// Turn automatic prefix caching on, before any sequence is reserved (the engine's
    /// `--enable-prefix-caching`). Caches that cannot cache prefixes say so.
    fn enable_prefix_caching(&mut self) -> Result<(), KvError> {
        Err(KvError::InvalidConfig(format!(
            "prefix caching: the {} cache cannot cache prefixes",
            self.name()
        )))
    }
}

/// Automatic prefix caching (vLLM V1's design, `docs/design/prefix_caching.md`; issue 18): the
/// K and V of every full block of tokens a sequence computed stay in the cache, indexed by the
/// block's chained key ([`crate::PrefixIndex`]), after the sequence is freed — evictable, least
/// recently released first, when memory runs out — so that a later sequence whose tokens start
/// the same way (a shared system prompt, a multi-turn chat) starts with those blocks instead of
/// computing them again. Memory held only by the cache counts as free: it is evicted on demand.
///
/// Use per sequence: [`PrefixCache::match_prefix`] before its first `reserve`, then `reserve`
/// from the tokens covered on, and [`PrefixCache::cache_computed`] after every step that
/// computed K and V, with the same salt each time.
pub trait PrefixCache {
    /// For `seq`, which must hold no KV yet: find the longest run of cached full blocks at the
    /// start of `tokens` — never all of them: at least the last token is left to compute, so at
    /// most the largest multiple of the block size below `tokens.len()` — and start `seq` with
    /// them (one more reference each). Returns the tokens covered, which `seq` then holds; on a
    /// miss (0) `seq` holds nothing, as before the call. `salt` (vLLM's `cache_salt`) keeps
    /// requests of different salts from sharing. The lookup is counted in the stats.
    fn match_prefix(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        salt: Option<&[u8]>,
    ) -> Result<usize, KvError>;
    /// `tokens` are `seq`'s tokens whose K and V are now computed (prompt and generated, at
    /// most what it holds): record every full block of them not yet recorded. A block equal to
    /// one already cached stays the sequence's own, uncached (a live table is never rewritten).
    fn cache_computed(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        salt: Option<&[u8]>,
    ) -> Result<(), KvError>;
    /// The tokens [`PrefixCache::match_prefix`] would cover now, looking only: nothing is
    /// referenced or counted (the scheduler's guess of what a waiting sequence will compute).
    fn cached_tokens(&self, tokens: &[u32], salt: Option<&[u8]>) -> usize;
    /// The cache's counters (lookups, hits, evictions, cached and evictable units).
    fn prefix_stats(&self) -> PrefixStats;
    /// Take back the counts of a `match_prefix` (its `tokens.len()` and the tokens it covered)
    /// whose sequence was not admitted after all and was freed: it will be looked up again, and
    /// counting both would inflate the hit rate.
    fn retract_lookup(&mut self, queried_tokens: usize, hit_tokens: usize);
}

/// A waiting sequence the scheduler expects the next step to admit ([`MapAhead::prepare_admissions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LikelyAdmission {
    pub seq: SeqId,
    /// Tokens at its start the prefix cache holds now ([`PrefixCache::cached_tokens`]; 0
    /// without caching): the admission maps them from the cache rather than backing them.
    pub hit: usize,
    /// Tokens its first `reserve` will likely ask for (the hit and its first chunk).
    pub len: usize,
}

/// What a cache that backs memory on demand (vmm: pages mapped into a virtual range) can do
/// while the device computes — vAttention's overlap of allocation with compute and its eager
/// allocation. Caches whose memory is all mapped up front (paged) have none of it.
pub trait MapAhead {
    /// Hint that `seq` will soon need `len` tokens backed, so the pages can be mapped while the
    /// current step computes.
    fn map_ahead(&self, seq: SeqId, len: usize);
    /// Hint that these waiting sequences are likely admitted by the next step (a slot acquired
    /// and its first pages mapped ahead, those a likely prefix-cache hit covers left to the
    /// hit). Preparations of sequences no longer listed are dropped; prepared memory never
    /// blocks a `reserve`.
    fn prepare_admissions(&mut self, next: &[LikelyAdmission]);
    /// Eager allocation (vAttention §6): back the first `tokens[i]` tokens of free slot `i` now,
    /// before any request (largest first: an admission takes the free slot with the most
    /// pages). The pages belong to no sequence — surplus, reclaimed under pressure. Returns the
    /// pages mapped.
    fn warm_free_slots(&mut self, tokens: &[usize]) -> usize;
    /// The map-ahead thread's counters (waits should stay 0).
    fn mapper_stats(&self) -> MapperStats;
    /// Of the map waits, those of sequences already holding memory (growth: decode steps and
    /// later prefill chunks) — the ones map-ahead exists to remove; the rest are admissions.
    fn growth_map_waits(&self) -> u64;
}

/// Storage of K and V for the CPU forward pass: the books plus host addressing.
pub trait KvCache: KvManager + Sync {
    /// Where `seq`'s K and V of `layer` live; valid until the next `reserve`, `fork` or `free`.
    fn layer(&self, seq: SeqId, layer: usize) -> Result<KvRef<'_>, KvError>;
    /// This cache as its books (what the scheduler takes), without trait upcasting.
    fn manager(&self) -> &dyn KvManager;
    fn manager_mut(&mut self) -> &mut dyn KvManager;
}

/// The error of a prefix-cache call on a `kind` cache (`paged`, `vmm`) built without caching.
pub(super) fn caching_off(kind: &str) -> KvError {
    KvError::InvalidConfig(format!(
        "prefix caching is off in this {kind} cache; expected one built with_prefix_caching"
    ))
}

/// Prefix caching is turned on before any sequence is reserved: `held` sequences are.
pub(super) fn enable_before_use(held: usize) -> Result<(), KvError> {
    if held > 0 {
        return Err(KvError::InvalidConfig(format!(
            "prefix caching must be turned on before any sequence is reserved; {held} are"
        )));
    }
    Ok(())
}

/// The error of `cache_computed` given `computed` tokens of `seq`, which holds only `held`.
pub(super) fn unreserved(seq: SeqId, held: usize, computed: usize) -> KvError {
    KvError::NotAllocated {
        what: format!(
            "tokens {held}..{computed} of sequence {seq} (computed tokens must be reserved)"
        ),
    }
}

/// The error for a sequence a cache does not hold.
pub(super) fn unknown(seq: SeqId) -> KvError {
    KvError::NotAllocated {
        what: format!("sequence {seq}"),
    }
}

/// Which KV cache to build: the command line's `--kv-mode`, `--block-size`, `--vmm-layout`,
/// `--page-size`.
/// What a cache is sized for: up to `max_seqs` sequences of up to `max_tokens` tokens each, in
/// `bytes` of memory (host memory on the CPU, device memory on CUDA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    pub max_seqs: usize,
    pub max_tokens: usize,
    pub bytes: usize,
}

impl KvBudget {
    pub const fn new(max_seqs: usize, max_tokens: usize, bytes: usize) -> Self {
        KvBudget {
            max_seqs,
            max_tokens,
            bytes,
        }
    }

    /// The vmm cache of this budget: its slots and tokens, `max_pages` pages of `page_size`.
    pub const fn vmm_shape(self, layout: KvLayout, page_size: usize, max_pages: usize) -> VmmShape {
        VmmShape::new(layout, self.max_seqs, self.max_tokens, page_size, max_pages)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMode {
    Paged { block_size: usize },
    Vmm { layout: KvLayout, page_size: usize },
}

impl KvMode {
    /// The one sizing rule of every device: how many units — blocks (paged) or physical pages
    /// (vmm) — the budget's bytes buy for `dims` with elements of `elem_bytes` bytes. vmm takes
    /// no more pages than `max_seqs` slots of `max_tokens` tokens could ever map (per region,
    /// whole pages per slot).
    pub fn units_for(self, dims: KvDims, elem_bytes: usize, budget: KvBudget) -> usize {
        let KvBudget {
            max_seqs,
            max_tokens,
            bytes: kv_bytes,
        } = budget;
        let token_bytes = dims.bytes_per_token_of(elem_bytes).max(1);
        match self {
            KvMode::Paged { block_size } => kv_bytes / (block_size * token_bytes).max(1),
            KvMode::Vmm { layout, page_size } => {
                let page_size = page_size.max(1);
                let regions = match layout {
                    KvLayout::PerLayer => 2 * dims.num_layers,
                    KvLayout::TokenMajor => 1,
                };
                let per_slot = regions * (max_tokens * (token_bytes / regions)).div_ceil(page_size);
                (kv_bytes / page_size).min(max_seqs.saturating_mul(per_slot))
            }
        }
    }

    /// A host-memory cache (the CPU device) of `dtype` elements, sized for `budget`.
    pub fn build(
        self,
        dims: KvDims,
        dtype: KvDtype,
        budget: KvBudget,
    ) -> Result<Box<dyn KvCache>, KvError> {
        let units = self.units_for(dims, dtype.bytes(), budget);
        Ok(match self {
            KvMode::Paged { block_size } => Box::new(PagedKv::<HostPools>::with_dtype(
                dims, dtype, units, block_size,
            )?),
            KvMode::Vmm { layout, page_size } => {
                let shape = budget.vmm_shape(layout, page_size, units);
                Box::new(VmmKv::with_dtype(dims, dtype, shape)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use vkv_kernels::cpu::{attention, kv_append, Heads};

    use super::*;
    use crate::{PagedKv, VmmKv};
    use vkv_kernels::cpu;

    use crate::TEST_DIMS as DIMS;

    fn caches_of(d: KvDtype) -> Vec<Box<dyn KvCache>> {
        vec![
            Box::new(PagedKv::with_dtype(DIMS, d, 64, 16).unwrap()),
            Box::new(
                VmmKv::with_dtype(DIMS, d, VmmShape::new(KvLayout::PerLayer, 4, 512, 4096, 64))
                    .unwrap(),
            ),
            Box::new(
                VmmKv::with_dtype(
                    DIMS,
                    d,
                    VmmShape::new(KvLayout::TokenMajor, 4, 512, 4096, 64),
                )
                .unwrap(),
            ),
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
            let build = |d| {
                mode.build(DIMS, d, KvBudget::new(64, 4096, 1 << 20))
                    .unwrap()
            };
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

    /// Attention of a 4-head query over the first `len` tokens of `seq`'s layer 1.
    fn attend(cache: &dyn KvCache, seq: SeqId, len: usize, q: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; 4 * DIMS.head_dim];
        let r = cache.layer(seq, 1).unwrap();
        let heads = Heads {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: DIMS.head_dim,
        };
        // SAFETY: `len` tokens of `seq` were written.
        unsafe { attention(q, &r, len, heads, 0.25, &mut out) };
        out
    }

    /// Write token `t` of `seq` in every layer: K and V made from `(t, salt)`.
    fn write(cache: &mut dyn KvCache, seq: SeqId, t: usize, salt: f32) {
        let width = DIMS.num_kv_heads * DIMS.head_dim;
        let k: Vec<f32> = (0..width)
            .map(|i| ((i + 3 * t) as f32 * 0.37 + salt).sin())
            .collect();
        let v: Vec<f32> = (0..width)
            .map(|i| ((i * 7 + t) as f32 * 0.11 - salt).cos())
            .collect();
        cache.reserve(seq, t + 1).unwrap();
        for layer in 0..DIMS.num_layers {
            let r = cache.layer(seq, layer).unwrap();
            // SAFETY: token `t` was just reserved.
            unsafe { kv_append(&r, t, &k, &v, DIMS.num_kv_heads, DIMS.head_dim) };
        }
    }

    #[test]
    fn a_fork_reads_its_source_prefix_and_writes_only_its_own_memory() {
        let q: Vec<f32> = (0..4 * DIMS.head_dim)
            .map(|i| (i as f32 * 0.7).sin())
            .collect();
        let all = [KvDtype::F32, KvDtype::F16, KvDtype::Fp8]
            .into_iter()
            .flat_map(|d| caches_of(d).into_iter().map(move |c| (d, c)));
        for (dtype, mut cache) in all {
            let name = cache.name();
            for t in 0..100 {
                write(cache.as_mut(), 7, t, 0.0);
            }
            let before: Vec<Vec<f32>> = (1..=100)
                .map(|n| attend(cache.as_ref(), 7, n, &q))
                .collect();
            let used = cache.usage().bytes_allocated;
            // At a block boundary, inside a block (and inside a 4 KiB page), and whole.
            for fork_at in [0usize, 16, 37, 64, 100] {
                let f = 20;
                cache.fork(7, f, fork_at).unwrap();
                cache.audit().unwrap();
                assert_eq!(cache.reserved(f), Some(fork_at), "{name}");
                // Sharing, not copying: a fork at a unit boundary (64 tokens is whole blocks,
                // and whole pages of f32 and f16) takes no memory.
                if fork_at == 64 && dtype != KvDtype::Fp8 {
                    assert_eq!(cache.usage().bytes_allocated, used, "{name}");
                }
                if fork_at > 0 {
                    assert_eq!(
                        attend(cache.as_ref(), f, fork_at, &q),
                        before[fork_at - 1],
                        "{name}: fork at {fork_at}"
                    );
                }
                // The fork goes its own way; the source must not see it.
                for t in fork_at..fork_at + 20 {
                    write(cache.as_mut(), f, t, 1.5);
                }
                assert_ne!(
                    attend(cache.as_ref(), f, fork_at + 20, &q),
                    before[(fork_at + 19).min(99)],
                    "{name}: fork at {fork_at} wrote nothing of its own"
                );
                assert!(matches!(
                    cache.fork(7, f, 10),
                    Err(KvError::AlreadyAllocated { seq: 20 })
                ));
                cache.free(f).unwrap();
            }
            for n in [1, 16, 17, 37, 38, 64, 65, 100] {
                assert_eq!(
                    attend(cache.as_ref(), 7, n, &q),
                    before[n - 1],
                    "{name}: the source changed under its forks ({n} tokens)"
                );
            }
            assert!(
                cache.fork(7, 99, 101).is_err(),
                "{name}: fork past the source"
            );
            assert_eq!(cache.reserved(99), None, "{name}");
            cache.free(7).unwrap();
            cache.audit().unwrap();
            assert_eq!(cache.usage(), KvUsage::default(), "{name}");
        }
    }
}
