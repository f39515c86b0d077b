//! The checks every KV cache must pass, whatever its design and device: random sequences of
//! what the scheduler and the engine do to a cache — admit and grow (`reserve`), fork a prefix
//! (`fork`: n > 1 samples, beams, cached prefixes), abort (`free` at any point) and preempt
//! (`free` of the newest when memory runs out) — against a model of what each sequence holds,
//! with the cache's own audit after every operation (reference counts included) and nothing left
//! at the end. The CPU caches run it in unit tests (under proptest too); `tests/gpu_kv.rs` runs
//! the same function on the CUDA caches, so the GPU's books are held to the same invariants.
//! (vkv-vmm's `conformance.rs` does the same for the physical-memory backends.)
//!
//! A cache with automatic prefix caching on ([`KvManager::prefix_cache`]) is driven as the
//! scheduler drives it: every admission is looked up first (`match_prefix`, prompts drawn from
//! a few shared prefixes) and every successful `reserve` or `fork` records the sequence's
//! tokens (`cache_computed`); at the end cached memory may stay, but none of it is in use.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::manager::{KvManager, KvUsage, SeqId};
use super::KvError;

/// What a run did, to show it exercised the cache (not only its refusals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConformanceReport {
    pub reserves: usize,
    pub forks: usize,
    pub frees: usize,
    pub preemptions: usize,
    /// Operations refused for lack of memory (and checked to have changed nothing).
    pub out_of_memory: usize,
    /// With prefix caching: tokens admissions found cached.
    pub hit_tokens: usize,
}

/// The tokens of every sequence, for a cache with prefix caching: prompts start with one of a
/// few shared prefixes, drawn from their own generator so a cache without caching sees the
/// same operations as before.
struct Prompts {
    rng: StdRng,
    prefixes: Vec<Vec<u32>>,
    tokens: BTreeMap<SeqId, Vec<u32>>,
}

impl Prompts {
    fn new(seed: u64, max_len: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let prefixes = (1..=3u32)
            .map(|p| {
                let most = max_len.min(256) as u32;
                let n = rng.random_range(most / 4..=most / 2);
                (0..n).map(|t| 1000 * p + t).collect()
            })
            .collect();
        Prompts {
            rng,
            prefixes,
            tokens: BTreeMap::new(),
        }
    }

    /// `seq`'s tokens, extended with random ones (a new sequence: a shared prefix first) to
    /// `len`.
    fn grow(&mut self, seq: SeqId, len: usize) -> &[u32] {
        let tokens = self.tokens.entry(seq).or_insert_with(|| {
            let p = self.rng.random_range(0..self.prefixes.len());
            self.prefixes[p][..self.prefixes[p].len().min(len)].to_vec()
        });
        while tokens.len() < len {
            tokens.push(self.rng.random_range(0..4));
        }
        &tokens[..len]
    }
}

/// Run `steps` random operations on `kv` (which must hold nothing) with sequences of up to
/// `max_len` tokens, seeded by `seed`, checking after each that the cache holds exactly what
/// the model says and passes its audit; then free everything and check the cache is empty.
/// The error says which step broke which rule.
pub fn check_random_operations(
    kv: &mut dyn KvManager,
    seed: u64,
    steps: usize,
    max_len: usize,
) -> Result<ConformanceReport, KvError> {
    let fail = |step: usize, what: String| KvError::Inconsistent(format!("step {step}: {what}"));
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model: BTreeMap<SeqId, usize> = BTreeMap::new();
    let mut next_id: SeqId = 1;
    let mut report = ConformanceReport::default();
    let mut prompts = kv
        .prefix_cache()
        .is_some()
        .then(|| Prompts::new(seed, max_len));
    if kv.usage() != KvUsage::default() {
        return Err(fail(0, format!("a fresh cache reports {:?}", kv.usage())));
    }
    for step in 0..steps {
        let pick = |rng: &mut StdRng, model: &BTreeMap<SeqId, usize>| {
            let i = rng.random_range(0..model.len());
            model.iter().nth(i).map(|(&s, &n)| (s, n))
        };
        match rng.random_range(0..10u32) {
            // Admit a new sequence, or grow one (a prefill chunk or a decode step).
            0..=4 => {
                let grow = !model.is_empty() && rng.random_bool(0.6);
                let (seq, len) = match grow.then(|| pick(&mut rng, &model)).flatten() {
                    Some((seq, held)) => {
                        let add = if rng.random_bool(0.7) {
                            1
                        } else {
                            rng.random_range(1..=64)
                        };
                        (seq, (held + add).min(max_len).max(held))
                    }
                    None => {
                        next_id += 1;
                        (next_id, rng.random_range(1..=max_len.min(256)))
                    }
                };
                // Prefix caching: an admission starts with what its prompt finds cached.
                if let (Some(p), false) = (prompts.as_mut(), model.contains_key(&seq)) {
                    let tokens = p.grow(seq, len);
                    let cache = kv.prefix_cache_mut().expect("caching is on");
                    match cache.match_prefix(seq, tokens, None) {
                        Ok(0) => {}
                        Ok(covered) if covered < len => {
                            report.hit_tokens += covered;
                            model.insert(seq, covered);
                        }
                        Ok(covered) => {
                            return Err(fail(
                                step,
                                format!("a prompt of {len} tokens matched {covered}"),
                            ))
                        }
                        Err(KvError::OutOfMemory { .. }) => {
                            report.out_of_memory += 1;
                            p.tokens.remove(&seq);
                            if kv.reserved(seq).is_some() {
                                return Err(fail(
                                    step,
                                    format!("a refused match left sequence {seq} behind"),
                                ));
                            }
                            kv.audit().map_err(|e| fail(step, e.to_string()))?;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                report.reserves += 1;
                match kv.reserve(seq, len) {
                    Ok(()) => {
                        model.insert(seq, len);
                        if let Some(p) = prompts.as_mut() {
                            let tokens = p.grow(seq, len);
                            let cache = kv.prefix_cache_mut().expect("caching is on");
                            cache.cache_computed(seq, tokens, None)?;
                        }
                    }
                    Err(KvError::OutOfMemory { .. }) => {
                        report.out_of_memory += 1;
                        if kv.reserved(seq) != model.get(&seq).copied() {
                            return Err(fail(step, format!(
                                "a refused reserve of {len} tokens changed sequence {seq}: {:?}, was {:?}",
                                kv.reserved(seq), model.get(&seq)
                            )));
                        }
                        // Preemption by recompute: the newest sequence gives its memory back.
                        if let Some((&newest, _)) = model.iter().next_back() {
                            kv.free(newest)?;
                            model.remove(&newest);
                            report.preemptions += 1;
                        }
                        if let Some(p) = prompts.as_mut() {
                            p.tokens.retain(|s, _| model.contains_key(s));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            // Fork a prefix of a running sequence into a new one.
            5..=6 if !model.is_empty() => {
                let (src, held) = pick(&mut rng, &model).expect("not empty");
                let tokens = rng.random_range(0..=held);
                next_id += 1;
                let dst = next_id;
                report.forks += 1;
                match kv.fork(src, dst, tokens) {
                    Ok(()) => {
                        model.insert(dst, tokens);
                        if let Some(p) = prompts.as_mut() {
                            let prefix = p.grow(src, held)[..tokens].to_vec();
                            p.tokens.insert(dst, prefix);
                            let cache = kv.prefix_cache_mut().expect("caching is on");
                            cache.cache_computed(dst, &p.tokens[&dst], None)?;
                        }
                    }
                    Err(KvError::OutOfMemory { .. }) => {
                        report.out_of_memory += 1;
                        if kv.reserved(dst).is_some() {
                            return Err(fail(
                                step,
                                format!("a refused fork left sequence {dst} behind"),
                            ));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            // Finish or abort one.
            _ if !model.is_empty() => {
                let (seq, _) = pick(&mut rng, &model).expect("not empty");
                kv.free(seq)?;
                model.remove(&seq);
                if let Some(p) = prompts.as_mut() {
                    p.tokens.remove(&seq);
                }
                report.frees += 1;
                if kv.free(seq).is_ok() {
                    return Err(fail(step, format!("sequence {seq} freed twice")));
                }
            }
            _ => {}
        }
        kv.audit().map_err(|e| fail(step, e.to_string()))?;
        check_books(kv, &model).map_err(|what| fail(step, what.to_string()))?;
    }
    for &seq in model.keys() {
        kv.free(seq)?;
    }
    kv.audit().map_err(|e| fail(steps, e.to_string()))?;
    let left = kv.usage();
    if left != KvUsage::default() {
        return Err(fail(
            steps,
            format!("everything freed, yet the cache reports {left:?}"),
        ));
    }
    Ok(report)
}

/// Where the cache's books differ from the model's (reported as a [`KvError::Inconsistent`]
/// with the step).
#[derive(Debug, thiserror::Error)]
enum BooksError {
    /// A sequence's reserved length differs from the model's.
    #[error("sequence {seq} should hold {expected} tokens, the cache says {found:?}")]
    Length {
        seq: SeqId,
        expected: usize,
        found: Option<usize>,
    },
    /// The cache's usage differs from the model's sequences and tokens.
    #[error("{sequences} sequences of {tokens} tokens, the cache reports {found:?}")]
    Usage {
        sequences: usize,
        tokens: usize,
        found: KvUsage,
    },
}

/// The cache holds exactly the model's sequences at the model's lengths.
fn check_books(kv: &dyn KvManager, model: &BTreeMap<SeqId, usize>) -> Result<(), BooksError> {
    for (&seq, &expected) in model {
        let found = kv.reserved(seq);
        if found != Some(expected) {
            return Err(BooksError::Length {
                seq,
                expected,
                found,
            });
        }
    }
    let usage = kv.usage();
    let tokens: usize = model.values().sum();
    if usage.sequences != model.len() || usage.bytes_holding_tokens != tokens * kv.bytes_per_token()
    {
        return Err(BooksError::Usage {
            sequences: model.len(),
            tokens,
            found: usage,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use vkv_kernels::cpu::KvDtype;
    use vkv_vmm::KvLayout;

    use super::*;
    use crate::{KvBudget, KvMode};

    use crate::TEST_DIMS as DIMS;

    fn modes() -> [KvMode; 4] {
        [
            KvMode::Paged { block_size: 16 },
            KvMode::Paged { block_size: 5 },
            KvMode::Vmm {
                layout: KvLayout::PerLayer,
                page_size: 4096,
            },
            KvMode::Vmm {
                layout: KvLayout::TokenMajor,
                page_size: 4096,
            },
        ]
    }

    #[test]
    fn every_cpu_cache_keeps_its_books_through_forks_aborts_and_preemption() {
        for mode in modes() {
            // 96 KiB: a few hundred tokens, so memory runs out often.
            let mut kv = mode
                .build(DIMS, KvDtype::F16, KvBudget::new(8, 512, 96 << 10))
                .unwrap();
            let report = check_random_operations(kv.manager_mut(), 7, 600, 512)
                .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            assert!(
                report.forks > 20 && report.preemptions > 5 && report.frees > 20,
                "{mode:?}: {report:?}"
            );
        }
    }

    /// The vmm caches with automatic prefix caching on: the same books, with admissions hitting
    /// cached prefixes.
    #[test]
    fn the_vmm_caches_keep_their_books_with_prefix_caching_on() {
        for layout in KvLayout::ALL {
            let shape = crate::VmmShape::new(layout, 8, 512, 4096, 64);
            let mut kv = crate::VmmKv::with_dtype(DIMS, KvDtype::F16, shape)
                .unwrap()
                .with_prefix_caching();
            let report = check_random_operations(&mut kv, 7, 600, 512)
                .unwrap_or_else(|e| panic!("{layout}: {e}"));
            assert!(
                report.forks > 20 && report.preemptions > 5 && report.hit_tokens > 0,
                "{layout}: {report:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_operations_on_any_cpu_cache(seed in any::<u64>(), mode in 0..4usize, kib in 16..256usize) {
            let mut kv = modes()[mode].build(DIMS, KvDtype::F32, KvBudget::new(6, 300, kib << 10)).unwrap();
            let r = check_random_operations(kv.manager_mut(), seed, 200, 300);
            prop_assert!(r.is_ok(), "{:?}: {}", modes()[mode], r.unwrap_err());
        }
    }
}
