//! The KV allocation policies of the fragmentation study, each a thin driver over the allocator
//! the engine itself uses — [`ContiguousArena`] for the Orca-style reservations, [`BlockAllocator`]
//! and [`BlockTable`] for paged, [`KvSpace`] on [`AccountingVmm`] for vmm — so what the study
//! measures is what those allocators do.
//!
//! Waste categories (as in Fig. 2 of the vLLM paper): **reserved** — memory set aside for tokens
//! the request has not produced yet but will; **internal** — memory a request holds that no token
//! of it will ever fill (the tail of a reservation beyond the final length, the unfilled part of
//! the last block or page); **external** — free memory in holes too small to be the next
//! allocation (only contiguous reservations have it; here: all free memory outside the largest
//! hole).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use vkv_vmm::{AccountingVmm, KvLayout, KvSpace, KvSpaceConfig, SlotId, VmmError};

use vkv_engine::kv::{BlockAllocator, BlockTable, ContiguousArena, KvError};
use vkv_engine::presets::KvShape;

/// How much a reservation policy sets aside for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reservation {
    /// The model's maximum length (Orca-Max).
    Max,
    /// The final length rounded up to a power of two (Orca-Pow2).
    Pow2,
    /// Exactly the final length, known in advance (Orca-Oracle).
    Oracle,
}

/// One allocation policy of the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// One contiguous reservation per request in a first-fit arena.
    Orca(Reservation),
    /// PagedAttention blocks of `block_size` tokens.
    Paged { block_size: usize },
    /// A vmm `KvSpace` with pages of `page_size` bytes.
    Vmm { layout: KvLayout, page_size: usize },
}

impl Policy {
    /// The policies the issue asks for: Orca-Max/Pow2/Oracle, paged 8–128, vmm per-layer 64 KiB
    /// and 2 MiB, vmm token-major 2 MiB.
    pub fn default_set() -> Vec<Policy> {
        let mut v = vec![
            Policy::Orca(Reservation::Max),
            Policy::Orca(Reservation::Pow2),
            Policy::Orca(Reservation::Oracle),
        ];
        v.extend([8, 16, 32, 64, 128].map(|block_size| Policy::Paged { block_size }));
        v.extend([
            Policy::Vmm {
                layout: KvLayout::PerLayer,
                page_size: 64 << 10,
            },
            Policy::Vmm {
                layout: KvLayout::PerLayer,
                page_size: 2 << 20,
            },
            Policy::Vmm {
                layout: KvLayout::TokenMajor,
                page_size: 2 << 20,
            },
        ]);
        v
    }

    /// Tokens one allocation unit holds for `shape` (block size; tokens per page and region).
    pub fn granule_tokens(&self, shape: &KvShape) -> Option<f64> {
        match *self {
            Policy::Orca(_) => None,
            Policy::Paged { block_size } => Some(block_size as f64),
            Policy::Vmm { layout, page_size } => {
                let per_region = match layout {
                    KvLayout::PerLayer => shape.bytes_per_token() / (2 * shape.num_layers),
                    KvLayout::TokenMajor => shape.bytes_per_token(),
                };
                Some(page_size as f64 / per_region as f64)
            }
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Policy::Orca(Reservation::Max) => write!(f, "orca-max"),
            Policy::Orca(Reservation::Pow2) => write!(f, "orca-pow2"),
            Policy::Orca(Reservation::Oracle) => write!(f, "orca-oracle"),
            Policy::Paged { block_size } => write!(f, "paged-{block_size}"),
            Policy::Vmm { layout, page_size } => {
                let size = if page_size % (1 << 20) == 0 {
                    format!("{}MiB", page_size >> 20)
                } else {
                    format!("{}KiB", page_size >> 10)
                };
                write!(f, "vmm-{layout}-{size}")
            }
        }
    }
}

/// A policy name [`Policy::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown policy {found:?}: expected orca-max, orca-pow2, orca-oracle, paged-N, \
     vmm-per-layer-SIZE or vmm-token-major-SIZE (SIZE like 64KiB, 2MiB)"
)]
pub struct PolicyParseError {
    /// The text given.
    pub found: String,
}

/// Why a policy driver failed (running out of memory is not an error: the driver says `false`).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The replay named a request the policy holds nothing for.
    #[error("unknown request {id}: expected a request admitted and not yet freed")]
    UnknownRequest { id: usize },
    /// The allocator under an Orca or paged policy refused for a reason other than memory.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The `KvSpace` under a vmm policy refused for a reason other than memory.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// Memory still held after every request finished (a leaked block, page or range).
    #[error("{bytes} B still allocated after every request finished, expected 0")]
    Leaked { bytes: usize },
}

impl FromStr for Policy {
    type Err = PolicyParseError;
    /// `orca-max`, `orca-pow2`, `orca-oracle`, `paged-N`, `vmm-per-layer-SIZE`,
    /// `vmm-token-major-SIZE` with SIZE like `64KiB` or `2MiB`.
    fn from_str(s: &str) -> Result<Self, PolicyParseError> {
        let bad = || PolicyParseError {
            found: s.to_string(),
        };
        let size = |t: &str| -> Result<usize, PolicyParseError> {
            let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
            let n: usize = n.parse().map_err(|_| bad())?;
            match unit {
                "KiB" => Ok(n << 10),
                "MiB" => Ok(n << 20),
                _ => Err(bad()),
            }
        };
        match s {
            "orca-max" => Ok(Policy::Orca(Reservation::Max)),
            "orca-pow2" => Ok(Policy::Orca(Reservation::Pow2)),
            "orca-oracle" => Ok(Policy::Orca(Reservation::Oracle)),
            _ => {
                if let Some(n) = s.strip_prefix("paged-") {
                    let block_size: usize = n.parse().map_err(|_| bad())?;
                    if block_size == 0 {
                        return Err(bad());
                    }
                    Ok(Policy::Paged { block_size })
                } else if let Some(t) = s.strip_prefix("vmm-per-layer-") {
                    Ok(Policy::Vmm {
                        layout: KvLayout::PerLayer,
                        page_size: size(t)?,
                    })
                } else if let Some(t) = s.strip_prefix("vmm-token-major-") {
                    Ok(Policy::Vmm {
                        layout: KvLayout::TokenMajor,
                        page_size: size(t)?,
                    })
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// Bytes of KV memory by what they hold, at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Composition {
    pub token_bytes: usize,
    pub reserved_bytes: usize,
    pub internal_bytes: usize,
    pub external_bytes: usize,
    /// Usable free memory (including vmm pages that hold no token and are reclaimed on demand).
    pub free_bytes: usize,
}

impl Composition {
    /// Memory held by requests: tokens + reserved + internal.
    pub fn allocated(&self) -> usize {
        self.token_bytes + self.reserved_bytes + self.internal_bytes
    }
}

/// What the replay needs of a policy: admit a request, grow it, free it, and say where the
/// memory is. Requests are identified by the replay's ids.
pub(crate) trait KvPolicy {
    /// Allocate for a new request holding `tokens` tokens, `final_len` eventually. `Ok(false)`:
    /// not enough memory now.
    fn admit(&mut self, id: usize, tokens: usize, final_len: usize) -> Result<bool, PolicyError>;
    /// Grow request `id` to `tokens` tokens. `Ok(false)`: out of memory.
    fn grow(&mut self, id: usize, tokens: usize) -> Result<bool, PolicyError>;
    fn free(&mut self, id: usize) -> Result<(), PolicyError>;
    /// The memory right now, given every live request's (tokens, final length).
    fn composition(&self, live: &[(usize, usize)]) -> Composition;
}

/// Bytes `policy` needs, in an empty memory, for a request of `final_len` tokens.
pub(crate) fn bytes_for(
    policy: Policy,
    shape: &KvShape,
    max_len: usize,
    final_len: usize,
) -> usize {
    let bpt = shape.bytes_per_token();
    match policy {
        Policy::Orca(r) => reservation_len(r, max_len, final_len) * bpt,
        Policy::Paged { block_size } => final_len.div_ceil(block_size) * block_size * bpt,
        Policy::Vmm { layout, page_size } => {
            let regions = if layout == KvLayout::PerLayer {
                2 * shape.num_layers
            } else {
                1
            };
            let per_region = bpt / regions;
            (final_len * per_region).div_ceil(page_size) * page_size * regions
        }
    }
}

fn reservation_len(r: Reservation, max_len: usize, final_len: usize) -> usize {
    match r {
        Reservation::Max => max_len,
        Reservation::Pow2 => final_len.next_power_of_two().min(max_len),
        Reservation::Oracle => final_len,
    }
}

/// Build the driver for `policy` over `kv_memory` bytes.
pub(crate) fn build(
    policy: Policy,
    shape: &KvShape,
    kv_memory: usize,
    max_len: usize,
    max_requests: usize,
) -> Result<Box<dyn KvPolicy>, PolicyError> {
    let bpt = shape.bytes_per_token();
    Ok(match policy {
        Policy::Orca(reservation) => Box::new(Orca {
            arena: ContiguousArena::new(kv_memory / bpt),
            reservation,
            max_len,
            bpt,
            starts: HashMap::new(),
            arena_bytes: kv_memory,
        }),
        Policy::Paged { block_size } => {
            let blocks = kv_memory / (block_size * bpt);
            Box::new(Paged {
                alloc: BlockAllocator::new(blocks, block_size)?,
                tables: HashMap::new(),
                bpt,
                leftover: kv_memory - blocks * block_size * bpt,
            })
        }
        Policy::Vmm { layout, page_size } => {
            let config = KvSpaceConfig {
                layout,
                num_layers: shape.num_layers,
                num_kv_heads: shape.num_kv_heads,
                head_dim: shape.head_dim,
                dtype_bytes: shape.dtype_bytes,
                max_slots: max_requests.max(1),
                max_tokens: max_len,
                page_size,
                max_pages: kv_memory / page_size,
            };
            let granularity = page_size.min(64 << 10);
            let backend = Arc::new(AccountingVmm::new(granularity)?);
            Box::new(Vmm {
                space: KvSpace::new(config, backend)?,
                slots: HashMap::new(),
                leftover: kv_memory % page_size,
            })
        }
    })
}

struct Orca {
    arena: ContiguousArena,
    reservation: Reservation,
    max_len: usize,
    bpt: usize,
    /// Request id → (start, reserved length) in tokens.
    starts: HashMap<usize, (usize, usize)>,
    arena_bytes: usize,
}

impl KvPolicy for Orca {
    fn admit(&mut self, id: usize, _tokens: usize, final_len: usize) -> Result<bool, PolicyError> {
        let len = reservation_len(self.reservation, self.max_len, final_len);
        match self.arena.allocate(len) {
            Ok(start) => {
                self.starts.insert(id, (start, len));
                Ok(true)
            }
            Err(KvError::NoContiguousSpace { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn grow(&mut self, id: usize, tokens: usize) -> Result<bool, PolicyError> {
        let (_, len) = self.starts[&id];
        Ok(tokens <= len)
    }

    fn free(&mut self, id: usize) -> Result<(), PolicyError> {
        let (start, _) = self
            .starts
            .remove(&id)
            .ok_or(PolicyError::UnknownRequest { id })?;
        Ok(self.arena.free(start)?)
    }

    fn composition(&self, live: &[(usize, usize)]) -> Composition {
        let reserved_total: usize = self.starts.values().map(|&(_, len)| len).sum();
        let tokens: usize = live.iter().map(|&(t, _)| t).sum();
        let until_final: usize = live.iter().map(|&(t, f)| f - t).sum();
        let free = self.arena.free_total();
        let largest = self.arena.largest_hole();
        Composition {
            token_bytes: tokens * self.bpt,
            reserved_bytes: until_final * self.bpt,
            internal_bytes: (reserved_total - tokens - until_final) * self.bpt,
            external_bytes: (free - largest) * self.bpt
                + (self.arena_bytes - self.arena.capacity() * self.bpt),
            free_bytes: largest * self.bpt,
        }
    }
}

struct Paged {
    alloc: BlockAllocator,
    tables: HashMap<usize, BlockTable>,
    bpt: usize,
    leftover: usize,
}

impl KvPolicy for Paged {
    fn admit(&mut self, id: usize, tokens: usize, _final_len: usize) -> Result<bool, PolicyError> {
        let mut table = BlockTable::new();
        match table.grow_to(tokens, &mut self.alloc) {
            Ok(_) => {
                self.tables.insert(id, table);
                Ok(true)
            }
            Err(KvError::OutOfBlocks { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn grow(&mut self, id: usize, tokens: usize) -> Result<bool, PolicyError> {
        let table = self
            .tables
            .get_mut(&id)
            .ok_or(PolicyError::UnknownRequest { id })?;
        match table.grow_to(tokens, &mut self.alloc) {
            Ok(_) => Ok(true),
            Err(KvError::OutOfBlocks { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn free(&mut self, id: usize) -> Result<(), PolicyError> {
        let mut table = self
            .tables
            .remove(&id)
            .ok_or(PolicyError::UnknownRequest { id })?;
        Ok(table.release(&mut self.alloc)?)
    }

    fn composition(&self, live: &[(usize, usize)]) -> Composition {
        let block_bytes = self.alloc.block_size() * self.bpt;
        let held = (self.alloc.num_blocks() - self.alloc.num_free()) * block_bytes;
        let tokens: usize = live.iter().map(|&(t, _)| t).sum::<usize>() * self.bpt;
        Composition {
            token_bytes: tokens,
            reserved_bytes: 0,
            internal_bytes: held - tokens,
            external_bytes: self.leftover,
            free_bytes: self.alloc.num_free() * block_bytes,
        }
    }
}

struct Vmm {
    space: KvSpace,
    slots: HashMap<usize, SlotId>,
    leftover: usize,
}

impl Vmm {
    fn ensure(&mut self, slot: SlotId, tokens: usize) -> Result<bool, PolicyError> {
        match self.space.ensure(slot, tokens) {
            Ok(_) => Ok(true),
            Err(VmmError::PoolExhausted { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl KvPolicy for Vmm {
    fn admit(&mut self, id: usize, tokens: usize, _final_len: usize) -> Result<bool, PolicyError> {
        let slot = match self.space.acquire() {
            Ok(slot) => slot,
            Err(VmmError::NoFreeSlot { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if self.ensure(slot, tokens)? {
            self.slots.insert(id, slot);
            Ok(true)
        } else {
            self.space.release(slot)?;
            Ok(false)
        }
    }

    fn grow(&mut self, id: usize, tokens: usize) -> Result<bool, PolicyError> {
        let slot = *self
            .slots
            .get(&id)
            .ok_or(PolicyError::UnknownRequest { id })?;
        self.ensure(slot, tokens)
    }

    fn free(&mut self, id: usize) -> Result<(), PolicyError> {
        let slot = self
            .slots
            .remove(&id)
            .ok_or(PolicyError::UnknownRequest { id })?;
        Ok(self.space.release(slot)?)
    }

    fn composition(&self, _live: &[(usize, usize)]) -> Composition {
        // Pages that hold no token (cached in released slots, past an active slot's length) are
        // reclaimed on demand: they count as free, not as waste.
        let s = self.space.stats();
        let held = s.bytes_in_use();
        let free = (s.pages_reclaimable() + self.space.pool_available()) * s.page_size;
        Composition {
            token_bytes: s.bytes_holding_tokens,
            reserved_bytes: 0,
            internal_bytes: held - s.bytes_holding_tokens,
            external_bytes: self.leftover,
            free_bytes: free,
        }
    }
}
