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
//! (detected at run time; `VKV_NO_SIMD` says no):
//! - Q·Kᵀ takes 8 tokens at a time, one 8-lane accumulator per token, and reduces the 8
//!   accumulators to one vector of 8 scores with a `hadd` tree — no horizontal sum per token;
//!   f16 K is converted to f32 once per 8-token block into L1 scratch and read by every head of
//!   the group from there.
//! - `exp` is [`exp_avx2`], a Cephes-style polynomial (range reduction by ln 2 split in two
//!   constants, degree-5 polynomial, exponent by integer shift), maximum relative error below
//!   2e-7 on `[-87, 0]` (tested against f64 `exp`); inputs below −87 give exactly 0.
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

    /// Element offset of token `t`'s K (and V) head 0.
    fn offset(&self, t: usize) -> usize {
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

    fn bases(&self) -> (*mut u8, *mut u8, usize) {
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
pub(super) mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::KvRef;
    use crate::cpu::fp8;

    /// The cache's element type, as the kernels' const parameter.
    pub(super) const F32: u8 = 0;
    pub(super) const F16: u8 = 1;
    /// FP8 E4M3, read as its value divided by [`fp8::SCALE`] (the kernels multiply it back in
    /// the attention scale for K and the softmax normalisation for V).
    pub(super) const FP8: u8 = 2;

    /// Bytes per element of dtype `D`.
    const fn esz(d: u8) -> usize {
        match d {
            F32 => 4,
            F16 => 2,
            _ => 1,
        }
    }

    /// What dtype `D`'s loads leave out: 1, or [`fp8::SCALE`].
    const fn unit(d: u8) -> f32 {
        if d == FP8 {
            fp8::SCALE
        } else {
            1.0
        }
    }

    /// See [`super::to_f16`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn to_f16(src: &[f32], dst: *mut f16) {
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src[i..].as_ptr()));
            _mm_storeu_si128(dst.add(i).cast(), h);
        }
        for (i, x) in src.iter().enumerate().skip(n8) {
            dst.add(i).write(f16::from_f32(*x));
        }
    }

    /// 8 elements of dtype `D` from `p` as f32 (FP8: divided by [`fp8::SCALE`]).
    #[inline(always)]
    unsafe fn load8<const D: u8>(p: *const u8) -> __m256 {
        match D {
            F32 => _mm256_loadu_ps(p.cast()),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            _ => fp8::simd::load8(p),
        }
    }

    /// `[Σ a[0], Σ a[1], ..., Σ a[7]]`: the lane sums of 8 vectors as one vector.
    #[inline(always)]
    unsafe fn transpose_sum(a: &[__m256; 8]) -> __m256 {
        let s01 = _mm256_hadd_ps(a[0], a[1]);
        let s23 = _mm256_hadd_ps(a[2], a[3]);
        let s45 = _mm256_hadd_ps(a[4], a[5]);
        let s67 = _mm256_hadd_ps(a[6], a[7]);
        // Per 128-bit half: [a0, a1, a2, a3] partial sums (low half: lanes 0-3; high: 4-7).
        let s0123 = _mm256_hadd_ps(s01, s23);
        let s4567 = _mm256_hadd_ps(s45, s67);
        let lo = _mm256_permute2f128_ps::<0x20>(s0123, s4567);
        let hi = _mm256_permute2f128_ps::<0x31>(s0123, s4567);
        _mm256_add_ps(lo, hi)
    }

    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        _mm_cvtss_f32(m)
    }

    /// `e^x` per lane (see the module docs): Cephes' `expf` reduction and polynomial; relative
    /// error < 2e-7 for x in [-87, 88]; exactly 0 below -87 (and for -∞).
    #[inline(always)]
    pub(in crate::cpu) unsafe fn exp_avx2(x: __m256) -> __m256 {
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        // n = round(x / ln 2); r = x - n·ln 2 with ln 2 split so n·C1 is exact.
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5, // Cephes: 5.0000001201e-1, which is 0.5 in f32
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(pow2)), keep)
    }

    /// See [`super::attention_rows`]; `D` is the cache's element type. `head_dim` is a multiple
    /// of 8 and every row's context at least 1. `avx512`: AVX512F was detected, and the P·V pass
    /// may use it.
    ///
    /// The rows share each K row's conversion and each V row's loads; every (row, head) is
    /// computed with the FMAs, in the order, that it gets alone (its scores for its own tokens,
    /// its softmax over them with the same 8-lane sums, its P·V over them), so the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attention_rows<const D: u8>(
        rows: &super::QueryRows<'_>,
        kv: &KvRef<'_>,
        scratch: &mut Vec<f32>,
        avx512: bool,
    ) {
        let super::QueryRows {
            q,
            q_stride,
            count,
            first_context,
            kv_head,
            group,
            head_dim: hd,
            scale,
            out,
            out_stride,
        } = *rows;
        let esz = esz(D);
        let (kb, vb, _) = kv.bases();
        let context = first_context + count - 1;
        let heads = count * group;
        // Scratch: scores [row][head][padded context], then 8 converted K rows. Every score a
        // row reads is written before (its own tokens below, the rest -∞), so it is not cleared.
        let cp = context.next_multiple_of(8);
        if scratch.len() < heads * cp + 8 * hd {
            scratch.resize(heads * cp + 8 * hd, 0.0);
        }
        let (scores, kbuf) = scratch.split_at_mut(heads * cp);
        let (scores, kbuf) = (scores.as_mut_ptr(), kbuf.as_mut_ptr());
        let q = q.as_ptr();

        // Q·Kᵀ, 8 tokens at a time. The K and V rows of the tokens PREFETCH ahead are asked of
        // memory meanwhile (V for the P·V pass, into L2): paged blocks are scattered and vmm
        // token-major rows are a layer's width apart, so the hardware's stream prefetchers
        // cannot run ahead on their own.
        const PREFETCH: usize = 16;
        let row_bytes = hd * esz;
        let mut ahead = kv.offsets(context, kv_head);
        let mut offsets = kv.offsets(context, kv_head);
        let vscale = _mm256_set1_ps(scale * unit(D));
        for t0 in (0..context).step_by(8) {
            let n_ahead = if t0 == 0 { PREFETCH + 8 } else { 8 };
            for at in ahead.by_ref().take(n_ahead) {
                for line in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(kb.add(at * esz + line).cast());
                    _mm_prefetch::<_MM_HINT_T1>(vb.add(at * esz + line).cast());
                }
            }
            let n = (context - t0).min(8);
            let mut krows = [std::ptr::null::<f32>(); 8];
            for (j, at) in offsets.by_ref().take(n).enumerate() {
                let src = kb.add(at * esz);
                krows[j] = if D == F32 {
                    src.cast()
                } else {
                    let dst = kbuf.add(j * hd);
                    for c in (0..hd).step_by(8) {
                        _mm256_storeu_ps(dst.add(c), load8::<D>(src.add(esz * c)));
                    }
                    dst
                };
            }
            // Lanes past the context read token t0 again; their scores are overwritten below.
            for j in n..8 {
                krows[j] = krows[0];
            }
            // Rows whose context ends before this block have no scores in it.
            for r in (t0.saturating_sub(first_context))..count {
                for h in 0..group {
                    let qh = q.add(r * q_stride + h * hd);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..hd).step_by(8) {
                        let qv = _mm256_loadu_ps(qh.add(c));
                        for (a, row) in acc.iter_mut().zip(&krows) {
                            *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(c)), *a);
                        }
                    }
                    _mm256_storeu_ps(
                        scores.add((r * group + h) * cp + t0),
                        _mm256_mul_ps(transpose_sum(&acc), vscale),
                    );
                }
            }
        }

        // Softmax numerators and sums per (row, head): past the row's context -∞, so e^(−∞) = 0
        // (padding chunks add exact zeros to the sums).
        let mut inv = [0f32; 64];
        let mut inv_big = Vec::new();
        let inv: &mut [f32] = if heads <= 64 {
            &mut inv[..heads]
        } else {
            inv_big.resize(heads, 0.0);
            &mut inv_big
        };
        for (v, inv) in inv.iter_mut().enumerate() {
            let s = scores.add(v * cp);
            for t in (first_context + v / group)..cp {
                *s.add(t) = f32::NEG_INFINITY;
            }
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for t in (0..cp).step_by(8) {
                m = _mm256_max_ps(m, _mm256_loadu_ps(s.add(t)));
            }
            let m = _mm256_set1_ps(hmax(m));
            let mut sum = _mm256_setzero_ps();
            for t in (0..cp).step_by(8) {
                let e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s.add(t)), m));
                _mm256_storeu_ps(s.add(t), e);
                sum = _mm256_add_ps(sum, e);
            }
            *inv = unit(D) / super::super::quant::simd::hsum(sum);
        }

        // P·V: 32 dimensions (or 8 when head_dim is not a multiple of 32) of up to 3 (row, head)
        // pairs per pass over the tokens.
        let job = PvJob {
            kv,
            vb,
            kv_head,
            p: scores,
            cp,
            out,
            out_stride,
            group,
            first_context,
            hd,
        };
        let mut h0 = 0;
        // AVX-512: 64 dimensions of up to 4 pairs per pass (16 accumulators, 4 V vectors).
        while avx512 && hd.is_multiple_of(64) && h0 < heads {
            let g = (heads - h0).min(4);
            for d0 in (0..hd).step_by(64) {
                match g {
                    1 => pv512::<D, 1>(&job, h0, d0),
                    2 => pv512::<D, 2>(&job, h0, d0),
                    3 => pv512::<D, 3>(&job, h0, d0),
                    _ => pv512::<D, 4>(&job, h0, d0),
                }
            }
            h0 += g;
        }
        while h0 < heads {
            let g = (heads - h0).min(3);
            let mut d0 = 0;
            while d0 < hd {
                if hd - d0 >= 32 {
                    match g {
                        1 => pv::<D, 1, 4>(&job, h0, d0),
                        2 => pv::<D, 2, 4>(&job, h0, d0),
                        _ => pv::<D, 3, 4>(&job, h0, d0),
                    }
                    d0 += 32;
                } else {
                    match g {
                        1 => pv::<D, 1, 1>(&job, h0, d0),
                        2 => pv::<D, 2, 1>(&job, h0, d0),
                        _ => pv::<D, 3, 1>(&job, h0, d0),
                    }
                    d0 += 8;
                }
            }
            h0 += g;
        }
        for (v, inv) in inv.iter().enumerate() {
            let f = _mm256_set1_ps(*inv);
            for c in (0..hd).step_by(8) {
                let p = job.out_of(v).add(c);
                _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), f));
            }
        }
    }

    /// [`pv`] for 64 dimensions (`d0 .. d0 + 64`) in 512-bit vectors: per output the same FMAs
    /// in the same order (tokens in sequence, from zero), so the same bits.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn pv512<const D: u8, const G: usize>(job: &PvJob<'_, '_>, h0: usize, d0: usize) {
        let esz = esz(D);
        let mut acc = [[_mm512_setzero_ps(); 4]; G];
        let lim: [usize; G] = std::array::from_fn(|i| job.context_of(h0 + i));
        for (t, at) in job.kv.offsets(lim[G - 1], job.kv_head).enumerate() {
            let src = job.vb.add((at + d0) * esz);
            let v: [__m512; 4] = std::array::from_fn(|w| match D {
                F32 => _mm512_loadu_ps(src.add(64 * w).cast()),
                F16 => _mm512_cvtph_ps(_mm256_loadu_si256(src.add(32 * w).cast())),
                _ => fp8::simd::load16(src.add(16 * w)),
            });
            for (i, acc) in acc.iter_mut().enumerate() {
                // A pair's own tokens only (a later row's reach further).
                if t < lim[i] {
                    let pt = _mm512_set1_ps(*job.p.add((h0 + i) * job.cp + t));
                    for (a, v) in acc.iter_mut().zip(&v) {
                        *a = _mm512_fmadd_ps(pt, *v, *a);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (w, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(job.out_of(h0 + i).add(d0 + 16 * w), *a);
            }
        }
    }

    /// What the P·V passes of one GQA group share: its KV, the V base, the context, the
    /// softmax numerators `p` (`cp` per head) and the output (`hd` per head).
    #[derive(Clone, Copy)]
    struct PvJob<'a, 'k> {
        kv: &'a KvRef<'k>,
        vb: *mut u8,
        kv_head: usize,
        /// Softmax numerators, `cp` per (row, head) pair.
        p: *const f32,
        cp: usize,
        /// Row `r`'s head `h` at `out + r · out_stride + h · hd`.
        out: *mut f32,
        out_stride: usize,
        /// Heads per row.
        group: usize,
        /// Row `r` attends over `first_context + r` tokens.
        first_context: usize,
        hd: usize,
    }

    impl PvJob<'_, '_> {
        /// Tokens (row, head) pair `v` attends over.
        fn context_of(&self, v: usize) -> usize {
            self.first_context + v / self.group
        }

        /// Where pair `v`'s output starts.
        fn out_of(&self, v: usize) -> *mut f32 {
            self.out
                .wrapping_add((v / self.group) * self.out_stride + (v % self.group) * self.hd)
        }
    }

    /// `out[h0 + i][d0 .. d0 + 8W] = Σ_t p[h0 + i][t] · V[t][d0 .. d0 + 8W]` for `i < G`.
    #[inline(always)]
    unsafe fn pv<const D: u8, const G: usize, const W: usize>(
        job: &PvJob<'_, '_>,
        h0: usize,
        d0: usize,
    ) {
        let esz = esz(D);
        let mut acc = [[_mm256_setzero_ps(); W]; G];
        let lim: [usize; G] = std::array::from_fn(|i| job.context_of(h0 + i));
        for (t, at) in job.kv.offsets(lim[G - 1], job.kv_head).enumerate() {
            let src = job.vb.add((at + d0) * esz);
            let mut v = [_mm256_setzero_ps(); W];
            for (w, v) in v.iter_mut().enumerate() {
                *v = load8::<D>(src.add(8 * w * esz));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                if t < lim[i] {
                    let pt = _mm256_broadcast_ss(&*job.p.add((h0 + i) * job.cp + t));
                    for (a, v) in acc.iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(pt, *v, *a);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (w, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(job.out_of(h0 + i).add(d0 + 8 * w), *a);
            }
        }
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
