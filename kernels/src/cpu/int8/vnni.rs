//! The AVX512-VNNI integer tile kernel: 512-bit vectors, one 16-column panel per vector, the
//! integer sums by `vpdpbusd` (u8 × i8, four products per i32 lane) — oneDNN's VNNI GEMM idea
//! applied to ggml's Q4_1 / Q8_0 blocks, in the repacked layout of the parent's docs.
//!
//! It owns only the arithmetic of one [`Tile`] (up to 8 rows × one panel: 8 i32 and 8 f32
//! accumulators of the 32 registers, the shape the parent's `tile_rows` measured best); the
//! layout, the activation quantization, the task split and the dispatch are the parent's.
//! Invariants: the integer sums are exact (their order is free, so a small tile sums a block's
//! steps in two chains); the f32 folding is the portable path's `fma(f32(Σ), d_w · d_x, acc)`
//! (then `fma(m_w, s_x, acc)` for Q4_1), blocks in order, so every output has the same bits as
//! on AVX2 or the portable path whatever the tile shape. Called only after run-time detection
//! (AVX512F, AVX512BW, AVX512-VNNI, F16C).

use std::arch::x86_64::*;

use super::{Packed, Q8Rows, Tile, BLOCK, PANEL};

/// Tile `t` (`R` rows × one panel) of `w · x`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile<const R: usize, const Q4: bool>(w: &Packed, x: &Q8Rows, t: &Tile<'_>) {
    let nb = w.blocks();
    let rec = Packed::record_bytes(Q4);
    let qb = Packed::quant_bytes(Q4);
    let wbase = w.data.as_ptr();
    let mut acc = [_mm512_setzero_ps(); R];
    let ahead_lines = t.ahead.len().div_ceil(64).div_ceil(nb);
    for b in 0..nb {
        super::prefetch_lines(t.ahead, b * ahead_lines, ahead_lines);
        let wp = wbase.add((t.p0 * nb + b) * rec);
        let at: [usize; R] = std::array::from_fn(|r| (t.r0 + r) * nb + b);
        let xp: [*const i8; R] = std::array::from_fn(|r| x.qs.as_ptr().add(at[r] * BLOCK));
        let bcast = |r: usize, s: usize| {
            _mm512_set1_epi32(std::ptr::read_unaligned(xp[r].add(4 * s) as *const i32))
        };
        let mut sum = [_mm512_setzero_si512(); R];
        // A small tile sums a block's steps in two chains (integers: the order is free),
        // else one `vpdpbusd` waits for the previous one.
        let mut odd = [_mm512_setzero_si512(); R];
        let split = R < 4;
        if Q4 {
            let mask = _mm512_set1_epi8(0x0F);
            for s in 0..4 {
                let v = _mm512_loadu_si512(wp.add(64 * s) as *const _);
                let lo = _mm512_and_si512(v, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                for r in 0..R {
                    let (xl, xh) = (bcast(r, s), bcast(r, s + 4));
                    sum[r] = _mm512_dpbusd_epi32(sum[r], lo, xl);
                    if split {
                        odd[r] = _mm512_dpbusd_epi32(odd[r], hi, xh);
                    } else {
                        sum[r] = _mm512_dpbusd_epi32(sum[r], hi, xh);
                    }
                }
            }
        } else {
            for (r, sum) in sum.iter_mut().enumerate() {
                *sum = _mm512_set1_epi32(*x.start.get_unchecked(at[r]));
            }
            for s in 0..8 {
                let wv = _mm512_loadu_si512(wp.add(64 * s) as *const _);
                for r in 0..R {
                    let xv = bcast(r, s);
                    if split && s % 2 == 1 {
                        odd[r] = _mm512_dpbusd_epi32(odd[r], wv, xv);
                    } else {
                        sum[r] = _mm512_dpbusd_epi32(sum[r], wv, xv);
                    }
                }
            }
        }
        if split {
            for r in 0..R {
                sum[r] = _mm512_add_epi32(sum[r], odd[r]);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(qb) as *const __m256i));
        let mw = if Q4 {
            _mm512_cvtph_ps(_mm256_loadu_si256(wp.add(qb + 2 * PANEL) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        for r in 0..R {
            let dx = _mm512_set1_ps(*x.d.get_unchecked(at[r]));
            let scale = _mm512_mul_ps(dw, dx);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r]), scale, acc[r]);
            if Q4 {
                let sx = _mm512_set1_ps(*x.s.get_unchecked(at[r]));
                acc[r] = _mm512_fmadd_ps(mw, sx, acc[r]);
            }
        }
    }
    for (r, &v) in acc.iter().enumerate() {
        let (dst, cols) = t.dst(r);
        if cols == PANEL {
            _mm512_storeu_ps(dst, v);
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << cols) - 1) as u16, v);
        }
    }
}
