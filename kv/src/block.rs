//! The paged KV allocator: a pool of `num_blocks` blocks of `block_size` tokens, handed out one
//! at a time and reference-counted, and per-sequence block tables (vLLM's `BlockAllocator` and
//! `BlockSpaceManager`; mistral.rs's `paged_attention/block_pool.rs` follows the same scheme).
//!
//! Invariants (property-tested below): every block is exactly one of *held* (a reference count
//! equal to the number of tables that hold it), *free* (on the free list, once) or *kept*
//! (held by nobody yet off the free list: its bytes hold a block the prefix cache may hand out
//! again); a table holding `n` tokens holds exactly `ceil(n / block_size)` blocks; a failed
//! grow allocates nothing.
//!
//! Kept blocks are the allocator's side of automatic prefix caching (`paged.rs`): a cached
//! block whose last holder lets go is kept ([`BlockAllocator::release_and_keep`]) instead of
//! freed, a prefix-cache hit gives it a holder again ([`BlockAllocator::revive`]), and when
//! memory runs out the cache evicts it and hands it back ([`BlockAllocator::reclaim`]).
//! [`BlockAllocator::allocate`] never takes a kept block: only the cache decides to evict.

use super::KvError;

/// The state of a block a caller's request did not expect (see [`KvError::BlockState`]).
fn state_of(alloc: &BlockAllocator, block: BlockId) -> String {
    match alloc.refs.get(block as usize) {
        None => format!("past the pool's {} blocks", alloc.refs.len()),
        Some(&r) if r > 0 => format!("held by {r}"),
        Some(_) if alloc.kept[block as usize] => "kept".into(),
        Some(_) => "free".into(),
    }
}

/// Index of a physical KV block.
pub type BlockId = u32;

/// A pool of fixed-size KV blocks (see the module docs).
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    free: Vec<BlockId>,
    refs: Vec<u32>,
    /// Blocks held by nobody and off the free list, kept for the prefix cache.
    kept: Vec<bool>,
    num_kept: usize,
}

impl BlockAllocator {
    /// `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        if block_size == 0 || num_blocks > u32::MAX as usize {
            return Err(KvError::InvalidConfig(format!(
                "block_size must be > 0 and num_blocks < 2^32, found {block_size} and {num_blocks}"
            )));
        }
        Ok(BlockAllocator {
            block_size,
            // Pop from the end: hand out low block numbers first.
            free: (0..num_blocks as BlockId).rev().collect(),
            refs: vec![0; num_blocks],
            kept: vec![false; num_blocks],
            num_kept: 0,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by nobody but kept off the free list for the prefix cache.
    pub fn num_kept(&self) -> usize {
        self.num_kept
    }

    /// Whether `block` is kept (held by nobody, off the free list).
    pub fn is_kept(&self, block: BlockId) -> bool {
        self.kept.get(block as usize).copied().unwrap_or(false)
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Take a free block (reference count 1).
    pub fn allocate(&mut self) -> Result<BlockId, KvError> {
        let block = self.free.pop().ok_or(KvError::OutOfBlocks {
            needed: 1,
            free: 0,
            total: self.num_blocks(),
        })?;
        self.refs[block as usize] = 1;
        Ok(block)
    }

    /// Add a holder to an allocated block (a second sequence sharing it).
    pub fn retain(&mut self, block: BlockId) -> Result<(), KvError> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(KvError::NotAllocated {
                what: format!("block {block}"),
            }),
        }
    }

    /// Drop a holder; the block is free again when none is left.
    pub fn release(&mut self, block: BlockId) -> Result<(), KvError> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                if *r == 0 {
                    self.free.push(block);
                }
                Ok(())
            }
            _ => Err(KvError::NotAllocated {
                what: format!("block {block}"),
            }),
        }
    }

    /// Drop a holder of a block the prefix cache holds: when none is left the block is *kept*
    /// (not put on the free list: its bytes stay for a later hit) and `true` is returned.
    pub fn release_and_keep(&mut self, block: BlockId) -> Result<bool, KvError> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                let last = *r == 0;
                if last {
                    self.kept[block as usize] = true;
                    self.num_kept += 1;
                }
                Ok(last)
            }
            _ => Err(KvError::BlockState {
                block,
                expected: "held",
                found: state_of(self, block),
            }),
        }
    }

    /// Give a kept block a holder again (a prefix-cache hit on it): reference count 1.
    pub fn revive(&mut self, block: BlockId) -> Result<(), KvError> {
        self.unkeep(block)?;
        self.refs[block as usize] = 1;
        Ok(())
    }

    /// Put a kept block back on the free list (the prefix cache evicted it).
    pub fn reclaim(&mut self, block: BlockId) -> Result<(), KvError> {
        self.unkeep(block)?;
        self.free.push(block);
        Ok(())
    }

    fn unkeep(&mut self, block: BlockId) -> Result<(), KvError> {
        if !self.is_kept(block) {
            return Err(KvError::BlockState {
                block,
                expected: "kept",
                found: state_of(self, block),
            });
        }
        self.kept[block as usize] = false;
        self.num_kept -= 1;
        Ok(())
    }

    /// Holders of `block` (0 when free).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// Check the books against the tables that hold blocks: every block's reference count is
    /// the number of tables holding it, and every block nobody holds is either free (once) or
    /// kept, never both.
    pub fn audit<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a BlockTable>,
    ) -> Result<(), KvError> {
        let mut holders = vec![0u32; self.refs.len()];
        for table in tables {
            if table.blocks.len() != self.blocks_for(table.tokens) {
                return Err(KvError::Inconsistent(format!(
                    "a table of {} tokens holds {} blocks of {}",
                    table.tokens,
                    table.blocks.len(),
                    self.block_size
                )));
            }
            for &b in &table.blocks {
                match holders.get_mut(b as usize) {
                    Some(h) => *h += 1,
                    None => {
                        return Err(KvError::Inconsistent(format!(
                            "block {b} is past the pool's {} blocks",
                            self.refs.len()
                        )))
                    }
                }
            }
        }
        if let Some(b) = (0..self.refs.len()).find(|&b| holders[b] != self.refs[b]) {
            return Err(KvError::Inconsistent(format!(
                "block {b} is held by {} tables but its reference count is {}",
                holders[b], self.refs[b]
            )));
        }
        let mut free = vec![false; self.refs.len()];
        for &b in &self.free {
            let b = b as usize;
            if b >= free.len()
                || std::mem::replace(&mut free[b], true)
                || self.refs[b] != 0
                || self.kept[b]
            {
                return Err(KvError::Inconsistent(format!(
                    "block {b} is on the free list twice, past the pool, still held or kept"
                )));
            }
        }
        let kept = self.kept.iter().filter(|&&k| k).count();
        if kept != self.num_kept {
            return Err(KvError::Inconsistent(format!(
                "{kept} blocks are marked kept but the count says {}",
                self.num_kept
            )));
        }
        if let Some(b) = (0..self.refs.len()).find(|&b| self.kept[b] && self.refs[b] != 0) {
            return Err(KvError::Inconsistent(format!(
                "block {b} is kept but held by {}",
                self.refs[b]
            )));
        }
        let unheld = self.refs.iter().filter(|&&r| r == 0).count();
        if unheld != self.free.len() + kept {
            return Err(KvError::Inconsistent(format!(
                "{unheld} blocks are held by nobody but {} are free and {kept} kept",
                self.free.len()
            )));
        }
        Ok(())
    }
}

/// One sequence's blocks, in logical order, and the tokens they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    tokens: usize,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Tokens the table holds.
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Hold `tokens` tokens (never fewer than now), allocating the blocks that needs. Either all
    /// needed blocks are allocated or none (and `OutOfBlocks` says how many were missing).
    /// Returns the number of blocks allocated.
    pub fn grow_to(&mut self, tokens: usize, alloc: &mut BlockAllocator) -> Result<usize, KvError> {
        let tokens = tokens.max(self.tokens);
        let needed = alloc.blocks_for(tokens).saturating_sub(self.blocks.len());
        if needed > alloc.num_free() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: alloc.num_free(),
                total: alloc.num_blocks(),
            });
        }
        for _ in 0..needed {
            self.blocks.push(alloc.allocate()?);
        }
        self.tokens = tokens;
        Ok(needed)
    }

    /// A new table holding the first `tokens` tokens of this one (a fork: a second sample of
    /// the same prompt, a beam, a cached prefix). Whole blocks are shared — one more holder
    /// each — and when `tokens` ends inside a block, a fresh block takes that last part; the
    /// pair `(from, to)` returned beside the table names the block whose bytes the caller must
    /// copy (copy-on-write, done at the fork because the shared block would be written next).
    /// All or nothing: on `OutOfBlocks` no reference count changed.
    pub fn fork(
        &self,
        tokens: usize,
        alloc: &mut BlockAllocator,
    ) -> Result<(BlockTable, Option<(BlockId, BlockId)>), KvError> {
        if tokens > self.tokens {
            return Err(KvError::NotAllocated {
                what: format!(
                    "tokens {}..{tokens} of a table holding {}",
                    self.tokens, self.tokens
                ),
            });
        }
        let whole = tokens / alloc.block_size();
        let partial = !tokens.is_multiple_of(alloc.block_size());
        if partial && alloc.num_free() == 0 {
            return Err(KvError::OutOfBlocks {
                needed: 1,
                free: 0,
                total: alloc.num_blocks(),
            });
        }
        let mut blocks = Vec::with_capacity(whole + usize::from(partial));
        for &b in &self.blocks[..whole] {
            alloc.retain(b)?;
            blocks.push(b);
        }
        let copy = if partial {
            let fresh = alloc.allocate()?;
            blocks.push(fresh);
            Some((self.blocks[whole], fresh))
        } else {
            None
        };
        Ok((BlockTable { blocks, tokens }, copy))
    }

    /// Append a whole block another holder computed (a prefix-cache hit), with one more
    /// reference — reviving it when it was kept, which the returned `true` says. Only a table
    /// ending on a block boundary can take one; its length grows by a block.
    pub fn push_shared(
        &mut self,
        block: BlockId,
        alloc: &mut BlockAllocator,
    ) -> Result<bool, KvError> {
        if !self.tokens.is_multiple_of(alloc.block_size()) {
            return Err(KvError::Inconsistent(format!(
                "a shared block can follow only whole blocks, but the table holds {} tokens of blocks of {}",
                self.tokens,
                alloc.block_size()
            )));
        }
        let revived = alloc.is_kept(block);
        if revived {
            alloc.revive(block)?;
        } else {
            alloc.retain(block)?;
        }
        self.blocks.push(block);
        self.tokens += alloc.block_size();
        Ok(revived)
    }

    /// Give every block back, keeping (off the free list) the last-held ones `cached` says the
    /// prefix cache holds; returns those, in the table's order. The table is empty afterwards.
    pub fn release_keeping(
        &mut self,
        alloc: &mut BlockAllocator,
        cached: impl Fn(BlockId) -> bool,
    ) -> Result<Vec<BlockId>, KvError> {
        let mut kept = Vec::new();
        for block in self.blocks.drain(..) {
            if cached(block) {
                if alloc.release_and_keep(block)? {
                    kept.push(block);
                }
            } else {
                alloc.release(block)?;
            }
        }
        self.tokens = 0;
        Ok(kept)
    }

    /// Give every block back; the table is empty afterwards.
    pub fn release(&mut self, alloc: &mut BlockAllocator) -> Result<(), KvError> {
        for block in self.blocks.drain(..) {
            alloc.release(block)?;
        }
        self.tokens = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn blocks_are_allocated_as_tokens_arrive() {
        let mut alloc = BlockAllocator::new(4, 16).unwrap();
        let mut t = BlockTable::new();
        assert_eq!(t.grow_to(1, &mut alloc).unwrap(), 1);
        assert_eq!(t.grow_to(16, &mut alloc).unwrap(), 0);
        assert_eq!(t.grow_to(17, &mut alloc).unwrap(), 1);
        assert_eq!(t.grow_to(5, &mut alloc).unwrap(), 0, "never shrinks");
        assert_eq!((t.len(), t.blocks().len(), alloc.num_free()), (17, 2, 2));
        let err = t.grow_to(100, &mut alloc).unwrap_err();
        assert!(matches!(
            err,
            KvError::OutOfBlocks {
                needed: 5,
                free: 2,
                total: 4
            }
        ));
        assert_eq!(alloc.num_free(), 2, "a failed grow allocates nothing");
        t.release(&mut alloc).unwrap();
        assert_eq!(alloc.num_free(), 4);
        assert!(alloc.release(0).is_err(), "double free is an error");
        assert!(BlockAllocator::new(4, 0).is_err());
    }

    #[test]
    fn shared_blocks_are_freed_by_their_last_holder() {
        let mut alloc = BlockAllocator::new(2, 16).unwrap();
        let b = alloc.allocate().unwrap();
        alloc.retain(b).unwrap();
        alloc.release(b).unwrap();
        assert_eq!((alloc.ref_count(b), alloc.num_free()), (1, 1));
        alloc.release(b).unwrap();
        assert_eq!((alloc.ref_count(b), alloc.num_free()), (0, 2));
        assert!(alloc.retain(b).is_err());
    }

    #[test]
    fn a_kept_block_is_off_the_free_list_until_revived_or_reclaimed() {
        let mut alloc = BlockAllocator::new(3, 4).unwrap();
        let mut t = BlockTable::new();
        t.grow_to(8, &mut alloc).unwrap();
        let [a, b] = [t.blocks()[0], t.blocks()[1]];
        let kept = t.release_keeping(&mut alloc, |x| x == a).unwrap();
        assert_eq!(kept, [a]);
        assert_eq!((alloc.num_free(), alloc.num_kept()), (2, 1));
        assert!(alloc.is_kept(a) && !alloc.is_kept(b));
        alloc.audit([&t]).unwrap();
        assert!(
            alloc.retain(a).is_err(),
            "a kept block is revived, not retained"
        );
        let err = alloc.revive(b).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("block {b} is free; expected a block kept")
        );
        // Allocation takes only free blocks.
        let mut u = BlockTable::new();
        u.grow_to(8, &mut alloc).unwrap();
        assert!(!u.blocks().contains(&a));
        assert!(u.grow_to(9, &mut alloc).is_err());
        let mut hit = BlockTable::new();
        assert!(hit.push_shared(a, &mut alloc).unwrap(), "revived");
        assert_eq!((alloc.ref_count(a), alloc.num_kept(), hit.len()), (1, 0, 4));
        alloc.audit([&u, &hit]).unwrap();
        assert_eq!(hit.release_keeping(&mut alloc, |_| true).unwrap(), [a]);
        alloc.reclaim(a).unwrap();
        assert!(alloc.reclaim(a).is_err());
        u.release(&mut alloc).unwrap();
        assert_eq!(alloc.num_free(), 3);
        alloc.audit([]).unwrap();
    }

    proptest! {
        #[test]
        fn random_grows_and_releases_keep_every_block_accounted(
            num_blocks in 1..64usize,
            block_size in 1..33usize,
            ops in proptest::collection::vec((0..6usize, 0..400usize, 0..6u8, 0..6usize), 1..200),
        ) {
            // Blocks of even number stand for blocks the prefix cache holds.
            let cached = |b: BlockId| b.is_multiple_of(2);
            let mut alloc = BlockAllocator::new(num_blocks, block_size).unwrap();
            let mut tables = vec![BlockTable::new(); 6];
            for (i, tokens, op, from) in ops {
                let before = (tables[i].clone(), alloc.num_free());
                match op {
                    0 => tables[i].release(&mut alloc).unwrap(),
                    // Fork a prefix of another table into this one (released first).
                    1 if from != i => {
                        tables[i].release(&mut alloc).unwrap();
                        let n = tokens.min(tables[from].len());
                        let free = alloc.num_free();
                        match tables[from].fork(n, &mut alloc) {
                            Ok((t, copy)) => {
                                prop_assert_eq!(t.len(), n);
                                prop_assert_eq!(copy.is_some(), n % block_size != 0);
                                tables[i] = t;
                            }
                            Err(_) => prop_assert_eq!(alloc.num_free(), free),
                        }
                    }
                    // Finish keeping the cached blocks.
                    3 => {
                        let kept = tables[i].release_keeping(&mut alloc, cached).unwrap();
                        for &b in &kept {
                            prop_assert!(cached(b) && alloc.is_kept(b) && alloc.ref_count(b) == 0);
                        }
                    }
                    // The cache evicts a kept block.
                    4 => {
                        let kept: Vec<BlockId> =
                            (0..num_blocks as BlockId).filter(|&b| alloc.is_kept(b)).collect();
                        if !kept.is_empty() {
                            let free = alloc.num_free();
                            alloc.reclaim(kept[from % kept.len()]).unwrap();
                            prop_assert_eq!(alloc.num_free(), free + 1);
                        } else {
                            prop_assert!(alloc.reclaim(from as BlockId).is_err());
                        }
                    }
                    // A hit on a kept or held block appends it to a table on a block boundary.
                    5 => {
                        let b = (tokens % num_blocks) as BlockId;
                        let usable = alloc.is_kept(b) || alloc.ref_count(b) > 0;
                        let aligned = tables[i].len().is_multiple_of(block_size);
                        let held = alloc.ref_count(b);
                        if tables[i].blocks().contains(&b) {
                            continue;
                        }
                        match tables[i].push_shared(b, &mut alloc) {
                            Ok(revived) => {
                                prop_assert!(usable && aligned);
                                prop_assert_eq!(revived, held == 0);
                                prop_assert_eq!(alloc.ref_count(b), held + 1);
                            }
                            Err(_) => {
                                prop_assert!(!usable || !aligned);
                                prop_assert_eq!(alloc.ref_count(b), held);
                            }
                        }
                    }
                    _ => {
                        // Growing a table that shares a block it would write is the caller's
                        // mistake (a fork copies the partial block), so grow only whole ones.
                        if tables[i].grow_to(tokens, &mut alloc).is_err() {
                            prop_assert_eq!((tables[i].clone(), alloc.num_free()), before);
                        }
                    }
                }
                let mut holders: HashMap<BlockId, u32> = HashMap::new();
                for t in &tables {
                    prop_assert_eq!(t.blocks().len(), t.len().div_ceil(block_size));
                    for &b in t.blocks() {
                        *holders.entry(b).or_default() += 1;
                    }
                }
                for (&b, &n) in &holders {
                    prop_assert_eq!(alloc.ref_count(b), n, "block {}", b);
                }
                prop_assert_eq!(alloc.num_free() + alloc.num_kept() + holders.len(), num_blocks);
                prop_assert!(alloc.audit(&tables).is_ok());
            }
            for t in &mut tables {
                t.release(&mut alloc).unwrap();
            }
            for b in 0..num_blocks as BlockId {
                if alloc.is_kept(b) {
                    alloc.reclaim(b).unwrap();
                }
            }
            prop_assert_eq!(alloc.num_free(), num_blocks);
            prop_assert!(alloc.audit(&tables).is_ok());
        }
    }
}
