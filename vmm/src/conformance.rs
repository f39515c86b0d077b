//! Real-memory checks any byte-holding [`PhysicalMemory`] backend must pass, run by the host
//! unit tests on [`crate::HostVmm`] and by `tests/gpu_vmm.rs` on [`crate::CudaVmm`], so both
//! backends answer to the same checks. Each function builds a small [`KvSpace`] of `page_size`
//! pages on the backend and **panics** (assert) on the first wrong byte: this module is for
//! tests, not for serving.
//!
//! Checked: bytes written through one slot read back (through the checked accessors and at the
//! addresses a kernel computes from a [`LayerView`]); a shared prefix page reads the same bytes
//! from both slots and is one physical page; the copied partial page is private to each slot;
//! release → reuse of a slot keeps its pages mapped; reclaim returns pages to the pool.

use std::sync::Arc;

use crate::{KvLayout, KvPart, KvSpace, KvSpaceConfig, PhysicalMemory, SlotId};

/// A space of 2 layers × 2 KV heads × `head_dim` in 2-byte elements; `max_tokens` is chosen
/// so each slot spans at least four pages in either layout.
pub fn small_space(
    backend: Arc<dyn PhysicalMemory>,
    layout: KvLayout,
    page_size: usize,
    head_dim: usize,
    max_pages: usize,
) -> KvSpace {
    let mut config = KvSpaceConfig {
        layout,
        num_layers: 2,
        num_kv_heads: 2,
        head_dim,
        dtype_bytes: 2,
        max_slots: 4,
        max_tokens: 0,
        page_size,
        max_pages,
    };
    config.max_tokens = 4 * page_size / config.region_bytes_per_token();
    KvSpace::new(config, backend).expect("small KvSpace")
}

/// Tokens one page holds in one region of `space` (at least 1).
pub fn tokens_per_page(space: &KvSpace) -> usize {
    (space.config().page_size / space.config().region_bytes_per_token()).max(1)
}

/// The bytes of one token's K or V, unique per (tag, layer, part, token).
pub fn pattern(tag: u32, layer: usize, part: KvPart, token: usize, len: usize) -> Vec<u8> {
    let seed = tag
        .wrapping_mul(2654435761)
        .wrapping_add((layer * 2 + part as usize) as u32 * 7919 + token as u32 * 104729);
    (0..len)
        .map(|i| (seed.wrapping_add(i as u32 * 31) >> 3) as u8)
        .collect()
}

/// Write `pattern(tag, ..)` into every layer's K and V of `tokens` of `slot`.
pub fn write_tokens(space: &KvSpace, slot: SlotId, tokens: std::ops::Range<usize>, tag: u32) {
    let len = space.config().head_bytes();
    for t in tokens {
        for layer in 0..space.config().num_layers {
            for part in [KvPart::K, KvPart::V] {
                space
                    .write_token(slot, layer, part, t, &pattern(tag, layer, part, t, len))
                    .expect("write_token");
            }
        }
    }
}

/// One token's K or V of one layer.
pub fn read_token(space: &KvSpace, slot: SlotId, layer: usize, part: KvPart, t: usize) -> Vec<u8> {
    let mut out = vec![0u8; space.config().head_bytes()];
    space
        .read_token(slot, layer, part, t, &mut out)
        .expect("read_token");
    out
}

/// Whether `tokens` of `slot` hold `pattern(tag, ..)` in every layer's K and V.
pub fn tokens_match(
    space: &KvSpace,
    slot: SlotId,
    tokens: std::ops::Range<usize>,
    tag: u32,
) -> bool {
    let len = space.config().head_bytes();
    tokens.into_iter().all(|t| {
        (0..space.config().num_layers).all(|layer| {
            [KvPart::K, KvPart::V].into_iter().all(|part| {
                read_token(space, slot, layer, part, t) == pattern(tag, layer, part, t, len)
            })
        })
    })
}

/// Bytes written through two slots read back, also at the addresses a strided kernel computes.
pub fn bytes_round_trip(backend: Arc<dyn PhysicalMemory>, layout: KvLayout, page_size: usize) {
    let mut space = small_space(backend.clone(), layout, page_size, 16, 64);
    let tpp = tokens_per_page(&space);
    let n = (2 * tpp + tpp / 2).min(space.config().max_tokens);
    let a = space.acquire().unwrap();
    let b = space.acquire().unwrap();
    assert_ne!(a, b);
    space.ensure(a, n).unwrap();
    space.ensure(b, n).unwrap();
    write_tokens(&space, a, 0..n, 1);
    write_tokens(&space, b, 0..n, 2);
    assert!(tokens_match(&space, a, 0..n, 1), "{layout}: slot a");
    assert!(tokens_match(&space, b, 0..n, 2), "{layout}: slot b");
    let c = space.config().clone();
    let row = c.head_dim * c.dtype_bytes;
    for layer in 0..c.num_layers {
        let view = space.layer_view(layer);
        for (slot, tag) in [(a, 1), (b, 2)] {
            for t in [0, tpp - 1, tpp, n - 1] {
                for (base, part) in [(view.k, KvPart::K), (view.v, KvPart::V)] {
                    let expect = pattern(tag, layer, part, t, c.head_bytes());
                    for head in 0..c.num_kv_heads {
                        let elem = slot.0 * view.slot_stride
                            + t * view.token_stride
                            + head * view.head_stride;
                        let mut got = vec![0u8; row];
                        // SAFETY: the slot is backed for n > t tokens.
                        unsafe {
                            backend
                                .read(base + (elem * view.dtype_bytes) as u64, &mut got)
                                .unwrap()
                        };
                        assert_eq!(
                            got,
                            expect[head * row..(head + 1) * row],
                            "{layout} layer {layer} token {t} head {head}"
                        );
                    }
                }
            }
        }
    }
    space.audit().unwrap();
}

/// A shared prefix is one physical page read by both slots; the partial page is a private copy.
pub fn shared_prefix(backend: Arc<dyn PhysicalMemory>, layout: KvLayout, page_size: usize) {
    let mut space = small_space(backend, layout, page_size, 16, 64);
    let tpp = tokens_per_page(&space);
    let src = space.acquire().unwrap();
    space.ensure(src, 3 * tpp).unwrap();
    write_tokens(&space, src, 0..3 * tpp, 7);
    let dst = space.acquire().unwrap();
    let prefix = tpp + tpp / 2; // one full page and half of the next
    let before = space.stats();
    space.share_prefix(src, dst, prefix).unwrap();
    let after = space.stats();
    let regions = space.config().num_regions();
    assert_eq!(
        after.pages_shared, regions,
        "{layout}: the full page of each region is shared"
    );
    assert_eq!(
        after.pages_mapped - before.pages_mapped,
        regions,
        "{layout}: one copied page per region"
    );
    assert_eq!(space.len(dst), prefix);
    assert!(
        tokens_match(&space, dst, 0..prefix, 7),
        "{layout}: dst reads src's prefix"
    );

    // One physical page: a write through src shows through dst. (Engines never write below a
    // slot's length; this check does, to see the mapping itself.)
    let len = space.config().head_bytes();
    let probe = vec![0xAB; len];
    space.write_token(src, 0, KvPart::K, 3, &probe).unwrap();
    assert_eq!(
        read_token(&space, dst, 0, KvPart::K, 3),
        probe,
        "{layout}: shared page"
    );
    space
        .write_token(src, 0, KvPart::K, 3, &pattern(7, 0, KvPart::K, 3, len))
        .unwrap();

    // The partial page was copied: writes after the prefix in one slot leave the other alone.
    space.ensure(dst, prefix + 4).unwrap();
    write_tokens(&space, dst, prefix..prefix + 4, 99);
    assert!(
        tokens_match(&space, src, 0..3 * tpp, 7),
        "{layout}: src unchanged by dst"
    );
    assert!(tokens_match(&space, dst, prefix..prefix + 4, 99));
    write_tokens(&space, src, tpp..tpp + 2, 55);
    assert!(
        tokens_match(&space, dst, tpp..tpp + 2, 7),
        "{layout}: dst's copy unchanged by src"
    );
    space.audit().unwrap();

    // Releasing the source leaves dst's prefix intact and un-shares the page.
    space.release(src).unwrap();
    assert!(
        tokens_match(&space, dst, 0..tpp, 7),
        "{layout}: prefix survives the source"
    );
    assert_eq!(space.stats().pages_shared, 0);
    space.audit().unwrap();
}

/// Release → reuse keeps the same physical pages mapped; reclaim returns them all to the pool.
pub fn reuse_and_reclaim(backend: Arc<dyn PhysicalMemory>, layout: KvLayout, page_size: usize) {
    let mut space = small_space(backend, layout, page_size, 16, 64);
    let n = 3 * tokens_per_page(&space);
    let a = space.acquire().unwrap();
    let mapped = space.ensure(a, n).unwrap();
    assert_eq!(
        mapped,
        space.config().pages_for(n) * space.config().num_regions()
    );
    write_tokens(&space, a, 0..n, 3);
    space.release(a).unwrap();
    let s = space.stats();
    assert_eq!(
        (s.pages_cached, s.active_slots, s.bytes_holding_tokens),
        (mapped, 0, 0)
    );

    let again = space.acquire().unwrap();
    assert_eq!(
        again, a,
        "{layout}: the slot that still has pages is preferred"
    );
    assert_eq!(
        space.ensure(again, n).unwrap(),
        0,
        "{layout}: no mapping call on reuse"
    );
    assert!(
        tokens_match(&space, again, 0..n, 3),
        "{layout}: same physical pages"
    );
    space.release(again).unwrap();

    assert_eq!(space.reclaim_all().unwrap(), mapped);
    let s = space.stats();
    assert_eq!(
        (s.pages_mapped, s.mappings, s.pages_free),
        (0, 0, s.pages_created)
    );
    assert_eq!(space.trim_pool().unwrap(), s.pages_created);
    space.audit().unwrap();
}
