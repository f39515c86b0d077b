//! CPU attention over a sequence's KV cache, and the KV append: the [`KvRef`] addressing (strided
//! over contiguous virtual memory — a vmm slot in either layout — or a paged block table), the
//! element type the cache stores ([`KvDtype`]: f32, or f16 converted on append and on load), and
//! decode/prefill attention of one query row.
//!
//! The kernel works per **GQA group**: the `n_heads / n_kv_heads` query heads that share one KV
//! head are computed together, so each KV head's K and V are read from memory once per query
//! row rather than once per query head (llama.cpp and FlashDecoding do the same on the GPU).
//! Scores are two-pass (all scores, then one max, exp and sum, then P·V), not online: the scores
//! of a row fit in L1/L2 at the contexts the CPU serves. On x86-64 with AVX2, FMA and F16C
//! (detected at run time; `VKV_NO_SIMD` says no), in the child module `simd`:
//! - Q·Kᵀ takes 8 tokens at a time, one 8-lane accumulator per token, and reduces the 8
//!   accumulators to one vector of 8 scores with a `hadd` tree — no horizontal sum per token;
//!   f16 K is converted to f32 once per 8-token block into L1 scratch and read by every head of
//!   the group from there.
//! - `exp` is [`exp_avx2`](simd::exp_avx2), a Cephes-style polynomial (range reduction by ln 2
//!   split in two constants, degree-5 polynomial, exponent by integer shift), maximum relative
//!   error below 2e-7 on `[-87, 0]` (tested against f64 `exp`); inputs below −87 give exactly 0.
//! - P·V accumulates 32 output dimensions of up to 3 heads in registers over all tokens, so each
//!   V row is loaded (and converted) once for the group; with AVX512F (detected at run time,
//!   `VKV_NO_AVX512` says no) 64 dimensions of up to 4 heads in one pass, the same FMAs in the
//!   same order per output, so the same bits.
//!
//! The paged cache (`PagedKv` in the engine) lays a block out head-major, `[kv_head][token]
//! [head_dim]`, so the rows one task reads from a block are contiguous (vLLM's block layout);
//! `attention_timings` (an ignored test) measures a 16-sequence decode step's attention.
//!
//! The result of a row depends only on its query, its KV and its context — never on the other
//! rows of the batch or on how a prompt was chunked — which is what batch invariance and chunked
//! prefill = one-pass prefill need. The portable path (other architectures, `VKV_NO_SIMD`) keeps
//! one head at a time in plain Rust with libm `exp`; its results differ from the SIMD path's by
//! rounding only.

use half::f16;

/// The element type of a CPU KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 4 bytes per element, exact.
    F32,
    /// IEEE half (F16C conversions, round to nearest even): half the memory and half the bytes
    /// read per decode step; values keep 11 significant bits.
    #[default]
    F16,
    /// FP8 E4M3, unscaled (vLLM's `--kv-cache-dtype fp8`; [`super::fp8`]): a quarter of f32's
    /// memory and bytes per decode step; 4 significant bits, magnitudes up to 448.
    Fp8,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
            KvDtype::Fp8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Fp8 => "fp8",
        }
    }

    /// The SIMD kernels' const parameter for this type.
    #[cfg(target_arch = "x86_64")]
    const fn id(self) -> u8 {
        match self {
            KvDtype::F32 => simd::F32,
            KvDtype::F16 => simd::F16,
            KvDtype::Fp8 => simd::FP8,
        }
    }
}

/// Where one sequence's K and V of one layer live. Pointers are to element 0 (of the slot, or of
/// the pool); strides are in elements of `dtype`.
#[derive(Debug, Clone, Copy)]
pub enum KvRef<'a> {
    /// Contiguous: token `t`, head `h` at `k + t·token_stride + h·head_stride` (a vmm slot,
    /// either layout, or a plain tensor).
    Strided {
        k: *mut u8,
        v: *mut u8,
        dtype: KvDtype,
        token_stride: usize,
        head_stride: usize,
    },
    /// Paged: token `t` is slot `t % block_size` of block `blocks[t / block_size]` in the pools.
    Paged {
        k_pool: *mut u8,
        v_pool: *mut u8,
        dtype: KvDtype,
        blocks: &'a [u32],
        block_size: usize,
        block_stride: usize,
        token_stride: usize,
        head_stride: usize,
    },
}

// SAFETY: a KvRef is only a description of memory owned by a KV cache; the functions that
// dereference it are `unsafe` and state what the caller guarantees.
unsafe impl Send for KvRef<'_> {}
unsafe impl Sync for KvRef<'_> {}

impl KvRef<'_> {
    pub fn dtype(&self) -> KvDtype {
        match *self {
            KvRef::Strided { dtype, .. } | KvRef::Paged { dtype, .. } => dtype,
        }
    }

    /// Where token `t`'s K (and V) head 0 is: its element offset from the K (V) base, in
    /// elements of [`KvRef::dtype`] (head `h` is `h · head_stride` further).
    pub fn offset(&self, t: usize) -> usize {
        match *self {
            KvRef::Strided { token_stride, .. } => t * token_stride,
            KvRef::Paged {
                blocks,
                block_size,
                block_stride,
                token_stride,
                ..
            } => blocks[t / block_size] as usize * block_stride + (t % block_size) * token_stride,
        }
    }

    /// `(run, token_stride)`: tokens `t..t + run` from a multiple of `run` are `token_stride`
    /// apart (a paged block; the whole range when strided), so a scan over tokens computes one
    /// [`KvRef::offset`] per run instead of a division per token.
    fn run(&self) -> (usize, usize) {
        match *self {
            KvRef::Strided { token_stride, .. } => (usize::MAX, token_stride),
            KvRef::Paged {
                block_size,
                token_stride,
                ..
            } => (block_size, token_stride),
        }
    }

    /// The K base, the V base and the head stride (elements) that [`KvRef::offset`] counts from.
    pub fn bases(&self) -> (*mut u8, *mut u8, usize) {
        match *self {
            KvRef::Strided {
                k, v, head_stride, ..
            } => (k, v, head_stride),
            KvRef::Paged {
                k_pool,
                v_pool,
                head_stride,
                ..
            } => (k_pool, v_pool, head_stride),
        }
    }

    /// The element offsets of head `head` of tokens `0..context`, in order, without a division
    /// per token.
    fn offsets(&self, context: usize, head: usize) -> impl Iterator<Item = usize> + '_ {
        let (_, _, hs) = self.bases();
        let (run, stride) = self.run();
        let (mut base, mut left) = (0, 0);
        (0..context).map(move |t| {
            if left == 0 {
                (base, left) = (self.offset(t) + head * hs, run);
            }
            let at = base;
            (base, left) = (base + stride, left - 1);
            at
        })
    }
}

/// The head counts of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Write token `pos`'s K and V (`[n_kv_heads][head_dim]` f32 each), converted to the cache's
/// dtype.
///
/// # Safety
/// `kv` must describe memory backed for at least `pos + 1` tokens of `n_kv_heads · head_dim`
/// elements, not accessed concurrently at this token.
pub unsafe fn kv_append(
    kv: &KvRef<'_>,
    pos: usize,
    k: &[f32],
    v: &[f32],
    n_kv_heads: usize,
    head_dim: usize,
) {
    let (kb, vb, hs) = kv.bases();
    let at = kv.offset(pos);
    let dtype = kv.dtype();
    for h in 0..n_kv_heads {
        let (src_k, src_v) = (
            &k[h * head_dim..(h + 1) * head_dim],
            &v[h * head_dim..(h + 1) * head_dim],
        );
        let e = (at + h * hs) * dtype.bytes();
        // SAFETY: the caller guarantees the token is backed; `head_dim` elements of `dtype`.
        unsafe {
            match dtype {
                KvDtype::F32 => {
                    std::ptr::copy_nonoverlapping(src_k.as_ptr(), kb.add(e).cast(), head_dim);
                    std::ptr::copy_nonoverlapping(src_v.as_ptr(), vb.add(e).cast(), head_dim);
                }
                KvDtype::F16 => {
                    to_f16(src_k, kb.add(e).cast());
                    to_f16(src_v, vb.add(e).cast());
                }
                KvDtype::Fp8 => {
                    super::fp8::encode_into(src_k, kb.add(e));
                    super::fp8::encode_into(src_v, vb.add(e));
                }
            }
        }
    }
}

/// Convert `src` to f16 at `dst` (round to nearest even; F16C where available, else `half`,
/// which rounds the same way).
///
/// # Safety
/// `dst` must be valid for `src.len()` writes.
unsafe fn to_f16(src: &[f32], dst: *mut f16) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: F16C was detected; as for this function.
        return unsafe { simd::to_f16(src, dst) };
    }
    for (i, x) in src.iter().enumerate() {
        // SAFETY: as for this function.
        unsafe { dst.add(i).write(f16::from_f32(*x)) };
    }
}

/// Causal GQA attention of one query token over the first `context` tokens of a sequence's KV:
/// `out[h] = softmax(q[h] · K[g]ᵀ · scale) · V[g]` with `g = h / (n_heads / n_kv_heads)`.
///
/// # Safety
/// `kv` must describe memory holding at least `context` written tokens.
pub unsafe fn attention(
    q: &[f32],
    kv: &KvRef<'_>,
    context: usize,
    heads: Heads,
    scale: f32,
    out: &mut [f32],
) {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    } = heads;
    let group = n_heads / n_kv_heads;
    let width = group * head_dim;
    let mut scratch = Vec::new();
    for g in 0..n_kv_heads {
        let range = g * width..(g + 1) * width;
        // SAFETY: forwarded from the caller.
        unsafe {
            attention_group(
                &q[range.clone()],
                kv,
                context,
                g,
                group,
                head_dim,
                scale,
                &mut out[range],
                &mut scratch,
            )
        };
    }
}

/// The `group` query heads `q` (`[group][head_dim]`) that share KV head `kv_head`, attending over
/// the first `context` tokens, into `out` (`[group][head_dim]`); `scratch` is reused space.
///
/// # Safety
/// As for [`attention`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_group(
    q: &[f32],
    kv: &KvRef<'_>,
    context: usize,
    kv_head: usize,
    group: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert!(
        q.len() >= group * head_dim && out.len() >= group * head_dim,
        "attention_group: q or out shorter than {group} heads of {head_dim}"
    );
    if context == 0 {
        // Nothing to attend to (the forward pass always has the row's own token).
        out[..group * head_dim].fill(0.0);
        return;
    }
    let rows = QueryRows {
        q,
        q_stride: 0,
        count: 1,
        first_context: context,
        kv_head,
        group,
        head_dim,
        scale,
        out: out.as_mut_ptr(),
        out_stride: 0,
    };
    // SAFETY: forwarded from the caller; `out` holds the one row's `group` heads.
    unsafe { attention_rows(&rows, kv, scratch) }
}

/// Consecutive query rows of one sequence (a prefill chunk's) for one GQA group: row `r`'s
/// `group` heads at `q[r · q_stride ..]` (`[group][head_dim]`), attending causally over its
/// first `first_context + r` tokens, written to `out + r · out_stride` (`[group][head_dim]`).
#[derive(Clone, Copy)]
pub struct QueryRows<'a> {
    pub q: &'a [f32],
    pub q_stride: usize,
    pub count: usize,
    pub first_context: usize,
    pub kv_head: usize,
    pub group: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub out: *mut f32,
    pub out_stride: usize,
}

/// [`attention_group`] of several consecutive query rows of one sequence at once: each K row is
/// converted, and each V row loaded, once for all of them rather than once per row (a prefill
/// chunk's rows read the same KV), with every row's result bit for bit what it gets alone. The
/// forward pass runs every (chunk's block of rows, KV head) of a batch in parallel through this.
///
/// # Safety
/// `kv` must hold `first_context + count - 1` written tokens; `out` must be valid for the
/// rows' writes, which nothing else reads or writes meanwhile.
pub unsafe fn attention_rows(rows: &QueryRows<'_>, kv: &KvRef<'_>, scratch: &mut Vec<f32>) {
    let QueryRows {
        q,
        q_stride,
        count,
        first_context,
        kv_head,
        group,
        head_dim,
        scale,
        out,
        out_stride,
    } = *rows;
    if count == 0 {
        return;
    }
    assert!(
        first_context >= 1 && q.len() >= (count - 1) * q_stride + group * head_dim,
        "attention_rows: {count} rows of {group} heads of {head_dim} from context {first_context}"
    );
    #[cfg(target_arch = "x86_64")]
    if simd_available() && head_dim.is_multiple_of(8) {
        let rows_fn = match kv.dtype() {
            KvDtype::F32 => simd::attention_rows::<{ KvDtype::F32.id() }>,
            KvDtype::F16 => simd::attention_rows::<{ KvDtype::F16.id() }>,
            KvDtype::Fp8 => simd::attention_rows::<{ KvDtype::Fp8.id() }>,
        };
        // SAFETY: AVX2, FMA and F16C were detected at run time; the rest as for this function.
        return unsafe { rows_fn(rows, kv, scratch, avx512_available()) };
    }
    let head = match kv.dtype() {
        KvDtype::F32 => attention_head_portable::<f32>,
        KvDtype::F16 => attention_head_portable::<f16>,
        KvDtype::Fp8 => attention_head_portable::<Fp8>,
    };
    for r in 0..count {
        for h in 0..group {
            let qh = &q[r * q_stride + h * head_dim..][..head_dim];
            // SAFETY: as for this function.
            unsafe {
                let o = std::slice::from_raw_parts_mut(
                    out.add(r * out_stride + h * head_dim),
                    head_dim,
                );
                head(
                    qh,
                    kv,
                    first_context + r,
                    kv_head,
                    head_dim,
                    scale,
                    o,
                    scratch,
                )
            }
        }
    }
}

/// An element a KV cache stores.
trait KvElem: Copy {
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// An FP8 E4M3 code ([`super::fp8`]).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Fp8(u8);

impl KvElem for Fp8 {
    fn to_f32(self) -> f32 {
        super::fp8::decode(self.0)
    }
}

/// One query head in plain Rust (16 partial sums per dot, libm `exp`).
#[allow(clippy::too_many_arguments)]
unsafe fn attention_head_portable<E: KvElem>(
    qh: &[f32],
    kv: &KvRef<'_>,
    context: usize,
    kv_head: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (kb, vb, _) = kv.bases();
    let (kb, vb) = (kb.cast::<E>(), vb.cast::<E>());
    scores.clear();
    scores.resize(context, 0.0);
    let mut max = f32::NEG_INFINITY;
    let qh = &qh[..head_dim];
    for (s, at) in scores.iter_mut().zip(kv.offsets(context, kv_head)) {
        // SAFETY: t < context, which the caller guarantees is written.
        let kt = unsafe { std::slice::from_raw_parts(kb.add(at), head_dim) };
        let mut acc = [0f32; 16];
        let (cq, ck) = (qh.chunks_exact(16), kt.chunks_exact(16));
        let mut tail = 0f32;
        for (x, y) in cq.remainder().iter().zip(ck.remainder()) {
            tail += x * y.to_f32();
        }
        for (x, y) in cq.zip(ck) {
            for i in 0..16 {
                acc[i] += x[i] * y[i].to_f32();
            }
        }
        let mut h = [0f32; 8];
        for i in 0..8 {
            h[i] = acc[i] + acc[i + 8];
        }
        let d = ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7])) + tail;
        *s = d * scale;
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let out = &mut out[..head_dim];
    out.fill(0.0);
    for (s, at) in scores.iter().zip(kv.offsets(context, kv_head)) {
        // SAFETY: as above.
        let vt = unsafe { std::slice::from_raw_parts(vb.add(at), head_dim) };
        for (o, v) in out.iter_mut().zip(vt) {
            *o += s * v.to_f32();
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Whether AVX2, FMA and F16C can be used (detected at run time; `VKV_NO_SIMD` says no).
pub(super) fn simd_available() -> bool {
    crate::RuntimeSwitches::get().cpu.f16c
}

/// Whether the P·V pass may use AVX-512 (32 vector registers: a GQA group's accumulators of 64
/// dimensions stay in registers in one pass over V); detected at run time, `VKV_NO_AVX512` says
/// no. Its results are the AVX2 pass's bits (the same FMAs per output, in the same order).
fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::RuntimeSwitches::get().cpu.avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd;

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
