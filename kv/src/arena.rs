//! `ContiguousArena`: first-fit allocation of contiguous ranges inside `[0, capacity)`, with
//! coalescing of freed neighbours — the allocator of an engine that gives each request one
//! contiguous KV reservation (FasterTransformer, Orca). Units are the caller's (tokens in
//! `vkv frag`). Its waste is what PagedAttention removed: reservations sized before the output
//! length is known, and external fragmentation — free memory split into holes too small to use.
//!
//! Invariants (property-tested below): holes and allocations never overlap and together cover
//! the arena; no two holes touch (they are coalesced).

use std::collections::{BTreeMap, HashMap};

use super::KvError;

/// A first-fit arena of contiguous ranges (see the module docs).
#[derive(Debug, Clone)]
pub struct ContiguousArena {
    capacity: usize,
    /// Free holes: start → length.
    holes: BTreeMap<usize, usize>,
    /// Allocations: start → length.
    allocated: HashMap<usize, usize>,
}

impl ContiguousArena {
    pub fn new(capacity: usize) -> Self {
        let mut holes = BTreeMap::new();
        if capacity > 0 {
            holes.insert(0, capacity);
        }
        ContiguousArena {
            capacity,
            holes,
            allocated: HashMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Units free in all holes.
    pub fn free_total(&self) -> usize {
        self.holes.values().sum()
    }

    /// The largest single allocation that would succeed now.
    pub fn largest_hole(&self) -> usize {
        self.holes.values().copied().max().unwrap_or(0)
    }

    /// Allocate `len` contiguous units at the lowest address that fits; returns the start.
    pub fn allocate(&mut self, len: usize) -> Result<usize, KvError> {
        let found = self
            .holes
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&s, &l)| (s, l));
        let Some((start, hole)) = found.filter(|_| len > 0) else {
            return Err(KvError::NoContiguousSpace {
                len,
                free: self.free_total(),
                largest_hole: self.largest_hole(),
            });
        };
        self.holes.remove(&start);
        if hole > len {
            self.holes.insert(start + len, hole - len);
        }
        self.allocated.insert(start, len);
        Ok(start)
    }

    /// Free the allocation starting at `start`, merging it with free neighbours.
    pub fn free(&mut self, start: usize) -> Result<(), KvError> {
        let Some(mut len) = self.allocated.remove(&start) else {
            return Err(KvError::NotAllocated {
                what: format!("arena range at {start}"),
            });
        };
        let mut start = start;
        if let Some((&prev, &plen)) = self.holes.range(..start).next_back() {
            if prev + plen == start {
                self.holes.remove(&prev);
                start = prev;
                len += plen;
            }
        }
        if let Some(next_len) = self.holes.remove(&(start + len)) {
            len += next_len;
        }
        self.holes.insert(start, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn first_fit_leaves_holes_and_coalesces_them() {
        let mut a = ContiguousArena::new(100);
        let x = a.allocate(30).unwrap();
        let y = a.allocate(30).unwrap();
        let z = a.allocate(30).unwrap();
        assert_eq!((x, y, z), (0, 30, 60));
        a.free(y).unwrap();
        // 40 free but in two holes of 30 and 10: a request for 35 fails (external fragmentation).
        assert_eq!((a.free_total(), a.largest_hole()), (40, 30));
        assert!(matches!(
            a.allocate(35).unwrap_err(),
            KvError::NoContiguousSpace {
                len: 35,
                free: 40,
                largest_hole: 30
            }
        ));
        a.free(z).unwrap();
        assert_eq!(a.largest_hole(), 70, "the freed neighbours merged");
        a.free(x).unwrap();
        assert_eq!(a.largest_hole(), 100);
        assert!(a.free(x).is_err());
        assert!(a.allocate(0).is_err());
    }

    proptest! {
        #[test]
        fn holes_and_allocations_tile_the_arena(
            capacity in 1..500usize,
            ops in proptest::collection::vec((1..120usize, any::<bool>(), 0..50usize), 1..200),
        ) {
            let mut a = ContiguousArena::new(capacity);
            let mut live: Vec<usize> = Vec::new();
            for (len, free, pick) in ops {
                if free && !live.is_empty() {
                    let start = live.swap_remove(pick % live.len());
                    a.free(start).unwrap();
                } else if let Ok(start) = a.allocate(len) {
                    live.push(start);
                }
                let mut ranges: Vec<(usize, usize, bool)> = a.holes.iter().map(|(&s, &l)| (s, l, true)).collect();
                ranges.extend(a.allocated.iter().map(|(&s, &l)| (s, l, false)));
                ranges.sort();
                let mut at = 0;
                for w in ranges.windows(2) {
                    prop_assert!(!(w[0].2 && w[1].2 && w[0].0 + w[0].1 == w[1].0), "touching holes");
                }
                for (s, l, _) in ranges {
                    prop_assert_eq!(s, at, "gap or overlap");
                    at = s + l;
                }
                prop_assert_eq!(at, capacity);
            }
        }
    }
}
