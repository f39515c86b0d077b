//! Products of block-quantized weights (Q4_1, Q8_0) with activations quantized to 8 bits, in
//! integer arithmetic — llama.cpp's `ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0` idea,
//! computed as a register-blocked GEMM in the style of llama.cpp's repacked CPU kernels and
//! oneDNN's VNNI GEMM.
//!
//! Each activation row is quantized per 32-element block (ggml's Q8_1): `d_x = max|x| / 127`,
//! `q_x = round(x / d_x)` (ties to even) in `-127..=127`, and `s_x = d_x · Σ q_x`. A Q4_1 weight block
//! (`w = d_w · q_w + m_w`, `q_w` in `0..16`) then contributes
//! `d_w · d_x · Σ q_w q_x + m_w · s_x`; a Q8_0 block (`w = d_w · q_w`, `q_w` signed)
//! `d_w · d_x · Σ q_w q_x`. The sums `Σ q_w q_x` are exact integers (u8 × i8 products summed in
//! i32: `vpdpbusd` with AVX512-VNNI, `vpmaddubsw` + `vpmaddwd` with AVX2, plain Rust elsewhere),
//! so all three instruction sets give the same integers.
//!
//! **Layout (VNNI's).** Weights are repacked once (on first use, kept beside the ggml layout
//! that [`super::Weight::row`] and the f32 kernels read) in panels of [`PANEL`] = 16 output
//! columns — one 512-bit vector of i32 lanes, lane `c` for column `c`. Per panel and block, a
//! record holds the quants in steps of 4 consecutive `k`: step `s` is 64 bytes, column `c`'s
//! quants `4s..4s + 4` at bytes `4c..4c + 4`, so one `vpdpbusd` of a step with the activation's
//! 4 bytes broadcast to every lane (`vpbroadcastd`) adds 4 products to each of 16 columns. Q4_1
//! packs steps `s` and `s + 4` into the low and high nibbles of one 64-byte chunk (0.5 bytes per
//! weight); Q8_0 quants are stored offset by 128 (unsigned, as `vpdpbusd` wants them) and the
//! offset's `128 · Σ q_x` starts the integer sum negative. Then the panel's 16 `d_w` and (Q4_1)
//! 16 `m_w` as f16, as ggml stores them: Q4_1 reads 0.625 bytes per weight, as in the file.
//! Panels are stored block after block, so a panel is one sequential stream; the last panel of a
//! matrix whose rows are not a multiple of 16 is padded with zero columns, never written out.
//! Activations stay row-major (`k` bytes per row, plus `d_x`, `s_x` and the offset per block),
//! quantized in AVX-512 on the VNNI path and in AVX2 otherwise, to the portable path's bytes.
//!
//! **The tile.** A kernel keeps `R` activation rows × `C` panels of i32 sums in registers for
//! one block (each weight vector loaded and unpacked once for `R` rows, each broadcast used for
//! `C` panels), then folds them into as many f32 accumulators: `acc = fma(f32(Σ), d_w · d_x,
//! acc)`, and for Q4_1 `acc = fma(m_w, s_x, acc)`. That is the cheapest exact form we found: the
//! three factors of the main term vary by row, by column and by both, so it takes a multiply and
//! an FMA per output and block, and the min term (`s_x` per row and block, `m_w` per column and
//! block) one more FMA and no integer work. With AVX512-VNNI on 512-bit vectors (32 registers)
//! the tile is 8 rows × 1 panel (8 i32 + 8 f32 accumulators), so a task reads one sequential
//! weight stream: at 8 and 16 rows (a decode batch's half, its output head) it measured 10–20 %
//! faster than the 4 × 2 tile used before, and no slower at 128 rows (the VNNI and FMA work
//! per block is the same; Zen 4 runs both on the same two pipes, which caps the kernel near
//! 64 of every 88 cycles in `vpdpbusd`). One row (decode, bound by reading the weights) takes
//! 1 × 1 with a block's steps summed in two integer chains. AVX2 (16 registers) takes 2 rows ×
//! one panel as two 256-bit halves; the portable path one output at a time. Tasks (rayon) are
//! runs of panels, over 64 activation rows at a time (the rows stay in L2 while every panel
//! meets them); when the rows take several tiles, the next panel's weights are prefetched into
//! L2 during a panel's first tile, a slice per block (they come from memory: a model's weights
//! outgrow the caches; one burst of prefetches fills the miss queue and stalls). The two SIMD
//! kernels are the child modules `vnni` and `avx2`.
//!
//! **Batch invariance by construction.** Every output is one lane of one accumulator, computed
//! by the same f32 operations in the same order — blocks in sequence, the two FMAs above, from
//! zero — whatever the tile shape, the row's place in the tile, `m`, or the instruction set:
//! its quantization depends on the row alone and its integer sums are exact (at most
//! 32 · 255 · 127 < 2^24, so their conversion to f32 is exact too). Tails (rows not a multiple
//! of `R`, panels not a multiple of `C`) take smaller tiles of the same kernel. The portable path
//! rounds the same way (f32 `mul_add`), so it gives the same bits as the SIMD paths — the tests
//! check both. The SIMD paths are picked at run time (never `target-cpu`); `VKV_NO_VNNI` forces
//! AVX2, `VKV_NO_SIMD` the portable path.

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use super::quant::BLOCK;
use super::HugeBuffer;

/// Output columns per panel: the i32 / f32 lanes of a 512-bit vector.
pub(super) const PANEL: usize = 16;
/// Consecutive `k` per lane and step (`vpdpbusd` sums 4 byte products into an i32 lane).
const STEP: usize = 4;
/// Steps per block.
const STEPS: usize = BLOCK / STEP;

/// A quantized matrix repacked for the integer kernels (see the module docs).
#[derive(Debug, Clone)]
pub struct Packed {
    /// Q4_1 (nibbles and a min) or Q8_0 (bytes offset by 128).
    q4: bool,
    /// Columns (weights per row).
    k: usize,
    /// Panel after panel, block after block: one record of [`Packed::record_bytes`]. In
    /// huge-page memory: a decode step streams every packed matrix.
    data: HugeBuffer,
}

impl Packed {
    /// Bytes of quants in a record, before the scales.
    fn quant_bytes(q4: bool) -> usize {
        if q4 {
            PANEL * BLOCK / 2
        } else {
            PANEL * BLOCK
        }
    }

    /// One panel's block: quants, `d_w` (16 f16), then for Q4_1 `m_w` (16 f16).
    fn record_bytes(q4: bool) -> usize {
        Self::quant_bytes(q4) + if q4 { 4 * PANEL } else { 2 * PANEL }
    }

    fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    fn panels(&self) -> usize {
        self.data.len() / (self.blocks() * Self::record_bytes(self.q4))
    }

    /// The bytes of panels `p0..p0 + count` (consecutive panels are contiguous).
    fn panel_bytes(&self, p0: usize, count: usize) -> &[u8] {
        let len = self.blocks() * Self::record_bytes(self.q4);
        &self.data[p0 * len..(p0 + count) * len]
    }

    /// The record of panel `p`, block `b`.
    fn record(&self, p: usize, b: usize) -> &[u8] {
        let rec = Self::record_bytes(self.q4);
        &self.data[(p * self.blocks() + b) * rec..][..rec]
    }

    /// Quant `STEP · s + t` of column `c` in a record, unsigned (Q8_0: offset by 128).
    fn quant(q4: bool, rec: &[u8], c: usize, s: usize, t: usize) -> u8 {
        if q4 {
            let byte = rec[64 * (s % 4) + STEP * c + t];
            if s < 4 {
                byte & 0xF
            } else {
                byte >> 4
            }
        } else {
            rec[64 * s + STEP * c + t]
        }
    }

    /// `(d_w, m_w)` of column `c` in a record (`m_w` 0 for Q8_0).
    fn scales(q4: bool, rec: &[u8], c: usize) -> (f32, f32) {
        let at = |i: usize| f16::from_le_bytes([rec[i], rec[i + 1]]).to_f32();
        let q = Self::quant_bytes(q4);
        (
            at(q + 2 * c),
            if q4 { at(q + 2 * PANEL + 2 * c) } else { 0.0 },
        )
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
        let rec = Self::record_bytes(q4);
        let qb = Self::quant_bytes(q4);
        let mut data = HugeBuffer::zeroed(rows.div_ceil(PANEL) * nb * rec);
        let panel = |(p, data): (usize, &mut [u8])| {
            for (b, r) in data.chunks_exact_mut(rec).enumerate() {
                for c in 0..PANEL.min(rows - p * PANEL) {
                    let blk = (p * PANEL + c) * nb + b;
                    for s in 0..STEPS {
                        for t in 0..STEP {
                            let q = quant(blk, STEP * s + t);
                            if q4 {
                                r[64 * (s % 4) + STEP * c + t] |= q << (4 * (s / 4));
                            } else {
                                r[64 * s + STEP * c + t] = q;
                            }
                        }
                    }
                    let (d, m) = scale(blk);
                    r[qb + 2 * c..][..2].copy_from_slice(&d.to_le_bytes());
                    if q4 {
                        r[qb + 2 * PANEL + 2 * c..][..2].copy_from_slice(&m.to_le_bytes());
                    }
                }
            }
        };
        data.par_chunks_mut(nb * rec).enumerate().for_each(panel);
        Packed { q4, k, data }
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

/// Activation rows quantized to 8 bits per 32-element block, row-major.
#[derive(Debug, Clone)]
pub struct Q8Rows {
    /// Row `r`'s quants at `k · r`.
    qs: Vec<i8>,
    /// Per row and block (at `blocks · r + b`): `d_x`.
    d: Vec<f32>,
    /// Per row and block: `s_x = d_x · Σ q_x` (Q4_1's min term).
    s: Vec<f32>,
    /// Per row and block: `-128 · Σ q_x`, where Q8_0's integer sums start (its offset).
    start: Vec<i32>,
}

/// One row's input and outputs in [`quantize_rows`].
type RowParts<'a> = (
    (&'a [f32], &'a mut [i8]),
    ((&'a mut [f32], &'a mut [f32]), &'a mut [i32]),
);

/// Quantize `m` rows of `k` activations.
fn quantize_rows(isa: Isa, x: &[f32], m: usize, k: usize) -> Q8Rows {
    let nb = k / BLOCK;
    let mut q = Q8Rows {
        qs: vec![0i8; m * k],
        d: vec![0f32; m * nb],
        s: vec![0f32; m * nb],
        start: vec![0i32; m * nb],
    };
    let one = |((xr, qs), ((d, s), start)): RowParts<'_>| match isa {
        // SAFETY: the instruction sets were detected at run time (`isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni => unsafe { quantize_row_avx512(xr, qs, d, s, start) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { quantize_row_avx2(xr, qs, d, s, start) },
        _ => quantize_row(xr, qs, d, s, start),
    };
    if m * k >= super::SERIAL_BELOW {
        x[..m * k]
            .par_chunks_exact(k)
            .zip(q.qs.par_chunks_exact_mut(k))
            .zip(
                q.d.par_chunks_exact_mut(nb)
                    .zip(q.s.par_chunks_exact_mut(nb))
                    .zip(q.start.par_chunks_exact_mut(nb)),
            )
            .for_each(one);
    } else {
        x[..m * k]
            .chunks_exact(k)
            .zip(q.qs.chunks_exact_mut(k))
            .zip(
                q.d.chunks_exact_mut(nb)
                    .zip(q.s.chunks_exact_mut(nb))
                    .zip(q.start.chunks_exact_mut(nb)),
            )
            .for_each(one);
    }
    q
}

/// [`quantize_row`] compiled for AVX2: the same operations (IEEE multiply, add, compare: no
/// fused multiply-add), so the same bits, in wider vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    start: &mut [i32],
) {
    quantize_row(x, qs, d, s, start)
}

/// [`quantize_row`] in AVX-512, a block (two vectors) at a time: the same IEEE operations, and
/// `vcvtps2dq` rounding to nearest, ties to even, as [`quantize_row`]'s `ROUND` trick does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    start: &mut [i32],
) {
    use std::arch::x86_64::*;
    let blocks = x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK));
    for (((xb, qb), d), (s, start)) in blocks.zip(d).zip(s.iter_mut().zip(start)) {
        let v0 = _mm512_loadu_ps(xb.as_ptr());
        let v1 = _mm512_loadu_ps(xb.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let db = amax / 127.0;
        let id = _mm512_set1_ps(if db > 0.0 { 1.0 / db } else { 0.0 });
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let q0 = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v0, id));
        let q1 = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v1, id));
        _mm_storeu_si128(qb.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(
            qb.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtepi32_epi8(q1),
        );
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        *d = db;
        *s = db * sum as f32;
        *start = -128 * sum;
    }
}

#[inline(always)]
fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], start: &mut [i32]) {
    // Adding and subtracting 1.5 · 2^23 rounds an f32 below 2^22 to the nearest integer, ties to
    // even, in two operations that vectorize (`f32::round` is a libm call per element).
    const ROUND: f32 = 12_582_912.0;
    let blocks = x.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(BLOCK));
    for (((xb, qb), d), (s, start)) in blocks.zip(d).zip(s.iter_mut().zip(start)) {
        let mut amax = [0f32; 8];
        for c in xb.chunks_exact(8) {
            for (a, v) in amax.iter_mut().zip(c) {
                *a = a.max(v.abs());
            }
        }
        let db = amax.iter().fold(0f32, |a, &v| a.max(v)) / 127.0;
        let id = if db > 0.0 { 1.0 / db } else { 0.0 };
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = ((v * id + ROUND) - ROUND) as i8;
        }
        let sum: i32 = qb.iter().map(|&v| v as i32).sum();
        *d = db;
        *s = db * sum as f32;
        *start = -128 * sum;
    }
}

/// Which implementation runs the integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX512-VNNI on 512-bit vectors (with AVX512BW and F16C).
    Vnni,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// Plain Rust.
    Portable,
}

/// The widest instruction set the switches allow (`VKV_NO_SIMD`, `VKV_NO_VNNI`).
fn isa() -> Isa {
    let cpu = crate::RuntimeSwitches::get().cpu;
    if cpu.avx512_vnni {
        Isa::Vnni
    } else if cpu.f16c {
        Isa::Avx2
    } else {
        Isa::Portable
    }
}

/// Rows of the largest tile on `isa` for a product of `m` rows. A tile is one panel wide on
/// every instruction set, so a task reads one sequential weight stream.
fn tile_rows(isa: Isa, m: usize) -> usize {
    match (isa, m) {
        // One row streams its weights from memory (measured against 1 × 2 and 1 × 4 panels,
        // docs/benchmarks.md).
        (Isa::Vnni, 1) => 1,
        // Several rows: 8 × 1 measured 10–20 % faster than 4 × 2 at 8 and 16 rows (a decode
        // batch's half, its output head) and no slower at 128, alternating in one process
        // (`int8_decode_step_timings`, docs/benchmarks.md).
        (Isa::Vnni, _) => 8,
        (Isa::Avx2, _) => 2,
        (Isa::Portable, _) => 1,
    }
}

/// Activation rows per pass over all the panels (a parallel region each): their quants stay in
/// each core's L2 while every panel meets them. A prefill's thousand rows in one pass (5–13 %
/// slower, `int8_decode_step_timings` at 1024 rows) stream them from L3 once per panel.
const ROW_BLOCK: usize = 64;
/// At most this many parallel tasks (each a run of panel columns).
const MAX_TASKS: usize = 64;

/// `out[m][n] = Σ_k x[m][k] · w[n][k]` with `x` quantized to 8 bits per block: `w` packed for
/// the integer kernels. Batch-invariant (see the module docs).
pub fn matmul_packed(x: &[f32], m: usize, k: usize, w: &Packed, n: usize, out: &mut [f32]) {
    matmul_packed_split(x, m, k, w, &mut [(out, n)]);
}

/// [`matmul_packed`] of a stacked matrix (`w`'s rows: those of several matrices one after the
/// other, as the fused QKV or gate/up projections are) with each part's columns written to its
/// own output: `outs[i]` is `[m][widths[i]]`. Every width but the last is a multiple of the
/// 16-column panel, so each panel lands in one output.
pub fn matmul_packed_split(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Packed,
    outs: &mut [(&mut [f32], usize)],
) {
    let n: usize = outs.iter().map(|(_, width)| width).sum();
    assert!(
        w.k == k
            && k.is_multiple_of(BLOCK)
            && n.div_ceil(PANEL) <= w.panels()
            && x.len() >= m * k
            && outs.iter().all(|(out, width)| out.len() >= m * width)
            && outs[..outs.len().saturating_sub(1)]
                .iter()
                .all(|(_, width)| width.is_multiple_of(PANEL)),
        "matmul_w_int8 shapes"
    );
    let mut first = 0;
    let dests = outs
        .iter_mut()
        .map(|(out, width)| {
            let d = Dest {
                out: out.as_mut_ptr(),
                width: *width,
                first_panel: first,
            };
            first += width.div_ceil(PANEL);
            d
        })
        .collect();
    matmul_into(isa(), x, m, k, w, &Dests(dests));
}

/// [`matmul_packed`] on a given instruction set.
#[cfg(test)]
fn matmul_with(isa: Isa, x: &[f32], m: usize, k: usize, w: &Packed, n: usize, out: &mut [f32]) {
    let dest = Dest {
        out: out.as_mut_ptr(),
        width: n,
        first_panel: 0,
    };
    matmul_into(isa, x, m, k, w, &Dests(vec![dest]));
}

/// One output of a product: `[m][width]` at `out`, taking the panels from `first_panel` on.
struct Dest {
    out: *mut f32,
    width: usize,
    first_panel: usize,
}

/// The outputs of a product, in panel order; the tasks each write the columns of their own
/// panels.
struct Dests(Vec<Dest>);
// SAFETY: tasks write disjoint elements (see `matmul_into`).
unsafe impl Sync for Dests {}

impl Dests {
    /// Columns in all.
    fn n(&self) -> usize {
        self.0.iter().map(|d| d.width).sum()
    }

    /// Where panel `p`'s columns go: `(row 0's first column, row stride, columns)`.
    fn panel(&self, p: usize) -> (*mut f32, usize, usize) {
        let d = self
            .0
            .iter()
            .rev()
            .find(|d| d.first_panel <= p)
            .expect("panel 0 has an output");
        let col = (p - d.first_panel) * PANEL;
        (d.out.wrapping_add(col), d.width, PANEL.min(d.width - col))
    }
}

/// The product into `dests` on instruction set `isa`.
fn matmul_into(isa: Isa, x: &[f32], m: usize, k: usize, w: &Packed, dests: &Dests) {
    let n = dests.n();
    if m == 0 || n == 0 {
        return;
    }
    let xq = quantize_rows(isa, x, m, k);
    let tr = tile_rows(isa, m);
    let panels = n.div_ceil(PANEL);
    let per_task = panels.div_ceil(MAX_TASKS);
    let block = ROW_BLOCK.div_ceil(tr) * tr;
    for c0 in (0..m).step_by(block) {
        let c1 = (c0 + block).min(m);
        (0..panels.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let (p0, p1) = (task * per_task, ((task + 1) * per_task).min(panels));
                for p in p0..p1 {
                    let (out, stride, cols) = dests.panel(p);
                    // The next panel's weights, asked for a slice per block during the first
                    // tile (a burst of prefetches at once fills the miss queue and stalls).
                    let ahead = if p + 1 < p1 && m > tr {
                        w.panel_bytes(p + 1, 1)
                    } else {
                        &[]
                    };
                    let mut r0 = c0;
                    while r0 < c1 {
                        let rows = tr.min(c1 - r0);
                        let t = Tile {
                            r0,
                            rows,
                            p0: p,
                            out,
                            stride,
                            cols,
                            ahead: if r0 == c0 { ahead } else { &[] },
                        };
                        // SAFETY: each output holds `m` rows of its width (checked by the
                        // caller); this task alone writes the columns of its panels.
                        unsafe { tile(isa, w, &xq, &t) };
                        r0 += rows;
                    }
                }
            });
    }
}

/// Ask for `lines` 64-byte lines of `bytes` from line `first` on into the L2 cache (x86-64;
/// elsewhere nothing).
#[inline(always)]
fn prefetch_lines(bytes: &[u8], first: usize, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let end = bytes.len().min((first + lines) * 64);
        for at in (first * 64..end).step_by(64) {
            // SAFETY: a prefetch of an address inside `bytes` has no effect on memory.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(at).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, first, lines);
}

/// One tile of a product: rows `r0..r0 + rows` × panel `p0` (of the weights), written at `out`
/// (row 0's first column of the panel in its output) with rows `stride` apart.
#[derive(Clone, Copy)]
struct Tile<'w> {
    r0: usize,
    rows: usize,
    p0: usize,
    out: *mut f32,
    stride: usize,
    /// Columns of the panel that exist (the last panel of an output may be partial).
    cols: usize,
    /// Weights to prefetch into L2 while this tile runs, a slice per block (the next panel's,
    /// on the first tile of a panel); empty for none.
    ahead: &'w [u8],
}

impl Tile<'_> {
    /// Where the tile's row `r` starts in its output, and how many of its 16 columns exist.
    fn dst(&self, r: usize) -> (*mut f32, usize) {
        // `wrapping_add`: a pointer into the output, used only for the valid columns.
        (
            self.out.wrapping_add((self.r0 + r) * self.stride),
            self.cols,
        )
    }
}

/// Compute tile `t` on `isa`.
///
/// # Safety
/// `t.out` holds rows `t.r0 .. t.r0 + t.rows` of `t.cols` columns `t.stride` apart, that
/// nothing else reads or writes meanwhile; the tile lies within `w` and `x`.
unsafe fn tile(isa: Isa, w: &Packed, x: &Q8Rows, t: &Tile<'_>) {
    /// Dispatch to the kernel instance for `rows`.
    macro_rules! rows {
        ($module:ident, $t:expr, $q4:expr, [$($r:literal),*]) => {
            match ($t.rows, $q4) {
                $(
                    ($r, true) => $module::tile::<$r, true>(w, x, $t),
                    ($r, false) => $module::tile::<$r, false>(w, x, $t),
                )*
                _ => unreachable!("tile of {} rows", $t.rows),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Vnni => rows!(vnni, t, w.q4, [1, 2, 3, 4, 5, 6, 7, 8]),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => rows!(avx2, t, w.q4, [1, 2]),
        _ => {
            for r in 0..t.rows {
                let mut acc = [0f32; PANEL];
                portable_panel(w, t.p0, x, t.r0 + r, &mut acc);
                let (dst, cols) = t.dst(r);
                std::slice::from_raw_parts_mut(dst, cols).copy_from_slice(&acc[..cols]);
            }
        }
    }
}

/// Panel `p` of `w` · activation row `r`, in plain Rust: the same integers and the same f32
/// operations, in the same order, as the SIMD kernels.
fn portable_panel(w: &Packed, p: usize, x: &Q8Rows, r: usize, acc: &mut [f32; PANEL]) {
    let nb = w.blocks();
    for b in 0..nb {
        let rec = w.record(p, b);
        let xq = &x.qs[r * w.k + b * BLOCK..][..BLOCK];
        let at = r * nb + b;
        for (c, acc) in acc.iter_mut().enumerate() {
            let mut sum = if w.q4 { 0 } else { x.start[at] };
            for s in 0..STEPS {
                for t in 0..STEP {
                    sum += Packed::quant(w.q4, rec, c, s, t) as i32 * xq[STEP * s + t] as i32;
                }
            }
            let (dw, mw) = Packed::scales(w.q4, rec, c);
            *acc = (sum as f32).mul_add(dw * x.d[at], *acc);
            if w.q4 {
                *acc = mw.mul_add(x.s[at], *acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The packed form of a quantized weight, built on first use.
pub(super) type PackedCell = OnceLock<Packed>;

#[cfg(test)]
#[path = "int8_tests.rs"]
mod tests;

/// Kernel timings (not a check): `cargo test --release -p vkv-kernels --lib int8_timings --
/// --ignored --nocapture`. SmolLM2-135M's shapes; one thread and all threads, best of several
/// runs, so a busy machine disturbs it less. `VKV_INT8_TIMINGS=m1,m2,..` picks the row counts.
#[cfg(test)]
#[path = "int8_timings_tests.rs"]
mod timings;
