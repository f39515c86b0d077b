//! The AVX2 integer tile kernel (with FMA and F16C): a 16-column panel as two 256-bit halves,
//! the integer sums by `vpmaddubsw` + `vpmaddwd` — the instruction pair llama.cpp's AVX2
//! `ggml_vec_dot_q4_1_q8_1` / `q8_0_q8_0` use where there is no VNNI.
//!
//! It owns only the arithmetic of one [`Tile`] (up to 2 rows × one panel, as the parent's
//! `tile_rows` picks for AVX2); the repacked layout, the activation quantization, the task split
//! and the dispatch are the parent's. Invariants: `vpmaddubsw` multiplies unsigned by signed
//! bytes into saturating i16 pairs: Q4_1's pair sums (each at most 2 · 15 · 127) of all eight
//! steps still fit i16, so they are added there before widening, and Q8_0's quants (stored
//! offset by 128, which would overflow) are taken back to signed with their sign moved onto the
//! activations. The integer sums are
//! exact and the f32 folding is the portable path's `fma(f32(Σ), d_w · d_x, acc)` (then
//! `fma(m_w, s_x, acc)` for Q4_1), blocks in order — the same bits as the VNNI kernel and the
//! portable path (see the parent's docs). Called only after run-time detection.

use std::arch::x86_64::*;

use super::{Packed, Q8Rows, Tile, BLOCK, PANEL};

/// Tile `t` (`R` rows × one panel) of `w · x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<const R: usize, const Q4: bool>(w: &Packed, x: &Q8Rows, t: &Tile<'_>) {
    let nb = w.blocks();
    let rec = Packed::record_bytes(Q4);
    let qb = Packed::quant_bytes(Q4);
    let wbase = w.data.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let ahead_lines = t.ahead.len().div_ceil(64).div_ceil(nb);
    // Two halves of a panel per accumulator row.
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        super::prefetch_lines(t.ahead, b * ahead_lines, ahead_lines);
        let wp = wbase.add((t.p0 * nb + b) * rec);
        let at: [usize; R] = std::array::from_fn(|r| (t.r0 + r) * nb + b);
        let xp: [*const i8; R] = std::array::from_fn(|r| x.qs.as_ptr().add(at[r] * BLOCK));
        let bcast = |r: usize, s: usize| {
            _mm256_set1_epi32(std::ptr::read_unaligned(xp[r].add(4 * s) as *const i32))
        };
        let load =
            |s: usize, h: usize| _mm256_loadu_si256(wp.add(64 * s + 32 * h) as *const __m256i);
        let mut sum = [[_mm256_setzero_si256(); 2]; R];
        if Q4 {
            // Pairs of nibble × i8 products are at most 2 · 15 · 127, so all eight steps'
            // pairs still fit i16.
            let mask = _mm256_set1_epi8(0x0F);
            let mut pairs = [[_mm256_setzero_si256(); 2]; R];
            for s in 0..4 {
                for h in 0..2 {
                    let v = load(s, h);
                    let lo = _mm256_and_si256(v, mask);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                    for (r, pairs) in pairs.iter_mut().enumerate() {
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, bcast(r, s)),
                            _mm256_maddubs_epi16(hi, bcast(r, s + 4)),
                        );
                        pairs[h] = _mm256_add_epi16(pairs[h], p);
                    }
                }
            }
            for (sum, pairs) in sum.iter_mut().zip(&pairs) {
                for (s, &p) in sum.iter_mut().zip(pairs) {
                    *s = _mm256_madd_epi16(p, ones);
                }
            }
        } else {
            // `vpmaddubsw` multiplies unsigned by signed bytes into i16 pairs, which
            // (q + 128) · q_x would overflow: take q back to signed and move its sign
            // onto the activations.
            for s in 0..8 {
                for h in 0..2 {
                    let q = _mm256_xor_si256(load(s, h), _mm256_set1_epi8(-128));
                    let qabs = _mm256_abs_epi8(q);
                    for (r, sum) in sum.iter_mut().enumerate() {
                        let p = _mm256_maddubs_epi16(qabs, _mm256_sign_epi8(bcast(r, s), q));
                        sum[h] = _mm256_add_epi32(sum[h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        }
        for h in 0..2 {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(qb + 16 * h) as *const __m128i));
            let mw = if Q4 {
                _mm256_cvtph_ps(_mm_loadu_si128(
                    wp.add(qb + 2 * PANEL + 16 * h) as *const __m128i
                ))
            } else {
                _mm256_setzero_ps()
            };
            for r in 0..R {
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*x.d.get_unchecked(at[r])));
                let a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][h]), scale, acc[r][h]);
                acc[r][h] = if Q4 {
                    _mm256_fmadd_ps(mw, _mm256_set1_ps(*x.s.get_unchecked(at[r])), a)
                } else {
                    a
                };
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let (dst, cols) = t.dst(r);
        let mut v = [0f32; PANEL];
        _mm256_storeu_ps(v.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(v.as_mut_ptr().add(8), acc[1]);
        std::ptr::copy_nonoverlapping(v.as_ptr(), dst, cols);
    }
}
