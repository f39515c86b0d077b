//! The x86-64 kernels of CPU attention: the GQA-group rows of [`super::attention_rows`] in
//! AVX2, FMA and F16C (the P·V pass also in AVX-512F), the f16 conversion of the KV append, and
//! the vector `exp` that SwiGLU ([`crate::cpu::silu_mul`]) uses as well.
//!
//! Every kernel is `unsafe` and compiled with `#[target_feature]`; the parent's dispatch calls it
//! only after run-time detection (`simd_available`, `avx512_available`), never by `target-cpu`.
//! The cache's element type is a const parameter (`F32`, `F16`, `FP8`), so each dtype gets its
//! own loads without a branch per element. Invariants the callers keep: `head_dim` is a multiple
//! of 8 and every row's context is at least 1. What makes the results batch-invariant: every
//! (row, head) output is computed with the FMAs, in the order, that it gets alone — whatever the
//! rows beside it, the chunking of a prompt, or whether the AVX-512 P·V pass runs — so the same
//! bits.
//!
//! The ideas: Q·Kᵀ eight tokens at a time reduced with a `hadd` transpose (no horizontal sum per
//! token), the GQA group's heads sharing each K and V row as llama.cpp and FlashDecoding do on
//! the GPU, and `exp` as Cephes' `expf` (range reduction by ln 2 split in two constants, a
//! degree-5 polynomial, the exponent by integer shift). The parent module's docs give the
//! measured design.

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
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src[i..].as_ptr()));
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
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
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
