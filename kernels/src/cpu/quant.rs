//! Matrix products with weights kept in ggml's block-quantized formats, so decoding reads
//! 0.625 bytes per Q4_1 weight (1.06 for Q8_0) instead of 4 for f32 — decode on the CPU is bound
//! by the bytes of weights it reads per token.
//!
//! Two ways to meet the activations ([`Activations`]):
//! - **Int8** (the model's default, [`matmul_w_int8`], module `int8`): each activation row is
//!   quantized to 8 bits per 32-element block and multiplied with the raw quants in integers
//!   (AVX512-VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`), as llama.cpp does. A row costs a fraction of
//!   the f32 path's multiply-adds, so a batch of rows sharing each weight load gains far more, and
//!   the result of a row never depends on the other rows (batch-invariant by construction).
//! - **F32** (the reference, this module): activations stay f32 and every block is dequantized
//!   in registers — `w_i = d·q_i + m` for Q4_1, `d·q_i` for Q8_0 — once per block for all the
//!   activation rows that use it, so a row costs only its multiply-adds. This is the same
//!   function as the f32 product of the dequantized weights up to summation order. An AVX2 +
//!   FMA path is picked at run time (the binary is built for any x86-64); elsewhere a scalar path
//!   computes the same sums.
//!
//! Block layouts (ggml): Q4_1 — 20 bytes per 32 weights: f16 `d`, f16 `m`, 16 bytes of nibbles,
//! byte `j` holding weight `j` (low nibble) and `j + 16` (high nibble). Q8_0 — 34 bytes per 32
//! weights: f16 `d`, 32 signed bytes. [`Weight`] keeps them (scales as f32) for the f32 path and
//! the embedding lookup, and the int8 path's repacked copy beside them once it is built.

use half::f16;
use rayon::prelude::*;

use super::int8::{self, PackedCell};

/// A weight matrix `[rows][cols]` (`[out][in]`) in one of the formats the CPU multiplies.
/// Quantized formats are repacked at load: f32 scales (ggml stores f16, and converting them in
/// the inner loop costs more than the arithmetic) and the bare quants.
#[derive(Debug, Clone)]
pub enum Weight {
    F32(Vec<f32>),
    /// Per block: `scales[2b] = d`, `scales[2b + 1] = m`; `qs[16b..16b + 16]` nibbles.
    /// `int8`: the same weights repacked for [`matmul_w_int8`], built on its first use.
    Q4_1 {
        scales: Vec<f32>,
        qs: Vec<u8>,
        int8: PackedCell,
    },
    /// Per block: `scales[b] = d`; `qs[32b..32b + 32]`.
    Q8_0 {
        scales: Vec<f32>,
        qs: Vec<i8>,
        int8: PackedCell,
    },
}

/// Weights per quantization block.
pub const BLOCK: usize = 32;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl Weight {
    /// Repack ggml Q4_1 blocks (20 bytes each).
    pub fn from_q4_1(bytes: &[u8]) -> Self {
        let blocks = bytes.chunks_exact(20);
        let mut scales = Vec::with_capacity(blocks.len() * 2);
        let mut qs = Vec::with_capacity(blocks.len() * 16);
        for blk in blocks {
            scales.extend([f16_at(blk, 0), f16_at(blk, 2)]);
            qs.extend_from_slice(&blk[4..20]);
        }
        Weight::Q4_1 {
            scales,
            qs,
            int8: PackedCell::new(),
        }
    }

    /// Repack ggml Q8_0 blocks (34 bytes each).
    pub fn from_q8_0(bytes: &[u8]) -> Self {
        let blocks = bytes.chunks_exact(34);
        let mut scales = Vec::with_capacity(blocks.len());
        let mut qs = Vec::with_capacity(blocks.len() * 32);
        for blk in blocks {
            scales.push(f16_at(blk, 0));
            qs.extend(blk[2..34].iter().map(|&q| q as i8));
        }
        Weight::Q8_0 {
            scales,
            qs,
            int8: PackedCell::new(),
        }
    }

    /// Number of elements held.
    pub fn len(&self) -> usize {
        match self {
            Weight::F32(v) => v.len(),
            Weight::Q4_1 { qs, .. } => qs.len() * 2,
            Weight::Q8_0 { qs, .. } => qs.len(),
        }
    }

    /// One matrix with the rows of `parts` one after the other (Q, K and V projections as one
    /// product), if they all have the same format; else the parts back, unchanged.
    pub fn stack_rows(parts: Vec<Weight>) -> Result<Weight, Vec<Weight>> {
        let same = parts
            .windows(2)
            .all(|w| std::mem::discriminant(&w[0]) == std::mem::discriminant(&w[1]));
        if parts.is_empty() || !same {
            return Err(parts);
        }
        let mut parts = parts.into_iter();
        let mut out = parts.next().expect("not empty");
        for p in parts {
            match (&mut out, p) {
                (Weight::F32(a), Weight::F32(b)) => a.extend(b),
                (
                    Weight::Q4_1 {
                        scales, qs, int8, ..
                    },
                    Weight::Q4_1 {
                        scales: s, qs: q, ..
                    },
                ) => {
                    scales.extend(s);
                    qs.extend(q);
                    *int8 = PackedCell::new();
                }
                (
                    Weight::Q8_0 {
                        scales, qs, int8, ..
                    },
                    Weight::Q8_0 {
                        scales: s, qs: q, ..
                    },
                ) => {
                    scales.extend(s);
                    qs.extend(q);
                    *int8 = PackedCell::new();
                }
                _ => unreachable!("formats checked above"),
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `r` (of `cols` weights) as f32 — the embedding lookup.
    pub fn row(&self, r: usize, cols: usize, out: &mut [f32]) {
        let blocks = cols / BLOCK;
        match self {
            Weight::F32(v) => out[..cols].copy_from_slice(&v[r * cols..(r + 1) * cols]),
            Weight::Q4_1 { scales, qs, .. } => {
                for (b, o) in (r * blocks..(r + 1) * blocks).zip(out.chunks_exact_mut(BLOCK)) {
                    let (d, m) = (scales[2 * b], scales[2 * b + 1]);
                    let q = &qs[16 * b..16 * b + 16];
                    for j in 0..16 {
                        o[j] = d * (q[j] & 0xF) as f32 + m;
                        o[j + 16] = d * (q[j] >> 4) as f32 + m;
                    }
                }
            }
            Weight::Q8_0 { scales, qs, .. } => {
                for (b, o) in (r * blocks..(r + 1) * blocks).zip(out.chunks_exact_mut(BLOCK)) {
                    let q = &qs[32 * b..32 * b + 32];
                    for j in 0..BLOCK {
                        o[j] = scales[b] * q[j] as f32;
                    }
                }
            }
        }
    }
}

/// `out[m][n] = Σ_k x[m][k] · w[n][k]` for any [`Weight`] format, the fastest way for `m`: rows
/// in registers when few, tiles through `gemm` when many. A row's result can depend on `m` (gemm
/// sums in another order), so it can change with what else is in the batch; see
/// [`matmul_w_rowwise`].
pub fn matmul_w(x: &[f32], m: usize, k: usize, w: &Weight, n: usize, out: &mut [f32]) {
    if let Weight::F32(v) = w {
        return super::matmul_t(x, m, k, v, n, out);
    }
    let schedule = if m > SMALL_M {
        Schedule::Tiles
    } else {
        Schedule::Registers
    };
    matmul_quantized(x, m, k, w, n, out, schedule);
}

/// [`matmul_w`] where every output row is computed by the same instructions in the same order
/// whatever `m` and the other rows are: **batch invariance** (a sequence's logits are bit-for-bit
/// the same alone or batched with others; vLLM's `VLLM_BATCH_INVARIANT` and Thinking Machines'
/// "Defeating Nondeterminism in LLM Inference" make the same trade). Quantized weights always take
/// the register kernel; f32 weights a dot product per output. Slower for large `m` (prefill).
pub fn matmul_w_rowwise(x: &[f32], m: usize, k: usize, w: &Weight, n: usize, out: &mut [f32]) {
    match w {
        Weight::F32(v) => matmul_f32_rowwise(x, m, k, v, n, out),
        _ => matmul_quantized(x, m, k, w, n, out, Schedule::RowWise),
    }
}

/// How activations meet quantized weights in a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32 activations, weights dequantized in registers ([`matmul_w`], [`matmul_w_rowwise`]):
    /// the f32 product of the dequantized weights, up to summation order. The reference.
    F32,
    /// Activations quantized to 8 bits per block and integer dot products
    /// ([`matmul_w_int8`]; llama.cpp's Q8_1 path). Batch-invariant by construction.
    Int8,
}

impl Activations {
    /// The runtime switch (`VKV_CPU_ACTIVATIONS=f32|int8`, see [`crate::RuntimeSwitches`]),
    /// else `default`.
    pub fn from_switches(default: Activations) -> Activations {
        crate::RuntimeSwitches::get()
            .cpu_activations
            .unwrap_or(default)
    }
}

impl Weight {
    /// Whether the weights are block-quantized (Q4_1, Q8_0).
    pub fn is_quantized(&self) -> bool {
        !matches!(self, Weight::F32(_))
    }
}

impl Weight {
    /// Build the packed form [`matmul_w_int8`] uses for this `[rows][k]` matrix now, rather than
    /// on the first product (a model's load, not its first request, should pay for it).
    pub fn pack_int8(&self, k: usize) {
        self.int8(k);
    }

    fn int8(&self, k: usize) -> Option<&int8::Packed> {
        let packed = match self {
            Weight::F32(_) => return None,
            Weight::Q4_1 { scales, qs, int8 } => {
                int8.get_or_init(|| int8::Packed::from_q4_1(scales, qs, k))
            }
            Weight::Q8_0 { scales, qs, int8 } => {
                int8.get_or_init(|| int8::Packed::from_q8_0(scales, qs, k))
            }
        };
        assert_eq!(packed.cols(), k, "matmul_w_int8: columns of the weight");
        Some(packed)
    }
}

/// [`matmul_w`] with each activation row quantized to 8 bits per 32-element block and integer
/// dot products with the quantized weights (module `int8`). Every output row is computed the same
/// way whatever `m` and the other rows are (batch-invariant). f32 weights take
/// [`matmul_w_rowwise`]'s f32 path.
pub fn matmul_w_int8(x: &[f32], m: usize, k: usize, w: &Weight, n: usize, out: &mut [f32]) {
    match (w, w.int8(k)) {
        (_, Some(packed)) => int8::matmul_packed(x, m, k, packed, n, out),
        (Weight::F32(v), None) => matmul_f32_rowwise(x, m, k, v, n, out),
        (_, None) => unreachable!("quantized weights pack"),
    }
}

/// [`matmul_w_int8`] of a stacked weight (the rows of several matrices one after the other) with
/// each part's columns written to its own output, `outs[i]` `[m][width_i]`: no `[m][Σ width]`
/// intermediate to copy out of when every width but the last is a multiple of the packed
/// panel (16 columns); otherwise, and for f32 weights, the stacked product is computed and its
/// parts copied out.
pub fn matmul_w_int8_split(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Weight,
    outs: &mut [(&mut [f32], usize)],
) {
    let aligned = outs[..outs.len().saturating_sub(1)]
        .iter()
        .all(|(_, width)| width.is_multiple_of(int8::PANEL));
    match (w.int8(k), aligned) {
        (Some(packed), true) => int8::matmul_packed_split(x, m, k, packed, outs),
        _ => {
            let n: usize = outs.iter().map(|(_, width)| width).sum();
            let mut all = vec![0f32; m * n];
            matmul_w_int8(x, m, k, w, n, &mut all);
            split_columns(&all, m, outs);
        }
    }
}

/// Copy `all` (`[m][Σ widths]`, a stacked product's result) out into the parts `outs`
/// (`[m][width_i]` each).
pub fn split_columns(all: &[f32], m: usize, outs: &mut [(&mut [f32], usize)]) {
    let n: usize = outs.iter().map(|(_, width)| width).sum();
    for r in 0..m {
        let mut at = r * n;
        for (out, width) in outs.iter_mut() {
            out[r * *width..(r + 1) * *width].copy_from_slice(&all[at..at + *width]);
            at += *width;
        }
    }
}

fn matmul_f32_rowwise(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        w.len() >= n * k && x.len() >= m * k && out.len() >= m * n,
        "matmul_w_rowwise shapes"
    );
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(TASK * m.max(1))
        .enumerate()
        .for_each(|(task, chunk)| {
            for (jj, dst) in chunk.chunks_mut(m).enumerate() {
                let wj = &w[(task * TASK + jj) * k..][..k];
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = super::dot(&x[r * k..(r + 1) * k], wj);
                }
            }
        });
    transpose_into(&out_t, m, n, out);
}

/// `out[r][j] = out_t[j][r]`, 16 columns (a cache line of `out`) at a time: column by column,
/// the `m` rows written would be `4n` bytes apart, and with `n` a multiple of 1024 (3072, 49152)
/// they all fall in one set of the L1 cache, which holds only 8 of them.
pub(super) fn transpose_into(out_t: &[f32], m: usize, n: usize, out: &mut [f32]) {
    const TILE: usize = 16;
    for j0 in (0..n).step_by(TILE) {
        let cols = TILE.min(n - j0);
        for r in 0..m {
            let dst = &mut out[r * n + j0..r * n + j0 + cols];
            for (jj, d) in dst.iter_mut().enumerate() {
                *d = out_t[(j0 + jj) * m + r];
            }
        }
    }
}

/// How a quantized product is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schedule {
    /// Dequantized tiles through gemm (many rows).
    Tiles,
    /// Weights decoded in registers, the fastest way for the group's row count.
    Registers,
    /// Weights decoded in registers, every row summed the same way whatever the group's size.
    RowWise,
}

/// Quantized product, computed as `schedule` says.
fn matmul_quantized(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Weight,
    n: usize,
    out: &mut [f32],
    schedule: Schedule,
) {
    assert!(
        k.is_multiple_of(BLOCK) && w.len() >= n * k && x.len() >= m * k && out.len() >= m * n,
        "matmul_w shapes"
    );
    if m == 0 {
        return;
    }
    // Transposed result [n][m], so each task owns a contiguous piece.
    let mut out_t = vec![0f32; n * m];
    if schedule == Schedule::Tiles {
        // Many activation rows (prefill): dequantize a tile of weight rows once and let gemm
        // do the arithmetic.
        out_t
            .par_chunks_mut(TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let rows = chunk.len() / m;
                let mut tile = vec![0f32; rows * k];
                for jj in 0..rows {
                    w.row(task * TASK + jj, k, &mut tile[jj * k..(jj + 1) * k]);
                }
                // chunk[jj][r] = Σ tile[jj][kk] · x[r][kk]
                super::matmul_t_serial(&tile, rows, k, x, m, chunk);
            });
    } else {
        let avx2 = super::fma_available();
        out_t
            .par_chunks_mut(TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (jj, dst) in chunk.chunks_mut(m).enumerate() {
                    let j = task * TASK + jj;
                    for r0 in (0..m).step_by(ROWS) {
                        let g = ROWS.min(m - r0);
                        let mut acc = [0f32; ROWS];
                        let xs = &x[r0 * k..(r0 + g) * k];
                        if avx2 {
                            // SAFETY: AVX2 and FMA were detected at run time.
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                simd::dot_rows(
                                    w,
                                    j,
                                    xs,
                                    k,
                                    g,
                                    schedule == Schedule::RowWise,
                                    &mut acc,
                                )
                            };
                        } else {
                            scalar_dot_rows(w, j, xs, k, g, &mut acc);
                        }
                        dst[r0..r0 + g].copy_from_slice(&acc[..g]);
                    }
                }
            });
    }
    transpose_into(&out_t, m, n, out);
}

/// Up to this many activation rows, decode weights in registers; beyond, dequantize tiles + gemm.
const SMALL_M: usize = 16;
/// Activation rows handled together: each weight block is decoded once for all of them.
const ROWS: usize = 8;
/// Output rows per parallel task.
pub(super) const TASK: usize = 32;

/// `acc[r] = dot(w[j], xs[r])` for `g ≤ ROWS` activation rows, in plain Rust.
fn scalar_dot_rows(w: &Weight, j: usize, xs: &[f32], k: usize, g: usize, acc: &mut [f32; ROWS]) {
    let blocks = k / BLOCK;
    let mut q = [0f32; BLOCK];
    for b in 0..blocks {
        let at = j * blocks + b;
        // The block's weights, dequantized once for all rows.
        match w {
            Weight::Q4_1 { scales, qs, .. } => {
                let (d, m) = (scales[2 * at], scales[2 * at + 1]);
                let nib = &qs[16 * at..16 * at + 16];
                for i in 0..16 {
                    q[i] = (nib[i] & 0xF) as f32 * d + m;
                    q[i + 16] = (nib[i] >> 4) as f32 * d + m;
                }
            }
            Weight::Q8_0 { scales, qs, .. } => {
                for (q, &v) in q.iter_mut().zip(&qs[32 * at..32 * at + 32]) {
                    *q = v as f32 * scales[at];
                }
            }
            Weight::F32(_) => unreachable!("f32 weights go through gemm"),
        }
        for r in 0..g {
            let x = &xs[r * k + b * BLOCK..][..BLOCK];
            let s: f32 = q.iter().zip(x).map(|(q, x)| q * x).sum();
            acc[r] += s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use std::arch::x86_64::*;

    use super::{Weight, BLOCK, ROWS};

    /// The sum of the 8 lanes of `v` (also the int8 kernels').
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::cpu) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `acc[r] = dot(w[j], xs[r])` for `g ≤ ROWS` activation rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(
        w: &Weight,
        j: usize,
        xs: &[f32],
        k: usize,
        g: usize,
        rowwise: bool,
        acc: &mut [f32; ROWS],
    ) {
        // A row count known at compile time keeps the accumulators in registers. Few rows get
        // two accumulators each (shorter chains of dependent FMAs); many get one (sixteen would
        // not fit the sixteen registers). `rowwise` keeps one for every `g`, so each row is
        // summed the same way whatever the batch (see `matmul_w_rowwise`).
        match (g, rowwise) {
            (1, false) => rows::<1, 2>(w, j, xs, k, acc),
            (2, false) => rows::<2, 2>(w, j, xs, k, acc),
            (3, false) => rows::<3, 2>(w, j, xs, k, acc),
            (4, false) => rows::<4, 2>(w, j, xs, k, acc),
            (1, true) => rows::<1, 1>(w, j, xs, k, acc),
            (2, true) => rows::<2, 1>(w, j, xs, k, acc),
            (3, true) => rows::<3, 1>(w, j, xs, k, acc),
            (4, true) => rows::<4, 1>(w, j, xs, k, acc),
            (5, _) => rows::<5, 1>(w, j, xs, k, acc),
            (6, _) => rows::<6, 1>(w, j, xs, k, acc),
            (7, _) => rows::<7, 1>(w, j, xs, k, acc),
            _ => rows::<8, 1>(w, j, xs, k, acc),
        }
    }

    /// [`dot_rows`] for `G` rows and `A` accumulators per row (1, or 2 for the two halves of
    /// each block). Each block's weights are decoded once, then used by every row.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const G: usize, const A: usize>(
        w: &Weight,
        j: usize,
        xs: &[f32],
        k: usize,
        acc: &mut [f32; ROWS],
    ) {
        let blocks = k / BLOCK;
        let mut vacc = [[_mm256_setzero_ps(); 2]; G];
        let mask = _mm_set1_epi8(0x0F);
        for b in 0..blocks {
            let at = j * blocks + b;
            let (wv, d, mo) = match w {
                Weight::Q4_1 { scales, qs, .. } => {
                    let q = _mm_loadu_si128(qs.as_ptr().add(16 * at) as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    let cvt = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    let wv = [
                        cvt(lo),
                        cvt(_mm_srli_si128(lo, 8)),
                        cvt(hi),
                        cvt(_mm_srli_si128(hi, 8)),
                    ];
                    (
                        wv,
                        *scales.get_unchecked(2 * at),
                        *scales.get_unchecked(2 * at + 1),
                    )
                }
                Weight::Q8_0 { scales, qs, .. } => {
                    let p = qs.as_ptr().add(32 * at) as *const u8;
                    let cvt = |o: usize| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            p.add(o) as *const __m128i
                        )))
                    };
                    (
                        [cvt(0), cvt(8), cvt(16), cvt(24)],
                        *scales.get_unchecked(at),
                        0.0,
                    )
                }
                Weight::F32(_) => unreachable!("f32 weights go through gemm"),
            };
            let (dv, mv) = (_mm256_set1_ps(d), _mm256_set1_ps(mo));
            let ws = [
                _mm256_fmadd_ps(wv[0], dv, mv),
                _mm256_fmadd_ps(wv[1], dv, mv),
                _mm256_fmadd_ps(wv[2], dv, mv),
                _mm256_fmadd_ps(wv[3], dv, mv),
            ];
            for (r, v) in vacc.iter_mut().enumerate() {
                let x = xs.as_ptr().add(r * k + b * BLOCK);
                v[0] = _mm256_fmadd_ps(ws[0], _mm256_loadu_ps(x), v[0]);
                v[0] = _mm256_fmadd_ps(ws[1], _mm256_loadu_ps(x.add(8)), v[0]);
                v[A - 1] = _mm256_fmadd_ps(ws[2], _mm256_loadu_ps(x.add(16)), v[A - 1]);
                v[A - 1] = _mm256_fmadd_ps(ws[3], _mm256_loadu_ps(x.add(24)), v[A - 1]);
            }
        }
        for r in 0..G {
            acc[r] = hsum(_mm256_add_ps(vacc[r][0], vacc[r][1]));
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    /// Random ggml blocks for `rows × cols` weights (Q4_1 or Q8_0), as [`Weight`] keeps them;
    /// also the int8 kernels' tests' weights.
    pub(in crate::cpu) fn random_weight(
        rng: &mut StdRng,
        rows: usize,
        cols: usize,
        q4: bool,
    ) -> Weight {
        let mut b = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            b.extend(f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes());
            if q4 {
                b.extend(f16::from_f32(rng.random_range(-0.2f32..0.2)).to_le_bytes());
                b.extend((0..16).map(|_| rng.random::<u8>()));
            } else {
                b.extend((0..32).map(|_| rng.random::<u8>()));
            }
        }
        if q4 {
            Weight::from_q4_1(&b)
        } else {
            Weight::from_q8_0(&b)
        }
    }

    /// A stacked product split into outputs gives each the stacked product's columns, whether
    /// the widths fall on panels (written in place) or not (copied out), for every weight type.
    #[test]
    fn split_products_are_the_stacked_products_columns() {
        let mut rng = StdRng::seed_from_u64(31);
        let (m, k) = (5, 64);
        for widths in [vec![32usize, 16, 21], vec![20, 30, 7]] {
            let n: usize = widths.iter().sum();
            let f32_weight = Weight::F32((0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect());
            for w in [
                random_weight(&mut rng, n, k, true),
                random_weight(&mut rng, n, k, false),
                f32_weight,
            ] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut whole = vec![0f32; m * n];
                matmul_w_int8(&x, m, k, &w, n, &mut whole);
                let mut parts: Vec<Vec<f32>> =
                    widths.iter().map(|&wd| vec![0f32; m * wd]).collect();
                let mut outs: Vec<(&mut [f32], usize)> = parts
                    .iter_mut()
                    .zip(&widths)
                    .map(|(p, &wd)| (p.as_mut_slice(), wd))
                    .collect();
                matmul_w_int8_split(&x, m, k, &w, &mut outs);
                for r in 0..m {
                    let mut at = r * n;
                    for (p, &wd) in parts.iter().zip(&widths) {
                        assert_eq!(&p[r * wd..(r + 1) * wd], &whole[at..at + wd], "{widths:?}");
                        at += wd;
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_products_equal_the_f32_product_of_the_dequantized_weights() {
        let mut rng = StdRng::seed_from_u64(3);
        for q4 in [true, false] {
            for (m, k, n) in [
                (1, 32, 1),
                (1, 576, 193),
                (3, 64, 70),
                (8, 1536, 40),
                (5, 96, 33),
                (37, 128, 65),
            ] {
                let w = random_weight(&mut rng, n, k, q4);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut dense = vec![0f32; n * k];
                for r in 0..n {
                    w.row(r, k, &mut dense[r * k..(r + 1) * k]);
                }
                let mut want = vec![0f32; m * n];
                super::super::matmul_t(&x, m, k, &dense, n, &mut want);
                let mut got = vec![f32::NAN; m * n];
                matmul_w(&x, m, k, &w, n, &mut got);
                for j in 0..n {
                    for r0 in (0..m).step_by(ROWS) {
                        let g = ROWS.min(m - r0);
                        let mut scalar = [0f32; ROWS];
                        scalar_dot_rows(&w, j, &x[r0 * k..(r0 + g) * k], k, g, &mut scalar);
                        for (r, s) in scalar.iter().enumerate().take(g) {
                            let i = (r0 + r) * n + j;
                            let tol = 1e-4 * (1.0 + want[i].abs());
                            assert!(
                                (got[i] - want[i]).abs() <= tol,
                                "q4={q4} {m}x{k}x{n} [{i}]: {} vs {}",
                                got[i],
                                want[i]
                            );
                            assert!(
                                (s - want[i]).abs() <= tol,
                                "scalar q4={q4} {m}x{k}x{n} [{i}]"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rowwise_products_do_not_depend_on_the_other_rows() {
        let mut rng = StdRng::seed_from_u64(11);
        let (k, n) = (128, 48);
        let dense: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for w in [
            random_weight(&mut rng, n, k, true),
            random_weight(&mut rng, n, k, false),
            Weight::F32(dense),
        ] {
            let row: Vec<f32> = (0..k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut alone = vec![0f32; n];
            matmul_w_rowwise(&row, 1, k, &w, n, &mut alone);
            for (m, at) in [(2, 1), (17, 9), (40, 39)] {
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                x[at * k..(at + 1) * k].copy_from_slice(&row);
                let mut out = vec![f32::NAN; m * n];
                matmul_w_rowwise(&x, m, k, &w, n, &mut out);
                assert_eq!(&out[at * n..(at + 1) * n], &alone[..], "m = {m}");
            }
        }
    }

    #[test]
    fn a_stacked_product_is_the_products_of_its_parts() {
        let mut rng = StdRng::seed_from_u64(12);
        let (m, k) = (3, 64);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        for q4 in [true, false] {
            let parts = vec![
                random_weight(&mut rng, 8, k, q4),
                random_weight(&mut rng, 40, k, q4),
            ];
            let apart: Vec<Vec<f32>> = parts
                .iter()
                .map(|w| {
                    let n = w.len() / k;
                    let mut out = vec![0f32; m * n];
                    matmul_w(&x, m, k, w, n, &mut out);
                    out
                })
                .collect();
            let stacked = Weight::stack_rows(parts).unwrap();
            let mut out = vec![0f32; m * 48];
            matmul_w(&x, m, k, &stacked, 48, &mut out);
            for r in 0..m {
                assert_eq!(&out[r * 48..r * 48 + 8], &apart[0][r * 8..(r + 1) * 8]);
                assert_eq!(
                    &out[r * 48 + 8..(r + 1) * 48],
                    &apart[1][r * 40..(r + 1) * 40]
                );
            }
        }
        let mixed = vec![
            random_weight(&mut rng, 8, k, true),
            random_weight(&mut rng, 8, k, false),
        ];
        assert_eq!(Weight::stack_rows(mixed).unwrap_err().len(), 2);
    }
}
