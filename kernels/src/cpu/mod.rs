//! The CPU implementation of every op the forward pass needs, in f32: the CPU device runs these,
//! and they are the oracle the CUDA kernels are tested against.
//!
//! Layouts: activations are row-major `[tokens][features]`; a weight is row-major `[out][in]`
//! (an `nn.Linear` weight, or a GGUF tensor with dims `[in, out]`); per-token heads are
//! contiguous `[head][head_dim]`. KV is read and written through a [`KvRef`], in either of the
//! two addressing modes of the attention kernels (strided over contiguous virtual memory, or a
//! block table), stored as f32 or f16 ([`KvDtype`]; the `attention` module). RoPE follows the two conventions in use: adjacent pairs (`Interleaved`, as
//! llama.cpp applies it to GGUF Llama weights, whose Q/K rows the converter permuted) and the two
//! halves of each head (`Half`, HF's `rotate_half`).

use rayon::prelude::*;

mod attention;
pub mod fp8;
mod huge_pages;
mod int8;
mod quant;

pub use attention::{
    attention, attention_group, attention_rows, kv_append, Heads, KvDtype, KvRef, QueryRows,
};

pub use huge_pages::{available_bytes, HugeBuffer, HugePageUse};
pub use quant::{
    matmul_w, matmul_w_int8, matmul_w_int8_split, matmul_w_rowwise, split_columns, Activations,
    Weight, BLOCK,
};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimensions (2i, 2i+1) rotate together (llama.cpp on GGUF Llama weights).
    Interleaved,
    /// Dimensions (i, i + d/2) rotate together (HF `rotate_half`).
    Half,
}

/// Llama-3's RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// RoPE inverse frequencies for one head (`head_dim / 2` of them), with Llama-3 scaling applied.
pub fn rope_inv_freq(head_dim: usize, theta: f32, scaling: Option<Llama3RopeScaling>) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
            let Some(s) = scaling else { return f };
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let low = s.original_max_position_embeddings / s.low_freq_factor;
            let high = s.original_max_position_embeddings / s.high_freq_factor;
            if wavelen < high {
                f
            } else if wavelen > low {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// Rotate every head of every row of `x` (`[rows][n_heads · head_dim]`) by its row's position.
pub fn rope(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    style: RopeStyle,
) {
    rope_rotate(
        x,
        &RopeTable::new(positions, inv_freq),
        n_heads,
        head_dim,
        style,
    );
}

/// `(cos, sin)` of every row's position times every inverse frequency (`[rows][freqs]`): what
/// [`rope`] computes, once per forward pass instead of once per head, layer and Q or K (the
/// values are the same `sin_cos` of the same products, so the rotation's bits are too).
pub struct RopeTable {
    freqs: usize,
    cos_sin: Vec<(f32, f32)>,
}

impl RopeTable {
    pub fn new(positions: &[usize], inv_freq: &[f32]) -> Self {
        let cos_sin = positions
            .iter()
            .flat_map(|&pos| {
                inv_freq.iter().map(move |&f| {
                    let (sin, cos) = (pos as f32 * f).sin_cos();
                    (cos, sin)
                })
            })
            .collect();
        RopeTable {
            freqs: inv_freq.len(),
            cos_sin,
        }
    }
}

/// [`rope`] with the angles of `table` (one row of it per row of `x`).
pub fn rope_rotate(
    x: &mut [f32],
    table: &RopeTable,
    n_heads: usize,
    head_dim: usize,
    style: RopeStyle,
) {
    let width = n_heads * head_dim;
    let rotate = |(row, angles): (&mut [f32], &[(f32, f32)])| {
        for head in row.chunks_mut(head_dim) {
            for (i, &(cos, sin)) in angles.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Half => (i, i + head_dim / 2),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    };
    let freqs = table.freqs.max(1);
    if x.len() >= SERIAL_BELOW {
        x.par_chunks_mut(width)
            .zip(table.cos_sin.par_chunks(freqs))
            .for_each(rotate);
    } else {
        x.chunks_mut(width)
            .zip(table.cos_sin.chunks(freqs))
            .for_each(rotate);
    }
}

/// RMSNorm of each row of `x` (`[rows][dim]`) into `out`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    let norm = |(o, x): (&mut [f32], &[f32])| {
        let ms = sum_of_squares(x) / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
            *o = x * inv * w;
        }
    };
    if x.len() < SERIAL_BELOW {
        out.chunks_mut(dim).zip(x.chunks(dim)).for_each(norm);
    } else {
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .for_each(norm);
    }
}

/// `Σ x²` in 16 partial sums (lane `i` takes elements `i`, `i + 16`, ...) added pairwise at the
/// end, then the tail: a fixed order that vectorizes (one running sum is a chain of dependent
/// adds).
fn sum_of_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + tail
}

/// Elementwise ops (norms, RoPE, SiLU) on fewer elements than this run on the calling thread: a
/// decode step's few rows take microseconds, less than a parallel region costs (waking the other
/// workers, which on a busy 2-core machine may have yielded their core).
pub const SERIAL_BELOW: usize = 1 << 15;

/// `gate = silu(gate) · up`, elementwise (SwiGLU). With AVX2 the `exp` is the attention
/// kernel's polynomial (relative error < 2e-7), for every element alike (a tail goes through the
/// same vector code), so an element's result does not depend on where the slice was split.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    if attention::simd_available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        let run = |(g, u): (&mut [f32], &[f32])| unsafe { silu_mul_avx2(g, u) };
        if gate.len() < SERIAL_BELOW {
            gate.chunks_mut(256).zip(up.chunks(256)).for_each(run);
        } else {
            gate.par_chunks_mut(256)
                .zip(up.par_chunks(256))
                .for_each(run);
        }
        return;
    }
    gate.par_iter_mut().zip(up.par_iter()).for_each(|(g, u)| {
        *g = *g / (1.0 + (-*g).exp()) * u;
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn eight(g: __m256, u: __m256) -> __m256 {
        let e = attention::simd::exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u)
    }
    let n8 = gate.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        let (g, u) = (gate[i..].as_mut_ptr(), up[i..].as_ptr());
        _mm256_storeu_ps(g, eight(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
    }
    if n8 < gate.len() {
        let (mut g, mut u) = ([0f32; 8], [0f32; 8]);
        let rest = gate.len() - n8;
        g[..rest].copy_from_slice(&gate[n8..]);
        u[..rest].copy_from_slice(&up[n8..]);
        _mm256_storeu_ps(
            g.as_mut_ptr(),
            eight(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr())),
        );
        gate[n8..].copy_from_slice(&g[..rest]);
    }
}

/// `out[m][n] = Σ_k x[m][k] · w[n][k]` — activations times a transposed `[out][in]` weight —
/// through the `gemm` crate (SIMD picked at run time, threads by rayon).
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let parallel = m * n * k >= 1 << 16 && threads > 1;
    gemm_t(
        x,
        m,
        k,
        w,
        n,
        out,
        if parallel {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        },
    );
}

/// [`matmul_t`] on the calling thread only (for use inside parallel tasks).
pub fn matmul_t_serial(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    gemm_t(x, m, k, w, n, out, gemm::Parallelism::None);
}

fn gemm_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    parallelism: gemm::Parallelism,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_t shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the shapes were checked above; strides describe row-major x [m,k], w^T [k,n]
    // (element (kk, j) at w[j·k + kk]) and row-major out [m,n].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Whether AVX2 and FMA can be used (detected at run time; `VKV_NO_SIMD` says no).
fn fma_available() -> bool {
    crate::RuntimeSwitches::get().cpu.avx2_fma
}

/// Dot product with eight independent partial sums, so the compiler can keep them in SIMD lanes
/// (a single running sum is a dependency chain it may not reorder); with FMA where the CPU has
/// it (the baseline x86-64 target has only SSE2: 4 lanes, separate multiply and add).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { dot_fma(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = x.mul_add(*y, tail);
    }
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = [0f32; 8];
    for i in 0..8 {
        s[i] = acc[i] + acc[i + 8];
    }
    ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7])) + tail
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Row-wise log-sum-exp-stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn matmul_t_matches_the_naive_product() {
        let mut rng = StdRng::seed_from_u64(1);
        for (m, k, n) in [(1, 7, 5), (3, 64, 33), (17, 128, 96), (64, 256, 300)] {
            let (x, w) = (random(m * k, &mut rng), random(n * k, &mut rng));
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, m, k, &w, n, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| x[i * k + kk] * w[j * k + kk]).sum();
                    assert!(
                        (out[i * n + j] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{k}x{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_formula_for_every_length() {
        let mut rng = StdRng::seed_from_u64(4);
        for n in [1, 7, 8, 9, 255, 256, 257, 1000] {
            let g: Vec<f32> = (0..n).map(|_| rng.random_range(-100.0f32..100.0)).collect();
            let u = random(n, &mut rng);
            let mut got = g.clone();
            silu_mul(&mut got, &u);
            for i in 0..n {
                let x = g[i] as f64;
                let want = x / (1.0 + (-x).exp()) * u[i] as f64;
                assert!(
                    (got[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "n {n} i {i}: {} vs {want}",
                    got[i]
                );
            }
            // A split changes no element.
            let mut halves = g.clone();
            let (a, b) = halves.split_at_mut(n / 2);
            silu_mul(a, &u[..n / 2]);
            silu_mul(b, &u[n / 2..]);
            assert_eq!(halves, got, "n {n}");
        }
    }

    #[test]
    fn rope_styles_rotate_the_pairs_they_name() {
        let inv = rope_inv_freq(4, 10000.0, None);
        assert_eq!(inv[0], 1.0);
        let mut a = vec![1.0, 0.0, 1.0, 0.0];
        rope(&mut a, &[1], 1, 4, &inv, RopeStyle::Interleaved);
        assert!((a[0] - 1f32.cos()).abs() < 1e-6 && (a[1] - 1f32.sin()).abs() < 1e-6);
        let mut b = vec![1.0, 1.0, 0.0, 0.0];
        rope(&mut b, &[1], 1, 4, &inv, RopeStyle::Half);
        assert!((b[0] - 1f32.cos()).abs() < 1e-6 && (b[2] - 1f32.sin()).abs() < 1e-6);
        // Position 0 is the identity.
        let mut c = vec![0.3, -0.2, 0.5, 0.1];
        rope(&mut c, &[0], 1, 4, &inv, RopeStyle::Half);
        assert_eq!(c, vec![0.3, -0.2, 0.5, 0.1]);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = rope_inv_freq(128, 500000.0, None);
        let scaled = rope_inv_freq(128, 500000.0, Some(s));
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    }
}
