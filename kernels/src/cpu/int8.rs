//! Products of block-quantized weights (Q4_1, Q8_0) with activations quantized to 8 bits, in
//! integer arithmetic — llama.cpp's `ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0` idea.
//!
//! Each activation row is quantized per 32-element block (ggml's Q8_1): `d_x = max|x| / 127`,
//! `q_x = round(x / d_x)` (ties to even) in `-127..=127`, and `s_x = d_x · Σ q_x`. A Q4_1 weight block
//! (`w = d_w · q_w + m_w`, `q_w` in `0..16`) then contributes
//! `d_w · d_x · Σ q_w q_x + m_w · s_x`; a Q8_0 block (`w = d_w · q_w`, `q_w` signed)
//! `d_w · d_x · Σ q_w q_x`. The sums `Σ q_w q_x` are exact integers (u8 × i8 products summed in
//! i32: `vpdpbusd` with AVX512-VNNI, `vpmaddubsw` + `vpmaddwd` with AVX2, plain Rust elsewhere),
//! so all three instruction sets give the same integers.
//!
//! **Batch invariance by construction.** A row's result is computed by the same operations in
//! the same order whatever the other rows are: its quantization depends on the row alone, its
//! integer sums are exact, and the f32 combination (per group of blocks: one multiply, one or two
//! FMAs per lane, then a fixed horizontal sum) does not depend on how many rows share a weight
//! load. The portable path rounds the same way (f32 `mul_add`), so it gives the same bits as the
//! SIMD paths — the tests check both.
//!
//! **Layout.** Weights are repacked once (on first use, kept beside the ggml layout that
//! [`super::Weight::row`] and the f32 kernels read) so that a 256-bit vector lane holds one
//! block's running sum: the blocks of a row are taken in groups of 8 (then one group each of 4,
//! 2, 1 for the rest — 576 = 18 blocks is 8 + 8 + 2), and in a group of `R` blocks each block
//! owns `8 / R` lanes; vector `v`, lane `i` holds four consecutive quants of block
//! `i / (8 / R)` (see [`source`]). Activations are permuted the same way when quantized. Per
//! group, the weight side keeps each lane's `d_w` and `m_w` (the min in the block's first lane,
//! 0 in the others) as f16, as ggml stores them: Q4_1 reads 0.625 bytes per weight, as in the
//! file. Q4_1 nibbles come in pairs of vectors (low and high nibbles of 32 bytes); Q8_0 quants
//! are stored offset by 128 (unsigned, as `vpdpbusd` wants them), and the offset's
//! `128 · Σ q_x` is subtracted in integers.
//!
//! **Rows per weight load.** A weight group is unpacked into registers once and dotted with up
//! to 8 activation rows (VNNI, 32 vector registers) or 4 (AVX2, 16 registers): this is where a
//! batch wins over one sequence. The SIMD paths are picked at run time (never `target-cpu`);
//! `VKV_NO_VNNI` forces AVX2, `VKV_NO_SIMD` the portable path.

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use super::quant::{BLOCK, TASK};

/// i32 / f32 lanes of a 256-bit vector.
const LANES: usize = 8;
/// Blocks in a full group (one per lane).
const GROUP: usize = 8;

/// The sizes of the groups a row of `blocks` blocks splits into: eights, then one each of 4, 2
/// and 1 where needed.
fn group_sizes(blocks: usize) -> Vec<usize> {
    let mut g = vec![GROUP; blocks / GROUP];
    for r in [4, 2, 1] {
        if (blocks % GROUP) & r != 0 {
            g.push(r);
        }
    }
    g
}

/// Where byte `e` (0..32) of vector `v` of a group of `r` blocks comes from:
/// `(block in the group, element in the block)`. Lane `e / 4` belongs to block
/// `lane / (8 / r)`; the block's lanes take its 32 elements four at a time, lane by lane, then
/// vector by vector.
fn source(r: usize, v: usize, e: usize) -> (usize, usize) {
    let per = LANES / r;
    let lane = e / 4;
    (lane / per, 4 * (v * per + lane % per) + e % 4)
}

/// A quantized matrix repacked for the integer kernels (see the module docs).
#[derive(Debug, Clone)]
pub struct Packed {
    /// Q4_1 (nibbles and a min) or Q8_0 (bytes offset by 128).
    q4: bool,
    /// Columns (weights per row).
    k: usize,
    groups: Vec<usize>,
    /// Per row `k / 2` (Q4_1) or `k` (Q8_0) bytes, group after group.
    qs: Vec<u8>,
    /// Per row, per group: `d_w` of each lane's block, then (Q4_1) `m_w` in each block's first
    /// lane and 0 elsewhere.
    lanes: Vec<f16>,
}

impl Packed {
    fn row_bytes(&self) -> usize {
        if self.q4 {
            self.k / 2
        } else {
            self.k
        }
    }

    fn lanes_per_group(&self) -> usize {
        if self.q4 {
            2 * LANES
        } else {
            LANES
        }
    }

    /// Repack `rows` rows of `k` weights from ggml-ordered blocks: `quant(block, i)` is element
    /// `i` of a block as an unsigned byte (Q4_1: `0..16`; Q8_0: `q + 128`), `scale(block)` its
    /// `(d, m)`.
    fn build(
        q4: bool,
        rows: usize,
        k: usize,
        quant: impl Fn(usize, usize) -> u8 + Sync,
        scale: impl Fn(usize) -> (f16, f16) + Sync,
    ) -> Self {
        let nb = k / BLOCK;
        let groups = group_sizes(nb);
        let row_bytes = if q4 { k / 2 } else { k };
        let row_lanes = groups.len() * if q4 { 2 * LANES } else { LANES };
        let mut qs = vec![0u8; rows * row_bytes];
        let mut lanes = vec![f16::ZERO; rows * row_lanes];
        let one = |(j, (qs, lanes)): (usize, (&mut [u8], &mut [f16]))| {
            let (mut qs, mut lanes) = (qs.iter_mut(), lanes.iter_mut());
            let put = |q: &mut std::slice::IterMut<'_, u8>, v: u8| *q.next().expect("row") = v;
            let mut b0 = j * nb;
            for &r in &groups {
                let vec = |v: usize, e: usize| {
                    let (b, i) = source(r, v, e);
                    quant(b0 + b, i)
                };
                if !q4 {
                    for v in 0..r {
                        for e in 0..32 {
                            put(&mut qs, vec(v, e));
                        }
                    }
                } else if r == 1 {
                    for e in 0..16 {
                        put(&mut qs, vec(0, e) | vec(0, e + 16) << 4);
                    }
                } else {
                    for pair in 0..r / 2 {
                        for e in 0..32 {
                            put(&mut qs, vec(2 * pair, e) | vec(2 * pair + 1, e) << 4);
                        }
                    }
                }
                let per = LANES / r;
                for lane in 0..LANES {
                    *lanes.next().expect("row") = scale(b0 + lane / per).0;
                }
                if q4 {
                    for lane in 0..LANES {
                        *lanes.next().expect("row") = if lane % per == 0 {
                            scale(b0 + lane / per).1
                        } else {
                            f16::ZERO
                        };
                    }
                }
                b0 += r;
            }
        };
        qs.par_chunks_mut(row_bytes)
            .zip(lanes.par_chunks_mut(row_lanes))
            .enumerate()
            .for_each(one);
        Packed {
            q4,
            k,
            groups,
            qs,
            lanes,
        }
    }

    /// From ggml Q4_1 data as [`super::Weight`] keeps it: `(d, m)` per block and 16 bytes of
    /// nibbles (byte `j`: element `j` low, `j + 16` high).
    pub(super) fn from_q4_1(scales: &[f32], qs: &[u8], k: usize) -> Self {
        let rows = qs.len() * 2 / k;
        Packed::build(
            true,
            rows,
            k,
            |b, i| {
                let byte = qs[16 * b + i % 16];
                if i < 16 {
                    byte & 0xF
                } else {
                    byte >> 4
                }
            },
            |b| {
                (
                    f16::from_f32(scales[2 * b]),
                    f16::from_f32(scales[2 * b + 1]),
                )
            },
        )
    }

    /// From ggml Q8_0 data as [`super::Weight`] keeps it: `d` per block and 32 signed bytes.
    pub(super) fn from_q8_0(scales: &[f32], qs: &[i8], k: usize) -> Self {
        let rows = qs.len() / k;
        Packed::build(
            false,
            rows,
            k,
            |b, i| (qs[32 * b + i] as u8) ^ 0x80,
            |b| (f16::from_f32(scales[b]), f16::ZERO),
        )
    }

    pub(super) fn cols(&self) -> usize {
        self.k
    }
}

/// Activation rows quantized to 8 bits per 32-element block, permuted like the weights, and
/// stored group-major: a group's data for all rows together, so a kernel finds row `r0 + r`
/// at a fixed distance from row `r0`.
#[derive(Debug, Clone)]
pub struct Q8Rows {
    m: usize,
    /// Group `g` (starting at block `b0`, of `R` blocks): row `r`'s `32 · R` quants at
    /// `32 · (m · b0 + r · R)`.
    qs: Vec<i8>,
    /// Group `g`, row `r`, at `16 · (m · g + r)`: `d_x` of each lane's block, then
    /// `s_x = d_x · Σ q_x` of each lane's block.
    lanes: Vec<f32>,
    /// Group `g`, row `r`, at `8 · (m · g + r)`: `128 · Σ q_x` over each lane's quants (Q8_0's
    /// offset).
    offsets: Vec<i32>,
}

/// One row's input and outputs in [`quantize_rows`].
type RowParts<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut [f32], &'a mut [i32]));

/// Quantize `m` rows of `k` activations for weights split into `groups`.
pub fn quantize_rows(x: &[f32], m: usize, k: usize, groups: &[usize]) -> Q8Rows {
    let ng = groups.len();
    // Row-major first (rows in parallel), then regrouped.
    let mut qs = vec![0i8; m * k];
    let mut lanes = vec![0f32; m * ng * 2 * LANES];
    let mut offsets = vec![0i32; m * ng * LANES];
    let avx2 = isa() != Isa::Portable;
    let one = |((xr, qs), (lanes, offsets)): RowParts<'_>| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 was detected at run time (`isa`).
            return unsafe { quantize_row_avx2(xr, groups, qs, lanes, offsets) };
        }
        let _ = avx2;
        quantize_row(xr, groups, qs, lanes, offsets)
    };
    let (lw, ow) = (ng * 2 * LANES, ng * LANES);
    if m * k >= 1 << 14 {
        x[..m * k]
            .par_chunks_exact(k)
            .zip(qs.par_chunks_exact_mut(k))
            .zip(
                lanes
                    .par_chunks_exact_mut(lw)
                    .zip(offsets.par_chunks_exact_mut(ow)),
            )
            .for_each(one);
    } else {
        x[..m * k]
            .chunks_exact(k)
            .zip(qs.chunks_exact_mut(k))
            .zip(lanes.chunks_exact_mut(lw).zip(offsets.chunks_exact_mut(ow)))
            .for_each(one);
    }
    if m == 1 {
        return Q8Rows {
            m,
            qs,
            lanes,
            offsets,
        };
    }
    let mut q = Q8Rows {
        m,
        qs: Vec::with_capacity(m * k),
        lanes: Vec::with_capacity(lanes.len()),
        offsets: Vec::with_capacity(offsets.len()),
    };
    let mut b0 = 0;
    for (gi, &r) in groups.iter().enumerate() {
        for row in 0..m {
            q.qs.extend_from_slice(&qs[row * k + b0 * BLOCK..][..r * BLOCK]);
            q.lanes
                .extend_from_slice(&lanes[(row * ng + gi) * 2 * LANES..][..2 * LANES]);
            q.offsets
                .extend_from_slice(&offsets[(row * ng + gi) * LANES..][..LANES]);
        }
        b0 += r;
    }
    q
}

impl Q8Rows {
    /// Offsets of row `r`'s data for group `gi` (starting at block `b0`, of `size` blocks):
    /// quants, lanes, offsets.
    fn at(&self, gi: usize, b0: usize, size: usize, r: usize) -> (usize, usize, usize) {
        (
            BLOCK * (self.m * b0 + r * size),
            2 * LANES * (self.m * gi + r),
            LANES * (self.m * gi + r),
        )
    }
}

/// [`quantize_row`] compiled for AVX2: the same operations (IEEE multiply, add, compare: no
/// fused multiply-add), so the same bits, in wider vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    x: &[f32],
    groups: &[usize],
    qs: &mut [i8],
    lanes: &mut [f32],
    offsets: &mut [i32],
) {
    quantize_row(x, groups, qs, lanes, offsets)
}

#[inline(always)]
fn quantize_row(
    x: &[f32],
    groups: &[usize],
    qs: &mut [i8],
    lanes: &mut [f32],
    offsets: &mut [i32],
) {
    // Adding and subtracting 1.5 · 2^23 rounds an f32 below 2^22 to the nearest integer, ties to
    // even, in two operations that vectorize (`f32::round` is a libm call per element).
    const ROUND: f32 = 12_582_912.0;
    let mut b0 = 0;
    for (gi, &r) in groups.iter().enumerate() {
        let mut q = [[0i8; BLOCK]; GROUP];
        let mut word_sums = [[0i32; BLOCK / 4]; GROUP];
        let mut block_d = [0f32; GROUP];
        let mut block_s = [0f32; GROUP];
        for b in 0..r {
            let xb = &x[(b0 + b) * BLOCK..][..BLOCK];
            let mut amax = [0f32; 8];
            for c in xb.chunks_exact(8) {
                for (a, v) in amax.iter_mut().zip(c) {
                    *a = a.max(v.abs());
                }
            }
            let d = amax.iter().fold(0f32, |a, &v| a.max(v)) / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (q, &v) in q[b].iter_mut().zip(xb) {
                *q = ((v * id + ROUND) - ROUND) as i8;
            }
            for (s, w) in word_sums[b].iter_mut().zip(q[b].chunks_exact(4)) {
                *s = w.iter().map(|&v| v as i32).sum();
            }
            block_d[b] = d;
            block_s[b] = d * word_sums[b].iter().sum::<i32>() as f32;
        }
        // Four quants at a time into the layout of `source`.
        let out = &mut qs[b0 * BLOCK..(b0 + r) * BLOCK];
        let per = LANES / r;
        let shift = per.trailing_zeros();
        let off = &mut offsets[gi * LANES..(gi + 1) * LANES];
        off.fill(0);
        for v in 0..r {
            for lane in 0..LANES {
                // `source` on words: lanes per block and blocks are powers of two.
                let (blk, word) = (lane >> shift, (v << shift) + (lane & (per - 1)));
                out[32 * v + 4 * lane..][..4].copy_from_slice(&q[blk][4 * word..4 * word + 4]);
                off[lane] += 128 * word_sums[blk][word];
            }
        }
        let l = &mut lanes[gi * 2 * LANES..(gi + 1) * 2 * LANES];
        for lane in 0..LANES {
            l[lane] = block_d[lane / per];
            l[LANES + lane] = block_s[lane / per];
        }
        b0 += r;
    }
}

/// Which implementation runs the integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX512-VNNI on 256-bit vectors (with AVX512VL/BW and F16C).
    Vnni,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// Plain Rust.
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("VKV_NO_SIMD").is_none() {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2
                && std::env::var_os("VKV_NO_VNNI").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
    }
    Isa::Portable
}

/// Most activation rows per weight load: 8 accumulators beside 8 weight vectors. (16 rows would
/// fit VNNI's 32 registers, but LLVM does not unroll that loop and keeps the accumulators in
/// memory.)
const MAX_ROWS: usize = 8;

/// `out[m][n] = Σ_k x[m][k] · w[n][k]` with `x` quantized to 8 bits per block: `w` packed for
/// the integer kernels. Batch-invariant (see the module docs).
pub fn matmul_packed(x: &[f32], m: usize, k: usize, w: &Packed, n: usize, out: &mut [f32]) {
    assert!(
        w.k == k && w.qs.len() >= n * w.row_bytes() && x.len() >= m * k && out.len() >= m * n,
        "matmul_w_int8 shapes"
    );
    matmul_with(isa(), x, m, k, w, n, out);
}

/// [`matmul_packed`] on a given instruction set.
fn matmul_with(isa: Isa, x: &[f32], m: usize, k: usize, w: &Packed, n: usize, out: &mut [f32]) {
    if m == 0 {
        return;
    }
    let xq = quantize_rows(x, m, k, &w.groups);
    let out_at = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(TASK)).into_par_iter().for_each(|task| {
        let out_at = &out_at;
        let (j0, rows) = (task * TASK, TASK.min(n - task * TASK));
        // A few activation rows at a time against all this task's weight rows: both stay in
        // the L1 cache (prefill has thousands of rows).
        let mut r0 = 0;
        while r0 < m {
            let g = rows_per_pass(isa, m - r0);
            let mut tile = [[0f32; MAX_ROWS]; TASK];
            for (jj, t) in tile.iter_mut().enumerate().take(rows) {
                dot_rows(isa, w, j0 + jj, &xq, r0, g, t);
            }
            for r in 0..g {
                // SAFETY: `out` holds `m · n` values (checked above); this task alone writes
                // columns `j0..j0 + rows`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_at.0.add((r0 + r) * n + j0), rows)
                };
                for (d, t) in dst.iter_mut().zip(&tile) {
                    *d = t[r];
                }
            }
            r0 += g;
        }
    });
}

/// `out` shared by the tasks of a product, each writing its own columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `matmul_with`).
unsafe impl Sync for OutPtr {}

/// How many of `left` rows the next pass takes.
fn rows_per_pass(isa: Isa, left: usize) -> usize {
    let max = match isa {
        Isa::Vnni => MAX_ROWS,
        Isa::Avx2 => 4,
        Isa::Portable => 1,
    };
    let mut g = max.min(left);
    if isa != Isa::Portable {
        // The kernels are compiled for these counts.
        g = [8, 4, 2, 1].into_iter().find(|&c| c <= g).unwrap_or(1);
    }
    g
}

/// `acc[r] = row j of w · activation row r0 + r`, for `g` rows.
fn dot_rows(isa: Isa, w: &Packed, j: usize, x: &Q8Rows, r0: usize, g: usize, acc: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni => {
            // SAFETY: the features were detected at run time (`isa`); shapes checked by the caller.
            unsafe {
                match (g, w.q4) {
                    (8, true) => vnni::rows::<8, true>(w, j, x, r0, acc),
                    (4, true) => vnni::rows::<4, true>(w, j, x, r0, acc),
                    (2, true) => vnni::rows::<2, true>(w, j, x, r0, acc),
                    (_, true) => vnni::rows::<1, true>(w, j, x, r0, acc),
                    (8, false) => vnni::rows::<8, false>(w, j, x, r0, acc),
                    (4, false) => vnni::rows::<4, false>(w, j, x, r0, acc),
                    (2, false) => vnni::rows::<2, false>(w, j, x, r0, acc),
                    (_, false) => vnni::rows::<1, false>(w, j, x, r0, acc),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: as above.
            unsafe {
                match (g, w.q4) {
                    (4, true) => avx2::rows::<4, true>(w, j, x, r0, acc),
                    (2, true) => avx2::rows::<2, true>(w, j, x, r0, acc),
                    (_, true) => avx2::rows::<1, true>(w, j, x, r0, acc),
                    (4, false) => avx2::rows::<4, false>(w, j, x, r0, acc),
                    (2, false) => avx2::rows::<2, false>(w, j, x, r0, acc),
                    (_, false) => avx2::rows::<1, false>(w, j, x, r0, acc),
                }
            }
        }
        _ => {
            for (r, a) in acc.iter_mut().enumerate().take(g) {
                *a = portable_dot(w, j, x, r0 + r);
            }
        }
    }
}

/// Row `j` of `w` · activation row `r`, in plain Rust: the same integers and the same f32
/// operations, in the same order, as the SIMD kernels.
fn portable_dot(w: &Packed, j: usize, x: &Q8Rows, r: usize) -> f32 {
    let mut acc = [0f32; LANES];
    let wq = &w.qs[j * w.row_bytes()..(j + 1) * w.row_bytes()];
    let wl = &w.lanes[j * w.groups.len() * w.lanes_per_group()..];
    let (mut b0, mut wb) = (0, 0);
    for (gi, &g) in w.groups.iter().enumerate() {
        // The group's weights as unsigned bytes, vector by vector.
        let mut wv = [[0u8; 32]; GROUP];
        if !w.q4 {
            for (v, vec) in wv.iter_mut().enumerate().take(g) {
                vec.copy_from_slice(&wq[wb + 32 * v..wb + 32 * v + 32]);
            }
            wb += 32 * g;
        } else if g == 1 {
            for e in 0..16 {
                wv[0][e] = wq[wb + e] & 0xF;
                wv[0][e + 16] = wq[wb + e] >> 4;
            }
            wb += 16;
        } else {
            for pair in 0..g / 2 {
                for e in 0..32 {
                    wv[2 * pair][e] = wq[wb + 32 * pair + e] & 0xF;
                    wv[2 * pair + 1][e] = wq[wb + 32 * pair + e] >> 4;
                }
            }
            wb += 16 * g;
        }
        let gl = &wl[gi * w.lanes_per_group()..];
        let (xq, xl, xo) = x.at(gi, b0, g, r);
        let (xg, xl, off) = (&x.qs[xq..], &x.lanes[xl..], &x.offsets[xo..]);
        for lane in 0..LANES {
            let mut dot = 0i32;
            for (v, vec) in wv.iter().enumerate().take(g) {
                for t in 0..4 {
                    let e = 4 * lane + t;
                    dot += vec[e] as i32 * xg[32 * v + e] as i32;
                }
            }
            if !w.q4 {
                dot -= off[lane];
            }
            let scale = gl[lane].to_f32() * xl[lane];
            acc[lane] = (dot as f32).mul_add(scale, acc[lane]);
            if w.q4 {
                acc[lane] = gl[LANES + lane]
                    .to_f32()
                    .mul_add(xl[LANES + lane], acc[lane]);
            }
        }
        b0 += g;
    }
    // The SIMD kernels' horizontal sum.
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// The SIMD kernels, one module per instruction set; `$vnni` picks the integer dot.
macro_rules! simd_kernels {
    ($isa:ident, $features:literal, $vnni:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            use std::arch::x86_64::*;

            use super::{Packed, Q8Rows, LANES};
            use crate::cpu::quant::simd::hsum;

            /// `acc[r] = row j of w · activation row r0 + r` for `G` rows.
            // `_mm256_dpbusd_epi32` is stable since Rust 1.89, after the workspace's declared
            // 1.85 (whose bump would turn on lints across other crates): building needs 1.89.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows<const G: usize, const Q4: bool>(
                w: &Packed,
                j: usize,
                x: &Q8Rows,
                r0: usize,
                acc: &mut [f32],
            ) {
                let mut vacc = [_mm256_setzero_ps(); G];
                let lpg = w.lanes_per_group();
                let mut wq = w.qs.as_ptr().add(j * w.row_bytes());
                let mut wl = w.lanes.as_ptr().add(j * w.groups.len() * lpg) as *const __m128i;
                let mut b0 = 0; // the group's first block
                for (gi, &g) in w.groups.iter().enumerate() {
                    let (xq, xl, xo) = x.at(gi, b0, g, r0);
                    let at = Group {
                        wq,
                        wl,
                        xq: x.qs.as_ptr().add(xq),
                        xl: x.lanes.as_ptr().add(xl),
                        xo: x.offsets.as_ptr().add(xo),
                    };
                    match g {
                        8 => group::<G, 8, Q4>(&mut vacc, at),
                        4 => group::<G, 4, Q4>(&mut vacc, at),
                        2 => group::<G, 2, Q4>(&mut vacc, at),
                        _ => group::<G, 1, Q4>(&mut vacc, at),
                    }
                    wq = wq.add(if Q4 { 16 * g } else { 32 * g });
                    wl = wl.add(lpg / LANES);
                    b0 += g;
                }
                for r in 0..G {
                    acc[r] = hsum(vacc[r]);
                }
            }

            /// Where one group's data is: the weights', and the first activation row's (the
            /// next rows follow at fixed distances, see [`Q8Rows`]).
            #[derive(Clone, Copy)]
            struct Group {
                wq: *const u8,
                /// `d_w` lanes, then (Q4_1) `m_w` lanes, as f16.
                wl: *const __m128i,
                xq: *const i8,
                xl: *const f32,
                xo: *const i32,
            }

            /// One group of `R` blocks, unpacked once, against `G` rows.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn group<const G: usize, const R: usize, const Q4: bool>(
                vacc: &mut [__m256; G],
                at: Group,
            ) {
                let mut wv = [_mm256_setzero_si256(); R];
                if Q4 {
                    let mask = _mm256_set1_epi8(0x0F);
                    if R == 1 {
                        let c = _mm_loadu_si128(at.wq as *const __m128i);
                        let c = _mm256_set_m128i(_mm_srli_epi16(c, 4), c);
                        wv[0] = _mm256_and_si256(c, mask);
                    } else {
                        for p in 0..R / 2 {
                            let c = _mm256_loadu_si256(at.wq.add(32 * p) as *const __m256i);
                            wv[2 * p] = _mm256_and_si256(c, mask);
                            wv[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(c, 4), mask);
                        }
                    }
                } else {
                    for (v, wv) in wv.iter_mut().enumerate() {
                        *wv = _mm256_loadu_si256(at.wq.add(32 * v) as *const __m256i);
                        if !$vnni {
                            // AVX2 multiplies unsigned by signed bytes into i16 pairs, which
                            // (q + 128) · q_x would overflow: keep q signed and move its sign
                            // onto the activations.
                            *wv = _mm256_xor_si256(*wv, _mm256_set1_epi8(-128));
                        }
                    }
                }
                let mut wabs = [_mm256_setzero_si256(); R];
                if !$vnni && !Q4 {
                    for v in 0..R {
                        wabs[v] = _mm256_abs_epi8(wv[v]);
                    }
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(at.wl));
                let mw = if Q4 {
                    _mm256_cvtph_ps(_mm_loadu_si128(at.wl.add(1)))
                } else {
                    _mm256_setzero_ps()
                };
                let ones = _mm256_set1_epi16(1);
                for (r, a) in vacc.iter_mut().enumerate() {
                    let xq = at.xq.add(32 * R * r);
                    let xl = at.xl.add(2 * LANES * r);
                    let xv = |v: usize| _mm256_loadu_si256(xq.add(32 * v) as *const __m256i);
                    let dot = if $vnni {
                        let mut d = _mm256_setzero_si256();
                        for v in 0..R {
                            d = _mm256_dpbusd_epi32(d, wv[v], xv(v));
                        }
                        if !Q4 {
                            let off = at.xo.add(LANES * r);
                            d = _mm256_sub_epi32(d, _mm256_loadu_si256(off as *const __m256i));
                        }
                        d
                    } else if Q4 {
                        // Pairs of nibble × i8 products are at most 2 · 15 · 127, so eight
                        // vectors of them still fit i16.
                        let mut s = _mm256_maddubs_epi16(wv[0], xv(0));
                        for v in 1..R {
                            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[v], xv(v)));
                        }
                        _mm256_madd_epi16(s, ones)
                    } else {
                        let mut d = _mm256_setzero_si256();
                        for v in 0..R {
                            let p = _mm256_maddubs_epi16(wabs[v], _mm256_sign_epi8(xv(v), wv[v]));
                            d = _mm256_add_epi32(d, _mm256_madd_epi16(p, ones));
                        }
                        d
                    };
                    let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(xl));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, *a);
                    if Q4 {
                        *a = _mm256_fmadd_ps(mw, _mm256_loadu_ps(xl.add(LANES)), *a);
                    }
                }
            }
        }
    };
}

simd_kernels!(
    vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true
);
simd_kernels!(avx2, "avx2,fma,f16c", false);

/// The packed form of a quantized weight, built on first use.
pub(super) type PackedCell = OnceLock<Packed>;

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::super::quant::tests::random_weight;
    use super::super::Weight;
    use super::*;

    fn packed(w: &Weight, k: usize) -> Packed {
        match w {
            Weight::Q4_1 { scales, qs, .. } => Packed::from_q4_1(scales, qs, k),
            Weight::Q8_0 { scales, qs, .. } => Packed::from_q8_0(scales, qs, k),
            Weight::F32(_) => unreachable!(),
        }
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Isa::Avx2);
            }
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Vnni);
            } else {
                eprintln!("no AVX512-VNNI here: its kernel is not checked");
            }
        }
        v
    }

    /// Shapes `(m, k, n)` covering every group size (k / 32 = 1, 2, 3, 7, 18, 48 blocks) and
    /// every kernel row count.
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 32, 3),
        (2, 64, 40),
        (3, 96, 33),
        (5, 224, 17),
        (16, 576, 35),
        (23, 576, 64),
        (7, 1536, 9),
        (40, 256, 33),
    ];

    #[test]
    fn the_layout_takes_every_element_of_a_group_once() {
        for r in [1, 2, 4, 8] {
            let mut seen = vec![0; r * BLOCK];
            for v in 0..r {
                for e in 0..32 {
                    let (b, i) = source(r, v, e);
                    seen[b * BLOCK + i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "group of {r}");
        }
        assert_eq!(group_sizes(18), [8, 8, 2]);
        assert_eq!(group_sizes(7), [4, 2, 1]);
        assert_eq!(group_sizes(48), [8; 6]);
    }

    /// The integer product is within the activation quantization's error of the f32 product of
    /// the dequantized weights: each `x` moves by at most `d_x / 2`, so a dot product by at most
    /// `Σ |w_i| · d_x(block of i) / 2` (plus f32 rounding).
    #[test]
    fn int8_products_are_within_the_activation_rounding_of_the_f32_product() {
        let mut rng = StdRng::seed_from_u64(21);
        for q4 in [true, false] {
            for (m, k, n) in SHAPES {
                let w = random_weight(&mut rng, n, k, q4);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut dense = vec![0f32; n * k];
                for r in 0..n {
                    w.row(r, k, &mut dense[r * k..(r + 1) * k]);
                }
                let mut got = vec![f32::NAN; m * n];
                super::super::matmul_w_int8(&x, m, k, &w, n, &mut got);
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    let dx: Vec<f32> = xr
                        .chunks(BLOCK)
                        .map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0)
                        .collect();
                    for j in 0..n {
                        let wr = &dense[j * k..(j + 1) * k];
                        let want: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let bound: f64 = wr
                            .iter()
                            .enumerate()
                            .map(|(i, a)| a.abs() as f64 * dx[i / BLOCK] as f64 / 2.0)
                            .sum::<f64>()
                            + 1e-5
                                * (1.0
                                    + wr.iter()
                                        .zip(xr)
                                        .map(|(a, b)| (a * b).abs() as f64)
                                        .sum::<f64>());
                        let err = (got[r * n + j] as f64 - want).abs();
                        assert!(
                            err <= bound,
                            "q4={q4} {m}x{k}x{n} [{r}][{j}]: {} vs {want} (bound {bound})",
                            got[r * n + j]
                        );
                    }
                }
            }
        }
    }

    /// The integer path is exactly "round the activations to 8 bits per block, then the f32
    /// product": against a plain implementation of that, only f32 rounding differs.
    #[test]
    fn int8_products_are_the_f32_product_of_the_rounded_activations() {
        let mut rng = StdRng::seed_from_u64(25);
        for q4 in [true, false] {
            for (m, k, n) in SHAPES {
                let w = random_weight(&mut rng, n, k, q4);
                // Activations with outliers, as a transformer's residual stream has.
                let x: Vec<f32> = (0..m * k)
                    .map(|i| {
                        let v = rng.random_range(-2.0f32..2.0);
                        if i % 97 == 5 {
                            v * 300.0
                        } else {
                            v
                        }
                    })
                    .collect();
                let mut got = vec![f32::NAN; m * n];
                super::super::matmul_w_int8(&x, m, k, &w, n, &mut got);
                let mut dense = vec![0f32; k];
                for r in 0..m {
                    let mut xr = x[r * k..(r + 1) * k].to_vec();
                    for b in xr.chunks_mut(BLOCK) {
                        let d = b.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                        for v in b.iter_mut() {
                            *v = (*v * id).round_ties_even() * d;
                        }
                    }
                    for j in 0..n {
                        w.row(j, k, &mut dense);
                        let want: f64 = dense
                            .iter()
                            .zip(&xr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let mag: f64 = dense
                            .iter()
                            .zip(&xr)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let err = (got[r * n + j] as f64 - want).abs();
                        assert!(
                            err <= 1e-5 * (1.0 + mag),
                            "q4={q4} {m}x{k}x{n} [{r}][{j}]: {} vs {want}",
                            got[r * n + j]
                        );
                    }
                }
            }
        }
    }

    /// The SIMD kernels compute the portable path's integers and f32 operations: equal bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(22);
        for q4 in [true, false] {
            for (m, k, n) in SHAPES {
                let w = packed(&random_weight(&mut rng, n, k, q4), k);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut want = vec![f32::NAN; m * n];
                matmul_with(Isa::Portable, &x, m, k, &w, n, &mut want);
                for isa in isas() {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, m, k, &w, n, &mut got);
                    assert_eq!(got, want, "{isa:?} q4={q4} {m}x{k}x{n}");
                }
            }
        }
    }

    /// A row's result does not depend on the rows beside it, on any instruction set.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let mut rng = StdRng::seed_from_u64(23);
        let (k, n) = (576, 40);
        for q4 in [true, false] {
            let w = packed(&random_weight(&mut rng, n, k, q4), k);
            let row: Vec<f32> = (0..k).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            for isa in isas() {
                let mut alone = vec![0f32; n];
                matmul_with(isa, &row, 1, k, &w, n, &mut alone);
                for (m, at) in [(2, 1), (5, 4), (16, 7), (17, 16), (37, 20)] {
                    let mut x: Vec<f32> =
                        (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    x[at * k..(at + 1) * k].copy_from_slice(&row);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, m, k, &w, n, &mut out);
                    assert_eq!(&out[at * n..(at + 1) * n], &alone[..], "{isa:?} m = {m}");
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any shape and data: every instruction set gives the portable path's bits, and each
        /// row's result is what that row gets alone.
        #[test]
        fn any_batch_gives_each_row_its_result_alone_on_every_instruction_set(
            blocks in 1usize..20,
            m in 1usize..20,
            n in 1usize..40,
            q4 in proptest::bool::ANY,
            seed in proptest::num::u64::ANY,
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let k = blocks * BLOCK;
            let w = packed(&random_weight(&mut rng, n, k, q4), k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let mut want = vec![f32::NAN; m * n];
            matmul_with(Isa::Portable, &x, m, k, &w, n, &mut want);
            for isa in isas() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(isa, &x, m, k, &w, n, &mut got);
                proptest::prop_assert_eq!(&got, &want, "{:?}", isa);
                for r in [0, m / 2, m - 1] {
                    let mut alone = vec![f32::NAN; n];
                    matmul_with(isa, &x[r * k..(r + 1) * k], 1, k, &w, n, &mut alone);
                    proptest::prop_assert_eq!(&alone[..], &got[r * n..(r + 1) * n]);
                }
            }
        }
    }

    /// Extreme activations: zeros (d_x = 0), one huge element per block, all equal.
    #[test]
    fn degenerate_blocks_are_exact_where_they_should_be() {
        let mut rng = StdRng::seed_from_u64(24);
        let (k, n) = (96, 5);
        for q4 in [true, false] {
            let w = random_weight(&mut rng, n, k, q4);
            let mut x = vec![0f32; 3 * k];
            x[k + 5] = 1.0e6;
            x[k + 40] = -3.0;
            x[2 * k..].fill(0.5);
            let mut got = vec![f32::NAN; 3 * n];
            super::super::matmul_w_int8(&x, 3, k, &w, n, &mut got);
            let mut dense = vec![0f32; k];
            for j in 0..n {
                w.row(j, k, &mut dense);
                assert_eq!(got[j], 0.0, "zero row");
                // One element per block is ±127 · d_x exactly.
                let want = dense[5] * 1.0e6 + dense[40] * -3.0;
                assert!((got[n + j] - want).abs() <= 1e-5 * want.abs().max(1.0));
                let want: f32 = dense.iter().map(|w| w * 0.5).sum();
                assert!((got[2 * n + j] - want).abs() <= 1e-4 * (1.0 + want.abs()));
            }
        }
    }
}

/// Kernel timings (not a check): `cargo test --release -p vkv-kernels --lib int8_timings --
/// --ignored --nocapture`. One thread, best of several runs, so a busy machine disturbs it less.
#[cfg(test)]
mod timings {
    use std::time::Instant;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::super::{matmul_w, matmul_w_int8, Weight};
    use super::*;

    #[test]
    #[ignore]
    fn int8_timings() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for (q4, k, n) in [(true, 576, 3072), (true, 1536, 576), (false, 576, 49152)] {
            let mut b = Vec::new();
            for _ in 0..n * k / BLOCK {
                b.extend(f16::from_f32(0.01).to_le_bytes());
                if q4 {
                    b.extend(f16::from_f32(-0.1).to_le_bytes());
                    b.extend((0..16).map(|_| rng.random::<u8>()));
                } else {
                    b.extend((0..32).map(|_| rng.random::<u8>()));
                }
            }
            let w = if q4 {
                Weight::from_q4_1(&b)
            } else {
                Weight::from_q8_0(&b)
            };
            w.pack_int8(k);
            for m in [1, 4, 8, 16, 64] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut out = vec![0f32; m * n];
                let mut best = |f: &(dyn Fn(&mut [f32]) + Sync)| {
                    (0..7)
                        .map(|_| {
                            let t = Instant::now();
                            pool.install(|| f(&mut out));
                            t.elapsed().as_secs_f64()
                        })
                        .fold(f64::MAX, f64::min)
                };
                let f32_s = best(&|o| matmul_w(&x, m, k, &w, n, o));
                let int8_s = best(&|o| matmul_w_int8(&x, m, k, &w, n, o));
                let bytes = w.len() as f64 * if q4 { 0.625 } else { 1.0625 };
                eprintln!(
                    "q4={q4} k={k} n={n} m={m}: f32 {:.3} ms, int8 {:.3} ms ({:.2}x); int8 {:.1} GB/s of weights, {:.2} ms per row",
                    f32_s * 1e3,
                    int8_s * 1e3,
                    f32_s / int8_s,
                    bytes / int8_s / 1e9,
                    int8_s * 1e3 / m as f64
                );
            }
        }
    }
}
