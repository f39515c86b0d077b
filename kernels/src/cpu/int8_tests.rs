//! Test module `tests` of `int8.rs` (a child module: `super` is `int8`).

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

/// Shapes `(m, k, n)` covering every tile height (rows not a multiple of 8 or 2), a last
/// panel of 1..15 columns, the model's `k` (576, 1536) and one block.
const SHAPES: [(usize, usize, usize); 10] = [
    (1, 32, 3),
    (1, 576, 70),
    (2, 64, 40),
    (3, 96, 33),
    (5, 224, 17),
    (16, 576, 35),
    (23, 576, 64),
    (7, 1536, 9),
    (40, 256, 33),
    (9, 1536, 50),
];

/// Every quant and scale of every row lands where the kernels read it, and the padding of a
/// last panel is zero.
#[test]
fn the_layout_keeps_every_weight_once() {
    let mut rng = StdRng::seed_from_u64(20);
    for q4 in [true, false] {
        for (n, k) in [(1, 32), (16, 64), (33, 96), (40, 576)] {
            let w = random_weight(&mut rng, n, k, q4);
            let p = packed(&w, k);
            assert_eq!(p.panels(), n.div_ceil(PANEL));
            let mut dense = vec![0f32; k];
            for j in 0..p.panels() * PANEL {
                if j < n {
                    w.row(j, k, &mut dense);
                }
                for b in 0..k / BLOCK {
                    let rec = p.record(j / PANEL, b);
                    let (d, m) = Packed::scales(q4, rec, j % PANEL);
                    for s in 0..STEPS {
                        for t in 0..STEP {
                            let q = Packed::quant(q4, rec, j % PANEL, s, t);
                            let want = if j >= n {
                                0.0
                            } else {
                                dense[b * BLOCK + STEP * s + t]
                            };
                            let got = if q4 {
                                d * q as f32 + m
                            } else {
                                d * (q as i32 - 128) as f32
                            };
                            assert_eq!(got, want, "q4={q4} n={n} k={k} row {j} block {b}");
                        }
                    }
                }
            }
        }
    }
}

/// `Σ a_i b_i` and `Σ |a_i b_i|` in f64: a reference dot product and its magnitude.
fn dot_f64(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (x, y)| {
        let p = *x as f64 * *y as f64;
        (s + p, m + p.abs())
    })
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
                    let (want, mag) = dot_f64(wr, xr);
                    let bound: f64 = wr
                        .iter()
                        .enumerate()
                        .map(|(i, a)| a.abs() as f64 * dx[i / BLOCK] as f64 / 2.0)
                        .sum::<f64>()
                        + 1e-5 * (1.0 + mag);
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
                    let (want, mag) = dot_f64(&dense, &xr);
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

/// A row's result does not depend on the rows beside it, on any instruction set: at every
/// position of a tile, in a tail tile, with full and partial last panels.
#[test]
fn a_rows_result_does_not_depend_on_the_batch() {
    let mut rng = StdRng::seed_from_u64(23);
    for (k, n) in [(576, 40), (1536, 35), (576, 96)] {
        for q4 in [true, false] {
            let w = packed(&random_weight(&mut rng, n, k, q4), k);
            let row: Vec<f32> = (0..k).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let mut reference = vec![0f32; n];
            matmul_with(Isa::Portable, &row, 1, k, &w, n, &mut reference);
            for isa in isas() {
                let mut alone = vec![0f32; n];
                matmul_with(isa, &row, 1, k, &w, n, &mut alone);
                assert_eq!(alone, reference, "{isa:?} k={k} n={n} q4={q4}");
                for (m, at) in [
                    (2, 1),
                    (5, 4),
                    (16, 7),
                    (17, 16),
                    (37, 20),
                    (7, 6),
                    (130, 129),
                    (130, 66),
                ] {
                    let mut x: Vec<f32> =
                        (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    x[at * k..(at + 1) * k].copy_from_slice(&row);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, m, k, &w, n, &mut out);
                    assert_eq!(
                        &out[at * n..(at + 1) * n],
                        &alone[..],
                        "{isa:?} k={k} n={n} q4={q4} m={m}"
                    );
                }
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

/// Every instruction set quantizes activations to the same bytes and scales: random rows,
/// a zero block, and ties (`x / d_x` exactly halfway: to even).
#[test]
fn every_instruction_set_quantizes_the_same() {
    let mut rng = StdRng::seed_from_u64(26);
    let k = 1536;
    let mut x: Vec<f32> = (0..5 * k).map(|_| rng.random_range(-3.0f32..3.0)).collect();
    x[..BLOCK].fill(0.0);
    // Block 1: d_x = 1, so these are their own x / d_x.
    for (i, v) in x[BLOCK..2 * BLOCK].iter_mut().enumerate() {
        *v = if i == 0 { 127.0 } else { i as f32 - 15.5 };
    }
    let want = quantize_rows(Isa::Portable, &x, 5, k);
    assert_eq!(&want.qs[BLOCK..BLOCK + 4], &[127, -14, -14, -12]);
    for isa in isas() {
        let got = quantize_rows(isa, &x, 5, k);
        assert_eq!(got.qs, want.qs, "{isa:?}");
        assert_eq!(got.d, want.d, "{isa:?}");
        assert_eq!(got.s, want.s, "{isa:?}");
        assert_eq!(got.start, want.start, "{isa:?}");
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
