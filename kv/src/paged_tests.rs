//! Tests of the paged cache's automatic prefix caching (`paged.rs`): hits, salts, eviction order,
//! the bytes a hit reads, and random operations against a model of what every block holds.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use vkv_kernels::cpu::{attention, kv_append, Heads};

use super::*;
use crate::conformance::check_random_operations;
use crate::TEST_DIMS as DIMS;

/// A host cache of `blocks` blocks of `block_size` tokens with prefix caching on.
fn caching(blocks: usize, block_size: usize) -> PagedKv {
    PagedKv::new(DIMS, blocks, block_size)
        .unwrap()
        .with_prefix_caching()
}

/// `seq`'s tokens `0..len` are computed: reserve them and record their full blocks.
fn compute(kv: &mut PagedKv, seq: SeqId, tokens: &[u32]) {
    kv.reserve(seq, tokens.len()).unwrap();
    kv.cache_computed(seq, tokens, None).unwrap();
    kv.audit().unwrap();
}

fn prompt(head: &[u32], tail: std::ops::Range<u32>) -> Vec<u32> {
    head.iter().copied().chain(tail).collect()
}

#[test]
fn a_shared_system_prompt_is_computed_once() {
    let mut kv = caching(16, 16);
    let system: Vec<u32> = (0..48).collect();
    let (a, b) = (prompt(&system, 1000..1010), prompt(&system, 2000..2005));
    assert_eq!(kv.match_prefix(1, &a, None).unwrap(), 0, "an empty cache");
    assert_eq!(kv.reserved(1), None, "a miss holds nothing");
    compute(&mut kv, 1, &a);
    assert_eq!(kv.prefix_stats().cached_units, 3, "the three full blocks");

    assert_eq!(kv.match_prefix(2, &b, None).unwrap(), 48);
    assert_eq!(kv.reserved(2), Some(48));
    let shared = kv.table(1).unwrap().blocks()[..3].to_vec();
    assert_eq!(kv.table(2).unwrap().blocks(), shared);
    for &block in &shared {
        assert_eq!(kv.alloc.ref_count(block), 2);
    }
    compute(&mut kv, 2, &b);
    assert_eq!(kv.usage().bytes_allocated, 5 * 16 * kv.bytes_per_token());

    kv.free(1).unwrap();
    kv.free(2).unwrap();
    kv.audit().unwrap();
    assert_eq!(kv.evictable_blocks(), 3, "the partial blocks were freed");
    assert_eq!(kv.usage().bytes_allocated, 0, "an idle cache holds nothing");
    assert_eq!(kv.free_blocks(), 16);
    for &block in &shared {
        assert!(kv.prefix.as_ref().unwrap().index.is_evictable(block));
    }

    let c = prompt(&system, 3000..3001);
    assert_eq!(
        kv.match_prefix(3, &c, None).unwrap(),
        48,
        "a hit after both left"
    );
    assert_eq!(kv.table(3).unwrap().blocks(), shared);
    assert_eq!((kv.evictable_blocks(), kv.free_blocks()), (0, 13));
    kv.audit().unwrap();
    assert_eq!(kv.match_prefix(4, &c, Some(b"tenant")).unwrap(), 0);
    assert_eq!(kv.reserved(4), None);
    assert!(matches!(
        kv.match_prefix(3, &c, None),
        Err(KvError::AlreadyAllocated { seq: 3 })
    ));
    let stats = kv.prefix_stats();
    assert_eq!(
        (stats.queried_tokens, stats.hit_tokens),
        (58 + 53 + 49 + 49, 48 + 48)
    );
}

#[test]
fn a_prompt_of_whole_blocks_leaves_its_last_block_to_compute() {
    let mut kv = caching(8, 16);
    let tokens: Vec<u32> = (0..48).collect();
    compute(&mut kv, 1, &tokens);
    assert_eq!(kv.prefix_stats().cached_units, 3);
    assert_eq!(kv.match_prefix(2, &tokens, None).unwrap(), 32);
    assert_eq!(
        kv.match_prefix(3, &prompt(&tokens, 7..8), None).unwrap(),
        48
    );
    assert_eq!(kv.match_prefix(4, &tokens[..1], None).unwrap(), 0);
    assert_eq!(kv.match_prefix(5, &[], None).unwrap(), 0);
    kv.audit().unwrap();
}

#[test]
fn eviction_takes_the_tail_blocks_first_and_never_a_held_one() {
    let mut kv = caching(6, 16);
    let tokens: Vec<u32> = (0..64).collect();
    compute(&mut kv, 1, &tokens);
    let blocks = kv.table(1).unwrap().blocks().to_vec();
    kv.free(1).unwrap();
    assert_eq!((kv.evictable_blocks(), kv.alloc.num_free()), (4, 2));
    // Three blocks: the two free ones, then the cached tail.
    kv.reserve(2, 48).unwrap();
    assert!(kv.table(2).unwrap().blocks().contains(&blocks[3]));
    assert_eq!(kv.prefix_stats().evictions, 1);
    kv.audit().unwrap();
    let longer = prompt(&tokens, 100..101);
    assert_eq!(
        kv.match_prefix(3, &longer, None).unwrap(),
        48,
        "the head stays"
    );
    // Nothing free nor evictable: out of memory, and nothing evicted or changed.
    let err = kv.reserve(4, 1).unwrap_err();
    assert!(matches!(err, KvError::OutOfMemory { .. }), "{err}");
    assert_eq!(kv.reserved(4), None);
    kv.free(2).unwrap();
    // Three free blocks are not four: the cache is untouched.
    assert!(kv.reserve(3, 48 + 64).is_err());
    assert_eq!(kv.prefix_stats().cached_units, 3);
    assert_eq!(kv.reserved(3), Some(48));
    kv.audit().unwrap();
    // Holders of the head blocks keep them through any pressure.
    kv.reserve(5, 48).unwrap();
    assert!(kv.reserve(6, 1).is_err());
    assert_eq!(kv.table(3).unwrap().blocks(), &blocks[..3]);
    kv.audit().unwrap();
}

#[test]
fn a_duplicate_block_stays_its_sequences_own() {
    let mut kv = caching(8, 4);
    let tokens: Vec<u32> = (0..9).collect();
    // Two sequences compute the same prompt side by side (neither hit the other).
    compute(&mut kv, 1, &tokens);
    kv.reserve(2, 9).unwrap();
    kv.cache_computed(2, &tokens, None).unwrap();
    kv.audit().unwrap();
    assert_eq!(
        kv.prefix_stats().cached_units,
        2,
        "sequence 2's copies are not cached"
    );
    let own = kv.table(2).unwrap().blocks().to_vec();
    kv.free(2).unwrap();
    assert_eq!(kv.evictable_blocks(), 0);
    assert!(own
        .iter()
        .all(|&b| kv.alloc.ref_count(b) == 0 && !kv.alloc.is_kept(b)));
    // A third sequence extends the chain through sequence 1's entries.
    let longer = prompt(&tokens, 9..13);
    kv.reserve(3, 13).unwrap();
    kv.cache_computed(3, &longer, None).unwrap();
    kv.free(1).unwrap();
    kv.free(3).unwrap();
    assert_eq!(
        kv.match_prefix(4, &prompt(&longer, 0..1), None).unwrap(),
        12
    );
    kv.audit().unwrap();
}

#[test]
fn without_caching_nothing_changes() {
    let mut kv = PagedKv::new(DIMS, 4, 16).unwrap();
    assert!(kv.prefix_cache().is_none() && kv.prefix_cache_mut().is_none());
    assert!(kv.match_prefix(1, &[1; 40], None).is_err());
    assert_eq!(kv.prefix_stats(), PrefixStats::default());
    let mut on = caching(4, 16);
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
    for (blocks, block_size) in [(24, 16), (40, 5)] {
        let mut kv = caching(blocks, block_size);
        let report = check_random_operations(&mut kv, 3, 400, 200).unwrap();
        assert!(report.hit_tokens > 0, "{report:?}");
    }
}

/// Write token `t` of `seq` in every layer: K and V made from the token id `id`.
fn write(kv: &mut PagedKv, seq: SeqId, t: usize, id: u32) {
    let width = DIMS.num_kv_heads * DIMS.head_dim;
    let k: Vec<f32> = (0..width)
        .map(|i| ((i as u32 + 3 * id) as f32 * 0.37).sin())
        .collect();
    let v: Vec<f32> = (0..width)
        .map(|i| ((i as u32 * 7 + id) as f32 * 0.11).cos())
        .collect();
    for layer in 0..DIMS.num_layers {
        let r = kv.layer(seq, layer).unwrap();
        // SAFETY: token `t` is reserved.
        unsafe { kv_append(&r, t, &k, &v, DIMS.num_kv_heads, DIMS.head_dim) };
    }
}

/// Attention of a 4-head query over the first `len` tokens of `seq`'s last layer.
fn attend(kv: &PagedKv, seq: SeqId, len: usize) -> Vec<f32> {
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

/// The bytes of `block` in every pool.
fn block_bytes(kv: &PagedKv, block: BlockId) -> Vec<u8> {
    let s = &kv.storage;
    let n = s.geometry.block_bytes;
    s.geometry
        .block_offsets(DIMS, block)
        .flat_map(|at| {
            // SAFETY: the block lies inside the pools, and nothing writes them meanwhile.
            unsafe { std::slice::from_raw_parts(s.pools.as_mut_ptr().add(at), n) }.to_vec()
        })
        .collect()
}

#[test]
fn a_hit_reads_the_bytes_the_first_sequence_wrote() {
    let mut kv = caching(6, 16);
    let tokens: Vec<u32> = (500..540).collect();
    kv.reserve(1, 40).unwrap();
    for (t, &id) in tokens.iter().enumerate() {
        write(&mut kv, 1, t, id);
    }
    kv.cache_computed(1, &tokens, None).unwrap();
    let before: Vec<Vec<f32>> = (1..=40).map(|n| attend(&kv, 1, n)).collect();
    let head = kv.table(1).unwrap().blocks()[..2].to_vec();
    let bytes: Vec<Vec<u8>> = head.iter().map(|&b| block_bytes(&kv, b)).collect();
    kv.free(1).unwrap();
    // Another sequence takes every free block and writes them all.
    kv.reserve(9, 64).unwrap();
    for t in 0..64 {
        write(&mut kv, 9, t, 7 + t as u32);
    }
    assert!(kv
        .table(9)
        .unwrap()
        .blocks()
        .iter()
        .all(|b| !head.contains(b)));
    kv.free(9).unwrap();

    assert_eq!(kv.match_prefix(2, &tokens, None).unwrap(), 32);
    assert_eq!(kv.table(2).unwrap().blocks(), head);
    for (&b, bytes) in head.iter().zip(&bytes) {
        assert_eq!(&block_bytes(&kv, b), bytes, "block {b}");
    }
    for n in [1, 16, 17, 32] {
        assert_eq!(attend(&kv, 2, n), before[n - 1], "{n} tokens");
    }
    // It computes the rest itself, in a block of its own.
    kv.reserve(2, 40).unwrap();
    for (t, &id) in tokens.iter().enumerate().skip(32) {
        write(&mut kv, 2, t, id);
    }
    assert_eq!(attend(&kv, 2, 40), before[39]);
    kv.audit().unwrap();
}

/// A sequence of the random-operations model: its tokens (prompt, then generated) and how many
/// of them are computed (written and reserved).
#[derive(Debug, Clone)]
struct Seq {
    tokens: Vec<u32>,
    computed: usize,
    salt: Option<&'static [u8]>,
}

/// The model beside the cache: the sequences, and what every block was last written with.
struct Model {
    seqs: BTreeMap<SeqId, Seq>,
    written: HashMap<BlockId, Vec<Option<u32>>>,
    next: SeqId,
    hits: usize,
}

impl Model {
    /// Record that `seq` computed its tokens up to `to` (reserved already), and tell the cache.
    fn compute(&mut self, kv: &mut PagedKv, seq: SeqId, to: usize) -> Result<(), String> {
        let bs = kv.block_size();
        let s = self.seqs.get_mut(&seq).expect("a model sequence");
        let blocks = kv.table(seq).expect("held").blocks();
        for t in s.computed..to {
            let block = blocks[t / bs];
            if kv.alloc.ref_count(block) != 1 {
                return Err(format!(
                    "sequence {seq} writes block {block}, which it shares"
                ));
            }
            self.written.entry(block).or_insert_with(|| vec![None; bs])[t % bs] = Some(s.tokens[t]);
        }
        s.computed = s.computed.max(to);
        kv.cache_computed(seq, &s.tokens[..s.computed], s.salt)
            .map_err(|e| e.to_string())
    }

    /// Free `seq` in both.
    fn free(&mut self, kv: &mut PagedKv, seq: SeqId) {
        kv.free(seq).unwrap();
        self.seqs.remove(&seq);
    }

    /// Memory ran out: the newest sequence gives its memory back (preemption by recompute).
    fn preempt(&mut self, kv: &mut PagedKv) {
        if let Some((&newest, _)) = self.seqs.iter().next_back() {
            self.free(kv, newest);
        }
    }

    /// The blocks `seq` starts with after a hit of `covered` tokens hold exactly them.
    fn check_hit(
        &self,
        kv: &PagedKv,
        seq: SeqId,
        tokens: &[u32],
        covered: usize,
    ) -> Result<(), String> {
        let bs = kv.block_size();
        if !covered.is_multiple_of(bs) || (covered > 0 && covered >= tokens.len()) {
            return Err(format!(
                "{covered} tokens of {} matched in blocks of {bs}",
                tokens.len()
            ));
        }
        for (j, &block) in kv
            .table(seq)
            .map_or(&[][..], |t| t.blocks())
            .iter()
            .enumerate()
        {
            let expected: Vec<Option<u32>> = tokens[j * bs..(j + 1) * bs]
                .iter()
                .map(|&t| Some(t))
                .collect();
            if self.written.get(&block) != Some(&expected) {
                return Err(format!(
                    "block {j} of a hit ({block}) holds {:?}, the prompt has {expected:?}",
                    self.written.get(&block)
                ));
            }
        }
        Ok(())
    }
}

/// Random admissions (prompts from a few shared prefixes plus random suffixes, some salted),
/// hits, chunked prefill, decode steps, forks, aborts and preemptions on a small cache, checked
/// against the model after every operation; at the end everything is freed and evicted.
fn random_operations(
    seed: u64,
    num_blocks: usize,
    bs: usize,
    steps: usize,
) -> Result<PrefixStats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kv = caching(num_blocks, bs);
    let prefixes: Vec<Vec<u32>> = (0..3u32)
        .map(|p| {
            (0..rng.random_range(0..4 * bs as u32))
                .map(|t| 1000 * (p + 1) + t)
                .collect()
        })
        .collect();
    let mut m = Model {
        seqs: BTreeMap::new(),
        written: HashMap::new(),
        next: 0,
        hits: 0,
    };
    for step in 0..steps {
        let fail = |what: String| format!("step {step}: {what}");
        match rng.random_range(0..10u32) {
            // Admit: a hit, then the first prefill chunk.
            0..=2 => {
                let mut tokens = prefixes[rng.random_range(0..3)].clone();
                let suffix = rng.random_range(1..2 * bs);
                tokens.extend((0..suffix).map(|_| rng.random_range(0..3u32)));
                let salt: Option<&'static [u8]> = rng.random_bool(0.2).then_some(b"tenant");
                m.next += 1;
                let seq = m.next;
                let covered = kv
                    .match_prefix(seq, &tokens, salt)
                    .map_err(|e| fail(e.to_string()))?;
                m.check_hit(&kv, seq, &tokens, covered).map_err(fail)?;
                m.hits += usize::from(covered > 0);
                m.seqs.insert(
                    seq,
                    Seq {
                        tokens,
                        computed: covered,
                        salt,
                    },
                );
                let chunk = (covered + rng.random_range(1..3 * bs)).min(m.seqs[&seq].tokens.len());
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
            }
            // Grow: the next prefill chunk, or a decode step.
            3..=5 if !m.seqs.is_empty() => {
                let seq = *m
                    .seqs
                    .keys()
                    .nth(rng.random_range(0..m.seqs.len()))
                    .unwrap();
                let s = m.seqs.get_mut(&seq).unwrap();
                if s.computed == s.tokens.len() {
                    s.tokens.push(rng.random_range(0..3u32));
                }
                let to = (s.computed + rng.random_range(1..2 * bs)).min(s.tokens.len());
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
                        if !n.is_multiple_of(bs) {
                            let from = kv.table(src).unwrap().blocks()[n / bs];
                            let to = kv.table(dst).unwrap().blocks()[n / bs];
                            let copied = m.written.get(&from).cloned().unwrap_or_default();
                            m.written.insert(to, copied);
                        }
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
        }
    }
    let stats = kv.prefix_stats();
    for seq in m.seqs.keys().copied().collect::<Vec<_>>() {
        m.free(&mut kv, seq);
    }
    kv.audit().map_err(|e| e.to_string())?;
    let (free, kept) = (kv.alloc.num_free(), kv.alloc.num_kept());
    if free + kept != num_blocks || kv.usage() != KvUsage::default() {
        return Err(format!(
            "all freed: {free} free, {kept} evictable of {num_blocks}, {:?}",
            kv.usage()
        ));
    }
    kv.make_free(num_blocks).map_err(|e| e.to_string())?;
    kv.audit().map_err(|e| e.to_string())?;
    let index = &kv.prefix.as_ref().unwrap().index;
    if kv.alloc.num_free() != num_blocks || !index.is_empty() {
        return Err(format!(
            "all evicted: {} free, {} cached",
            kv.alloc.num_free(),
            index.len()
        ));
    }
    Ok(PrefixStats {
        evictions: kv.prefix_stats().evictions,
        ..stats
    })
}

#[test]
fn random_operations_hit_evict_and_keep_the_books() {
    let stats = random_operations(11, 24, 4, 2000).unwrap();
    assert!(
        stats.hit_tokens > 200 && stats.evictions > 50,
        "the run exercised too little: {stats:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_operations_on_small_caches(seed in any::<u64>(), blocks in 2..40usize, bs in prop::sample::select(vec![1usize, 2, 4, 16])) {
        let r = random_operations(seed, blocks, bs, 300);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}
