//! Tests of `KvSpace` on real memory (`HostVmm`) and on the strict accounting backend.

use std::collections::HashMap;

use crate::PhysicalPage;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::{AccountingVmm, HostVmm};

const LAYERS: usize = 2;

/// A small model: 2 layers, 2 KV heads of dim 16 in bf16 → 64 B per head-row; with 4 KiB pages a
/// per-layer page holds 64 tokens and a token-major page 16.
fn config(layout: KvLayout, max_pages: usize) -> KvSpaceConfig {
    KvSpaceConfig {
        layout,
        num_layers: LAYERS,
        num_kv_heads: 2,
        head_dim: 16,
        dtype_bytes: 2,
        max_slots: 4,
        max_tokens: 256,
        page_size: 4096,
        max_pages,
    }
}

fn host_space(layout: KvLayout, max_pages: usize) -> KvSpace {
    KvSpace::new(config(layout, max_pages), Arc::new(HostVmm::new().unwrap())).unwrap()
}

use crate::conformance::{self, tokens_match, write_tokens};

fn host() -> Arc<dyn PhysicalMemory> {
    Arc::new(HostVmm::new().unwrap())
}

#[test]
fn host_bytes_round_trip() {
    for layout in KvLayout::ALL {
        for page in [4096, 64 << 10] {
            conformance::bytes_round_trip(host(), layout, page);
        }
    }
}

#[test]
fn host_shared_prefix() {
    for layout in KvLayout::ALL {
        for page in [4096, 64 << 10] {
            conformance::shared_prefix(host(), layout, page);
        }
    }
}

#[test]
fn host_reuse_and_reclaim() {
    for layout in KvLayout::ALL {
        conformance::reuse_and_reclaim(host(), layout, 4096);
    }
}

#[test]
fn resharing_a_shorter_prefix_unshares_the_pages_past_it() {
    for layout in KvLayout::ALL {
        let mut space = host_space(layout, 64);
        let tpp = space.config().page_size / space.config().region_bytes_per_token();
        let src = space.acquire().unwrap();
        space.ensure(src, 3 * tpp).unwrap();
        write_tokens(&space, src, 0..3 * tpp, 5);
        let dst = space.acquire().unwrap();
        space.share_prefix(src, dst, 2 * tpp + 1).unwrap();
        space.share_prefix(src, dst, tpp / 2).unwrap();
        space.audit().unwrap();
        // dst now writes from tpp/2 on, across what were shared pages: src must not see it.
        space.ensure(dst, 3 * tpp).unwrap();
        write_tokens(&space, dst, tpp / 2..3 * tpp, 6);
        assert!(tokens_match(&space, src, 0..3 * tpp, 5), "{layout}");
        assert!(tokens_match(&space, dst, 0..tpp / 2, 5), "{layout}");
        assert_eq!(space.stats().pages_shared, 0);
    }
}

#[test]
fn ensure_under_pressure_reclaims_released_slots() {
    let mut space = host_space(KvLayout::TokenMajor, 10);
    let a = space.acquire().unwrap();
    space.ensure(a, 10 * 16).unwrap(); // all 10 pages
    let b = space.acquire().unwrap();
    assert!(matches!(
        space.ensure(b, 16),
        Err(VmmError::PoolExhausted { .. })
    ));
    space.release(a).unwrap();
    assert_eq!(space.ensure(b, 4 * 16).unwrap(), 4);
    let s = space.stats();
    assert_eq!(
        (s.pages_created, s.pages_mapped, s.pages_cached),
        (10, 10, 6)
    );
    space.audit().unwrap();
}

#[test]
fn surplus_pages_of_an_active_slot_are_reclaimed_under_pressure() {
    let mut space = host_space(KvLayout::TokenMajor, 10); // 16 tokens per page
    let a = space.acquire().unwrap();
    space.ensure(a, 160).unwrap(); // all 10 pages
    space.release(a).unwrap();
    let reused = space.acquire().unwrap();
    assert_eq!(
        space.ensure(reused, 16).unwrap(),
        0,
        "the reused slot keeps its 10 pages"
    );
    assert_eq!(space.stats().pages_surplus, 9);
    let b = space.acquire().unwrap();
    assert_eq!(
        space.ensure(b, 5 * 16).unwrap(),
        5,
        "taken from the surplus"
    );
    assert!(space.is_backed(reused, 16));
    assert_eq!(space.stats().pages_surplus, 4);
    // More than the surplus can give: fails, and takes nothing.
    let before = space.stats();
    assert!(matches!(
        space.ensure(b, 10 * 16),
        Err(VmmError::PoolExhausted { .. })
    ));
    assert_eq!(space.stats(), before);
    space.audit().unwrap();
}

#[test]
fn llama_shaped_two_mib_pages_on_the_host() {
    let mut cfg = config(KvLayout::TokenMajor, 4);
    cfg.page_size = crate::DEFAULT_PAGE_SIZE;
    cfg.num_layers = 32;
    cfg.num_kv_heads = 8;
    cfg.head_dim = 128; // Llama-3-8B: 128 KiB per token, 16 tokens per 2 MiB page
    cfg.max_tokens = 64;
    let mut space = KvSpace::new(cfg, Arc::new(HostVmm::new().unwrap())).unwrap();
    let a = space.acquire().unwrap();
    assert_eq!(space.ensure(a, 17).unwrap(), 2);
    write_tokens(&space, a, 0..17, 11);
    assert!(tokens_match(&space, a, 0..17, 11));
    assert_eq!(space.stats().bytes_backed, 4 << 20);
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    for layout in KvLayout::ALL {
        let mut space = host_space(layout, 8);
        let a = space.acquire().unwrap();
        let before = space.stats();
        assert!(matches!(
            space.ensure(a, 257),
            Err(VmmError::TooManyTokens {
                requested: 257,
                max_tokens: 256,
                ..
            })
        ));
        // 8 pages are not enough for 256 tokens in either layout: nothing may be mapped.
        assert!(matches!(
            space.ensure(a, 256),
            Err(VmmError::PoolExhausted { .. })
        ));
        assert_eq!(
            space.stats(),
            before,
            "{layout}: a failed ensure maps nothing"
        );
        for _ in 1..4 {
            space.acquire().unwrap();
        }
        assert!(matches!(
            space.acquire(),
            Err(VmmError::NoFreeSlot { max_slots: 4 })
        ));
        assert!(matches!(
            space.ensure(SlotId(9), 1),
            Err(VmmError::UnknownSlot { slot: 9, .. })
        ));
        let b = SlotId(1);
        space.release(b).unwrap();
        assert!(matches!(
            space.ensure(b, 1),
            Err(VmmError::SlotNotActive { slot: 1 })
        ));
        assert!(matches!(
            space.release(b),
            Err(VmmError::SlotNotActive { .. })
        ));
        space.ensure(a, 4).unwrap();
        let c = space.acquire().unwrap();
        assert!(matches!(
            space.share_prefix(a, c, 5),
            Err(VmmError::ShareBeyondSource { .. })
        ));
        assert!(matches!(
            space.share_prefix(a, a, 1),
            Err(VmmError::ShareIntoSelf { .. })
        ));
        let mut buf = vec![0u8; space.config().head_bytes()];
        assert!(matches!(
            space.read_token(c, 0, KvPart::K, 0, &mut buf),
            Err(VmmError::NotBacked { .. })
        ));
        assert!(space.read_token(a, 0, KvPart::K, 0, &mut buf[1..]).is_err());
        space.audit().unwrap();
    }
}

#[test]
fn page_size_not_a_multiple_of_the_granularity_is_rejected() {
    let mut cfg = config(KvLayout::PerLayer, 8);
    cfg.page_size = 6000;
    let err = KvSpace::new(cfg.clone(), Arc::new(HostVmm::new().unwrap())).unwrap_err();
    assert!(
        matches!(
            err,
            VmmError::PageSizeNotAligned {
                page_size: 6000,
                ..
            }
        ),
        "{err}"
    );
    cfg.page_size = 64 << 10;
    let err = KvSpace::new(cfg, Arc::new(AccountingVmm::new(2 << 20).unwrap())).unwrap_err();
    assert!(
        matches!(
            err,
            VmmError::PageSizeNotAligned {
                granularity: 0x200000,
                ..
            }
        ),
        "{err}"
    );
    let mut cfg = config(KvLayout::PerLayer, 8);
    cfg.head_dim = 0;
    assert!(matches!(
        KvSpace::new(cfg, Arc::new(HostVmm::new().unwrap())),
        Err(VmmError::InvalidConfig(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Property tests: random sequences of operations against a model of what each slot holds.

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Ensure {
        slot: usize,
        tokens: usize,
    },
    Share {
        src: usize,
        dst: usize,
        tokens: usize,
    },
    Release {
        slot: usize,
    },
    Reclaim {
        pages: usize,
    },
    /// A prepared admission: surplus pages below a likely hit unmapped, the pages past it mapped
    /// ahead (`clear_for_hit` then `prefetch` from `hit`).
    Prepare {
        slot: usize,
        hit: usize,
        tokens: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Acquire),
        4 => (0..8usize, 0..300usize).prop_map(|(slot, tokens)| Op::Ensure { slot, tokens }),
        2 => (0..8usize, 0..8usize, 0..300usize).prop_map(|(src, dst, tokens)| Op::Share { src, dst, tokens }),
        2 => (0..8usize).prop_map(|slot| Op::Release { slot }),
        1 => (0..20usize).prop_map(|pages| Op::Reclaim { pages }),
        2 => (0..8usize, 0..300usize, 0..300usize).prop_map(|(slot, hit, tokens)| Op::Prepare { slot, hit, tokens }),
    ]
}

/// What every active slot holds: the tag each token's bytes were written with.
type Model = HashMap<SlotId, Vec<u32>>;

/// Apply `ops`; check the invariants after each, the bytes (when the backend holds bytes) and
/// that releasing and reclaiming everything returns every page to the pool.
fn run_ops(
    space: &mut KvSpace,
    ops: &[Op],
    accounting: Option<&AccountingVmm>,
) -> Result<(), TestCaseError> {
    let mut model: Model = HashMap::new();
    let mut next_tag = 1u32;
    let bytes = space.backend().holds_bytes();
    let pick = |model: &Model, i: usize| {
        let mut ids: Vec<SlotId> = model.keys().copied().collect();
        ids.sort();
        (!ids.is_empty()).then(|| ids[i % ids.len()])
    };
    for op in ops {
        match *op {
            Op::Acquire => match space.acquire() {
                Ok(s) => {
                    prop_assert!(
                        model.insert(s, Vec::new()).is_none(),
                        "slot {s} handed out twice"
                    );
                }
                Err(VmmError::NoFreeSlot { .. }) => {
                    prop_assert_eq!(model.len(), space.config().max_slots)
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            },
            Op::Ensure { slot, tokens } => {
                let Some(s) = pick(&model, slot) else {
                    continue;
                };
                let before = space.stats();
                match space.ensure(s, tokens) {
                    Ok(_) => {
                        let held = model.get_mut(&s).unwrap();
                        let old = held.len();
                        if tokens > old {
                            let tag = next_tag;
                            next_tag += 1;
                            held.resize(tokens, tag);
                            if bytes {
                                write_tokens(space, s, old..tokens, tag);
                            }
                        }
                    }
                    Err(VmmError::TooManyTokens { .. }) => {
                        prop_assert!(tokens > space.config().max_tokens)
                    }
                    Err(VmmError::PoolExhausted { .. }) => {
                        // Nothing mapped into the slot; released slots may have been reclaimed.
                        prop_assert!(space.stats().mappings <= before.mappings);
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Share { src, dst, tokens } => {
                let (Some(a), Some(b)) = (pick(&model, src), pick(&model, dst)) else {
                    continue;
                };
                match space.share_prefix(a, b, tokens) {
                    Ok(()) => {
                        let prefix = model[&a][..tokens].to_vec();
                        model.insert(b, prefix);
                    }
                    Err(VmmError::ShareIntoSelf { .. }) => prop_assert_eq!(a, b),
                    Err(VmmError::ShareBeyondSource { .. }) => {
                        prop_assert!(tokens > model[&a].len())
                    }
                    Err(VmmError::PoolExhausted { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Release { slot } => {
                let Some(s) = pick(&model, slot) else {
                    continue;
                };
                space
                    .release(s)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.remove(&s);
            }
            Op::Prepare { slot, hit, tokens } => {
                let Some(s) = pick(&model, slot) else {
                    continue;
                };
                let (len, page_size) = (model[&s].len(), space.config().page_size);
                let max = space.config().max_tokens;
                space
                    .clear_for_hit(s, hit, usize::MAX)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Only pages past the slot's length went, below the hit's last page.
                let first = space.config().pages_for(len);
                let below = hit.min(max) * space.config().region_bytes_per_token() / page_size;
                for region in 0..space.config().num_regions() {
                    for i in first..below {
                        prop_assert!(
                            space.page(s, region, i).is_none(),
                            "page {} of region {} still mapped",
                            i,
                            region
                        );
                    }
                }
                match space.prefetch(s, hit, tokens, usize::MAX) {
                    Ok(_) => {}
                    Err(VmmError::TooManyTokens { .. }) => prop_assert!(tokens > max),
                    Err(VmmError::PoolExhausted { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Reclaim { pages } => {
                let before = space.stats();
                let got = space
                    .reclaim(pages)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, pages.min(before.pages_cached + before.pages_surplus));
                // Only pages holding no token went: every active slot is still backed.
                for (s, held) in &model {
                    prop_assert!(space.is_backed(*s, held.len()));
                }
            }
        }
        space
            .audit()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let stats = space.stats();
        prop_assert!(stats.pages_created <= space.config().max_pages);
        for (s, held) in &model {
            prop_assert_eq!(space.len(*s), held.len());
            prop_assert!(space.is_backed(*s, held.len()));
        }
        if let Some(acc) = accounting {
            // The backend's own books agree: pages alive, and one mapping per page-table entry.
            prop_assert_eq!(acc.live_pages(), stats.pages_created);
            let per_page = space.config().page_size / acc.granularity();
            prop_assert_eq!(acc.mapped_granules(), stats.mappings * per_page);
        }
    }
    if bytes {
        for (s, held) in &model {
            for (t, &tag) in held.iter().enumerate() {
                prop_assert!(
                    tokens_match(space, *s, t..t + 1, tag),
                    "slot {} token {}",
                    s,
                    t
                );
            }
        }
    }
    for s in model.keys() {
        space
            .release(*s)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    space
        .reclaim_all()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let stats = space.stats();
    prop_assert_eq!(
        stats.pages_free,
        stats.pages_created,
        "every page back in the pool"
    );
    prop_assert_eq!((stats.pages_mapped, stats.mappings), (0, 0));
    space
        .audit()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

fn layout() -> impl Strategy<Value = KvLayout> {
    prop_oneof![Just(KvLayout::PerLayer), Just(KvLayout::TokenMajor)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_on_real_host_memory(layout in layout(), max_pages in 4..40usize,
                                              ops in proptest::collection::vec(op(), 1..60)) {
        let mut space = host_space(layout, max_pages);
        run_ops(&mut space, &ops, None)?;
    }

    #[test]
    fn random_operations_on_the_accounting_backend(layout in layout(), max_pages in 4..40usize,
                                                   ops in proptest::collection::vec(op(), 1..80)) {
        let backend = Arc::new(AccountingVmm::new(1024).unwrap());
        let mut space = KvSpace::new(config(layout, max_pages), backend.clone()).unwrap();
        run_ops(&mut space, &ops, Some(&backend))?;
        drop(space);
        prop_assert_eq!(backend.live_pages(), 0, "dropping the space releases every page");
    }
}

/// A page cache of whole units, evicted in the order they became evictable (the kv crate's is
/// its LRU prefix index).
#[derive(Debug, Default)]
struct Fifo {
    units: Vec<Vec<PhysicalPage>>,
    evictable: std::collections::VecDeque<Vec<PhysicalPage>>,
}

impl PageCache for Fifo {
    fn unreferenced(
        &mut self,
        _pages: &[PhysicalPage],
        kept: &dyn Fn(u64) -> bool,
    ) -> std::result::Result<(), String> {
        let (now, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.units)
            .into_iter()
            .partition(|u| u.iter().all(|p| kept(p.handle)));
        self.units = held;
        self.evictable.extend(now);
        Ok(())
    }

    fn referenced(&mut self, pages: &[PhysicalPage]) -> std::result::Result<(), String> {
        let (again, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.evictable)
            .into_iter()
            .partition(|u| u.iter().any(|p| pages.contains(p)));
        self.evictable = still.into();
        self.units.extend(again);
        Ok(())
    }

    fn evict(&mut self) -> Option<Vec<PhysicalPage>> {
        self.evictable.pop_front()
    }

    fn evictable_pages(&self) -> usize {
        self.evictable.iter().map(Vec::len).sum()
    }
}

impl Fifo {
    /// `unit` is cached (pinned by the caller) and held.
    fn cache(space: &mut KvSpace, unit: Vec<PhysicalPage>) {
        space.pin(&unit).unwrap();
        let cache: &mut dyn std::any::Any = space.page_cache_mut().unwrap();
        cache.downcast_mut::<Fifo>().unwrap().units.push(unit);
    }
}

#[test]
fn cached_pages_are_kept_mapped_again_and_evicted_only_when_mapped_nowhere() {
    for layout in KvLayout::ALL {
        let mut space = host_space(layout, 0);
        let (k, tokens) = space.config().prefix_unit();
        let n = space.unit_len();
        assert_eq!(k, 1, "4 KiB pages hold whole tokens");
        // Room for 5 units.
        space = host_space(layout, 5 * n);
        assert!(matches!(space.pin(&[]), Err(VmmError::NoPageCache)));
        space.set_page_cache(Box::<Fifo>::default());
        let a = space.acquire().unwrap();
        space.ensure(a, 3 * tokens + 1).unwrap();
        write_tokens(&space, a, 0..3 * tokens + 1, 3);
        let units: Vec<Vec<PhysicalPage>> =
            (0..3).map(|j| space.unit_pages(a, j).unwrap()).collect();
        for unit in &units {
            Fifo::cache(&mut space, unit.clone());
        }
        assert!(matches!(
            space.pin(&units[0]),
            Err(VmmError::AlreadyPinned { .. })
        ));
        space.audit().unwrap();
        space.release(a).unwrap();
        let s = space.stats();
        assert_eq!(
            (s.pages_kept, s.pages_pinned, s.pages_cached),
            (3 * n, 3 * n, n)
        );
        assert_eq!(s.bytes_in_use(), 0, "kept pages are not in use");
        space.audit().unwrap();

        // A new slot starts with the first two units, reading what slot a wrote.
        let b = space.acquire().unwrap();
        assert_eq!(b, a, "the released slot with pages left");
        let refs: Vec<&[PhysicalPage]> = units[..2].iter().map(Vec::as_slice).collect();
        assert_eq!(space.map_cached(b, &refs).unwrap(), 2 * tokens);
        assert!(tokens_match(&space, b, 0..2 * tokens, 3), "{layout}");
        assert!(matches!(
            space.map_cached(b, &refs),
            Err(VmmError::SlotNotEmpty { .. })
        ));
        space.audit().unwrap();
        // A fork shares them; the cached pages are never written by either.
        let c = space.acquire().unwrap();
        space.share_prefix(b, c, 2 * tokens).unwrap();
        space.ensure(c, 3 * tokens).unwrap();
        write_tokens(&space, c, 2 * tokens..3 * tokens, 9);
        space.audit().unwrap();

        // Unit 2 is the only evictable one: a request for everything else fails untouched,
        // then one that fits evicts it.
        let d = space.acquire().unwrap();
        // Free: the pool, b's surplus page row (mapped past its length) and unit 2.
        let room = space.pool_available() + space.stats().pages_surplus + n;
        assert!(space.ensure(d, (room / n + 1) * tokens).is_err());
        assert_eq!(space.stats().pages_kept, n);
        space.ensure(d, room / n * tokens).unwrap();
        assert_eq!(space.stats().pages_kept, 0, "{layout}: unit 2 evicted");
        assert_eq!(space.stats().pages_pinned, 2 * n);
        assert!(tokens_match(&space, c, 0..2 * tokens, 3));
        space.audit().unwrap();

        // Held by c after b leaves, evictable once c leaves too.
        space.release(b).unwrap();
        assert_eq!(space.stats().pages_kept, 0);
        space.release(c).unwrap();
        space.release(d).unwrap();
        assert_eq!(space.stats().pages_kept, 2 * n);
        space.audit().unwrap();
        space.reclaim_all().unwrap();
        let s = space.stats();
        assert_eq!(
            (s.pages_free, s.pages_kept, s.pages_pinned),
            (s.pages_created, 0, 0)
        );
        space.audit().unwrap();
        assert!(matches!(
            space.unpin(&units[0]),
            Err(VmmError::NotPinned { .. })
        ));
    }
}

#[test]
fn mapping_cached_units_checks_its_input_and_changes_nothing_on_error() {
    let mut space = host_space(KvLayout::PerLayer, 32);
    space.set_page_cache(Box::<Fifo>::default());
    let a = space.acquire().unwrap();
    space.ensure(a, 64).unwrap();
    let unit = space.unit_pages(a, 0).unwrap();
    let b = space.acquire().unwrap();
    assert!(matches!(
        space.map_cached(b, &[&unit]),
        Err(VmmError::NotPinned { .. })
    ));
    Fifo::cache(&mut space, unit.clone());
    assert!(matches!(
        space.map_cached(b, &[&unit[..1]]),
        Err(VmmError::UnitShape {
            expected: 4,
            found: 1
        })
    ));
    assert_eq!(space.len(b), 0);
    let free = space.pool_available();
    let unmapped = PhysicalPage {
        handle: u64::MAX,
        size: 4096,
    };
    assert!(matches!(
        space.pin(&[unmapped]),
        Err(VmmError::PinUnmapped { .. })
    ));
    assert_eq!(space.pool_available(), free);
    space.audit().unwrap();
    assert_eq!(space.map_cached(b, &[&unit]).unwrap(), 64);
    assert_eq!(space.references(unit[0].handle), 2);
    space.audit().unwrap();
}
