//! Test module `tests` of `attention.rs` (a child module: `super` is `attention`).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;

fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Backing store of one layer of a sequence, in one addressing mode.
struct Store {
    k: Vec<u8>,
    v: Vec<u8>,
    blocks: Vec<u32>,
}

#[test]
#[cfg(target_arch = "x86_64")]
fn vector_exp_is_within_its_documented_error() {
    if !simd_available() {
        eprintln!("skipped: no AVX2/FMA/F16C");
        return;
    }
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 0.0 {
        let xs: [f32; 8] = std::array::from_fn(|i| x - i as f32 * 1e-3);
        let mut got = [0f32; 8];
        // SAFETY: AVX2, FMA and F16C were detected.
        unsafe {
            use std::arch::x86_64::*;
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn run(xs: &[f32; 8], got: &mut [f32; 8]) {
                _mm256_storeu_ps(
                    got.as_mut_ptr(),
                    simd::exp_avx2(_mm256_loadu_ps(xs.as_ptr())),
                );
            }
            run(&xs, &mut got);
        }
        for (x, g) in xs.iter().zip(got) {
            if *x < -87.0 {
                assert_eq!(g, 0.0);
                continue;
            }
            let want = (*x as f64).exp();
            worst = worst.max(((g as f64 - want) / want).abs());
        }
        x += 0.0137;
    }
    assert!(worst < 2e-7, "max relative error {worst:e}");
    let got = unsafe {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn edge() -> [f32; 8] {
            let mut o = [0f32; 8];
            let x = _mm256_setr_ps(f32::NEG_INFINITY, -87.5, -200.0, 0.0, -1.0, 0.0, 0.0, 0.0);
            _mm256_storeu_ps(o.as_mut_ptr(), simd::exp_avx2(x));
            o
        }
        edge()
    };
    assert_eq!(&got[..4], &[0.0, 0.0, 0.0, 1.0]);
}

/// Every head of `n_heads` over ragged contexts, strided and paged (blocks of `bs` scattered
/// in reverse), f32 and f16, against an f64 dense reference over the values as stored.
fn agrees_with_a_dense_reference(hd: usize, n_heads: usize, n_kv: usize, bs: usize) {
    let mut rng = StdRng::seed_from_u64(2);
    let max_ctx = 75;
    let keys = random(max_ctx * n_kv * hd, &mut rng);
    let vals = random(max_ctx * n_kv * hd, &mut rng);
    // Scores of a realistic spread (|q·k| up to a few units).
    let q: Vec<f32> = random(n_heads * hd, &mut rng)
        .iter()
        .map(|x| x * 3.0)
        .collect();
    let width = n_kv * hd;
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Fp8] {
        let e = dtype.bytes();
        let nblocks = max_ctx.div_ceil(bs);
        let mut strided = Store {
            k: vec![0xff; max_ctx * width * e],
            v: vec![0xff; max_ctx * width * e],
            blocks: vec![],
        };
        let mut paged = Store {
            k: vec![0xff; (nblocks + 2) * bs * width * e],
            v: vec![0xff; (nblocks + 2) * bs * width * e],
            blocks: (0..nblocks as u32).rev().map(|b| b + 1).collect(),
        };
        let refs = |s: &mut Store, paged: bool| -> KvRef<'static> {
            let blocks: &'static [u32] = Box::leak(s.blocks.clone().into_boxed_slice());
            if paged {
                KvRef::Paged {
                    k_pool: s.k.as_mut_ptr(),
                    v_pool: s.v.as_mut_ptr(),
                    dtype,
                    blocks,
                    block_size: bs,
                    block_stride: bs * width,
                    token_stride: width,
                    head_stride: hd,
                }
            } else {
                KvRef::Strided {
                    k: s.k.as_mut_ptr(),
                    v: s.v.as_mut_ptr(),
                    dtype,
                    token_stride: width,
                    head_stride: hd,
                }
            }
        };
        let (rs, rp) = (refs(&mut strided, false), refs(&mut paged, true));
        for t in 0..max_ctx {
            let row = t * width..(t + 1) * width;
            unsafe {
                kv_append(&rs, t, &keys[row.clone()], &vals[row.clone()], n_kv, hd);
                kv_append(&rp, t, &keys[row.clone()], &vals[row], n_kv, hd);
            }
        }
        // The values as stored.
        let stored = |x: f32| match dtype {
            KvDtype::F32 => x as f64,
            KvDtype::F16 => f16::from_f32(x).to_f64(),
            KvDtype::Fp8 => super::super::fp8::decode(super::super::fp8::encode(x)) as f64,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = Heads {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        for ctx in [1, 7, 8, 9, bs - 1, bs, bs + 1, 2 * bs + 3, 33, max_ctx] {
            let (mut a, mut b) = (vec![f32::NAN; n_heads * hd], vec![f32::NAN; n_heads * hd]);
            unsafe {
                attention(&q, &rs, ctx, heads, scale, &mut a);
                attention(&q, &rp, ctx, heads, scale, &mut b);
            }
            assert_eq!(
                a, b,
                "{dtype:?} hd {hd} ctx {ctx}: paged differs from strided"
            );
            for h in 0..n_heads {
                let g = h / (n_heads / n_kv);
                let w: Vec<f64> = (0..ctx)
                    .map(|t| {
                        (0..hd)
                            .map(|d| q[h * hd + d] as f64 * stored(keys[(t * n_kv + g) * hd + d]))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = w.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = ex.iter().sum();
                for d in 0..hd {
                    let want: f64 = (0..ctx)
                        .map(|t| ex[t] / sum * stored(vals[(t * n_kv + g) * hd + d]))
                        .sum();
                    let got = a[h * hd + d] as f64;
                    assert!(
                        (got - want).abs() < 2e-6,
                        "{dtype:?} hd {hd} ctx {ctx} h{h} d{d}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn paged_and_strided_attention_agree_with_a_dense_reference() {
    // Head sizes of the portable fallback (12: not a multiple of 8), of the 8-wide P·V tail
    // (40), and of the usual kernels (64, 128); GQA groups of 1, 3 and 4 (4: split 3 + 1).
    agrees_with_a_dense_reference(12, 4, 2, 4);
    agrees_with_a_dense_reference(40, 6, 2, 16);
    agrees_with_a_dense_reference(64, 9, 3, 16);
    agrees_with_a_dense_reference(64, 8, 2, 5);
    agrees_with_a_dense_reference(128, 2, 2, 16);
}

/// Decode attention of SmolLM2-135M's shapes at 16 sequences (9 heads, 3 KV heads, 64 dims,
/// f16 paged KV in blocks of 16 scattered over the pool, head-major as `PagedKv` lays them
/// out (`VKV_ATTN_TOKEN_MAJOR=1`: token-major), `VKV_ATTN_LAYERS` layers (default 30) of
/// `VKV_ATTN_CONTEXT` tokens each (default 192): ~70 MB of KV, more than the L3, as one
/// decode step reads it. Prints the best and median of 15 steps on the current pool.
#[test]
#[ignore]
fn attention_timings() {
    use rayon::prelude::*;
    let env = crate::switches::knob::<usize>;
    let (seqs, layers, nh, nkv, hd, bs) = (16usize, env("VKV_ATTN_LAYERS", 30), 9, 3, 64, 16);
    let ctx = env("VKV_ATTN_CONTEXT", 192);
    let head_major = env("VKV_ATTN_TOKEN_MAJOR", 0) != 1;
    let dtype = if env("VKV_ATTN_FP8", 0) == 1 {
        KvDtype::Fp8
    } else {
        KvDtype::F16
    };
    let width = nkv * hd;
    let nb = ctx.div_ceil(bs);
    let mut rng = StdRng::seed_from_u64(9);
    // Blocks of a sequence scattered over the pool (a fixed permutation).
    let total = seqs * nb;
    let mut perm: Vec<u32> = (0..total as u32).collect();
    for i in (1..total).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    let mut pools: Vec<(Vec<u8>, Vec<u8>)> = (0..layers)
        .map(|_| {
            let n = total * bs * width * dtype.bytes();
            let k: Vec<u8> = (0..n).map(|_| rng.random::<u8>() & 0x3b).collect();
            let v: Vec<u8> = (0..n).map(|_| rng.random::<u8>() & 0x3b).collect();
            (k, v)
        })
        .collect();
    let refs: Vec<Vec<KvRef<'_>>> = pools
        .iter_mut()
        .map(|(k, v)| {
            (0..seqs)
                .map(|s| KvRef::Paged {
                    k_pool: k.as_mut_ptr(),
                    v_pool: v.as_mut_ptr(),
                    dtype,
                    blocks: &perm[s * nb..(s + 1) * nb],
                    block_size: bs,
                    block_stride: bs * width,
                    token_stride: if head_major { hd } else { width },
                    head_stride: if head_major { bs * hd } else { hd },
                })
                .collect()
        })
        .collect();
    let q = random(seqs * nh * hd, &mut rng);
    let mut out = vec![0f32; seqs * nh * hd];
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let reps = 30 / layers;
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = std::time::Instant::now();
            for layer in refs.iter().cycle().take(reps * layers) {
                out.par_chunks_mut(group * hd).enumerate().for_each_init(
                    Vec::new,
                    |scratch, (i, o)| {
                        let (r, g) = (i / nkv, i % nkv);
                        let qg = &q[r * nh * hd + g * group * hd..][..group * hd];
                        unsafe {
                            attention_group(qg, &layer[r], ctx, g, group, hd, scale, o, scratch)
                        };
                    },
                );
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let bytes = (seqs * reps * layers * ctx * width * 2 * dtype.bytes()) as f64;
    eprintln!(
        "attention, 16 sequences x {ctx} tokens x {layers} layers ({:.1} MB {} KV): best {:.2} ms ({:.1} GB/s), median {:.2} ms",
        bytes / 1e6,
        dtype.name(),
        times[0] * 1e3,
        bytes / times[0] / 1e9,
        times[7] * 1e3
    );
}

/// The AVX-512 P·V pass gives the AVX2 pass's bits (both dtypes, groups of 1 to 5 heads,
/// 64 and 128 dimensions, contexts from 1 to past a block).
#[test]
#[cfg(target_arch = "x86_64")]
fn avx512_pv_gives_the_avx2_bits() {
    if !(simd_available() && avx512_available()) {
        eprintln!("skipped: no AVX2/FMA/F16C or no AVX512F");
        return;
    }
    let mut rng = StdRng::seed_from_u64(4);
    for (hd, group) in [(64, 1), (64, 3), (64, 5), (128, 4)] {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Fp8] {
            let max_ctx = 37;
            let e = dtype.bytes();
            let (mut k, mut v) = (vec![0u8; max_ctx * hd * e], vec![0u8; max_ctx * hd * e]);
            let r = KvRef::Strided {
                k: k.as_mut_ptr(),
                v: v.as_mut_ptr(),
                dtype,
                token_stride: hd,
                head_stride: hd,
            };
            for t in 0..max_ctx {
                let (kt, vt) = (random(hd, &mut rng), random(hd, &mut rng));
                unsafe { kv_append(&r, t, &kt, &vt, 1, hd) };
            }
            let q: Vec<f32> = random(group * hd, &mut rng)
                .iter()
                .map(|x| x * 3.0)
                .collect();
            for ctx in [1, 5, 16, 37] {
                let run = |wide: bool| {
                    let mut out = vec![f32::NAN; group * hd];
                    let mut scratch = Vec::new();
                    let f = match dtype {
                        KvDtype::F32 => simd::attention_rows::<{ simd::F32 }>,
                        KvDtype::F16 => simd::attention_rows::<{ simd::F16 }>,
                        KvDtype::Fp8 => simd::attention_rows::<{ simd::FP8 }>,
                    };
                    let rows = QueryRows {
                        q: &q,
                        q_stride: 0,
                        count: 1,
                        first_context: ctx,
                        kv_head: 0,
                        group,
                        head_dim: hd,
                        scale: 0.125,
                        out: out.as_mut_ptr(),
                        out_stride: 0,
                    };
                    unsafe { f(&rows, &r, &mut scratch, wide) };
                    out
                };
                let (narrow, wide) = (run(false), run(true));
                assert!(
                    narrow
                        .iter()
                        .zip(&wide)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?} hd {hd} group {group} ctx {ctx}: AVX-512 P·V differs"
                );
            }
        }
    }
}

/// A block of consecutive query rows gives each row, bit for bit, what it gets alone
/// (every dtype, paged and strided, group sizes 1-5, blocks starting anywhere, contexts
/// across block and 8-token boundaries).
#[test]
fn query_rows_together_give_each_rows_result_alone() {
    let mut rng = StdRng::seed_from_u64(12);
    let (n_kv, bs) = (2, 16);
    for (hd, group) in [(64, 3), (64, 1), (32, 5), (8, 2)] {
        let width = n_kv * hd;
        let max_ctx = 70;
        let keys = random(max_ctx * width, &mut rng);
        let vals = random(max_ctx * width, &mut rng);
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Fp8] {
            let e = dtype.bytes();
            let nblocks = max_ctx.div_ceil(bs);
            let mut k = vec![0u8; (nblocks + 1) * bs * width * e];
            let mut v = vec![0u8; (nblocks + 1) * bs * width * e];
            let blocks: Vec<u32> = (0..nblocks as u32).rev().collect();
            for paged in [false, true] {
                let r = if paged {
                    KvRef::Paged {
                        k_pool: k.as_mut_ptr(),
                        v_pool: v.as_mut_ptr(),
                        dtype,
                        blocks: &blocks,
                        block_size: bs,
                        block_stride: bs * width,
                        token_stride: hd,
                        head_stride: bs * hd,
                    }
                } else {
                    KvRef::Strided {
                        k: k.as_mut_ptr(),
                        v: v.as_mut_ptr(),
                        dtype,
                        token_stride: width,
                        head_stride: hd,
                    }
                };
                for t in 0..max_ctx {
                    let row = t * width..(t + 1) * width;
                    unsafe { kv_append(&r, t, &keys[row.clone()], &vals[row], n_kv, hd) };
                }
                let q_stride = n_kv * group * hd + 3;
                for (first, count) in [(1, 1), (1, 9), (5, 17), (30, 8), (63, 8)] {
                    let q: Vec<f32> = random(count * q_stride, &mut rng)
                        .iter()
                        .map(|x| x * 3.0)
                        .collect();
                    for kv_head in 0..n_kv {
                        let at = kv_head * group * hd;
                        let mut together = vec![f32::NAN; count * q_stride];
                        let rows = QueryRows {
                            q: &q[at..],
                            q_stride,
                            count,
                            first_context: first,
                            kv_head,
                            group,
                            head_dim: hd,
                            scale: 0.125,
                            out: together[at..].as_mut_ptr(),
                            out_stride: q_stride,
                        };
                        unsafe { attention_rows(&rows, &r, &mut Vec::new()) };
                        for i in 0..count {
                            let mut alone = vec![f32::NAN; group * hd];
                            let qi = &q[i * q_stride + at..][..group * hd];
                            unsafe {
                                attention_group(
                                    qi,
                                    &r,
                                    first + i,
                                    kv_head,
                                    group,
                                    hd,
                                    0.125,
                                    &mut alone,
                                    &mut Vec::new(),
                                )
                            };
                            let got = &together[i * q_stride + at..][..group * hd];
                            assert!(
                                got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{dtype:?} paged={paged} hd {hd} group {group} rows {first}+{count} row {i}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn f16_append_rounds_to_nearest_even_like_half() {
    let mut rng = StdRng::seed_from_u64(3);
    let k = random(2 * 40, &mut rng);
    let mut pool = vec![0u8; 2 * 40 * 2];
    let mut vpool = vec![0u8; 2 * 40 * 2];
    let r = KvRef::Strided {
        k: pool.as_mut_ptr(),
        v: vpool.as_mut_ptr(),
        dtype: KvDtype::F16,
        token_stride: 80,
        head_stride: 40,
    };
    unsafe { kv_append(&r, 0, &k, &k, 2, 40) };
    for (i, x) in k.iter().enumerate() {
        let got = f16::from_le_bytes([pool[2 * i], pool[2 * i + 1]]);
        assert_eq!(got, f16::from_f32(*x), "element {i}");
    }
}
