//! Tests of the vmm caches' automatic prefix caching (`vmm.rs`), in both layouts and with a unit
//! of several pages: hits, misses, salts, eviction order under pressure, the bytes a hit reads,
//! and random operations against a model of what every sequence's tokens hold.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use vkv_kernels::cpu::{attention, kv_append, Heads};
use vkv_vmm::{KvLayout, KvPart};

use super::*;
use crate::conformance::check_random_operations;
use crate::TEST_DIMS as DIMS;

/// 3 layers: a token-major f32 token is 768 B, so a 4 KiB page holds no whole number of tokens
/// and a unit is 3 pages of 16 tokens.
const ODD_DIMS: KvDims = KvDims {
    num_layers: 3,
    num_kv_heads: 2,
    head_dim: 16,
};

/// An f32 cache of `dims` with prefix caching on: `slots` slots of 256 tokens, `pages` pages of
/// 4 KiB. TEST_DIMS: a token-major unit is one page of 8 tokens, a per-layer one 4 pages (one
/// per region) of 32 tokens.
fn caching_of(dims: KvDims, layout: KvLayout, slots: usize, pages: usize) -> VmmKv {
    let shape = VmmShape::new(layout, slots, 256, 4096, pages);
    VmmKv::with_dtype(dims, KvDtype::F32, shape)
        .unwrap()
        .with_prefix_caching()
}

fn caching(layout: KvLayout, slots: usize, pages: usize) -> VmmKv {
    caching_of(DIMS, layout, slots, pages)
}

/// A caching cache of 4 slots with room for `units` prefix units, and its unit: (cache, tokens
/// per unit, pages per unit).
fn caching_units(layout: KvLayout, units: usize) -> (VmmKv, usize, usize) {
    let probe = caching(layout, 4, 8);
    let (u, len) = (unit(&probe), unit_len(&probe));
    drop(probe);
    (caching(layout, 4, units * len), u, len)
}

fn unit(kv: &VmmKv) -> usize {
    kv.0.prefix_unit_tokens()
}

fn unit_len(kv: &VmmKv) -> usize {
    kv.space().unit_len()
}

fn prompt(head: &[u32], tail: std::ops::Range<u32>) -> Vec<u32> {
    head.iter().copied().chain(tail).collect()
}

/// K and V of token `id` at position `t` in `layer` (what a forward pass would have written).
fn kv_of(dims: KvDims, id: u32, t: usize, layer: usize) -> (Vec<f32>, Vec<f32>) {
    let width = dims.num_kv_heads * dims.head_dim;
    let x = id as usize * 3 + t * 5 + layer * 7;
    let k = (0..width).map(|i| ((i + x) as f32 * 0.37).sin()).collect();
    let v = (0..width)
        .map(|i| ((i * 7 + x) as f32 * 0.11).cos())
        .collect();
    (k, v)
}

/// Write tokens `range` of `seq` (reserved already) in every layer.
fn write(kv: &VmmKv, seq: SeqId, tokens: &[u32], range: std::ops::Range<usize>) {
    let dims = kv.dims();
    for t in range {
        for layer in 0..dims.num_layers {
            let (k, v) = kv_of(dims, tokens[t], t, layer);
            let r = kv.layer(seq, layer).unwrap();
            // SAFETY: token `t` is reserved, so its pages are mapped.
            unsafe { kv_append(&r, t, &k, &v, dims.num_kv_heads, dims.head_dim) };
        }
    }
}

/// Whether `seq`'s tokens `range` hold what [`write`] writes for `tokens`; the error says where
/// not.
fn holds(
    kv: &VmmKv,
    seq: SeqId,
    tokens: &[u32],
    range: std::ops::Range<usize>,
) -> Result<(), String> {
    if range.is_empty() {
        return Ok(());
    }
    let dims = kv.dims();
    let slot =
        kv.0.slot(seq)
            .ok_or(format!("sequence {seq} has no slot"))?;
    let space = kv.space();
    let mut got = vec![0u8; dims.num_kv_heads * dims.head_dim * 4];
    let bytes = |x: &[f32]| x.iter().flat_map(|f| f.to_ne_bytes()).collect::<Vec<u8>>();
    for t in range {
        for layer in 0..dims.num_layers {
            let (k, v) = kv_of(dims, tokens[t], t, layer);
            for (part, want) in [(KvPart::K, k), (KvPart::V, v)] {
                space
                    .read_token(slot, layer, part, t, &mut got)
                    .map_err(|e| e.to_string())?;
                if got != bytes(&want) {
                    return Err(format!(
                        "sequence {seq} token {t} (id {}) layer {layer} {part:?} differs from \
                         what was written for it",
                        tokens[t]
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `seq`'s tokens are computed: reserve, write and record them.
fn compute(kv: &mut VmmKv, seq: SeqId, tokens: &[u32]) {
    let from = kv.reserved(seq).unwrap_or(0);
    kv.reserve(seq, tokens.len()).unwrap();
    write(kv, seq, tokens, from..tokens.len());
    kv.cache_computed(seq, tokens, None).unwrap();
    kv.audit().unwrap();
}

/// The pages of `seq`'s first `n` units.
fn units_of(kv: &VmmKv, seq: SeqId, n: usize) -> Vec<Vec<PhysicalPage>> {
    let slot = kv.0.slot(seq).unwrap();
    let space = kv.space();
    (0..n).map(|j| space.unit_pages(slot, j).unwrap()).collect()
}

#[test]
fn the_unit_is_a_page_row_or_the_fewest_pages_holding_whole_tokens() {
    for (dims, layout, tokens, pages) in [
        (DIMS, KvLayout::TokenMajor, 8, 1),
        (DIMS, KvLayout::PerLayer, 32, 4),
        (ODD_DIMS, KvLayout::TokenMajor, 16, 3),
        (ODD_DIMS, KvLayout::PerLayer, 32, 6),
    ] {
        let kv = caching_of(dims, layout, 2, 64);
        assert_eq!((unit(&kv), unit_len(&kv)), (tokens, pages), "{layout}");
    }
}

#[test]
fn a_shared_system_prompt_is_computed_once() {
    for layout in KvLayout::ALL {
        let mut kv = caching(layout, 4, 64);
        let u = unit(&kv);
        let system: Vec<u32> = (0..3 * u as u32).collect();
        let half = u as u32 / 2;
        let (a, b) = (
            prompt(&system, 1000..1000 + half + 1),
            prompt(&system, 2000..2000 + half),
        );
        assert_eq!(kv.match_prefix(1, &a, None).unwrap(), 0, "an empty cache");
        assert_eq!(kv.reserved(1), None, "a miss holds nothing");
        compute(&mut kv, 1, &a);
        assert_eq!(
            kv.prefix_stats().cached_units,
            3,
            "{layout}: the full units"
        );
        let pinned = kv.space().stats().pages_pinned;
        assert_eq!(pinned, 3 * unit_len(&kv));

        assert_eq!(kv.match_prefix(2, &b, None).unwrap(), 3 * u, "{layout}");
        assert_eq!(kv.reserved(2), Some(3 * u));
        let shared = units_of(&kv, 1, 3);
        assert_eq!(
            units_of(&kv, 2, 3),
            shared,
            "{layout}: the same physical pages"
        );
        for page in shared.iter().flatten() {
            assert_eq!(kv.space().references(page.handle), 2);
        }
        holds(&kv, 2, &b, 0..3 * u).unwrap();
        compute(&mut kv, 2, &b);
        holds(&kv, 1, &a, 0..a.len()).unwrap();

        kv.free(1).unwrap();
        kv.free(2).unwrap();
        kv.audit().unwrap();
        let s = kv.space().stats();
        assert_eq!(
            s.pages_kept,
            3 * unit_len(&kv),
            "{layout}: only the cached units"
        );
        assert_eq!(kv.0.evictable_pages(), s.pages_kept);
        assert_eq!(kv.prefix_stats().evictable_units, 3);
        assert_eq!(kv.usage().bytes_allocated, 0, "an idle cache holds nothing");

        let c = prompt(&system, 3000..3001);
        assert_eq!(
            kv.match_prefix(3, &c, None).unwrap(),
            3 * u,
            "a hit after both left"
        );
        assert_eq!(units_of(&kv, 3, 3), shared);
        holds(&kv, 3, &c, 0..3 * u).unwrap();
        assert_eq!(kv.prefix_stats().evictable_units, 0);
        assert_eq!(kv.usage().bytes_allocated, 3 * unit_len(&kv) * 4096);
        kv.audit().unwrap();
        assert_eq!(kv.match_prefix(4, &c, Some(b"tenant")).unwrap(), 0);
        assert_eq!(kv.reserved(4), None);
        assert!(matches!(
            kv.match_prefix(3, &c, None),
            Err(KvError::AlreadyAllocated { seq: 3 })
        ));
        let stats = kv.prefix_stats();
        let queried = (a.len() + b.len() + 2 * c.len()) as u64;
        assert_eq!(
            (stats.queried_tokens, stats.hit_tokens),
            (queried, 6 * u as u64)
        );
        kv.free(3).unwrap();
        kv.audit().unwrap();
    }
}

#[test]
fn a_prompt_of_whole_units_leaves_its_last_unit_to_compute() {
    for layout in KvLayout::ALL {
        let mut kv = caching(layout, 8, 64);
        let u = unit(&kv);
        let tokens: Vec<u32> = (0..3 * u as u32).collect();
        compute(&mut kv, 1, &tokens);
        assert_eq!(kv.match_prefix(2, &tokens, None).unwrap(), 2 * u);
        assert_eq!(
            kv.match_prefix(3, &prompt(&tokens, 7..8), None).unwrap(),
            3 * u
        );
        assert_eq!(kv.match_prefix(4, &tokens[..1], None).unwrap(), 0);
        assert_eq!(kv.match_prefix(5, &[], None).unwrap(), 0);
        // A different first unit misses everything after it.
        let other = prompt(&[9], 1..3 * u as u32 + 1);
        assert_eq!(kv.match_prefix(6, &other, None).unwrap(), 0);
        kv.audit().unwrap();
    }
}

#[test]
fn eviction_takes_the_tail_units_first_and_never_a_held_one() {
    for layout in KvLayout::ALL {
        // Room for 6 units; a sequence of 4 units cached, then freed.
        let (mut kv, u, _) = caching_units(layout, 6);
        let tokens: Vec<u32> = (0..4 * u as u32).collect();
        compute(&mut kv, 1, &tokens);
        let units = units_of(&kv, 1, 4);
        kv.free(1).unwrap();
        assert_eq!(kv.prefix_stats().evictable_units, 4);
        // Three units: the two the pool still has, then the cached tail is evicted.
        kv.reserve(2, 3 * u).unwrap();
        assert_eq!(kv.prefix_stats().evictions, 1, "{layout}");
        let reused: Vec<PhysicalPage> = units_of(&kv, 2, 3).into_iter().flatten().collect();
        assert!(
            units[3].iter().all(|p| reused.contains(p)),
            "{layout}: the tail's pages reused"
        );
        kv.audit().unwrap();
        let longer = prompt(&tokens, 100..101);
        assert_eq!(
            kv.match_prefix(3, &longer, None).unwrap(),
            3 * u,
            "{layout}: the head stays"
        );
        holds(&kv, 3, &longer, 0..3 * u).unwrap();
        // Nothing free nor evictable: out of memory, and nothing evicted or changed.
        let err = kv.reserve(4, 1).unwrap_err();
        assert!(matches!(err, KvError::OutOfMemory { .. }), "{err}");
        assert_eq!(kv.reserved(4), None);
        kv.free(2).unwrap();
        // Three units of pages are free (sequence 2's, unmapped from its released slot on
        // demand); growing sequence 3 by four is out of memory, and nothing is evicted.
        assert!(kv.reserve(3, 7 * u).is_err());
        assert_eq!(kv.prefix_stats().cached_units, 3);
        assert_eq!(kv.reserved(3), Some(3 * u));
        kv.audit().unwrap();
        // The holder of the head units keeps them through any pressure.
        kv.reserve(5, 3 * u).unwrap();
        assert!(kv.reserve(6, 1).is_err());
        assert_eq!(units_of(&kv, 3, 3), &units[..3]);
        holds(&kv, 3, &longer, 0..3 * u).unwrap();
        kv.audit().unwrap();
        kv.free(3).unwrap();
        kv.free(5).unwrap();
        kv.audit().unwrap();
    }
}

#[test]
fn a_prepared_admission_leaves_the_pages_of_its_likely_hit_to_the_hit() {
    for layout in KvLayout::ALL {
        let (mut kv, u, len) = caching_units(layout, 16);
        let tokens: Vec<u32> = (0..4 * u as u32 + 1).collect();
        compute(&mut kv, 1, &tokens[..4 * u]);
        kv.free(1).unwrap();
        // A free slot warmed with surplus pages where the hit will go (it is the one an
        // admission acquires: the slot with the most pages).
        assert!(kv.0.warm_free_slots(&[4 * u]) > 0);
        // The scheduler's guess looks and counts nothing.
        let queried = kv.prefix_stats().queried_tokens;
        let hit = kv.cached_tokens(&tokens, None);
        assert_eq!(hit, 4 * u, "{layout}");
        assert_eq!(kv.prefix_stats().queried_tokens, queried, "{layout}");
        kv.0.prepare_admissions(&[LikelyAdmission {
            seq: 2,
            hit,
            len: tokens.len(),
        }]);
        kv.0.mapper.sync().unwrap();
        // The mapper unmapped the warm pages the hit will replace, off the critical path.
        let stats = kv.0.mapper_stats();
        assert_eq!(stats.pages_cleared_for_hits, 4 * len as u64, "{layout}");
        kv.audit().unwrap();
        // The hit maps its pages there, the page past it was mapped ahead: no wait.
        assert_eq!(kv.match_prefix(2, &tokens, None).unwrap(), 4 * u);
        kv.reserve(2, tokens.len()).unwrap();
        assert_eq!(kv.0.mapper_stats().waits, stats.waits, "{layout}");
        holds(&kv, 2, &tokens, 0..4 * u).unwrap();
        kv.audit().unwrap();
        kv.free(2).unwrap();
        kv.audit().unwrap();
    }
}

#[test]
fn map_ahead_and_warm_slots_evict_cached_pages_too() {
    for layout in KvLayout::ALL {
        let (mut kv, u, len) = caching_units(layout, 4);
        let tokens: Vec<u32> = (0..4 * u as u32 + 1).collect();
        compute(&mut kv, 1, &tokens[..4 * u]);
        kv.free(1).unwrap();
        // Released slot 0 keeps no page: every page is cached, kept.
        assert_eq!(kv.space().stats().pages_kept, 4 * len);
        // The mapper's thread maps a prepared admission ahead, evicting the tail unit.
        kv.0.prepare_admissions(&[LikelyAdmission {
            seq: 2,
            hit: 0,
            len: u,
        }]);
        kv.0.mapper.sync().unwrap();
        assert_eq!(kv.prefix_stats().evictions, 1, "{layout}");
        kv.audit().unwrap();
        // Warming evicts what it needs too.
        assert!(kv.0.warm_free_slots(&[2 * u]) > 0);
        assert_eq!(kv.prefix_stats().evictions, 3, "{layout}");
        kv.audit().unwrap();
        // The head is still there, and the prepared admission takes its slot.
        assert_eq!(kv.match_prefix(2, &tokens, None).unwrap(), u);
        holds(&kv, 2, &tokens, 0..u).unwrap();
        kv.audit().unwrap();
        kv.free(2).unwrap();
        // The space's reclaim evicts every cached unit and gives every page back.
        kv.space().reclaim_all().unwrap();
        let s = kv.space().stats();
        assert_eq!(
            (s.pages_free, s.pages_kept, s.pages_pinned),
            (s.pages_created, 0, 0)
        );
        assert_eq!(kv.prefix_stats().cached_units, 0);
        kv.audit().unwrap();
    }
}

/// Attention of a 4-head query over the first `len` tokens of `seq`'s last layer.
fn attend(kv: &VmmKv, seq: SeqId, len: usize) -> Vec<f32> {
    let q: Vec<f32> = (0..4 * DIMS.head_dim)
        .map(|i| (i as f32 * 0.7).sin())
        .collect();
    let mut out = vec![0f32; q.len()];
    let r = kv.layer(seq, DIMS.num_layers - 1).unwrap();
    let heads = Heads {
        n_heads: 4,
        n_kv_heads: DIMS.num_kv_heads,
        head_dim: DIMS.head_dim,
    };
    // SAFETY: `len` tokens of `seq` were written.
    unsafe { attention(&q, &r, len, heads, 0.25, &mut out) };
    out
}

#[test]
fn a_hit_reads_the_bytes_the_first_sequence_wrote() {
    for layout in KvLayout::ALL {
        let (mut kv, u, _) = caching_units(layout, 6);
        let tokens: Vec<u32> = (500..500 + 2 * u as u32 + u as u32 / 2).collect();
        kv.reserve(1, tokens.len()).unwrap();
        write(&kv, 1, &tokens, 0..tokens.len());
        kv.cache_computed(1, &tokens, None).unwrap();
        let before: Vec<Vec<f32>> = (1..=tokens.len()).map(|n| attend(&kv, 1, n)).collect();
        let head = units_of(&kv, 1, 2);
        kv.free(1).unwrap();
        // Another sequence takes every page the pool has and writes them all.
        kv.reserve(9, 3 * u).unwrap();
        let other: Vec<u32> = (7..7 + 3 * u as u32).collect();
        write(&kv, 9, &other, 0..3 * u);
        assert!(units_of(&kv, 9, 3).iter().all(|p| !head.contains(p)));
        kv.free(9).unwrap();

        assert_eq!(kv.match_prefix(2, &tokens, None).unwrap(), 2 * u);
        assert_eq!(units_of(&kv, 2, 2), head, "{layout}");
        holds(&kv, 2, &tokens, 0..2 * u).unwrap();
        for n in [1, u, u + 1, 2 * u] {
            assert_eq!(attend(&kv, 2, n), before[n - 1], "{layout}: {n} tokens");
        }
        // It computes the rest itself, in pages of its own.
        kv.reserve(2, tokens.len()).unwrap();
        write(&kv, 2, &tokens, 2 * u..tokens.len());
        assert_eq!(attend(&kv, 2, tokens.len()), before[tokens.len() - 1]);
        kv.audit().unwrap();
    }
}

#[test]
fn units_of_several_pages_hit_and_read_back() {
    for layout in KvLayout::ALL {
        let mut kv = caching_of(ODD_DIMS, layout, 4, 96);
        let u = unit(&kv);
        let tokens: Vec<u32> = (0..3 * u as u32 + 3).collect();
        compute(&mut kv, 1, &tokens);
        // A fork ending inside a unit shares some of its pages, not all.
        kv.fork(1, 2, u + u / 2).unwrap();
        kv.cache_computed(2, &tokens[..u + u / 2], None).unwrap();
        kv.free(1).unwrap();
        kv.audit().unwrap();
        // Token-major: the fork shares a page of unit 1, so only unit 2 is mapped nowhere;
        // per-layer: the fork shares unit 0 only.
        let past_the_fork = match layout {
            KvLayout::TokenMajor => 1,
            KvLayout::PerLayer => 2,
        };
        assert_eq!(kv.prefix_stats().evictable_units, past_the_fork, "{layout}");
        assert_eq!(kv.match_prefix(3, &tokens, None).unwrap(), 3 * u);
        holds(&kv, 3, &tokens, 0..3 * u).unwrap();
        holds(&kv, 2, &tokens, 0..u + u / 2).unwrap();
        kv.free(2).unwrap();
        kv.free(3).unwrap();
        kv.audit().unwrap();
        assert_eq!(kv.prefix_stats().evictable_units, 3);
    }
}

#[test]
fn a_duplicate_unit_stays_its_sequences_own() {
    for layout in KvLayout::ALL {
        let mut kv = caching(layout, 4, 64);
        let u = unit(&kv);
        let tokens: Vec<u32> = (0..2 * u as u32 + 1).collect();
        // Two sequences compute the same prompt side by side (neither hit the other).
        compute(&mut kv, 1, &tokens);
        compute(&mut kv, 2, &tokens);
        assert_eq!(
            kv.prefix_stats().cached_units,
            2,
            "{layout}: 2's copies are not cached"
        );
        kv.free(2).unwrap();
        assert_eq!(kv.prefix_stats().evictable_units, 0);
        assert_eq!(kv.space().stats().pages_kept, 0);
        // A third sequence extends the chain through sequence 1's entries.
        let longer = prompt(&tokens, 0..u as u32);
        compute(&mut kv, 3, &longer);
        kv.free(1).unwrap();
        kv.free(3).unwrap();
        assert_eq!(
            kv.match_prefix(4, &prompt(&longer, 0..1), None).unwrap(),
            3 * u
        );
        kv.audit().unwrap();
    }
}

#[test]
fn without_caching_nothing_changes() {
    let shape = VmmShape::new(KvLayout::TokenMajor, 2, 256, 4096, 16);
    let mut kv = VmmKv::with_dtype(DIMS, KvDtype::F32, shape).unwrap();
    assert!(kv.prefix_cache().is_none() && kv.prefix_cache_mut().is_none());
    assert!(kv.match_prefix(1, &[1; 40], None).is_err());
    assert_eq!(kv.prefix_stats(), PrefixStats::default());
    let mut on = caching(KvLayout::TokenMajor, 2, 16);
    assert!(on.prefix_cache().is_some() && on.prefix_cache_mut().is_some());
    assert!(
        on.cache_computed(1, &[1; 20], None).is_err(),
        "an unknown sequence"
    );
    on.reserve(1, 10).unwrap();
    assert!(
        on.cache_computed(1, &[1; 20], None).is_err(),
        "past what it holds"
    );
}

#[test]
fn the_conformance_checks_pass_with_caching_on() {
    for layout in KvLayout::ALL {
        let mut kv = caching(layout, 6, 48);
        let report = check_random_operations(&mut kv, 3, 400, 200).unwrap();
        assert!(report.hit_tokens > 0, "{layout}: {report:?}");
    }
}

/// A sequence of the random-operations model: its tokens (prompt, then generated), how many are
/// computed (written and reserved), and its salt.
#[derive(Debug, Clone)]
struct Seq {
    tokens: Vec<u32>,
    computed: usize,
    salt: Option<&'static [u8]>,
}

struct Model {
    seqs: BTreeMap<SeqId, Seq>,
    next: SeqId,
}

impl Model {
    /// `seq` computed its tokens up to `to` (reserved already): write them, tell the cache.
    fn compute(&mut self, kv: &mut VmmKv, seq: SeqId, to: usize) -> Result<(), String> {
        let s = self.seqs.get_mut(&seq).expect("a model sequence");
        write(kv, seq, &s.tokens, s.computed..to);
        s.computed = s.computed.max(to);
        kv.cache_computed(seq, &s.tokens[..s.computed], s.salt)
            .map_err(|e| e.to_string())
    }

    fn free(&mut self, kv: &mut VmmKv, seq: SeqId) {
        kv.free(seq).unwrap();
        self.seqs.remove(&seq);
    }

    /// Memory ran out: the newest sequence gives its memory back (preemption by recompute).
    fn preempt(&mut self, kv: &mut VmmKv) {
        if let Some((&newest, _)) = self.seqs.iter().next_back() {
            self.free(kv, newest);
        }
    }
}

/// Random admissions (prompts from a few shared prefixes plus random suffixes, some salted, some
/// prepared ahead by the mapper), hits, chunked prefill, decode steps, forks, aborts and
/// preemptions on a small space, checked after every operation: the audit, every sequence's
/// length, and every computed token of every sequence reading back what was written for it (so
/// a hit never returns other K and V, and nothing writes a cached page). At the end everything
/// is freed — nothing referenced, the cached units evictable — and reclaimed: every page back in
/// the pool.
fn random_operations(
    seed: u64,
    dims: KvDims,
    layout: KvLayout,
    pages: usize,
    steps: usize,
) -> Result<PrefixStats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kv = caching_of(dims, layout, 6, pages);
    let u = unit(&kv);
    let prefixes: Vec<Vec<u32>> = (0..3u32)
        .map(|p| {
            (0..rng.random_range(0..3 * u as u32))
                .map(|t| 1000 * (p + 1) + t)
                .collect()
        })
        .collect();
    let mut m = Model {
        seqs: BTreeMap::new(),
        next: 0,
    };
    for step in 0..steps {
        let fail = |what: String| format!("step {step}: {what}");
        match rng.random_range(0..10u32) {
            // Admit: a hit, then the first prefill chunk.
            0..=2 => {
                let mut tokens = prefixes[rng.random_range(0..3)].clone();
                let suffix = rng.random_range(1..2 * u);
                tokens.extend((0..suffix).map(|_| rng.random_range(0..3u32)));
                tokens.truncate(200);
                let salt: Option<&'static [u8]> = rng.random_bool(0.2).then_some(b"tenant");
                m.next += 1;
                let seq = m.next;
                if rng.random_bool(0.3) {
                    // Prepared as the scheduler does: the pages of the hit it finds now left to
                    // the hit (the admission may find more or less cached by then).
                    let hit = kv.cached_tokens(&tokens, salt);
                    kv.0.prepare_admissions(&[LikelyAdmission {
                        seq,
                        hit,
                        len: tokens.len(),
                    }]);
                    if rng.random_bool(0.5) {
                        kv.0.mapper.sync().map_err(|e| fail(e.to_string()))?;
                    }
                }
                let covered = match kv.match_prefix(seq, &tokens, salt) {
                    Ok(covered) => covered,
                    Err(KvError::OutOfMemory { .. }) => {
                        kv.0.prepare_admissions(&[]);
                        m.preempt(&mut kv);
                        kv.audit().map_err(|e| fail(e.to_string()))?;
                        continue;
                    }
                    Err(e) => return Err(fail(e.to_string())),
                };
                if !covered.is_multiple_of(u) || (covered > 0 && covered >= tokens.len()) {
                    return Err(fail(format!(
                        "{covered} of {} tokens matched",
                        tokens.len()
                    )));
                }
                if kv.reserved(seq) != (covered > 0).then_some(covered) {
                    return Err(fail(format!(
                        "a match of {covered} tokens left {:?} reserved",
                        kv.reserved(seq)
                    )));
                }
                holds(&kv, seq, &tokens, 0..covered).map_err(fail)?;
                m.seqs.insert(
                    seq,
                    Seq {
                        tokens,
                        computed: covered,
                        salt,
                    },
                );
                let chunk = (covered + rng.random_range(1..3 * u)).min(m.seqs[&seq].tokens.len());
                match kv.reserve(seq, chunk) {
                    Ok(()) => m.compute(&mut kv, seq, chunk).map_err(fail)?,
                    Err(KvError::OutOfMemory { .. }) => {
                        if covered == 0 {
                            m.seqs.remove(&seq);
                        } else {
                            m.free(&mut kv, seq);
                        }
                        m.preempt(&mut kv);
                    }
                    Err(e) => return Err(fail(e.to_string())),
                }
                kv.0.prepare_admissions(&[]);
            }
            // Grow: the next prefill chunk, or a decode step.
            3..=5 if !m.seqs.is_empty() => {
                let seq = *m
                    .seqs
                    .keys()
                    .nth(rng.random_range(0..m.seqs.len()))
                    .unwrap();
                let s = m.seqs.get_mut(&seq).unwrap();
                if s.computed == s.tokens.len() && s.tokens.len() < 256 {
                    s.tokens.push(rng.random_range(0..3u32));
                }
                let to = (s.computed + rng.random_range(1..2 * u)).min(s.tokens.len());
                if rng.random_bool(0.3) {
                    MapAhead::map_ahead(&kv.0, seq, to + u);
                }
                match kv.reserve(seq, to) {
                    Ok(()) => m.compute(&mut kv, seq, to).map_err(fail)?,
                    Err(KvError::OutOfMemory { .. }) => m.preempt(&mut kv),
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            // Fork a computed prefix (a second sample of the same prompt).
            6 if !m.seqs.is_empty() => {
                let src = *m
                    .seqs
                    .keys()
                    .nth(rng.random_range(0..m.seqs.len()))
                    .unwrap();
                let s = m.seqs[&src].clone();
                let n = rng.random_range(0..=s.computed);
                m.next += 1;
                let dst = m.next;
                match kv.fork(src, dst, n) {
                    Ok(()) => {
                        let tokens = s.tokens[..n].to_vec();
                        m.seqs.insert(
                            dst,
                            Seq {
                                tokens,
                                computed: n,
                                salt: s.salt,
                            },
                        );
                        m.compute(&mut kv, dst, n).map_err(fail)?;
                    }
                    Err(KvError::OutOfMemory { .. }) => m.preempt(&mut kv),
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            7 => m.preempt(&mut kv),
            8 if rng.random_bool(0.2) => {
                kv.0.warm_free_slots(&[rng.random_range(0..64)]);
            }
            _ if !m.seqs.is_empty() => {
                let seq = *m
                    .seqs
                    .keys()
                    .nth(rng.random_range(0..m.seqs.len()))
                    .unwrap();
                m.free(&mut kv, seq);
            }
            _ => {}
        }
        kv.audit().map_err(|e| fail(e.to_string()))?;
        for (&seq, s) in &m.seqs {
            if kv.reserved(seq) != Some(s.computed) {
                return Err(fail(format!(
                    "sequence {seq} holds {:?}, computed {}",
                    kv.reserved(seq),
                    s.computed
                )));
            }
            holds(&kv, seq, &s.tokens, 0..s.computed).map_err(fail)?;
        }
    }
    let stats = kv.prefix_stats();
    for seq in m.seqs.keys().copied().collect::<Vec<_>>() {
        m.free(&mut kv, seq);
    }
    kv.0.mapper.sync().map_err(|e| e.to_string())?;
    kv.audit().map_err(|e| e.to_string())?;
    let s = kv.space().stats();
    let evictable = kv.prefix_stats().evictable_units * unit_len(&kv);
    if kv.usage() != KvUsage::default()
        || s.pages_kept != s.pages_pinned
        || s.pages_kept != evictable
        || kv.prefix_stats().evictable_units != kv.prefix_stats().cached_units
    {
        return Err(format!(
            "all freed: {:?}, {s:?}, {:?}",
            kv.usage(),
            kv.prefix_stats()
        ));
    }
    kv.space().reclaim_all().map_err(|e| e.to_string())?;
    kv.audit().map_err(|e| e.to_string())?;
    let s = kv.space().stats();
    if s.pages_free != s.pages_created || s.pages_pinned != 0 || kv.prefix_stats().cached_units != 0
    {
        return Err(format!(
            "all evicted and reclaimed: {s:?}, {:?}",
            kv.prefix_stats()
        ));
    }
    Ok(PrefixStats {
        evictions: kv.prefix_stats().evictions,
        ..stats
    })
}

#[test]
fn random_operations_hit_evict_and_keep_the_books() {
    for (dims, layout, pages) in [
        (DIMS, KvLayout::TokenMajor, 24),
        (DIMS, KvLayout::PerLayer, 40),
        (ODD_DIMS, KvLayout::TokenMajor, 40),
    ] {
        let stats = random_operations(11, dims, layout, pages, 800)
            .unwrap_or_else(|e| panic!("{layout} {dims:?}: {e}"));
        assert!(
            stats.hit_tokens > 100 && stats.evictions > 10,
            "{layout} {dims:?}: the run exercised too little: {stats:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn random_operations_on_small_spaces(
        seed in any::<u64>(),
        layout in prop::sample::select(KvLayout::ALL.to_vec()),
        odd in any::<bool>(),
        pages in 4..48usize,
    ) {
        let dims = if odd { ODD_DIMS } else { DIMS };
        let r = random_operations(seed, dims, layout, pages, 150);
        prop_assert!(r.is_ok(), "{layout} {dims:?}: {}", r.unwrap_err());
    }
}
