//! The CPU implementation of every op the forward pass needs, in f32: the CPU device runs these,
//! and they are the oracle the CUDA kernels are tested against.
//!
//! Layouts: activations are row-major `[tokens][features]`; a weight is row-major `[out][in]`
//! (an `nn.Linear` weight, or a GGUF tensor with dims `[in, out]`); per-token heads are
//! contiguous `[head][head_dim]`. KV is read and written through a [`KvRef`], in either of the
//! two addressing modes of the attention kernels (strided over contiguous virtual memory, or a
//! block table). RoPE follows the two conventions in use: adjacent pairs (`Interleaved`, as
//! llama.cpp applies it to GGUF Llama weights, whose Q/K rows the converter permuted) and the two
//! halves of each head (`Half`, HF's `rotate_half`).

use rayon::prelude::*;

mod int8;
mod quant;

pub use quant::{matmul_w, matmul_w_int8, matmul_w_rowwise, Activations, Weight, BLOCK};

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
    let width = n_heads * head_dim;
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            for head in row.chunks_mut(head_dim) {
                for (i, &f) in inv_freq.iter().enumerate() {
                    let (sin, cos) = (pos as f32 * f).sin_cos();
                    let (a, b) = match style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Half => (i, i + head_dim / 2),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos - x1 * sin;
                    head[b] = x0 * sin + x1 * cos;
                }
            }
        });
}

/// RMSNorm of each row of `x` (`[rows][dim]`) into `out`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
                *o = x * inv * w;
            }
        });
}

/// `gate = silu(gate) · up`, elementwise (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gate.par_iter_mut().zip(up.par_iter()).for_each(|(g, u)| {
        *g = *g / (1.0 + (-*g).exp()) * u;
    });
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

/// Where one sequence's K and V of one layer live (f32 elements). Strides are in elements.
#[derive(Debug, Clone, Copy)]
pub enum KvRef<'a> {
    /// Contiguous: token `t`, head `h` at `k + t·token_stride + h·head_stride` (a vmm slot,
    /// either layout, or a plain tensor).
    Strided {
        k: *mut f32,
        v: *mut f32,
        token_stride: usize,
        head_stride: usize,
    },
    /// Paged: token `t` is slot `t % block_size` of block `blocks[t / block_size]` in the pools.
    Paged {
        k_pool: *mut f32,
        v_pool: *mut f32,
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
    /// Element offsets of token `t`'s K (and V) head 0.
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

    fn bases(&self) -> (*mut f32, *mut f32, usize) {
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
}

/// Write token `pos`'s K and V (`[n_kv_heads][head_dim]` each).
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
    for h in 0..n_kv_heads {
        // SAFETY: the caller guarantees the token is backed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                k[h * head_dim..].as_ptr(),
                kb.add(at + h * hs),
                head_dim,
            );
            std::ptr::copy_nonoverlapping(
                v[h * head_dim..].as_ptr(),
                vb.add(at + h * hs),
                head_dim,
            );
        }
    }
}

/// The head counts of an attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
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
    let mut scores = Vec::new();
    for h in 0..n_heads {
        let range = h * head_dim..(h + 1) * head_dim;
        // SAFETY: forwarded from the caller.
        unsafe {
            attention_head(
                &q[range.clone()],
                kv,
                context,
                h / (n_heads / n_kv_heads),
                head_dim,
                scale,
                &mut out[range],
                &mut scores,
            )
        };
    }
}

/// One query head of [`attention`], reading KV head `kv_head`; `scores` is scratch space. The
/// forward pass runs heads of all tokens in parallel through this.
///
/// # Safety
/// As for [`attention`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_head(
    qh: &[f32],
    kv: &KvRef<'_>,
    context: usize,
    kv_head: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: AVX2 and FMA were detected at run time; the rest as for this function.
        return unsafe {
            attention_head_fma(qh, kv, context, kv_head, head_dim, scale, out, scores)
        };
    }
    // SAFETY: as for this function.
    unsafe { attention_body::<false>(qh, kv, context, kv_head, head_dim, scale, out, scores) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_head_fma(
    qh: &[f32],
    kv: &KvRef<'_>,
    context: usize,
    kv_head: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    if !head_dim.is_multiple_of(64) {
        // SAFETY: as for `attention_head`.
        return unsafe {
            attention_body::<true>(qh, kv, context, kv_head, head_dim, scale, out, scores)
        };
    }
    let (kb, vb, hs) = kv.bases();
    scores.clear();
    scores.resize(context, 0.0);
    let mut max = f32::NEG_INFINITY;
    let q = qh[..head_dim].as_ptr();
    let (run, stride) = kv.run();
    let (mut base, mut left) = (0, 0);
    for (t, s) in scores.iter_mut().enumerate() {
        if left == 0 {
            (base, left) = (kv.offset(t) + kv_head * hs, run);
        }
        // SAFETY: t < context, which the caller guarantees is written; `head_dim` values.
        let k = unsafe { kb.add(base) };
        (base, left) = (base + stride, left - 1);
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..head_dim).step_by(16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), a0);
            // (two chains: the FMA latency is four times its issue interval)
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.add(i + 8)),
                _mm256_loadu_ps(k.add(i + 8)),
                a1,
            );
        }
        let v = _mm256_add_ps(a0, a1);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        *s = _mm_cvtss_f32(h) * scale;
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    let o = out[..head_dim].as_mut_ptr();
    // 64 output dimensions (8 registers) per pass over the positions.
    for i in (0..head_dim).step_by(64) {
        let mut a = [_mm256_setzero_ps(); 8];
        let (mut base, mut left) = (0, 0);
        for (t, s) in scores.iter().enumerate() {
            if left == 0 {
                (base, left) = (kv.offset(t) + kv_head * hs + i, run);
            }
            // SAFETY: as above.
            let v = unsafe { vb.add(base) };
            (base, left) = (base + stride, left - 1);
            let p = _mm256_set1_ps(s * inv);
            for (j, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * j)), *a);
            }
        }
        for (j, a) in a.iter().enumerate() {
            _mm256_storeu_ps(o.add(i + 8 * j), *a);
        }
    }
}

/// [`attention_head`]'s body, inlined into a caller compiled with FMA (`FMA = true`: fused
/// multiply-adds, 16 partial sums) or without.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_body<const FMA: bool>(
    qh: &[f32],
    kv: &KvRef<'_>,
    context: usize,
    kv_head: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let (kb, vb, hs) = kv.bases();
    scores.clear();
    scores.resize(context, 0.0);
    let mut max = f32::NEG_INFINITY;
    let qh = &qh[..head_dim];
    for (t, s) in scores.iter_mut().enumerate() {
        // SAFETY: t < context, which the caller guarantees is written.
        let kt =
            unsafe { std::slice::from_raw_parts(kb.add(kv.offset(t) + kv_head * hs), head_dim) };
        let mut acc = [0f32; 16];
        let (cq, ck) = (qh.chunks_exact(16), kt.chunks_exact(16));
        let mut tail = 0f32;
        for (x, y) in cq.remainder().iter().zip(ck.remainder()) {
            tail = madd(*x, *y, tail);
        }
        for (x, y) in cq.zip(ck) {
            for i in 0..16 {
                acc[i] = madd(x[i], y[i], acc[i]);
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
    out.fill(0.0);
    let inv = 1.0 / sum;
    let out = &mut out[..head_dim];
    for (t, s) in scores.iter().enumerate() {
        // SAFETY: as above.
        let vt =
            unsafe { std::slice::from_raw_parts(vb.add(kv.offset(t) + kv_head * hs), head_dim) };
        let p = s * inv;
        for (o, v) in out.iter_mut().zip(vt) {
            *o = madd(p, *v, *o);
        }
    }
}

/// Whether AVX2 and FMA can be used (detected at run time; `VKV_NO_SIMD` says no).
fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FMA.get_or_init(|| {
            std::env::var_os("VKV_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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

    #[test]
    fn paged_and_strided_attention_agree_with_a_dense_reference() {
        // Head sizes of the portable body (8) and of the AVX2 kernel (64, 128).
        for hd in [8, 64, 128] {
            attention_agrees_with_a_dense_reference(hd);
        }
    }

    fn attention_agrees_with_a_dense_reference(hd: usize) {
        let mut rng = StdRng::seed_from_u64(2);
        let (n_heads, n_kv, ctx) = (6, 2, 37);
        let keys = random(ctx * n_kv * hd, &mut rng);
        let vals = random(ctx * n_kv * hd, &mut rng);
        let q = random(n_heads * hd, &mut rng);
        // Strided: a plain [ctx][kv][hd] tensor.
        let (mut ks, mut vs) = (
            vec![f32::NAN; ctx * n_kv * hd],
            vec![f32::NAN; ctx * n_kv * hd],
        );
        let strided = KvRef::Strided {
            k: ks.as_mut_ptr(),
            v: vs.as_mut_ptr(),
            token_stride: n_kv * hd,
            head_stride: hd,
        };
        // Paged: blocks of 4 tokens scattered in reverse order over a pool of 12 blocks.
        let bs = 4;
        let blocks: Vec<u32> = (0..ctx.div_ceil(bs) as u32).rev().collect();
        let (mut kp, mut vp) = (
            vec![f32::NAN; 12 * bs * n_kv * hd],
            vec![f32::NAN; 12 * bs * n_kv * hd],
        );
        let paged = KvRef::Paged {
            k_pool: kp.as_mut_ptr(),
            v_pool: vp.as_mut_ptr(),
            blocks: &blocks,
            block_size: bs,
            block_stride: bs * n_kv * hd,
            token_stride: n_kv * hd,
            head_stride: hd,
        };
        for t in 0..ctx {
            let row = t * n_kv * hd..(t + 1) * n_kv * hd;
            unsafe {
                kv_append(
                    &strided,
                    t,
                    &keys[row.clone()],
                    &vals[row.clone()],
                    n_kv,
                    hd,
                );
                kv_append(&paged, t, &keys[row.clone()], &vals[row], n_kv, hd);
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = Heads {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let (mut a, mut b) = (vec![f32::NAN; n_heads * hd], vec![f32::NAN; n_heads * hd]);
        unsafe {
            attention(&q, &strided, ctx, heads, scale, &mut a);
            attention(&q, &paged, ctx, heads, scale, &mut b);
        }
        for h in 0..n_heads {
            let g = h / (n_heads / n_kv);
            let mut w: Vec<f32> = (0..ctx)
                .map(|t| {
                    (0..hd)
                        .map(|d| q[h * hd + d] * keys[(t * n_kv + g) * hd + d])
                        .sum::<f32>()
                        * scale
                })
                .collect();
            softmax(&mut w);
            for d in 0..hd {
                let want: f32 = (0..ctx).map(|t| w[t] * vals[(t * n_kv + g) * hd + d]).sum();
                assert!(
                    (a[h * hd + d] - want).abs() < 1e-5,
                    "hd {hd}: strided h{h} d{d}"
                );
                assert!(
                    (b[h * hd + d] - want).abs() < 1e-5,
                    "hd {hd}: paged h{h} d{d}"
                );
            }
        }
    }
}
