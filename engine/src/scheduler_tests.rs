//! The scheduler over real KV caches, with a stand-in for the model: the token sampled after
//! position `p` of sequence `s` is a fixed function of `(s, p)`, so a sequence's output does not
//! depend on how it was batched, chunked or preempted — and must come out the same.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use vkv_kernels::cpu::KvDtype;
use vkv_vmm::KvLayout;

use super::*;
use crate::kv::{KvDims, PagedKv, PrefixCache, VmmKv, VmmShape};

const DIMS: KvDims = KvDims {
    num_layers: 1,
    num_kv_heads: 1,
    head_dim: 8,
};

fn token_after(seq: SeqId, pos: usize) -> u32 {
    ((seq as usize * 7919 + pos * 104729) % 50_000) as u32
}

fn req(id: SeqId, prompt: usize, max_tokens: usize) -> SeqRequest {
    SeqRequest {
        id,
        prompt: (0..prompt as u32).map(|t| t + id as u32).collect(),
        max_tokens,
        cache_salt: None,
        fork_of: None,
        beam_width: None,
        whole_prompt: false,
        handed_over: None,
    }
}

/// Run one step: schedule, "compute", update. Returns the step.
fn step(s: &mut Scheduler, kv: &mut dyn KvManager) -> (Step, Vec<SeqId>) {
    let step = s.schedule(kv).unwrap();
    let sampled: Vec<(SeqId, u32)> = step
        .chunks
        .iter()
        .filter(|c| c.samples)
        .map(|c| (c.seq, token_after(c.seq, c.start + c.tokens.len() - 1)))
        .collect();
    let done = s.update(&step, &sampled, kv).unwrap();
    (step, done)
}

fn expected_output(id: SeqId, prompt: usize, max_tokens: usize) -> Vec<u32> {
    (0..max_tokens)
        .map(|i| token_after(id, prompt + i - 1))
        .collect()
}

#[test]
fn decodes_go_first_and_prefills_are_chunked_to_the_budget() {
    let mut kv = PagedKv::new(DIMS, 64, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 8,
    });
    s.add(req(1, 5, 3), &kv).unwrap();
    s.add(req(2, 12, 3), &kv).unwrap();
    let (a, _) = step(&mut s, &mut kv);
    let shape = |st: &Step| {
        st.chunks
            .iter()
            .map(|c| (c.seq, c.start, c.tokens.len(), c.samples))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&a), vec![(1, 0, 5, true), (2, 0, 3, false)]);
    let (b, _) = step(&mut s, &mut kv);
    assert_eq!(
        shape(&b),
        vec![(1, 5, 1, true), (2, 3, 7, false)],
        "the decode first, then 7 of 9 prefill tokens"
    );
    let (c, done) = step(&mut s, &mut kv);
    assert_eq!(shape(&c), vec![(1, 6, 1, true), (2, 10, 2, true)]);
    assert_eq!(
        done,
        vec![1],
        "request 1 has its 3 tokens: one from each step"
    );
    assert_eq!(kv.reserved(1), None);
    assert_eq!(s.generated(2).unwrap(), &[token_after(2, 11)]);
}

#[test]
fn running_out_of_kv_preempts_the_newest_and_outputs_stay_the_same() {
    // 6 blocks of 4 tokens = 24 tokens for two requests of 8 + 8: someone must be preempted.
    let mut kv = PagedKv::new(DIMS, 6, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
    });
    s.add(req(1, 8, 8), &kv).unwrap();
    s.add(req(2, 8, 8), &kv).unwrap();
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    for _ in 0..100 {
        if s.is_idle() {
            break;
        }
        for id in [1, 2] {
            if let Some(g) = s.generated(id) {
                outputs.insert(id, g.to_vec());
            }
        }
        step(&mut s, &mut kv);
    }
    assert!(s.is_idle());
    assert!(s.preemptions() > 0);
    for id in [1, 2] {
        assert_eq!(outputs[&id].len(), 7, "seen one step before the last token");
        assert_eq!(outputs[&id], expected_output(id, 8, 8)[..7]);
    }
    assert_eq!(kv.usage().bytes_allocated, 0, "no block left behind");
}

#[test]
fn handed_over_sequences_decode_at_admission_and_recompute_when_preempted() {
    // As above: 24 tokens of KV for two sequences of 8 + 8, so one is preempted. Sequence 2 is a
    // disaggregated decode half: its prompt's KV and first token come from elsewhere.
    let mut kv = PagedKv::new(DIMS, 6, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
    });
    s.add(req(1, 8, 8), &kv).unwrap();
    let handed = SeqRequest {
        handed_over: Some(token_after(2, 7)),
        ..req(2, 8, 8)
    };
    s.add(handed, &kv).unwrap();
    let (first, _) = step(&mut s, &mut kv);
    let shape: Vec<_> = first
        .chunks
        .iter()
        .map(|c| (c.seq, c.start, c.tokens.clone(), c.samples))
        .collect();
    assert_eq!(shape[1], (2, 8, vec![token_after(2, 7)], true), "{shape:?}");
    assert_eq!(first.imported, vec![2]);
    assert_eq!(
        kv.reserved(2),
        Some(9),
        "the prompt and the handed-over token"
    );
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut imported = 1;
    for _ in 0..100 {
        if s.is_idle() {
            break;
        }
        for id in [1, 2] {
            if let Some(g) = s.generated(id) {
                outputs.insert(id, g.to_vec());
            }
        }
        let (st, _) = step(&mut s, &mut kv);
        imported += st.imported.len();
        // Recomputed after a preemption: from position 0, the handed-over token included.
        if let Some(c) = st.chunks.iter().find(|c| c.seq == 2 && c.start == 0) {
            assert_eq!(c.tokens[8], token_after(2, 7));
        }
    }
    assert!(s.is_idle());
    assert!(s.preemptions() > 0);
    assert_eq!(
        imported, 1,
        "the KV comes in once; a preempted sequence recomputes"
    );
    for id in [1, 2] {
        assert_eq!(
            outputs[&id],
            expected_output(id, 8, 8)[..7],
            "sequence {id}"
        );
    }
    assert_eq!(kv.usage().bytes_allocated, 0, "no block left behind");
}

#[test]
fn bad_requests_are_refused() {
    let kv = PagedKv::new(DIMS, 4, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
    });
    assert!(matches!(
        s.add(req(1, 0, 3), &kv),
        Err(SchedulerError::Empty { id: 1 })
    ));
    assert!(matches!(
        s.add(req(1, 10, 7), &kv),
        Err(SchedulerError::TooLong {
            needed: 17,
            capacity: 16,
            ..
        })
    ));
    s.add(req(1, 10, 6), &kv).unwrap();
    assert!(matches!(
        s.add(req(1, 2, 2), &kv),
        Err(SchedulerError::Duplicate(1))
    ));
}

#[test]
fn aborting_frees_the_memory_at_once() {
    let mut kv = PagedKv::new(DIMS, 64, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 6,
    });
    s.add(req(1, 20, 5), &kv).unwrap(); // mid-prefill after one step
    s.add(req(2, 3, 5), &kv).unwrap();
    step(&mut s, &mut kv);
    assert!(kv.usage().bytes_allocated > 0);
    assert!(s.finish(1, &mut kv).unwrap());
    assert_eq!(kv.reserved(1), None);
    step(&mut s, &mut kv);
    step(&mut s, &mut kv);
    assert!(s.finish(2, &mut kv).unwrap(), "mid-decode");
    assert!(!s.finish(2, &mut kv).unwrap());
    assert!(s.is_idle());
    assert_eq!(kv.usage().bytes_allocated, 0);
}

#[derive(Debug, Clone)]
struct Arrival {
    at: usize,
    prompt: usize,
    max_tokens: usize,
    abort_at: Option<usize>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        0..30usize,
        1..40usize,
        1..25usize,
        proptest::option::weighted(0.15, 0..60usize),
    )
        .prop_map(|(at, prompt, max_tokens, abort_at)| Arrival {
            at,
            prompt,
            max_tokens,
            abort_at,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn budgets_hold_nothing_starves_and_everything_drains(
        arrivals in proptest::collection::vec(arrival(), 1..24),
        max_num_seqs in 1..6usize,
        max_num_batched_tokens in 1..48usize,
        blocks in 6..40usize,
        vmm in any::<bool>(),
    ) {
        let mut kv: Box<dyn KvManager> = if vmm {
            // 64 B per token: a 4 KiB page holds 64 tokens of a token-major slot.
            Box::new(VmmKv::with_dtype(DIMS, KvDtype::F32, VmmShape::new(KvLayout::TokenMajor, 8, 256, 4096, blocks / 4 + 1)).unwrap())
        } else {
            Box::new(PagedKv::new(DIMS, blocks, 4).unwrap())
        };
        let config = SchedulerConfig { max_num_seqs, max_num_batched_tokens };
        let mut s = Scheduler::new(config);
        let mut accepted: HashMap<SeqId, (usize, usize)> = HashMap::new();
        let mut aborted: HashSet<SeqId> = HashSet::new();
        let mut finished: HashMap<SeqId, Vec<u32>> = HashMap::new();
        let mut last_seen: HashMap<SeqId, Vec<u32>> = HashMap::new();
        let total: usize = arrivals.iter().map(|a| a.prompt + a.max_tokens).sum();
        let limit = 40 + 4 * total * (1 + total / max_num_batched_tokens);
        let mut t = 0;
        loop {
            for (i, a) in arrivals.iter().enumerate() {
                let id = i as SeqId;
                if a.at == t && s.add(req(id, a.prompt, a.max_tokens), kv.as_ref()).is_ok() {
                    accepted.insert(id, (a.prompt, a.max_tokens));
                }
                if a.abort_at == Some(t) && accepted.contains_key(&id) && !finished.contains_key(&id) && s.finish(id, kv.as_mut()).unwrap() {
                    aborted.insert(id);
                    prop_assert_eq!(kv.reserved(id), None, "aborted sequence still holds KV");
                }
            }
            for &id in accepted.keys() {
                if let Some(g) = s.generated(id) {
                    last_seen.insert(id, g.to_vec());
                }
            }
            if s.is_idle() && t > 30 {
                break;
            }
            prop_assert!(t < limit, "did not drain in {} steps: {} running, {} waiting", limit, s.num_running(), s.num_waiting());
            let planned = s.schedule(kv.as_mut()).unwrap();
            let tokens: usize = planned.chunks.iter().map(|c| c.tokens.len()).sum();
            prop_assert!(tokens <= max_num_batched_tokens);
            prop_assert!(s.num_running() <= max_num_seqs);
            let ids: HashSet<SeqId> = planned.chunks.iter().map(|c| c.seq).collect();
            prop_assert_eq!(ids.len(), planned.chunks.len(), "a sequence twice in one step");
            for c in &planned.chunks {
                prop_assert!(!c.tokens.is_empty());
                prop_assert!(kv.reserved(c.seq).unwrap_or(0) >= c.start + c.tokens.len(), "chunk not backed");
            }
            let sampled: Vec<(SeqId, u32)> = planned.chunks.iter().filter(|c| c.samples)
                .map(|c| (c.seq, token_after(c.seq, c.start + c.tokens.len() - 1))).collect();
            for id in s.update(&planned, &sampled, kv.as_mut()).unwrap() {
                let (prompt, max_tokens) = accepted[&id];
                finished.insert(id, expected_output(id, prompt, max_tokens));
                prop_assert_eq!(kv.reserved(id), None);
            }
            t += 1;
        }
        for (&id, &(prompt, max_tokens)) in &accepted {
            if aborted.contains(&id) {
                continue;
            }
            prop_assert!(finished.contains_key(&id), "request {} never finished", id);
            // What it generated before its last step is a prefix of the only right answer.
            if let Some(seen) = last_seen.get(&id) {
                prop_assert_eq!(&seen[..], &expected_output(id, prompt, max_tokens)[..seen.len()]);
            }
        }
        prop_assert_eq!(kv.usage().bytes_allocated, 0, "KV left allocated after draining");
    }
}

/// A prompt of `len` tokens that starts with the first `shared` tokens of prefix `prefix` (the
/// same for every request naming it) and goes on with tokens of the request's own.
fn shared_prompt(id: SeqId, prefix: usize, shared: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|p| {
            if p < shared {
                (prefix * 1000 + p) as u32
            } else {
                (100_000 + id as usize * 1000 + p) as u32
            }
        })
        .collect()
}

/// What the K and V at position `p` of a sequence stand for: every token up to and including it.
fn kv_key(tokens: &[u32], p: usize) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    tokens[..=p].hash(&mut h);
    h.finish()
}

/// A request of 2 tokens after a 22-token prompt whose first 18 are prefix 0's.
fn shared_18_of_22(id: SeqId) -> SeqRequest {
    SeqRequest {
        prompt: shared_prompt(id, 0, 18, 22),
        ..req(id, 0, 2)
    }
}

#[test]
fn a_cached_prefix_is_not_computed_again_and_counts_as_cached() {
    let mut kv = PagedKv::new(DIMS, 64, 4).unwrap().with_prefix_caching();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
    });
    let add = |s: &mut Scheduler, kv: &PagedKv, id: SeqId, salt: Option<&str>| {
        let mut request = shared_18_of_22(id);
        request.cache_salt = salt.map(str::to_string);
        s.add(request, kv).unwrap();
    };
    add(&mut s, &kv, 1, None);
    let (first, _) = step(&mut s, &mut kv);
    assert_eq!(first.cached, vec![]);
    while !s.is_idle() {
        step(&mut s, &mut kv);
    }
    // 18 shared tokens are 4 full blocks of 4 (16 tokens).
    add(&mut s, &kv, 2, None);
    let (second, _) = step(&mut s, &mut kv);
    assert_eq!(second.cached, vec![(2, 16)]);
    assert_eq!(
        (second.chunks[0].start, second.chunks[0].tokens.len()),
        (16, 6)
    );
    // Another salt shares nothing.
    add(&mut s, &kv, 3, Some("tenant b"));
    let (third, _) = step(&mut s, &mut kv);
    assert!(third.cached.is_empty() && third.chunks.iter().any(|c| c.seq == 3 && c.start == 0));
    while !s.is_idle() {
        step(&mut s, &mut kv);
    }
    kv.audit().unwrap();
    assert_eq!(kv.usage().bytes_allocated, 0);
    let stats = kv.prefix_stats();
    assert_eq!((stats.queried_tokens, stats.hit_tokens), (66, 16));
}

#[test]
fn likely_admissions_guess_the_hits_and_count_only_the_tokens_left_to_compute() {
    let mut kv = PagedKv::new(DIMS, 64, 4).unwrap().with_prefix_caching();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 12,
    });
    let add = |s: &mut Scheduler, kv: &PagedKv, id: SeqId| {
        s.add(shared_18_of_22(id), kv).unwrap();
    };
    add(&mut s, &kv, 1);
    // Nothing cached yet: the budget of 12 covers the first chunk of one prompt.
    assert_eq!(
        s.likely_admissions(&kv),
        vec![LikelyAdmission {
            seq: 1,
            hit: 0,
            len: 12
        }]
    );
    while !s.is_idle() {
        step(&mut s, &mut kv);
    }
    for id in 2..=4 {
        add(&mut s, &kv, id);
    }
    // 16 of each prompt's 22 tokens are cached: 6 left each, so two fit in the budget.
    let queried = kv.prefix_stats().queried_tokens;
    let likely = s.likely_admissions(&kv);
    assert_eq!(
        likely,
        vec![
            LikelyAdmission {
                seq: 2,
                hit: 16,
                len: 22
            },
            LikelyAdmission {
                seq: 3,
                hit: 16,
                len: 22
            }
        ]
    );
    assert_eq!(
        kv.prefix_stats().queried_tokens,
        queried,
        "guessing counts nothing"
    );
    // The step admits what was guessed.
    let (next, _) = step(&mut s, &mut kv);
    assert_eq!(next.cached, vec![(2, 16), (3, 16)]);
    while !s.is_idle() {
        step(&mut s, &mut kv);
    }
    kv.audit().unwrap();
}

#[derive(Debug, Clone)]
struct SharedArrival {
    at: usize,
    prefix: usize,
    shared: usize,
    prompt: usize,
    max_tokens: usize,
    abort_at: Option<usize>,
    /// Parallel sampling: another sample of the request this many arrivals before (same
    /// prompt, same arrival step), forked from it.
    sample_of: Option<usize>,
}

fn shared_arrival() -> impl Strategy<Value = SharedArrival> {
    (
        0..30usize,
        0..3usize,
        0..40usize,
        1..40usize,
        1..25usize,
        proptest::option::weighted(0.15, 0..60usize),
        proptest::option::weighted(0.3, 1..4usize),
    )
        .prop_map(
            |(at, prefix, shared, prompt, max_tokens, abort_at, sample_of)| SharedArrival {
                at,
                prefix,
                shared,
                prompt: prompt.max(shared),
                max_tokens,
                abort_at,
                sample_of,
            },
        )
}

/// The caches the prefix-caching proptest drives: paged (4-token blocks) and vmm in both layouts
/// over 4 KiB host pages, with f32 KV of [`WIDE`] (1 KiB a token per K or V: per-layer pages hold
/// 4 tokens, token-major pages 2, so both cache units of a few tokens).
fn prefix_cache_of(kind: usize, units: usize) -> (Box<dyn crate::kv::KvCache>, &'static str) {
    match kind {
        0 => (
            Box::new(
                PagedKv::with_dtype(WIDE, KvDtype::F32, units, 4)
                    .unwrap()
                    .with_prefix_caching(),
            ),
            "paged",
        ),
        // Forks without prefix caching.
        3 => (
            Box::new(PagedKv::with_dtype(WIDE, KvDtype::F32, units, 4).unwrap()),
            "paged, no caching",
        ),
        4 => {
            let shape = VmmShape::new(KvLayout::PerLayer, 8, 256, 4096, 2 * units);
            (
                Box::new(VmmKv::with_dtype(WIDE, KvDtype::F32, shape).unwrap()),
                "vmm per-layer, no caching",
            )
        }
        k => {
            let layout = if k == 1 {
                KvLayout::PerLayer
            } else {
                KvLayout::TokenMajor
            };
            let shape = VmmShape::new(layout, 8, 256, 4096, 2 * units);
            (
                Box::new(
                    VmmKv::with_dtype(WIDE, KvDtype::F32, shape)
                        .unwrap()
                        .with_prefix_caching(),
                ),
                if k == 1 {
                    "vmm per-layer"
                } else {
                    "vmm token-major"
                },
            )
        }
    }
}

const WIDE: KvDims = KvDims {
    num_layers: 1,
    num_kv_heads: 4,
    head_dim: 64,
};

/// Token `p`'s K, head 0, elements 0 and 1 in `kv` (f32): what [`write_key`] put there.
fn read_key(kv: &dyn crate::kv::KvCache, seq: SeqId, p: usize) -> (f32, f32) {
    let r = kv.layer(seq, 0).unwrap();
    let (k, _, _) = r.bases();
    // SAFETY: position `p` is reserved for `seq` (the caller reads only below its chunk's start,
    // which is below what the scheduler reserved) and the cache holds f32 elements.
    unsafe {
        let at = k.cast::<f32>().add(r.offset(p));
        (at.read(), at.add(1).read())
    }
}

/// Write token `p`'s K and V in `kv`: head 0's first two elements hold 48 bits of `key`.
fn write_key(kv: &dyn crate::kv::KvCache, seq: SeqId, p: usize, key: u64) {
    let width = WIDE.num_kv_heads * WIDE.head_dim;
    let mut k = vec![0f32; width];
    k[0] = (key & 0xff_ffff) as f32;
    k[1] = ((key >> 24) & 0xff_ffff) as f32;
    let r = kv.layer(seq, 0).unwrap();
    // SAFETY: position `p` is reserved for `seq`.
    unsafe { vkv_kernels::cpu::kv_append(&r, p, &k, &k, WIDE.num_kv_heads, WIDE.head_dim) };
}

fn as_key(key: u64) -> (f32, f32) {
    ((key & 0xff_ffff) as f32, ((key >> 24) & 0xff_ffff) as f32)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Prefix caching under random arrivals sharing prefixes, aborts, preemptions (a small
    /// cache) and evictions, in paged and both vmm layouts, with real KV bytes: every step
    /// writes into each chunk's positions a key standing for all the tokens up to them, and
    /// every position a chunk reads (those before it) must hold the key of exactly its own
    /// tokens — so a cached block or page handed to the wrong prefix, or written over while
    /// shared, is caught. Some requests are further samples of an earlier one (parallel
    /// sampling: same prompt, forked from it), also with caching off (kinds 3 and 4). Outputs
    /// are right, the cache audits clean after every step, and once all end nothing is
    /// referenced.
    #[test]
    fn prefix_caching_and_forks_read_only_right_kv_and_drain(
        arrivals in proptest::collection::vec(shared_arrival(), 1..20),
        max_num_seqs in 1..6usize,
        max_num_batched_tokens in 1..48usize,
        units in 12..48usize,
        kind in 0..5usize,
    ) {
        let (mut kv, name) = prefix_cache_of(kind, units);
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs, max_num_batched_tokens });
        let mut all_tokens: HashMap<SeqId, Vec<u32>> = HashMap::new();
        let mut accepted: HashSet<SeqId> = HashSet::new();
        let mut done: HashSet<SeqId> = HashSet::new();
        let mut hits = 0;
        let total: usize = arrivals.iter().map(|a| a.prompt + a.max_tokens).sum();
        let limit = 40 + 4 * total * (1 + total / max_num_batched_tokens);
        let mut t = 0;
        loop {
            for (i, a) in arrivals.iter().enumerate() {
                let id = i as SeqId;
                // A sample arrives with its source, with the source's prompt.
                let source = a.sample_of.filter(|&k| k <= i).map(|k| i - k);
                let (at, prompt_id, a_prompt) = match source {
                    Some(j) => (arrivals[j].at, j as SeqId, &arrivals[j]),
                    None => (a.at, id, a),
                };
                if at == t {
                    let prompt = shared_prompt(prompt_id, a_prompt.prefix, a_prompt.shared, a_prompt.prompt);
                    let mut tokens = prompt.clone();
                    tokens.extend(expected_output(id, a_prompt.prompt, a.max_tokens));
                    let fork_of = source.map(|j| j as SeqId);
                    let request = SeqRequest { id, prompt, max_tokens: a.max_tokens, cache_salt: None, fork_of, beam_width: None, whole_prompt: false, handed_over: None };
                    if s.add(request, kv.manager()).is_ok() {
                        accepted.insert(id);
                        all_tokens.insert(id, tokens);
                    }
                }
                if a.abort_at == Some(t) && accepted.contains(&id) && !done.contains(&id) && s.finish(id, kv.manager_mut()).unwrap() {
                    done.insert(id);
                }
            }
            if s.is_idle() && t > 30 {
                break;
            }
            prop_assert!(t < limit, "{}: did not drain in {} steps", name, limit);
            let planned = s.schedule(kv.manager_mut()).unwrap();
            prop_assert!(planned.failed.is_empty(), "{}: {:?}", name, planned.failed);
            prop_assert!(planned.chunks.iter().map(|c| c.tokens.len()).sum::<usize>() <= max_num_batched_tokens);
            prop_assert!(s.num_running() <= max_num_seqs);
            for &(id, cached) in &planned.cached {
                hits += cached;
                let c = planned.chunks.iter().find(|c| c.seq == id).expect("an admission has a chunk");
                prop_assert_eq!(c.start, cached, "{}", name);
            }
            for c in &planned.chunks {
                let tokens = &all_tokens[&c.seq];
                for p in 0..c.start {
                    prop_assert_eq!(read_key(kv.as_ref(), c.seq, p), as_key(kv_key(tokens, p)),
                        "{}: sequence {} reads wrong K/V at {}", name, c.seq, p);
                }
                for p in c.start..c.start + c.tokens.len() {
                    prop_assert_eq!(c.tokens[p - c.start], tokens[p]);
                    write_key(kv.as_ref(), c.seq, p, kv_key(tokens, p));
                }
            }
            let sampled: Vec<(SeqId, u32)> = planned.chunks.iter().filter(|c| c.samples)
                .map(|c| (c.seq, token_after(c.seq, c.start + c.tokens.len() - 1))).collect();
            for id in s.update(&planned, &sampled, kv.manager_mut()).unwrap() {
                done.insert(id);
            }
            kv.audit().map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            t += 1;
        }
        for id in &accepted {
            prop_assert!(done.contains(id), "{}: request {} never finished", name, id);
        }
        kv.audit().map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        prop_assert_eq!(kv.usage().bytes_allocated, 0, "{}: KV left referenced after draining", name);
        if let Some(cache) = kv.prefix_cache() {
            prop_assert_eq!(cache.prefix_stats().hit_tokens as usize, hits, "{}", name);
        }
    }
}

/// `n` samples of one 22-token prompt in 4-token blocks: the first computes the prompt; the
/// others, forked as soon as it has, share its 5 whole blocks and compute only the last prompt
/// token each (in a copy of the partial block), sample outputs of their own, and leave nothing.
#[test]
fn samples_fork_the_prompt_kv_once_computed_and_compute_one_token_each() {
    let mut kv = PagedKv::new(DIMS, 64, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
    });
    for id in 0..4 {
        let mut r = req(0, 22, 3);
        r.id = id;
        r.fork_of = (id > 0).then_some(0);
        s.add(r, &kv).unwrap();
    }
    // Step 1: only the source is admitted (its samples wait for its prompt KV).
    let (first, _) = step(&mut s, &mut kv);
    assert_eq!(first.chunks.len(), 1);
    assert_eq!((first.chunks[0].seq, first.chunks[0].tokens.len()), (0, 22));
    // After it, the samples are running, holding the first 21 tokens: 5 blocks shared, the
    // sixth (tokens 20 and 21) copied for each.
    assert_eq!(s.num_running(), 4);
    for id in 1..4 {
        assert_eq!(kv.reserved(id), Some(21));
    }
    kv.audit().unwrap();
    let blocks = kv.usage().bytes_allocated / (4 * kv.bytes_per_token());
    assert_eq!(
        blocks,
        6 + 3,
        "the source's 6 blocks and one copy per sample"
    );
    // Step 2: the source decodes, each sample computes the last prompt token and samples.
    let (second, _) = step(&mut s, &mut kv);
    let mut spans: Vec<(SeqId, usize, usize)> = second
        .chunks
        .iter()
        .map(|c| (c.seq, c.start, c.tokens.len()))
        .collect();
    spans.sort();
    assert_eq!(spans, vec![(0, 22, 1), (1, 21, 1), (2, 21, 1), (3, 21, 1)]);
    assert!(second.chunks.iter().all(|c| c.samples));
    let mut outputs = HashMap::new();
    while !s.is_idle() {
        for id in 0..4 {
            if let Some(g) = s.generated(id) {
                outputs.insert(id, g.to_vec());
            }
        }
        step(&mut s, &mut kv);
    }
    for id in 1..4 {
        assert_eq!(outputs[&id][..2], expected_output(id, 22, 3)[..2]);
    }
    kv.audit().unwrap();
    assert_eq!(kv.usage().bytes_allocated, 0);
}

/// A sample whose source finishes at its first token (max_tokens 1) still shares: the fork is
/// taken in the update that computed the prompt, before the source is freed. A sample whose
/// source is gone, or whose prompt differs, is computed as any request.
#[test]
fn a_sample_forks_before_its_source_finishes_and_runs_alone_without_one() {
    let mut kv = PagedKv::new(DIMS, 64, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
    });
    s.add(req(0, 10, 1), &kv).unwrap();
    let mut sample = req(0, 10, 2);
    sample.id = 1;
    sample.fork_of = Some(0);
    s.add(sample, &kv).unwrap();
    let (_, done) = step(&mut s, &mut kv);
    assert_eq!(done, vec![0]);
    assert_eq!(kv.reserved(1), Some(9));
    let (second, _) = step(&mut s, &mut kv);
    assert_eq!(
        (second.chunks[0].start, second.chunks[0].tokens.len()),
        (9, 1)
    );
    while !s.is_idle() {
        step(&mut s, &mut kv);
    }
    // No source: id 7 names one never added; id 8 names 9, whose prompt differs.
    let mut orphan = req(7, 6, 1);
    orphan.fork_of = Some(3);
    s.add(orphan, &kv).unwrap();
    s.add(req(9, 6, 4), &kv).unwrap();
    let mut other = req(8, 6, 1);
    other.fork_of = Some(9);
    s.add(other, &kv).unwrap();
    let (third, _) = step(&mut s, &mut kv);
    let mut starts: Vec<(SeqId, usize)> = third.chunks.iter().map(|c| (c.seq, c.start)).collect();
    starts.sort();
    assert_eq!(starts, vec![(7, 0), (8, 0), (9, 0)]);
    while !s.is_idle() {
        step(&mut s, &mut kv);
    }
    kv.audit().unwrap();
    assert_eq!(kv.usage().bytes_allocated, 0);
}

/// Beam search's operations: a sequence that sampled without a token is held (holds its KV,
/// is not scheduled); `fork_running` starts a copy sharing its KV plus a token of its own,
/// `append` gives it its token; both then decode from where the KV ends. When only held
/// sequences run and the queue's head does not fit, the newest held one is preempted to the
/// back of the queue so that the head goes in.
#[test]
fn held_sequences_fork_and_append_and_never_block_the_queue() {
    let mut kv = PagedKv::new(DIMS, 16, 4).unwrap();
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
    });
    let mut beam = req(0, 10, 5);
    beam.beam_width = Some(7);
    s.add(beam, &kv).unwrap();
    // The group takes 7 of the 8 places: of the next two requests one goes in.
    s.add(req(3, 4, 1), &kv).unwrap();
    s.add(req(4, 4, 1), &kv).unwrap();
    let first = s.schedule(&mut kv).unwrap();
    assert_eq!(first.chunks.len(), 2);
    s.finish(3, &mut kv).unwrap();
    s.finish(4, &mut kv).unwrap();
    assert_eq!(s.update(&first, &[], &mut kv).unwrap(), Vec::<SeqId>::new());
    // Held: nothing to compute.
    assert!(s.schedule(&mut kv).unwrap().chunks.is_empty());
    assert_eq!(s.fork_running(0, 1, 77, &mut kv).unwrap(), 10);
    assert!(matches!(
        s.fork_running(0, 1, 78, &mut kv),
        Err(SchedulerError::Duplicate(1))
    ));
    assert!(matches!(
        s.fork_running(5, 6, 78, &mut kv),
        Err(SchedulerError::Unknown(5))
    ));
    assert!(s.append(0, 76));
    // Two blocks of 4 shared, the third (tokens 8, 9) copied.
    let usage = kv.usage();
    assert_eq!(usage.bytes_allocated, 4 * kv.bytes_per_token() * 4);
    let next = s.schedule(&mut kv).unwrap();
    let mut chunks: Vec<(SeqId, usize, Vec<u32>)> = next
        .chunks
        .iter()
        .map(|c| (c.seq, c.start, c.tokens.clone()))
        .collect();
    chunks.sort();
    assert_eq!(chunks, vec![(0, 10, vec![76]), (1, 10, vec![77])]);
    s.update(&next, &[], &mut kv).unwrap();
    // Both held, 11 tokens each (3 blocks each, 2 shared: 4 of the 16 blocks). A prompt of 52
    // tokens needs 13 blocks: it goes in once the newest held sequence makes way.
    s.add(req(2, 52, 4), &kv).unwrap();
    let step3 = s.schedule(&mut kv).unwrap();
    assert_eq!(step3.preempted, vec![1]);
    assert_eq!(step3.chunks.len(), 1);
    assert_eq!(step3.chunks[0].seq, 2);
    assert_eq!(s.num_waiting(), 1);
    for seq in [0, 1, 2] {
        s.finish(seq, &mut kv).unwrap();
    }
    kv.audit().unwrap();
    assert_eq!(kv.usage().bytes_allocated, 0);
}

/// A beam-search request of the property test below: prompt and output lengths, width, arrival
/// step, and the seed of its (random) choices of which beams go on.
#[derive(Debug, Clone)]
struct BeamArrival {
    prompt: usize,
    max_tokens: usize,
    width: usize,
    at: usize,
    seed: u64,
}

fn beam_arrival() -> impl Strategy<Value = BeamArrival> {
    (1..14usize, 1..7usize, 1..4usize, 0..6usize, any::<u64>()).prop_map(
        |(prompt, max_tokens, width, at, seed)| BeamArrival {
            prompt,
            max_tokens,
            width,
            at,
            seed,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Beam search's use of the scheduler, with plain requests beside it, in a small cache
    /// (preemptions) with real KV bytes, paged and both vmm layouts, prefix caching on and off:
    /// a group's beams are held once they sample; when all have, `width` children are drawn at
    /// random among them — a parent drawn once `append`s, drawn again `fork_running`s, never
    /// drawn is freed — until `max_tokens`. Every position a chunk reads must hold the key of
    /// exactly its own tokens (so shared KV overwritten, or forked from the wrong place, is
    /// caught); a step never exceeds `max_num_seqs`; the books audit clean after every step;
    /// everything drains and nothing stays referenced.
    #[test]
    fn beam_groups_hold_fork_and_drain_reading_only_right_kv(
        beams in proptest::collection::vec(beam_arrival(), 1..5),
        plain in proptest::collection::vec((1..14usize, 1..7usize, 0..6usize), 0..4),
        max_num_seqs in 3..7usize,
        max_num_batched_tokens in 1..40usize,
        units in 16..48usize,
        kind in 0..5usize,
    ) {
        use rand::SeedableRng;
        let (mut kv, name) = prefix_cache_of(kind, units);
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs, max_num_batched_tokens });
        let mut tokens: HashMap<SeqId, Vec<u32>> = HashMap::new();
        // Per group: its live beams, tokens generated, held beams, random choices.
        let mut live: Vec<Vec<SeqId>> = vec![Vec::new(); beams.len()];
        let mut generated = vec![0usize; beams.len()];
        let mut held: HashSet<SeqId> = HashSet::new();
        let mut rngs: Vec<rand::rngs::StdRng> =
            beams.iter().map(|b| rand::rngs::StdRng::seed_from_u64(b.seed)).collect();
        let mut group_of: HashMap<SeqId, usize> = HashMap::new();
        let mut ended = vec![false; beams.len()];
        let mut plain_done: HashSet<SeqId> = HashSet::new();
        let mut next_id: SeqId = 1000;
        let mut t = 0;
        loop {
            for (g, b) in beams.iter().enumerate() {
                if b.at == t {
                    let id = g as SeqId;
                    let prompt = shared_prompt(id, 0, b.prompt / 2, b.prompt);
                    let width = Some(b.width.min(max_num_seqs));
                    let request = SeqRequest { id, prompt: prompt.clone(), max_tokens: b.max_tokens, cache_salt: None, fork_of: None, beam_width: width, whole_prompt: false, handed_over: None };
                    s.add(request, kv.manager()).unwrap();
                    tokens.insert(id, prompt);
                    live[g].push(id);
                    group_of.insert(id, g);
                }
            }
            for (i, &(prompt, max_tokens, at)) in plain.iter().enumerate() {
                if at == t {
                    let id = 500 + i as SeqId;
                    let r = req(id, prompt, max_tokens);
                    tokens.insert(id, r.prompt.clone());
                    s.add(r, kv.manager()).unwrap();
                }
            }
            if s.is_idle() && t > 8 {
                break;
            }
            prop_assert!(t < 2000, "{}: did not drain", name);
            let planned = s.schedule(kv.manager_mut()).unwrap();
            prop_assert!(planned.failed.is_empty(), "{}: {:?}", name, planned.failed);
            prop_assert!(s.num_running() <= max_num_seqs, "{}", name);
            for c in &planned.chunks {
                let own = &tokens[&c.seq];
                for p in 0..c.start {
                    prop_assert_eq!(read_key(kv.as_ref(), c.seq, p), as_key(kv_key(own, p)),
                        "{}: sequence {} reads wrong K/V at {}", name, c.seq, p);
                }
                for p in c.start..c.start + c.tokens.len() {
                    prop_assert_eq!(c.tokens[p - c.start], own[p]);
                    write_key(kv.as_ref(), c.seq, p, kv_key(own, p));
                }
            }
            let mut sampled = Vec::new();
            for c in planned.chunks.iter().filter(|c| c.samples) {
                if group_of.contains_key(&c.seq) {
                    held.insert(c.seq);
                } else {
                    let token = token_after(c.seq, c.start + c.tokens.len() - 1);
                    sampled.push((c.seq, token));
                }
            }
            for &(id, token) in &sampled {
                tokens.get_mut(&id).unwrap().push(token);
            }
            for id in s.update(&planned, &sampled, kv.manager_mut()).unwrap() {
                plain_done.insert(id);
            }
            for g in 0..beams.len() {
                if ended[g] || live[g].is_empty() || !live[g].iter().all(|b| held.contains(b)) {
                    continue;
                }
                let width = beams[g].width.min(max_num_seqs);
                let mut children: Vec<usize> = vec![0; live[g].len()];
                for _ in 0..width {
                    let parent = rngs[g].random_range(0..live[g].len());
                    children[parent] += 1;
                }
                let mut next = Vec::new();
                for (i, &parent) in live[g].iter().enumerate() {
                    if children[i] == 0 {
                        prop_assert!(s.finish(parent, kv.manager_mut()).unwrap());
                    }
                }
                for (i, &parent) in live[g].iter().enumerate() {
                    for child in 1..children[i] {
                        let token = 40_000 + child as u32;
                        s.fork_running(parent, next_id, token, kv.manager_mut()).unwrap();
                        let mut own = tokens[&parent].clone();
                        own.push(token);
                        tokens.insert(next_id, own);
                        group_of.insert(next_id, g);
                        next.push(next_id);
                        next_id += 1;
                    }
                }
                for (i, &parent) in live[g].iter().enumerate() {
                    if children[i] > 0 {
                        let token = token_after(parent, tokens[&parent].len());
                        prop_assert!(s.append(parent, token));
                        tokens.get_mut(&parent).unwrap().push(token);
                        next.push(parent);
                    }
                }
                for b in &live[g] {
                    held.remove(b);
                }
                live[g] = next;
                generated[g] += 1;
                if generated[g] == beams[g].max_tokens {
                    for &b in &live[g] {
                        s.finish(b, kv.manager_mut()).unwrap();
                    }
                    ended[g] = true;
                }
            }
            kv.audit().map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            t += 1;
        }
        prop_assert!(ended.iter().all(|&e| e), "{}: a beam search never ended", name);
        prop_assert_eq!(plain_done.len(), plain.len(), "{}", name);
        kv.audit().map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        prop_assert_eq!(kv.usage().bytes_allocated, 0, "{}: KV left referenced", name);
    }
}
