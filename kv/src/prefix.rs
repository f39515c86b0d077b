//! The prefix-cache index of automatic prefix caching: which units of KV memory hold the K and V
//! of which full blocks of tokens, so that a request whose prompt starts like an earlier one
//! (a shared system prompt, a multi-turn chat, few-shot examples) reuses that memory instead of
//! computing it again.
//!
//! # What it owns
//!
//! [`PrefixIndex`] owns the *books* of the cache, never the memory: a map from [`BlockKey`] to
//! the unit holding that block, and the LRU queue of cached units nobody references (reference
//! count 0 in the allocator: evictable). The allocator keeps the reference counts; the caller
//! (the scheduler, through the KV caches) tells the index when a unit gains its first holder
//! ([`PrefixIndex::acquire`]) or loses its last ([`PrefixIndex::release`]), and takes units
//! back from it when memory runs out ([`PrefixIndex::evict`]). The unit `U` is whatever the
//! cache hands out: a paged [`BlockId`](crate::BlockId) today, a physical page id of the vmm
//! cache later.
//!
//! # Where the idea comes from
//!
//! vLLM V1's automatic prefix caching (`docs/design/prefix_caching.md`): a block is identified
//! by a hash chained over its parent's hash, its own tokens and extra keys (here the
//! per-request `cache_salt`, so tenants can opt out of sharing); only full blocks are cached;
//! cached blocks with no holder stay in a free queue in eviction order, and a finished
//! request's blocks enter it tail first, so a request's last blocks are evicted before its
//! first ones (which more requests share) and older requests' before newer ones'. The
//! alternative is SGLang's RadixAttention: a radix tree over token sequences, matched
//! token by token, with LRU eviction of leaves. A hash map of chained keys is flat (no tree to
//! rebalance or split) and its granularity is the block, which is the granularity of the
//! memory anyway; the tree matches partial blocks, which block-granular memory cannot share
//! without a copy.
//!
//! # Invariants (checked by [`PrefixIndex::audit`], property-tested below)
//!
//! - A unit is in at most one entry, and every entry's unit maps back to that entry.
//! - Every evictable unit has an entry; the evictable queue holds each unit at most once.
//! - Every entry holds exactly `block_size` tokens and sits under the key its parent, tokens
//!   and salt hash to.
//! - A lookup never returns a wrong unit, even when 64-bit keys collide: an entry also stores
//!   its tokens, its parent (key *and* version: which entry it was computed after) and, for a
//!   first block, the salt, and a lookup compares them all. Entries with equal keys live side
//!   by side in one bucket. When a block is evicted, the blocks cached after it become
//!   unreachable (their parent's version is gone) and age out of the queue like the rest.
//!
//! # How the two KV modes will use it
//!
//! - paged: the unit is a block ([`BlockId`](crate::BlockId)); a hit is a block-table entry
//!   holding the cached block (one more reference), and the request computes only from the
//!   first missed block on.
//! - vmm: the unit is a physical page. With the token-major layout a 2 MiB page holds whole
//!   blocks of all layers (16 tokens of every layer for Llama-3-8B), so a block is a page and a
//!   hit is a `cuMemMap` of the cached page at the new slot's address. With the per-layer
//!   layout a page holds about a thousand tokens of one layer, so the block size of the index
//!   is the page's token count and a hit maps one page per layer region; the tail of the
//!   prompt inside a page is copied, as `KvSpace::share_prefix` does today.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};

/// The key of one full block of tokens: a 64-bit hash of its parent's key (none for a
/// sequence's first block), its token ids and, for a first block, the request's cache salt
/// (later blocks carry the salt through their parent's key, as vLLM's extra keys do).
///
/// Keys are stable within the process (std's `DefaultHasher` with its fixed keys), not across
/// Rust releases. Two different blocks may share a key (a collision); [`PrefixIndex`] compares
/// the blocks' contents, so a shared key costs a miss at worst, never a wrong hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(u64);

impl BlockKey {
    /// The key of the block of `tokens` that follows the block keyed `parent` (`None`: the
    /// first block of a sequence) in a request salted with `salt` (mixed into a first block's
    /// key only: the parent's key already carries it).
    pub fn new(parent: Option<BlockKey>, tokens: &[u32], salt: Option<&[u8]>) -> Self {
        let mut hasher = DefaultHasher::new();
        parent.hash(&mut hasher);
        tokens.hash(&mut hasher);
        if parent.is_none() {
            salt.hash(&mut hasher);
        }
        BlockKey(hasher.finish())
    }

    /// The 64 bits of the key.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// A key of chosen bits, to force collisions in tests.
    #[cfg(test)]
    pub(crate) fn from_raw(bits: u64) -> Self {
        BlockKey(bits)
    }
}

/// The keys of the full blocks of `tokens` in blocks of `block_size` tokens, salted with
/// `salt`, first block first. The partial last block has no key: only full blocks are cached.
/// A `block_size` of 0 has no blocks (an empty list).
pub fn block_keys(tokens: &[u32], block_size: usize, salt: Option<&[u8]>) -> Vec<BlockKey> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let key = BlockKey::new(parent, block, salt);
            parent = Some(key);
            key
        })
        .collect()
}

/// One cached block as a [`PrefixIndex`] knows it: its key and the version of its entry (a
/// block evicted and computed again is a new version). It is what a caller passes as the
/// `parent` of the next block it inserts, so that the index links the new block to exactly
/// the entry it was computed after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CachedBlock {
    key: BlockKey,
    version: u64,
}

impl CachedBlock {
    /// The block's key.
    pub fn key(self) -> BlockKey {
        self.key
    }
}

/// What [`PrefixIndex::lookup`] found: the units of the longest run of cached full blocks at
/// the start of the tokens, and the last of those blocks (the parent of the next one the
/// request inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixMatch<U> {
    /// The cached units, first block first.
    pub units: Vec<U>,
    /// The last matched block; `None` when nothing matched.
    pub last: Option<CachedBlock>,
}

impl<U> PrefixMatch<U> {
    /// Full blocks matched.
    pub fn blocks(&self) -> usize {
        self.units.len()
    }
}

/// What [`PrefixIndex::insert`] did with a block. Only the parent itself is checked: a block
/// inserted after a cached parent whose own ancestor is gone is cached, unreachable, and ages
/// out of the evictable queue like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted<U> {
    /// The caller's unit now caches the block.
    Cached(CachedBlock),
    /// An equal block (same tokens after the same parent, same salt) was already cached in
    /// `unit`; that entry is kept and the caller's unit stays uncached (the caller keeps using
    /// it: its block table is not rewritten).
    Duplicate { block: CachedBlock, unit: U },
    /// The parent is no longer cached (evicted or forgotten since the caller got it), so this
    /// block could never be found: it is not cached, and neither should the blocks after it be.
    ParentGone,
}

impl<U> Inserted<U> {
    /// The cached block to pass as the parent of the next insert: `None` after `ParentGone`.
    pub fn block(&self) -> Option<CachedBlock> {
        match *self {
            Inserted::Cached(block) | Inserted::Duplicate { block, .. } => Some(block),
            Inserted::ParentGone => None,
        }
    }
}

/// The counters of a [`PrefixIndex`], for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PrefixStats {
    /// Tokens looked up, as recorded by [`PrefixIndex::record_lookup`].
    pub queried_tokens: u64,
    /// Of those, tokens found cached.
    pub hit_tokens: u64,
    /// Units taken back by [`PrefixIndex::evict`].
    pub evictions: u64,
    /// Units caching a block (referenced or not).
    pub cached_units: usize,
    /// Cached units nobody references: the evictable queue's length.
    pub evictable_units: usize,
}

/// Errors of the prefix index: a caller that broke its contract, or books found inconsistent
/// by [`PrefixIndex::audit`]. Units are named by their `Debug` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("a prefix index needs a block size > 0, found 0")]
    ZeroBlockSize,
    #[error("a cached block holds exactly {expected} tokens (the block size), found {found}")]
    BlockLength { expected: usize, found: usize },
    #[error("unit {unit} is already cached; expected a unit the index does not hold")]
    AlreadyCached { unit: String },
    #[error("unit {unit} is not cached; expected a unit the index holds")]
    NotCached { unit: String },
    #[error(
        "unit {unit} is already evictable; expected a cached unit with holders (released twice?)"
    )]
    AlreadyEvictable { unit: String },
    #[error("unit {unit} is in two entries: under key {first:?} and under key {second:?}")]
    UnitInTwoEntries {
        unit: String,
        first: BlockKey,
        second: BlockKey,
    },
    #[error(
        "the entry under key {key:?} holds unit {unit}, but the unit map has {found:?} for it"
    )]
    UnitMapMismatch {
        unit: String,
        key: BlockKey,
        found: Option<BlockKey>,
    },
    #[error("the unit map holds {found} units but {expected} entries exist")]
    UnitMapSize { expected: usize, found: usize },
    #[error("unit {unit} is on the evictable queue but no entry holds it")]
    EvictableWithoutEntry { unit: String },
    #[error("unit {unit} is on the evictable queue at position {found} but its entry says {expected:?} (queued twice?)")]
    QueuePosition {
        unit: String,
        expected: Option<u64>,
        found: u64,
    },
    #[error("{expected} entries are marked evictable but the queue holds {found} units")]
    QueueSize { expected: usize, found: usize },
    #[error("an entry under key {found:?} of {tokens} tokens hashes to {expected:?} (block size {block_size})")]
    WrongKey {
        expected: BlockKey,
        found: BlockKey,
        tokens: usize,
        block_size: usize,
    },
    #[error("two entries under key {key:?} have version {version}")]
    VersionTwice { key: BlockKey, version: u64 },
}

fn name<U: Debug>(unit: U) -> String {
    format!("{unit:?}")
}

/// How an index computes keys: [`BlockKey::new`], or a degenerate function in tests.
type KeyFn = fn(Option<BlockKey>, &[u32], Option<&[u8]>) -> BlockKey;

/// One cached block.
#[derive(Debug, Clone)]
struct Entry<U> {
    unit: U,
    version: u64,
    /// The entry this block was computed after; `None` for a first block.
    parent: Option<CachedBlock>,
    tokens: Box<[u32]>,
    /// The salt of a first block (later blocks inherit it through `parent`).
    salt: Option<Box<[u8]>>,
    /// The unit's position in the evictable queue, when nobody references it.
    queued: Option<u64>,
}

impl<U> Entry<U> {
    /// Whether this entry caches `tokens` computed after `parent` in a request salted `salt`.
    fn holds(&self, parent: Option<CachedBlock>, tokens: &[u32], salt: Option<&[u8]>) -> bool {
        self.parent == parent
            && *self.tokens == *tokens
            && (parent.is_some() || self.salt.as_deref() == salt)
    }
}

/// The prefix-cache index over units `U` (see the module docs): cached full blocks by key, and
/// the LRU queue of cached units nobody references.
#[derive(Debug, Clone)]
pub struct PrefixIndex<U> {
    block_size: usize,
    key_of: KeyFn,
    /// Entries by key; a bucket holds more than one entry only when keys collide or an evicted
    /// parent left a child behind.
    entries: HashMap<BlockKey, Vec<Entry<U>>>,
    /// The entry of every cached unit.
    units: HashMap<U, CachedBlock>,
    /// Evictable units by queue position, least recently released first.
    queue: BTreeMap<u64, U>,
    next_version: u64,
    next_position: u64,
    queried_tokens: u64,
    hit_tokens: u64,
    evictions: u64,
}

impl<U: Copy + Eq + Hash + Debug> PrefixIndex<U> {
    /// An empty index of blocks of `block_size` tokens.
    pub fn new(block_size: usize) -> Result<Self, PrefixError> {
        Self::with_keys(block_size, BlockKey::new)
    }

    /// An empty index whose keys come from `key_of` (tests force collisions with it).
    fn with_keys(block_size: usize, key_of: KeyFn) -> Result<Self, PrefixError> {
        if block_size == 0 {
            return Err(PrefixError::ZeroBlockSize);
        }
        Ok(PrefixIndex {
            block_size,
            key_of,
            entries: HashMap::new(),
            units: HashMap::new(),
            queue: BTreeMap::new(),
            next_version: 0,
            next_position: 0,
            queried_tokens: 0,
            hit_tokens: 0,
            evictions: 0,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Units caching a block.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether no block is cached.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// Whether `unit` caches a block.
    pub fn is_cached(&self, unit: U) -> bool {
        self.units.contains_key(&unit)
    }

    /// Whether `unit` caches a block and nobody references it (it is on the evictable queue).
    pub fn is_evictable(&self, unit: U) -> bool {
        self.entry_of(unit).is_some_and(|e| e.queued.is_some())
    }

    /// The counters.
    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            queried_tokens: self.queried_tokens,
            hit_tokens: self.hit_tokens,
            evictions: self.evictions,
            cached_units: self.units.len(),
            evictable_units: self.queue.len(),
        }
    }

    fn entry(&self, block: CachedBlock) -> Option<&Entry<U>> {
        self.entries
            .get(&block.key)?
            .iter()
            .find(|e| e.version == block.version)
    }

    fn entry_mut(&mut self, block: CachedBlock) -> Option<&mut Entry<U>> {
        self.entries
            .get_mut(&block.key)?
            .iter_mut()
            .find(|e| e.version == block.version)
    }

    fn entry_of(&self, unit: U) -> Option<&Entry<U>> {
        self.entry(*self.units.get(&unit)?)
    }

    /// The units of the longest run of cached full blocks at the start of `tokens` in a request
    /// salted `salt`: it stops at the first block not cached, and never looks at the partial
    /// last block. Changes nothing (count the lookup with [`PrefixIndex::record_lookup`]).
    pub fn lookup(&self, tokens: &[u32], salt: Option<&[u8]>) -> PrefixMatch<U> {
        let mut found = PrefixMatch {
            units: Vec::new(),
            last: None,
        };
        for block in tokens.chunks_exact(self.block_size) {
            let parent = found.last;
            let key = (self.key_of)(parent.map(CachedBlock::key), block, salt);
            let Some(entry) = self
                .entries
                .get(&key)
                .and_then(|bucket| bucket.iter().find(|e| e.holds(parent, block, salt)))
            else {
                break;
            };
            found.units.push(entry.unit);
            found.last = Some(CachedBlock {
                key,
                version: entry.version,
            });
        }
        found
    }

    /// Count a lookup whose result was used: `queried_tokens` looked up, `hit_tokens` found. The
    /// scheduler counts a request once, when it admits it (a request waiting for memory is
    /// looked up again every step and would otherwise count again).
    pub fn record_lookup(&mut self, queried_tokens: usize, hit_tokens: usize) {
        self.queried_tokens += queried_tokens as u64;
        self.hit_tokens += hit_tokens as u64;
    }

    /// Record that `unit` holds the block of `block_tokens` that follows `parent` (`None`: the
    /// first block of a request) in a request salted `salt`, now that the block is full and
    /// computed. The unit starts referenced (its request holds it). If an equal block is already
    /// cached the existing entry stays and the caller's unit stays uncached
    /// ([`Inserted::Duplicate`]); if `parent` is no longer cached nothing is recorded
    /// ([`Inserted::ParentGone`]). `parent` must be what the index returned for the previous
    /// block of the same request (from [`PrefixIndex::lookup`] or an earlier insert).
    ///
    /// Errors, changing nothing: `block_tokens` is not one block, or `unit` is already cached.
    pub fn insert(
        &mut self,
        parent: Option<CachedBlock>,
        block_tokens: &[u32],
        salt: Option<&[u8]>,
        unit: U,
    ) -> Result<Inserted<U>, PrefixError> {
        if block_tokens.len() != self.block_size {
            return Err(PrefixError::BlockLength {
                expected: self.block_size,
                found: block_tokens.len(),
            });
        }
        if self.units.contains_key(&unit) {
            return Err(PrefixError::AlreadyCached { unit: name(unit) });
        }
        if parent.is_some_and(|p| self.entry(p).is_none()) {
            return Ok(Inserted::ParentGone);
        }
        let key = (self.key_of)(parent.map(CachedBlock::key), block_tokens, salt);
        let bucket = self.entries.entry(key).or_default();
        if let Some(existing) = bucket.iter().find(|e| e.holds(parent, block_tokens, salt)) {
            return Ok(Inserted::Duplicate {
                block: CachedBlock {
                    key,
                    version: existing.version,
                },
                unit: existing.unit,
            });
        }
        let block = CachedBlock {
            key,
            version: self.next_version,
        };
        self.next_version += 1;
        bucket.push(Entry {
            unit,
            version: block.version,
            parent,
            tokens: block_tokens.into(),
            salt: if parent.is_none() {
                salt.map(Into::into)
            } else {
                None
            },
            queued: None,
        });
        self.units.insert(unit, block);
        Ok(Inserted::Cached(block))
    }

    /// A hit took a reference to `unit`: it is no longer evictable (a no-op when it already had
    /// holders). Errors, changing nothing, when `unit` is not cached.
    pub fn acquire(&mut self, unit: U) -> Result<(), PrefixError> {
        let block = *self
            .units
            .get(&unit)
            .ok_or_else(|| PrefixError::NotCached { unit: name(unit) })?;
        let entry = self.entry_mut(block).expect("a cached unit has an entry");
        if let Some(position) = entry.queued.take() {
            self.queue.remove(&position);
        }
        Ok(())
    }

    /// A request finished (or was preempted) and the allocator dropped the reference counts of
    /// these cached `units` to 0: they become evictable. `units` are in the request's order,
    /// first block first; they enter the queue last block first, so a request's tail is evicted
    /// before its head, and after every unit released earlier (older requests' go first).
    /// Units that are not cached are not the index's business: the caller frees them.
    ///
    /// Errors, changing nothing: a unit is not cached, or already evictable (or listed twice).
    pub fn release(&mut self, units: &[U]) -> Result<(), PrefixError> {
        let mut seen = HashSet::with_capacity(units.len());
        for &unit in units {
            let entry = self
                .entry_of(unit)
                .ok_or_else(|| PrefixError::NotCached { unit: name(unit) })?;
            if entry.queued.is_some() || !seen.insert(unit) {
                return Err(PrefixError::AlreadyEvictable { unit: name(unit) });
            }
        }
        for &unit in units.iter().rev() {
            let position = self.next_position;
            self.next_position += 1;
            let block = self.units[&unit];
            self.entry_mut(block).expect("checked above").queued = Some(position);
            self.queue.insert(position, unit);
        }
        Ok(())
    }

    /// Take back the least recently released evictable unit and forget its block (its key no
    /// longer hits, and the blocks cached after it become unreachable); the caller reuses the
    /// unit. `None` when nothing is evictable.
    pub fn evict(&mut self) -> Option<U> {
        let (_, unit) = self.queue.pop_first()?;
        self.remove(unit);
        self.evictions += 1;
        Some(unit)
    }

    /// Drop the block `unit` caches, evictable or referenced, because the caller reuses the unit
    /// for other data. Returns whether it was cached.
    pub fn forget(&mut self, unit: U) -> bool {
        let cached = self.units.contains_key(&unit);
        if cached {
            self.remove(unit);
        }
        cached
    }

    /// Remove `unit`'s entry (which must exist) and its queue position.
    fn remove(&mut self, unit: U) {
        let block = self.units.remove(&unit).expect("a cached unit");
        let bucket = self.entries.get_mut(&block.key).expect("its bucket");
        let at = bucket
            .iter()
            .position(|e| e.version == block.version)
            .expect("its entry");
        let entry = bucket.swap_remove(at);
        if bucket.is_empty() {
            self.entries.remove(&block.key);
        }
        if let Some(position) = entry.queued {
            self.queue.remove(&position);
        }
    }

    /// Check the books (see the module docs): every entry's unit maps back to it and to no other
    /// entry; every entry holds one block under the key it hashes to; versions are unique per
    /// key; every evictable unit has an entry that knows its queue position; nothing is queued
    /// twice.
    pub fn audit(&self) -> Result<(), PrefixError> {
        let mut entries = 0;
        let mut queued = 0;
        let mut owner: HashMap<U, BlockKey> = HashMap::new();
        for (&key, bucket) in &self.entries {
            let mut versions = HashSet::new();
            for e in bucket {
                entries += 1;
                queued += usize::from(e.queued.is_some());
                if !versions.insert(e.version) {
                    return Err(PrefixError::VersionTwice {
                        key,
                        version: e.version,
                    });
                }
                let expected =
                    (self.key_of)(e.parent.map(CachedBlock::key), &e.tokens, e.salt.as_deref());
                if e.tokens.len() != self.block_size || expected != key {
                    return Err(PrefixError::WrongKey {
                        expected,
                        found: key,
                        tokens: e.tokens.len(),
                        block_size: self.block_size,
                    });
                }
                if let Some(first) = owner.insert(e.unit, key) {
                    return Err(PrefixError::UnitInTwoEntries {
                        unit: name(e.unit),
                        first,
                        second: key,
                    });
                }
                let mapped = self.units.get(&e.unit);
                if mapped
                    != Some(&CachedBlock {
                        key,
                        version: e.version,
                    })
                {
                    return Err(PrefixError::UnitMapMismatch {
                        unit: name(e.unit),
                        key,
                        found: mapped.map(|b| b.key),
                    });
                }
            }
        }
        if self.units.len() != entries {
            return Err(PrefixError::UnitMapSize {
                expected: entries,
                found: self.units.len(),
            });
        }
        for (&position, &unit) in &self.queue {
            let entry = self
                .entry_of(unit)
                .ok_or_else(|| PrefixError::EvictableWithoutEntry { unit: name(unit) })?;
            if entry.queued != Some(position) {
                return Err(PrefixError::QueuePosition {
                    unit: name(unit),
                    expected: entry.queued,
                    found: position,
                });
            }
        }
        if self.queue.len() != queued {
            return Err(PrefixError::QueueSize {
                expected: queued,
                found: self.queue.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
        fn find(
            &self,
            parent: Option<usize>,
            tokens: &[u32],
            salt: Option<&[u8]>,
        ) -> Option<usize> {
            self.entries.iter().position(|e| {
                e.alive
                    && e.parent == parent
                    && e.tokens == tokens
                    && (parent.is_some() || e.salt.as_deref() == salt)
            })
        }

        fn lookup(
            &self,
            tokens: &[u32],
            bs: usize,
            salt: Option<&[u8]>,
        ) -> (Vec<u32>, Option<usize>) {
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
                    let needed =
                        (req.tokens.len() + more.len()).div_ceil(self.bs) - req.units.len();
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
}
