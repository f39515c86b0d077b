//! KV handoff between instances (disaggregated prefill and decode, DistServe — Zhong et al.,
//! OSDI 2024): the KV of a sequence's first `tokens` tokens taken out of one cache as bytes
//! ([`export_kv`]) and written into a sequence of another ([`import_kv`]), on any host cache.
//!
//! The bytes are the K and V rows (`head_dim` elements of one head of one token of one layer) in
//! an order the *exporting* cache picks so that its memory is read in as few runs as it can
//! ([`WireOrder`]): a vmm token-major slot is one run (every layer of a token is contiguous,
//! and tokens follow each other), a vmm per-layer slot one run per layer and K/V (`2·L`), a
//! paged sequence one run per block, head, layer and K/V — the gather vLLM's connectors do. The
//! importer walks the same order through its own layout, so the two caches need not be of the
//! same mode: the bytes are the same rows either way. Adjacent rows are copied as one run, and
//! both sides count their runs ([`TransferStats::copies`]): the copies a handoff costs in each
//! KV mode, which is what the virtual-memory layout is meant to save.
//!
//! On the wire a [`KvBlob`] is a fixed little-endian header (magic, order, the shape, the element
//! type) followed by the rows; [`KvBlob::decode`] refuses anything that does not add up.

use vkv_kernels::cpu::{KvDtype, KvRef};

use crate::{KvCache, KvDims, KvError, SeqId};

/// The order of the rows in a [`KvBlob`]: for each, the loops from outermost to innermost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireOrder {
    /// token, layer, K/V, head: a vmm token-major slot read front to back.
    TokenMajor,
    /// layer, K/V, token, head: a vmm per-layer slot (or a plain tensor), one region at a time.
    LayerMajor,
    /// layer, K/V, block of `block_size` tokens, head, token: a paged block, head-major inside.
    Blocked { block_size: usize },
}

impl WireOrder {
    /// The order that reads `r` (layer 0 of a cache of `dims`) in the fewest runs.
    fn for_layout(r: &KvRef<'_>, dims: KvDims) -> WireOrder {
        let row = dims.num_kv_heads * dims.head_dim;
        match *r {
            KvRef::Paged { block_size, .. } => WireOrder::Blocked { block_size },
            KvRef::Strided { token_stride, .. } if token_stride == 2 * dims.num_layers * row => {
                WireOrder::TokenMajor
            }
            KvRef::Strided { .. } => WireOrder::LayerMajor,
        }
    }

    fn code(self) -> (u32, u32) {
        match self {
            WireOrder::TokenMajor => (0, 0),
            WireOrder::LayerMajor => (1, 0),
            WireOrder::Blocked { block_size } => (2, block_size as u32),
        }
    }

    fn from_code(code: u32, block_size: u32) -> Option<WireOrder> {
        match (code, block_size) {
            (0, _) => Some(WireOrder::TokenMajor),
            (1, _) => Some(WireOrder::LayerMajor),
            (2, b) if b > 0 => Some(WireOrder::Blocked {
                block_size: b as usize,
            }),
            _ => None,
        }
    }

    /// Every row `(layer, kv, token, head)` of `tokens` tokens in this order (`kv`: 0 = K, 1 = V).
    fn rows(self, dims: KvDims, tokens: usize, mut visit: impl FnMut(usize, usize, usize, usize)) {
        let (layers, heads) = (dims.num_layers, dims.num_kv_heads);
        match self {
            WireOrder::TokenMajor => {
                for t in 0..tokens {
                    for l in 0..layers {
                        for kv in 0..2 {
                            for h in 0..heads {
                                visit(l, kv, t, h);
                            }
                        }
                    }
                }
            }
            WireOrder::LayerMajor => {
                for l in 0..layers {
                    for kv in 0..2 {
                        for t in 0..tokens {
                            for h in 0..heads {
                                visit(l, kv, t, h);
                            }
                        }
                    }
                }
            }
            WireOrder::Blocked { block_size } => {
                for l in 0..layers {
                    for kv in 0..2 {
                        for b in (0..tokens).step_by(block_size) {
                            for h in 0..heads {
                                for t in b..(b + block_size).min(tokens) {
                                    visit(l, kv, t, h);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The KV of a sequence's first `tokens` tokens, out of one cache, into another. It is kept as
/// it goes over a wire — header, then rows — so that neither sending nor receiving copies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBlob {
    pub order: WireOrder,
    pub tokens: usize,
    pub dims: KvDims,
    pub dtype: KvDtype,
    /// The header, then `tokens` × the dims' bytes per token of rows in `order`.
    encoded: Vec<u8>,
}

/// What one side of a handoff did: bytes moved and the runs (memory copies) they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransferStats {
    pub bytes: usize,
    pub copies: usize,
}

/// Why a blob could not be read or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoffError {
    #[error("a KV blob must start with {expected} header bytes, found {found} bytes")]
    Truncated { expected: usize, found: usize },
    #[error("not a vkv KV blob (bad magic number)")]
    Magic,
    #[error("KV blob header: {0}")]
    Header(String),
    #[error("the KV blob holds {found} bytes of rows; its header says {expected}")]
    Length { expected: usize, found: usize },
    #[error("the KV blob is of {found}; this cache holds {expected}")]
    Shape { expected: String, found: String },
}

const MAGIC: &[u8; 8] = b"VKVKV\0\0\x01";
/// Magic, then 8 little-endian u32 (order, block size, tokens, layers, KV heads, head dim,
/// element type, reserved), then the prompt's hash (u64).
const HEADER: usize = 8 + 8 * 4 + 8;

/// The hash a blob carries of the prompt whose KV it holds ([`KvBlob::set_prompt_hash`]): 64-bit
/// FNV-1a over the token ids' little-endian bytes, the same in every build.
pub fn prompt_hash(tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tokens.iter().flat_map(|t| t.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl KvBlob {
    /// A blob of zero rows of this shape, its header written.
    pub fn zeroed(order: WireOrder, tokens: usize, dims: KvDims, dtype: KvDtype) -> KvBlob {
        let rows = tokens * dims.bytes_per_token_of(dtype.bytes());
        let mut encoded = vec![0u8; HEADER + rows];
        let (code, block_size) = order.code();
        let dtype_code = match dtype {
            KvDtype::F32 => 0u32,
            KvDtype::F16 => 1,
            KvDtype::Fp8 => 2,
        };
        encoded[..8].copy_from_slice(MAGIC);
        let fields = [
            code,
            block_size,
            tokens as u32,
            dims.num_layers as u32,
            dims.num_kv_heads as u32,
            dims.head_dim as u32,
            dtype_code,
            0,
        ];
        for (i, v) in fields.into_iter().enumerate() {
            encoded[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        KvBlob {
            order,
            tokens,
            dims,
            dtype,
            encoded,
        }
    }

    /// The [`prompt_hash`] of the prompt whose KV this is, as its exporter set it (0: unset).
    pub fn prompt_hash(&self) -> u64 {
        u64::from_le_bytes(self.encoded[40..48].try_into().expect("8 bytes"))
    }

    /// Record which prompt this KV is of, so that its importer can check its own.
    pub fn set_prompt_hash(&mut self, hash: u64) {
        self.encoded[40..48].copy_from_slice(&hash.to_le_bytes());
    }

    /// The K and V rows, in `order`.
    pub fn rows(&self) -> &[u8] {
        &self.encoded[HEADER..]
    }

    /// The blob as it goes over a wire: header, then rows.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// [`KvBlob::encoded`], without a copy.
    pub fn into_encoded(self) -> Vec<u8> {
        self.encoded
    }

    /// Read a blob [`KvBlob::encoded`] gave (taking its bytes, without a copy); anything that
    /// does not add up is an error.
    pub fn decode(bytes: Vec<u8>) -> Result<KvBlob, HandoffError> {
        if bytes.len() < HEADER {
            return Err(HandoffError::Truncated {
                expected: HEADER,
                found: bytes.len(),
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(HandoffError::Magic);
        }
        let field = |i: usize| {
            let at = 8 + 4 * i;
            u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
        };
        let order = WireOrder::from_code(field(0), field(1))
            .ok_or_else(|| HandoffError::Header(format!("unknown order {}", field(0))))?;
        let dtype = match field(6) {
            0 => KvDtype::F32,
            1 => KvDtype::F16,
            2 => KvDtype::Fp8,
            d => return Err(HandoffError::Header(format!("unknown element type {d}"))),
        };
        let dims = KvDims {
            num_layers: field(3) as usize,
            num_kv_heads: field(4) as usize,
            head_dim: field(5) as usize,
        };
        let tokens = field(2) as usize;
        // A header's numbers come from another process: their product may not fit a usize.
        let expected = [
            dims.num_layers,
            dims.num_kv_heads,
            dims.head_dim,
            2,
            dtype.bytes(),
        ]
        .into_iter()
        .try_fold(tokens, usize::checked_mul)
        .ok_or_else(|| {
            HandoffError::Header(format!(
                "{tokens} tokens of {dims:?} is more bytes than this machine can address"
            ))
        })?;
        if bytes.len() - HEADER != expected {
            return Err(HandoffError::Length {
                expected,
                found: bytes.len() - HEADER,
            });
        }
        Ok(KvBlob {
            order,
            tokens,
            dims,
            dtype,
            encoded: bytes,
        })
    }
}

/// Where row `(kv, t, h)` of layer view `r` is.
fn row_ptr(r: &KvRef<'_>, kv: usize, t: usize, h: usize) -> *mut u8 {
    let (base, head_stride) = match *r {
        KvRef::Strided {
            k, v, head_stride, ..
        } => ([k, v][kv], head_stride),
        KvRef::Paged {
            k_pool,
            v_pool,
            head_stride,
            ..
        } => ([k_pool, v_pool][kv], head_stride),
    };
    base.wrapping_add((r.offset(t) + h * head_stride) * r.dtype().bytes())
}

/// Walk the rows of `seq`'s first `tokens` tokens in `order`, merging rows adjacent in the
/// cache's memory into runs: `copy(at, wire_offset, len)` once per run.
fn runs(
    cache: &dyn KvCache,
    seq: SeqId,
    tokens: usize,
    order: WireOrder,
    mut copy: impl FnMut(*mut u8, usize, usize),
) -> Result<TransferStats, KvError> {
    let dims = cache.dims();
    let views = (0..dims.num_layers)
        .map(|l| cache.layer(seq, l))
        .collect::<Result<Vec<_>, _>>()?;
    let row = dims.head_dim * views[0].dtype().bytes();
    let mut stats = TransferStats::default();
    let mut run: Option<(*mut u8, usize, usize)> = None; // (memory, wire offset, length)
    let mut wire = 0;
    order.rows(dims, tokens, |l, kv, t, h| {
        let at = row_ptr(&views[l], kv, t, h);
        match &mut run {
            Some((start, _, len)) if start.wrapping_add(*len) == at => *len += row,
            _ => {
                if let Some((start, off, len)) = run.take() {
                    copy(start, off, len);
                    stats.copies += 1;
                }
                run = Some((at, wire, row));
            }
        }
        wire += row;
    });
    if let Some((start, off, len)) = run {
        copy(start, off, len);
        stats.copies += 1;
    }
    stats.bytes = wire;
    Ok(stats)
}

/// Check that `seq` holds `tokens` tokens of KV in `cache`.
fn check_reserved(cache: &dyn KvCache, seq: SeqId, tokens: usize) -> Result<(), KvError> {
    match cache.reserved(seq) {
        Some(held) if held >= tokens => Ok(()),
        Some(held) => Err(KvError::NotAllocated {
            what: format!("tokens {held}..{tokens} of sequence {seq}"),
        }),
        None => Err(KvError::NotAllocated {
            what: format!("sequence {seq}"),
        }),
    }
}

/// The KV of `seq`'s first `tokens` tokens (reserved and computed), as a blob in the order that
/// reads this cache's memory in the fewest runs.
pub fn export_kv(
    cache: &dyn KvCache,
    seq: SeqId,
    tokens: usize,
) -> Result<(KvBlob, TransferStats), KvError> {
    check_reserved(cache, seq, tokens)?;
    let dims = cache.dims();
    let first = cache.layer(seq, 0)?;
    let (order, dtype) = (WireOrder::for_layout(&first, dims), first.dtype());
    let mut blob = KvBlob::zeroed(order, tokens, dims, dtype);
    let rows = &mut blob.encoded[HEADER..];
    let stats = runs(cache, seq, tokens, order, |at, off, len| {
        // SAFETY: `at..at + len` are rows of tokens the sequence holds (checked above), in memory
        // the cache keeps mapped while it holds them; `off + len` is within `rows` (the rows
        // visited are exactly `tokens` × bytes per token).
        unsafe { std::ptr::copy_nonoverlapping(at, rows.as_mut_ptr().add(off), len) }
    })?;
    Ok((blob, stats))
}

/// Write `blob` into `seq`'s first `blob.tokens` tokens of KV, which `seq` must hold (reserved)
/// and no other sequence may share (a fresh reservation). The blob must be of the cache's dims
/// and element type.
pub fn import_kv(
    cache: &dyn KvCache,
    seq: SeqId,
    blob: &KvBlob,
) -> Result<TransferStats, HandoffError> {
    let shape = |d: KvDims, t: KvDtype| {
        format!(
            "{} layers × {} KV heads × {} dims of {}",
            d.num_layers,
            d.num_kv_heads,
            d.head_dim,
            t.name()
        )
    };
    let mismatch = |expected: String| HandoffError::Shape {
        expected,
        found: shape(blob.dims, blob.dtype),
    };
    let dims = cache.dims();
    let first = cache
        .layer(seq, 0)
        .map_err(|e| HandoffError::Header(e.to_string()))?;
    if dims != blob.dims || first.dtype() != blob.dtype {
        return Err(mismatch(shape(dims, first.dtype())));
    }
    check_reserved(cache, seq, blob.tokens).map_err(|e| HandoffError::Header(e.to_string()))?;
    runs(cache, seq, blob.tokens, blob.order, |at, off, len| {
        // SAFETY: `at..at + len` are rows of tokens `seq` holds exclusively (the caller's
        // promise: a fresh reservation shares nothing), mapped while it holds them; `off + len`
        // is within the blob's rows (a blob's rows always match its header, whose shape was
        // checked against the cache's).
        unsafe { std::ptr::copy_nonoverlapping(blob.rows().as_ptr().add(off), at, len) }
    })
    .map_err(|e| HandoffError::Header(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KvBudget, KvMode, TEST_DIMS};
    use vkv_vmm::KvLayout;

    fn modes() -> Vec<(KvMode, &'static str)> {
        vec![
            (KvMode::Paged { block_size: 16 }, "paged"),
            (
                KvMode::Vmm {
                    layout: KvLayout::TokenMajor,
                    page_size: 4096,
                },
                "token-major",
            ),
            (
                KvMode::Vmm {
                    layout: KvLayout::PerLayer,
                    page_size: 4096,
                },
                "per-layer",
            ),
        ]
    }

    fn cache(mode: KvMode) -> Box<dyn KvCache> {
        mode.build(TEST_DIMS, KvDtype::F32, KvBudget::new(4, 256, 4 << 20))
            .unwrap()
    }

    /// Fill `seq`'s first `tokens` tokens with values that name their layer, K/V, token, head
    /// and element.
    fn fill(cache: &dyn KvCache, seq: SeqId, tokens: usize) {
        let d = cache.dims();
        for l in 0..d.num_layers {
            let r = cache.layer(seq, l).unwrap();
            for kv in 0..2 {
                for t in 0..tokens {
                    for h in 0..d.num_kv_heads {
                        let at = row_ptr(&r, kv, t, h) as *mut f32;
                        for e in 0..d.head_dim {
                            let v = (((l * 2 + kv) * 1000 + t) * 10 + h) as f32 + e as f32 / 100.0;
                            // SAFETY: the row is reserved f32 memory of the test's cache.
                            unsafe { at.add(e).write(v) }
                        }
                    }
                }
            }
        }
    }

    fn read(cache: &dyn KvCache, seq: SeqId, tokens: usize) -> Vec<f32> {
        let d = cache.dims();
        let mut out = Vec::new();
        for l in 0..d.num_layers {
            let r = cache.layer(seq, l).unwrap();
            for kv in 0..2 {
                for t in 0..tokens {
                    for h in 0..d.num_kv_heads {
                        let at = row_ptr(&r, kv, t, h) as *const f32;
                        // SAFETY: as in `fill`.
                        out.extend((0..d.head_dim).map(|e| unsafe { at.add(e).read() }));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_mode_hands_its_kv_to_every_mode_row_for_row() {
        let tokens = 37;
        for (from, from_name) in modes() {
            let mut src = cache(from);
            src.reserve(1, tokens).unwrap();
            fill(src.as_ref(), 1, tokens);
            let (blob, out) = export_kv(src.as_ref(), 1, tokens).unwrap();
            let blob = KvBlob::decode(blob.encoded().to_vec()).unwrap();
            assert_eq!(blob.prompt_hash(), 0);
            assert_eq!(out.bytes, tokens * TEST_DIMS.bytes_per_token());
            for (to, to_name) in modes() {
                let mut dst = cache(to);
                dst.reserve(7, 3).unwrap(); // another sequence, so slot and blocks differ
                dst.reserve(5, tokens + 1).unwrap();
                let into = import_kv(dst.as_ref(), 5, &blob).unwrap();
                assert_eq!(into.bytes, out.bytes);
                assert_eq!(
                    read(dst.as_ref(), 5, tokens),
                    read(src.as_ref(), 1, tokens),
                    "{from_name} -> {to_name}"
                );
                dst.audit().unwrap();
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Any mode to any mode, any length, the caches fragmented by other sequences grown in
        /// between: the importer holds exactly the exporter's rows, its books audit clean, and
        /// the bytes moved are the tokens' whole KV.
        #[test]
        fn any_handoff_moves_every_row_and_nothing_else(
            from in 0usize..3,
            to in 0usize..3,
            tokens in 1usize..200,
            steps in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let grow = |c: &mut Box<dyn KvCache>, seq: SeqId, other: SeqId| {
                // Grow `seq` to `tokens` in the given steps, `other` beside it each time.
                let mut at = 0;
                for (i, &n) in steps.iter().cycle().enumerate() {
                    if at >= tokens {
                        break;
                    }
                    at = (at + n).min(tokens);
                    c.reserve(seq, at).unwrap();
                    c.reserve(other, ((i + 1) * 8).min(200)).unwrap();
                }
            };
            let mut src = cache(modes()[from].0);
            grow(&mut src, 1, 2);
            fill(src.as_ref(), 1, tokens);
            let (blob, out) = export_kv(src.as_ref(), 1, tokens).unwrap();
            proptest::prop_assert_eq!(out.bytes, tokens * TEST_DIMS.bytes_per_token());
            let mut dst = cache(modes()[to].0);
            grow(&mut dst, 3, 4);
            let into = import_kv(dst.as_ref(), 3, &blob).unwrap();
            proptest::prop_assert_eq!(into.bytes, out.bytes);
            proptest::prop_assert_eq!(read(dst.as_ref(), 3, tokens), read(src.as_ref(), 1, tokens));
            dst.audit().unwrap();
            src.audit().unwrap();
        }
    }

    #[test]
    fn the_contiguous_layouts_hand_over_in_one_or_two_per_layer_copies() {
        let tokens = 40;
        let copies = |mode| {
            let mut c = cache(mode);
            // Grown a block at a time beside another sequence, so paged blocks are not adjacent.
            for t in (16..tokens + 16).step_by(16) {
                c.reserve(1, t.min(tokens)).unwrap();
                c.reserve(2, t).unwrap();
            }
            export_kv(c.as_ref(), 1, tokens).unwrap().1.copies
        };
        let [paged, token_major, per_layer] = [0, 1, 2].map(|i| copies(modes()[i].0));
        assert_eq!(token_major, 1);
        assert_eq!(per_layer, 2 * TEST_DIMS.num_layers);
        // Paged (a block is head-major): per layer and K/V a run per full block (2 of the 40
        // tokens' blocks) and one per head of the partial last block.
        assert_eq!(
            paged,
            2 * TEST_DIMS.num_layers * (2 + TEST_DIMS.num_kv_heads)
        );
    }

    #[test]
    fn blobs_that_do_not_add_up_are_refused() {
        let mut c = cache(modes()[1].0);
        c.reserve(1, 8).unwrap();
        let (blob, _) = export_kv(c.as_ref(), 1, 8).unwrap();
        let mut marked = blob.clone();
        marked.set_prompt_hash(prompt_hash(&[1, 2, 3]));
        let back = KvBlob::decode(marked.encoded().to_vec()).unwrap();
        assert_eq!(back.prompt_hash(), prompt_hash(&[1, 2, 3]));
        assert_ne!(prompt_hash(&[1, 2, 3]), prompt_hash(&[1, 2, 4]));
        assert_eq!(back.rows(), blob.rows());
        let bytes = blob.encoded().to_vec();
        assert!(matches!(
            KvBlob::decode(bytes[..10].to_vec()),
            Err(HandoffError::Truncated { .. })
        ));
        assert!(matches!(
            KvBlob::decode(bytes[..bytes.len() - 1].to_vec()),
            Err(HandoffError::Length { .. })
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(KvBlob::decode(bad), Err(HandoffError::Magic));
        // A header whose shape overflows is refused, not multiplied into a panic.
        let mut huge = bytes.clone();
        for i in [2, 3, 4, 5] {
            huge[8 + 4 * i..12 + 4 * i].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        assert!(matches!(KvBlob::decode(huge), Err(HandoffError::Header(_))));
        // Unreserved tokens are neither read nor written.
        assert!(export_kv(c.as_ref(), 1, 9).is_err());
        let dims = KvDims {
            head_dim: 2 * blob.dims.head_dim,
            ..blob.dims
        };
        let other = KvBlob::zeroed(blob.order, blob.tokens, dims, blob.dtype);
        c.reserve(2, 8).unwrap();
        assert!(matches!(
            import_kv(c.as_ref(), 2, &other),
            Err(HandoffError::Shape { .. })
        ));
        c.free(2).unwrap();
        assert!(import_kv(c.as_ref(), 2, &blob).is_err());
    }
}
