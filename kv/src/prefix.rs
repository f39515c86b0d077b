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
//! cache hands out: a paged [`BlockId`](crate::BlockId), or the vmm cache's unit of pages
//! (named by its first page's handle).
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
//! # How the two KV modes use it
//!
//! - paged: the unit is a block ([`BlockId`](crate::BlockId)); a hit is a block-table entry
//!   holding the cached block (one more reference), and the request computes only from the
//!   first missed block on.
//! - vmm (`vmm.rs`): the unit is a page row — the pages at one index of every region. With the
//!   token-major layout a 2 MiB page holds all layers of a few tokens (16 for Llama-3-8B), so a
//!   block is a page and a hit is a `cuMemMap` of the cached page at the new slot's address.
//!   With the per-layer layout a page holds about a thousand tokens of one layer, so the block
//!   size of the index is the page's token count and a hit maps one page per layer region. A
//!   page that holds no whole number of tokens makes the unit the fewest pages that do. The
//!   tail of the prompt past the last full unit is computed by the request itself.

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

    /// Take back a lookup [`PrefixIndex::record_lookup`] counted, whose request was not
    /// admitted after all (it will be looked up again).
    pub fn retract_lookup(&mut self, queried_tokens: usize, hit_tokens: usize) {
        self.queried_tokens = self.queried_tokens.saturating_sub(queried_tokens as u64);
        self.hit_tokens = self.hit_tokens.saturating_sub(hit_tokens as u64);
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
#[path = "prefix_tests.rs"]
mod tests;
