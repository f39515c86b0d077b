//! Test module `timings` of `int8.rs` (a child module: `super` is `int8`).

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::super::quant::tests::random_weight;
use super::super::{matmul_w_int8, Weight};

/// The products of a decode step as each half of a batch runs them: `VKV_INT8_DECODE_ROWS`
/// rows (default 8) through 30 SmolLM2-135M-shaped layers of Q4_1 weights, on one thread,
/// so the weights come from memory as in the engine (66 MB); with `VKV_INT8_DECODE_HEAD`
/// set, its Q8_0 output head (30 MB) instead. Prints the best and median of 21 steps.
#[test]
#[ignore]
fn int8_decode_step_timings() {
    let m: usize = crate::switches::knob("VKV_INT8_DECODE_ROWS", 8);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(6);
    let head = crate::switches::knob_text("VKV_INT8_DECODE_HEAD").is_some();
    let shapes: &[(usize, usize)] = if head {
        &[(576, 49152)]
    } else {
        &[(576, 960), (576, 576), (576, 3072), (1536, 576)]
    };
    let layers: Vec<Vec<(Weight, usize, usize)>> = (0..if head { 1 } else { 30 })
        .map(|_| {
            shapes
                .iter()
                .map(|&(k, n)| {
                    let w = random_weight(&mut rng, n, k, !head);
                    w.pack_int8(k);
                    (w, k, n)
                })
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..m * 1536)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let mut out = vec![0f32; m * 49152];
    let macs: usize = layers.len() * m * shapes.iter().map(|(k, n)| k * n).sum::<usize>();
    let mut times: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            one.install(|| {
                for layer in &layers {
                    for (w, k, n) in layer {
                        matmul_w_int8(&x, m, *k, w, *n, &mut out);
                    }
                }
            });
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "decode-step products, {m} rows x {} layers, one thread: best {:.2} ms ({:.1} GMAC/s), median {:.2} ms ({:.1} GMAC/s)",
        layers.len(),
        times[0] * 1e3,
        macs as f64 / times[0] / 1e9,
        times[10] * 1e3,
        macs as f64 / times[10] / 1e9
    );
}

#[test]
#[ignore]
fn int8_timings() {
    let ms: Vec<usize> = crate::switches::knob_text("VKV_INT8_TIMINGS")
        .unwrap_or_else(|| "1,16,128,512,2048".into())
        .split(',')
        .map(|s| s.parse().expect("row counts"))
        .collect();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let all = rayon::ThreadPoolBuilder::new().build().unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for (q4, k, n) in [
        (true, 576, 960),
        (true, 576, 3072),
        (true, 1536, 576),
        (false, 576, 49152),
    ] {
        let w = random_weight(&mut rng, n, k, q4);
        w.pack_int8(k);
        for &m in &ms {
            if !q4 && m > 16 {
                continue;
            }
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut out = vec![0f32; m * n];
            let reps = (2e9 / (m * n * k) as f64).clamp(3.0, 200.0) as usize;
            let mut best = |pool: &rayon::ThreadPool| {
                (0..reps)
                    .map(|_| {
                        let t = Instant::now();
                        pool.install(|| matmul_w_int8(&x, m, k, &w, n, &mut out));
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min)
            };
            let (s1, sn) = (best(&one), best(&all));
            let macs = (m * n * k) as f64;
            let bytes = w.len() as f64 * if q4 { 0.625 } else { 1.0625 };
            eprintln!(
                "q4={q4} k={k} n={n} m={m}: 1 thread {:.3} ms {:.1} GMAC/s {:.1} GB/s; {} threads {:.3} ms {:.1} GMAC/s {:.1} GB/s",
                s1 * 1e3,
                macs / s1 / 1e9,
                bytes / s1 / 1e9,
                all.current_num_threads(),
                sn * 1e3,
                macs / sn / 1e9,
                bytes / sn / 1e9,
            );
        }
    }
}
