//! Tests of the prefix-cache index (`prefix.rs`): units, collisions forced through a folded key
//! function, and a property test against a model without hashing.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::*;
use crate::KvError;

/// Cache the full blocks of `tokens` in `units` (one per block), chained from the start.
fn cache(
    index: &mut PrefixIndex<u32>,
    tokens: &[u32],
    salt: Option<&[u8]>,
    units: &[u32],
) -> Vec<Inserted<u32>> {
    let mut parent = None;
    let mut done = Vec::new();
    for (block, &unit) in tokens.chunks_exact(index.block_size()).zip(units) {
        let inserted = index.insert(parent, block, salt, unit).unwrap();
        parent = inserted.block();
        done.push(inserted);
    }
    index.audit().unwrap();
    done
}

/// Every key collides with every other.
fn one_key(_: Option<BlockKey>, _: &[u32], _: Option<&[u8]>) -> BlockKey {
    BlockKey::from_raw(42)
}

#[test]
fn a_shared_system_prompt_hits_the_units_of_its_full_blocks() {
    let mut index = PrefixIndex::new(4).unwrap();
    let system: Vec<u32> = (0..10).collect();
    let a: Vec<u32> = system.iter().copied().chain(100..106).collect();
    let b: Vec<u32> = system.iter().copied().chain([7; 6]).collect();
    cache(&mut index, &a, None, &[10, 11, 12, 13]);

    let hit = index.lookup(&b, None);
    assert_eq!(hit.units, [10, 11], "the system prompt's two full blocks");
    let (keys_a, keys_b) = (block_keys(&a, 4, None), block_keys(&b, 4, None));
    assert_eq!(keys_a[..2], keys_b[..2]);
    assert_ne!(keys_a[2], keys_b[2], "the block the prompts differ in");
    assert_eq!(hit.last.map(CachedBlock::key), Some(keys_b[1]));

    // b computes its own third block after the shared two.
    let inserted = index.insert(hit.last, &b[8..12], None, 20).unwrap();
    assert_eq!(inserted.block().map(CachedBlock::key), Some(keys_b[2]));
    assert_eq!(index.lookup(&b, None).units, [10, 11, 20]);
    assert_eq!(index.lookup(&a, None).units, [10, 11, 12, 13]);
    assert_eq!(index.lookup(&a[..3], None).units, [], "less than a block");
    assert_eq!(index.lookup(&[5; 8], None).units, [], "a first-block miss");
    index.audit().unwrap();
}

#[test]
fn a_different_salt_misses() {
    let mut index = PrefixIndex::new(2).unwrap();
    let tokens = [1, 2, 3, 4, 5];
    cache(&mut index, &tokens, Some(b"tenant-a"), &[1, 2]);
    assert_eq!(index.lookup(&tokens, Some(b"tenant-a")).units, [1, 2]);
    assert_eq!(index.lookup(&tokens, Some(b"tenant-b")).units, []);
    assert_eq!(index.lookup(&tokens, None).units, []);
    assert_eq!(
        index.lookup(&tokens, Some(b"")).units,
        [],
        "empty is a salt"
    );
    let (a, b) = (
        block_keys(&tokens, 2, Some(b"tenant-a")),
        block_keys(&tokens, 2, Some(b"tenant-b")),
    );
    assert!(a.iter().zip(&b).all(|(a, b)| a != b), "every key differs");
    // An unsalted request caches its own copy beside the salted one.
    let inserted = cache(&mut index, &tokens, None, &[3, 4]);
    assert!(matches!(
        inserted[..],
        [Inserted::Cached(_), Inserted::Cached(_)]
    ));
    assert_eq!(index.lookup(&tokens, None).units, [3, 4]);
}

#[test]
fn the_partial_last_block_is_never_cached() {
    let mut index = PrefixIndex::new(4).unwrap();
    let tokens: Vec<u32> = (0..10).collect();
    assert_eq!(block_keys(&tokens, 4, None).len(), 2);
    assert_eq!(block_keys(&tokens, 0, None), []);
    cache(&mut index, &tokens, None, &[1, 2, 3]);
    assert_eq!(index.len(), 2, "the third unit holds a partial block");
    assert!(!index.is_cached(3));
    let err = index.insert(None, &tokens[8..], None, 3).unwrap_err();
    assert_eq!(
        err,
        PrefixError::BlockLength {
            expected: 4,
            found: 2
        }
    );
    assert_eq!(index.lookup(&tokens[..7], None).units, [1]);
    assert_eq!(index.lookup(&tokens, None).units, [1, 2]);
    index.audit().unwrap();
}

#[test]
fn eviction_takes_tail_blocks_first_and_older_requests_first() {
    let mut index = PrefixIndex::new(1).unwrap();
    cache(&mut index, &[1, 2, 3], None, &[1, 2, 3]);
    cache(&mut index, &[4, 5], None, &[4, 5]);
    assert_eq!(index.evict(), None, "referenced units are not evictable");
    index.release(&[1, 2, 3]).unwrap();
    index.release(&[4, 5]).unwrap();
    assert_eq!(index.stats().evictable_units, 5);
    index.acquire(1).unwrap(); // a hit on the first block
    index.acquire(1).unwrap(); // a second holder: no change
    assert!(!index.is_evictable(1) && index.is_evictable(2));
    index.audit().unwrap();
    let order: Vec<u32> = std::iter::from_fn(|| index.evict()).collect();
    assert_eq!(order, [3, 2, 5, 4]);
    assert_eq!(index.lookup(&[1, 2, 3], None).units, [1]);
    assert_eq!(index.lookup(&[4, 5], None).units, []);
    let stats = index.stats();
    assert_eq!(
        (stats.evictions, stats.cached_units, stats.evictable_units),
        (4, 1, 0)
    );
    index.audit().unwrap();
}

#[test]
fn colliding_keys_never_return_a_wrong_block() {
    let mut index = PrefixIndex::with_keys(2, one_key).unwrap();
    cache(&mut index, &[1, 2, 3, 4], None, &[10, 11]);
    // Same first block, different second: the first is a duplicate, the second cached.
    let b = cache(&mut index, &[1, 2, 5, 6], None, &[20, 21]);
    assert!(matches!(b[0], Inserted::Duplicate { unit: 10, .. }));
    assert!(matches!(b[1], Inserted::Cached(_)));
    // Every block has key 42, yet each lookup finds exactly its own blocks.
    assert_eq!(index.lookup(&[1, 2, 3, 4], None).units, [10, 11]);
    assert_eq!(index.lookup(&[1, 2, 5, 6], None).units, [10, 21]);
    assert_eq!(index.lookup(&[9, 9, 3, 4], None).units, []);
    assert_eq!(index.lookup(&[1, 2, 3, 4], Some(b"x")).units, []);
    assert_eq!(index.lookup(&[3, 4, 3, 4], None).units, []);
    // A different first block with the same key is cached beside the others, and the
    // second block [3, 4] computed after [1, 2] does not follow it.
    cache(&mut index, &[9, 9], None, &[30]);
    assert_eq!(index.lookup(&[9, 9, 3, 4], None).units, [30]);
    assert_eq!(index.entries.len(), 1, "one bucket");
    assert_eq!(index.len(), 4);
    index.audit().unwrap();
}

#[test]
fn a_forgotten_parent_leaves_its_children_unreachable() {
    for key_of in [BlockKey::new as KeyFn, one_key] {
        let mut index = PrefixIndex::with_keys(2, key_of).unwrap();
        let a = cache(&mut index, &[1, 2, 3, 4], None, &[1, 2]);
        assert!(index.forget(1));
        assert!(!index.forget(1), "forgotten once");
        assert_eq!(index.lookup(&[1, 2, 3, 4], None).units, []);
        // A request whose cached first block was dropped cannot cache a block after it.
        let late = index.insert(a[0].block(), &[5, 6], None, 3).unwrap();
        assert_eq!(late, Inserted::ParentGone);
        assert!(!index.is_cached(3));
        // Another first block under the (with `one_key`) same key: the old child [3, 4],
        // computed after [1, 2], must not follow it.
        cache(&mut index, &[7, 7], None, &[4]);
        assert_eq!(index.lookup(&[7, 7, 3, 4], None).units, [4]);
        // [1, 2] computed again is a new version; its child is cached again beside the
        // unreachable old one.
        let again = cache(&mut index, &[1, 2, 3, 4], None, &[5, 6]);
        assert!(matches!(again[1], Inserted::Cached(_)));
        assert_eq!(index.lookup(&[1, 2, 3, 4], None).units, [5, 6]);
        // The unreachable child ages out like any other unit.
        index.release(&[2]).unwrap();
        assert_eq!(index.evict(), Some(2));
        assert_eq!(index.lookup(&[1, 2, 3, 4], None).units, [5, 6]);
        index.audit().unwrap();
    }
}

#[test]
fn a_duplicate_block_keeps_the_cached_unit() {
    let mut index = PrefixIndex::new(2).unwrap();
    cache(&mut index, &[1, 2, 3, 4], None, &[1, 2]);
    let b = cache(&mut index, &[1, 2, 3, 4, 5, 6], None, &[3, 4, 5]);
    assert!(matches!(b[0], Inserted::Duplicate { unit: 1, .. }));
    assert!(matches!(b[1], Inserted::Duplicate { unit: 2, .. }));
    assert!(matches!(b[2], Inserted::Cached(_)));
    assert!(!index.is_cached(3) && !index.is_cached(4) && index.is_cached(5));
    assert_eq!(index.lookup(&[1, 2, 3, 4, 5, 6], None).units, [1, 2, 5]);
}

#[test]
fn broken_contracts_are_errors_that_change_nothing() {
    assert_eq!(
        PrefixIndex::<u32>::new(0).unwrap_err(),
        PrefixError::ZeroBlockSize
    );
    let mut index = PrefixIndex::new(1).unwrap();
    cache(&mut index, &[1, 2], None, &[1, 2]);
    let before = index.stats();
    assert_eq!(
        index.insert(None, &[9], None, 1).unwrap_err(),
        PrefixError::AlreadyCached { unit: "1".into() }
    );
    assert_eq!(
        index.acquire(7).unwrap_err(),
        PrefixError::NotCached { unit: "7".into() }
    );
    assert_eq!(
        index.release(&[1, 7]).unwrap_err(),
        PrefixError::NotCached { unit: "7".into() }
    );
    assert_eq!(
        index.release(&[2, 1, 2]).unwrap_err(),
        PrefixError::AlreadyEvictable { unit: "2".into() }
    );
    assert_eq!(index.stats(), before, "nothing changed");
    index.release(&[1]).unwrap();
    assert!(index.release(&[1]).is_err(), "released twice");
    let err: KvError = index.release(&[1]).unwrap_err().into();
    assert_eq!(
        err.to_string(),
        "unit 1 is already evictable; expected a cached unit with holders (released twice?)"
    );
    index.audit().unwrap();
}

#[test]
fn the_audit_names_what_is_broken() {
    let mut index = PrefixIndex::new(1).unwrap();
    cache(&mut index, &[1, 2], None, &[1, 2]);
    index.release(&[1, 2]).unwrap();

    let mut twice = index.clone();
    twice.queue.insert(99, 1);
    assert!(matches!(
        twice.audit(),
        Err(PrefixError::QueuePosition { found: 99, .. })
    ));

    let mut orphan = index.clone();
    orphan.queue.insert(99, 7);
    assert!(matches!(
        orphan.audit(),
        Err(PrefixError::EvictableWithoutEntry { .. })
    ));

    let mut shared = index.clone();
    for bucket in shared.entries.values_mut() {
        for e in bucket {
            e.unit = 1;
        }
    }
    assert!(matches!(
        shared.audit(),
        Err(PrefixError::UnitInTwoEntries { .. } | PrefixError::UnitMapMismatch { .. })
    ));

    let mut moved = index.clone();
    let key = *moved.entries.keys().next().unwrap();
    let bucket = moved.entries.remove(&key).unwrap();
    moved
        .entries
        .insert(BlockKey::from_raw(key.raw() ^ 1), bucket);
    assert!(matches!(moved.audit(), Err(PrefixError::WrongKey { .. })));
    index.audit().unwrap();
}

#[test]
fn lookups_are_counted_when_recorded() {
    let mut index = PrefixIndex::new(2).unwrap();
    cache(&mut index, &[1, 2, 3, 4], None, &[1, 2]);
    let tokens = [1, 2, 3, 9, 9];
    let hit = index.lookup(&tokens, None);
    assert_eq!(
        index.stats().queried_tokens,
        0,
        "a lookup alone counts nothing"
    );
    index.record_lookup(tokens.len(), hit.blocks() * index.block_size());
    let stats = index.stats();
    assert_eq!((stats.queried_tokens, stats.hit_tokens), (5, 2));
}

/// A simple model of the index: entries by content in a list (no keys, no hashing), the
/// evictable queue a `VecDeque`.
#[derive(Default)]
struct Model {
    entries: Vec<ModelEntry>,
    queue: VecDeque<u32>,
}

struct ModelEntry {
    unit: u32,
    parent: Option<usize>,
    tokens: Vec<u32>,
    salt: Option<Vec<u8>>,
    alive: bool,
}

#[derive(Debug, PartialEq)]
enum ModelInserted {
    Cached(usize),
    Duplicate(usize),
    ParentGone,
}

impl Model {
    fn find(&self, parent: Option<usize>, tokens: &[u32], salt: Option<&[u8]>) -> Option<usize> {
        self.entries.iter().position(|e| {
            e.alive
                && e.parent == parent
                && e.tokens == tokens
                && (parent.is_some() || e.salt.as_deref() == salt)
        })
    }

    fn lookup(&self, tokens: &[u32], bs: usize, salt: Option<&[u8]>) -> (Vec<u32>, Option<usize>) {
        let mut last = None;
        let mut units = Vec::new();
        for block in tokens.chunks_exact(bs) {
            let Some(at) = self.find(last, block, salt) else {
                break;
            };
            units.push(self.entries[at].unit);
            last = Some(at);
        }
        (units, last)
    }

    fn insert(
        &mut self,
        parent: Option<usize>,
        tokens: &[u32],
        salt: Option<&[u8]>,
        unit: u32,
    ) -> ModelInserted {
        if parent.is_some_and(|p| !self.entries[p].alive) {
            return ModelInserted::ParentGone;
        }
        if let Some(at) = self.find(parent, tokens, salt) {
            return ModelInserted::Duplicate(at);
        }
        self.entries.push(ModelEntry {
            unit,
            parent,
            tokens: tokens.to_vec(),
            salt: salt.filter(|_| parent.is_none()).map(<[u8]>::to_vec),
            alive: true,
        });
        ModelInserted::Cached(self.entries.len() - 1)
    }

    fn entry_of(&self, unit: u32) -> Option<usize> {
        self.entries.iter().position(|e| e.alive && e.unit == unit)
    }

    fn forget(&mut self, unit: u32) -> bool {
        self.queue.retain(|&u| u != unit);
        let at = self.entry_of(unit);
        if let Some(at) = at {
            self.entries[at].alive = false;
        }
        at.is_some()
    }

    fn evict(&mut self) -> Option<u32> {
        let unit = self.queue.pop_front()?;
        self.forget(unit);
        Some(unit)
    }

    fn cached(&self) -> usize {
        self.entries.iter().filter(|e| e.alive).count()
    }
}

/// A running request: its tokens, one unit per block (the last maybe partial), and how far
/// its full blocks have been offered to the index.
struct Request {
    tokens: Vec<u32>,
    salt: Option<&'static [u8]>,
    units: Vec<u32>,
    offered: usize,
    parent: Option<CachedBlock>,
    model_parent: Option<usize>,
    broken: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Start(usize, Vec<u32>, bool),
    Extend(usize, Vec<u32>),
    Finish(usize),
    Evict,
    Forget(u32),
    Lookup(Vec<u32>, bool),
}

fn op(units: u32) -> impl Strategy<Value = Op> {
    let tokens = || proptest::collection::vec(0..2u32, 0..10);
    prop_oneof![
        3 => (0..4usize, tokens(), any::<bool>()).prop_map(|(r, t, s)| Op::Start(r, t, s)),
        2 => (0..4usize, tokens()).prop_map(|(r, t)| Op::Extend(r, t)),
        2 => (0..4usize).prop_map(Op::Finish),
        1 => Just(Op::Evict),
        1 => (0..units).prop_map(Op::Forget),
        2 => (tokens(), any::<bool>()).prop_map(|(t, s)| Op::Lookup(t, s)),
    ]
}

/// Every unit of a caller's simulated allocator, and the index and model beside it.
struct World {
    bs: usize,
    index: PrefixIndex<u32>,
    model: Model,
    refs: Vec<u32>,
    free: Vec<u32>,
    /// What each unit was computed to hold: the salt and every token up to its block's end.
    holds: HashMap<u32, (Option<&'static [u8]>, Vec<u32>)>,
    requests: Vec<Option<Request>>,
}

const SALT: &[u8] = b"tenant";

impl World {
    fn lookup(
        &self,
        tokens: &[u32],
        salt: Option<&'static [u8]>,
    ) -> Result<(PrefixMatch<u32>, Option<usize>), TestCaseError> {
        let hit = self.index.lookup(tokens, salt);
        let (units, model_last) = self.model.lookup(tokens, self.bs, salt);
        prop_assert_eq!(&hit.units, &units, "the model's longest cached prefix");
        for (i, unit) in hit.units.iter().enumerate() {
            let (s, held) = &self.holds[unit];
            prop_assert_eq!(*s, salt);
            prop_assert_eq!(
                &held[..],
                &tokens[..(i + 1) * self.bs],
                "unit {} holds another prefix",
                unit
            );
        }
        Ok((hit, model_last))
    }

    /// A free unit, evicting a cached one when none is free.
    fn allocate(&mut self) -> Result<Option<u32>, TestCaseError> {
        let unit = match self.free.pop() {
            Some(u) => Some(u),
            None => {
                let evicted = self.index.evict();
                prop_assert_eq!(evicted, self.model.evict());
                evicted
            }
        };
        if let Some(u) = unit {
            prop_assert_eq!(self.refs[u as usize], 0);
            self.refs[u as usize] = 1;
        }
        Ok(unit)
    }

    /// `n` units, or none (and nothing held) when they cannot be found.
    fn allocate_all(&mut self, n: usize) -> Result<Option<Vec<u32>>, TestCaseError> {
        let mut got = Vec::new();
        while got.len() < n {
            match self.allocate()? {
                Some(u) => got.push(u),
                None => {
                    for &u in &got {
                        self.refs[u as usize] = 0;
                    }
                    self.free.extend(got);
                    return Ok(None);
                }
            }
        }
        Ok(Some(got))
    }

    /// Drop one reference to each of `units`; those left with none become evictable
    /// (cached) or free.
    fn drop_refs(&mut self, units: &[u32]) -> Result<(), TestCaseError> {
        let mut zero = Vec::new();
        for &u in units {
            self.refs[u as usize] -= 1;
            if self.refs[u as usize] == 0 {
                zero.push(u);
            }
        }
        let (cached, uncached): (Vec<u32>, Vec<u32>) =
            zero.into_iter().partition(|&u| self.index.is_cached(u));
        for &u in &cached {
            prop_assert!(self.model.entry_of(u).is_some());
        }
        self.index.release(&cached).unwrap();
        self.model.queue.extend(cached.iter().rev());
        self.free.extend(uncached);
        Ok(())
    }

    /// Offer the request's newly full blocks to the index.
    fn offer(&mut self, r: usize) -> Result<(), TestCaseError> {
        let req = self.requests[r].as_mut().unwrap();
        while !req.broken && (req.offered + 1) * self.bs <= req.tokens.len() {
            let i = req.offered;
            let prefix = &req.tokens[..(i + 1) * self.bs];
            let block = &prefix[i * self.bs..];
            let unit = req.units[i];
            self.holds.insert(unit, (req.salt, prefix.to_vec()));
            let got = self
                .index
                .insert(req.parent, block, req.salt, unit)
                .unwrap();
            let want = self.model.insert(req.model_parent, block, req.salt, unit);
            match (got, want) {
                (Inserted::Cached(b), ModelInserted::Cached(at)) => {
                    req.parent = Some(b);
                    req.model_parent = Some(at);
                }
                (Inserted::Duplicate { block, unit }, ModelInserted::Duplicate(at)) => {
                    prop_assert_eq!(unit, self.model.entries[at].unit);
                    req.parent = Some(block);
                    req.model_parent = Some(at);
                }
                (Inserted::ParentGone, ModelInserted::ParentGone) => req.broken = true,
                (got, want) => prop_assert!(false, "index {:?}, model {:?}", got, want),
            }
            req.offered += 1;
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Start(r, tokens, salted) if self.requests[r].is_none() => {
                let salt = salted.then_some(SALT);
                let (hit, model_parent) = self.lookup(&tokens, salt)?;
                self.index
                    .record_lookup(tokens.len(), hit.blocks() * self.bs);
                for &u in &hit.units {
                    self.refs[u as usize] += 1;
                    self.index.acquire(u).unwrap();
                    self.model.queue.retain(|&q| q != u);
                }
                let needed = tokens.len().div_ceil(self.bs) - hit.blocks();
                let Some(fresh) = self.allocate_all(needed)? else {
                    return self.drop_refs(&hit.units);
                };
                self.requests[r] = Some(Request {
                    salt,
                    offered: hit.blocks(),
                    units: hit.units.iter().copied().chain(fresh).collect(),
                    tokens,
                    parent: hit.last,
                    model_parent,
                    broken: false,
                });
                self.offer(r)?;
            }
            Op::Extend(r, more) if self.requests[r].is_some() => {
                let req = self.requests[r].as_ref().unwrap();
                let needed = (req.tokens.len() + more.len()).div_ceil(self.bs) - req.units.len();
                let Some(fresh) = self.allocate_all(needed)? else {
                    return Ok(());
                };
                let req = self.requests[r].as_mut().unwrap();
                req.tokens.extend(more);
                req.units.extend(fresh);
                self.offer(r)?;
            }
            Op::Finish(r) => {
                if let Some(req) = self.requests[r].take() {
                    self.drop_refs(&req.units)?;
                }
            }
            Op::Evict => {
                let evicted = self.index.evict();
                prop_assert_eq!(evicted, self.model.evict());
                self.free.extend(evicted);
            }
            Op::Forget(u) => {
                let forgotten = self.index.forget(u);
                prop_assert_eq!(forgotten, self.model.forget(u));
                if forgotten && self.refs[u as usize] == 0 {
                    self.free.push(u); // the caller reuses it
                }
            }
            Op::Lookup(tokens, salted) => {
                self.lookup(&tokens, salted.then_some(SALT))?;
            }
            _ => {}
        }
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        if let Err(e) = self.index.audit() {
            prop_assert!(false, "audit: {}", e);
        }
        let stats = self.index.stats();
        prop_assert_eq!(stats.cached_units, self.model.cached());
        prop_assert_eq!(stats.evictable_units, self.model.queue.len());
        for (u, &refs) in self.refs.iter().enumerate() {
            let u = u as u32;
            let free = self.free.contains(&u);
            let evictable = self.index.is_evictable(u);
            prop_assert_eq!(
                refs == 0,
                free ^ evictable,
                "unit {}: {} refs, free {}, evictable {}",
                u,
                refs,
                free,
                evictable
            );
            prop_assert!(
                !(free && self.index.is_cached(u)),
                "unit {} is free and cached",
                u
            );
        }
        Ok(())
    }
}

/// Keys folded to two values: nearly every lookup meets a colliding entry.
fn two_keys(parent: Option<BlockKey>, tokens: &[u32], salt: Option<&[u8]>) -> BlockKey {
    BlockKey::from_raw(BlockKey::new(parent, tokens, salt).raw() % 2)
}

proptest! {
    #[test]
    fn random_operations_agree_with_a_model_and_keep_the_audit_clean(
        bs in 1..4usize,
        units in 4..24u32,
        collide in any::<bool>(),
        ops in proptest::collection::vec(op(24), 1..120),
    ) {
        let key_of = if collide { two_keys as KeyFn } else { BlockKey::new };
        let mut world = World {
            bs,
            index: PrefixIndex::with_keys(bs, key_of).unwrap(),
            model: Model::default(),
            refs: vec![0; units as usize],
            free: (0..units).rev().collect(),
            holds: HashMap::new(),
            requests: (0..4).map(|_| None).collect(),
        };
        for op in ops {
            let op = match op {
                Op::Forget(u) => Op::Forget(u % units),
                op => op,
            };
            world.apply(op)?;
            world.check()?;
        }
        for r in 0..4 {
            world.apply(Op::Finish(r))?;
            world.check()?;
        }
        prop_assert_eq!(world.model.queue.len(), world.index.len(), "nothing is referenced");
        while let Some(u) = world.index.evict() {
            prop_assert_eq!(Some(u), world.model.evict());
            world.free.push(u);
            world.check()?;
        }
        prop_assert!(world.index.is_empty());
        prop_assert!(world.index.entries.is_empty() && world.index.queue.is_empty());
        prop_assert_eq!(world.free.len(), units as usize);
    }
}
