//! Step-latency profiles: what `vkv profile` measures (prefill steps over prompt lengths and
//! batch sizes, decode steps over batch sizes and contexts) and the latency models fitted to the
//! measurements by least squares (DistServe's forms; see the `plan` module). A profile is JSON,
//! with the device, the model, the date and the tensor-parallel degree it was measured at, so a
//! profile from another card can be planned with.

use serde::{Deserialize, Serialize};

/// One measured prefill step: the prompt (or chunk) lengths it computed, and its seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillSample {
    pub lens: Vec<usize>,
    pub seconds: f64,
}

/// One measured decode step: its sequences, their summed context, and its seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeSample {
    pub batch: usize,
    pub context_sum: usize,
    pub seconds: f64,
}

/// `a + b·Σl + c·Σl²` seconds for a prefill step of lengths `l`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillModel {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl PrefillModel {
    /// A step computing chunks `(start, tokens)`: a chunk of `k` tokens after `s` computed ones
    /// attends over `k·(2s + k)` query-key pairs, twice its causal share, so the chunks of one
    /// prompt add up to its `l²`.
    pub fn seconds(&self, chunks: impl IntoIterator<Item = (usize, usize)>) -> f64 {
        let (mut tokens, mut pairs, mut any) = (0.0, 0.0, false);
        for (start, k) in chunks {
            tokens += k as f64;
            pairs += (k * (2 * start + k)) as f64;
            any = true;
        }
        if !any {
            return 0.0;
        }
        (self.a + self.b * tokens + self.c * pairs).max(0.0)
    }
}

/// `a + b·Σcontext + c·batch` seconds for a decode step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodeModel {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl DecodeModel {
    pub fn seconds(&self, batch: usize, context_sum: usize) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        (self.a + self.b * context_sum as f64 + self.c * batch as f64).max(0.0)
    }
}

/// A device's measured step latencies and the models fitted to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The device (`cuda (NVIDIA H100 80GB HBM3)`, `cpu`).
    pub device: String,
    pub model: String,
    /// UTC date of the measurement.
    pub date: String,
    /// GPUs one instance of this profile takes.
    pub tensor_parallel: usize,
    /// KV bytes of one token (the handoff moves a prompt's worth).
    pub kv_bytes_per_token: usize,
    /// Tokens the instance's KV memory holds.
    pub kv_capacity_tokens: usize,
    /// The context length of the engine measured (requests are clamped to it as `vkv bench
    /// offline` clamps them); 0: unknown.
    #[serde(default)]
    pub max_model_len: usize,
    /// The engine's step token budget and sequence limit when measured.
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub prefill_samples: Vec<PrefillSample>,
    pub decode_samples: Vec<DecodeSample>,
    pub prefill: PrefillModel,
    pub decode: DecodeModel,
}

/// Why a profile cannot be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("fitting the {what} model needs at least 3 samples that differ, found {found}")]
    TooFew { what: &'static str, found: usize },
}

/// Least squares of `y ≈ x·β` for three regressors, in relative error (each row weighted by
/// `1 / y`: profiles span milliseconds to seconds, and plain least squares would fit the long
/// steps and miss the short ones by multiples); normal equations, Gaussian elimination with
/// partial pivoting; `None` if the regressors are collinear.
fn least_squares3(rows: &[([f64; 3], f64)]) -> Option<[f64; 3]> {
    let rows: Vec<([f64; 3], f64)> = rows
        .iter()
        .filter(|(_, y)| *y > 0.0)
        .map(|(x, y)| ([x[0] / y, x[1] / y, x[2] / y], 1.0))
        .collect();
    // Scale each column to unit size first: Σl² and Σl differ by orders of magnitude.
    let mut scale = [0f64; 3];
    for (x, _) in &rows {
        for j in 0..3 {
            scale[j] = scale[j].max(x[j].abs());
        }
    }
    if scale.contains(&0.0) {
        return None;
    }
    let mut m = [[0f64; 4]; 3];
    for (x, y) in &rows {
        let x = [x[0] / scale[0], x[1] / scale[1], x[2] / scale[2]];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] += x[i] * x[j];
            }
            m[i][3] += x[i] * y;
        }
    }
    for col in 0..3 {
        let pivot = (col..3).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() < 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col];
        for (row, r) in m.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Some([
        m[0][3] / m[0][0] / scale[0],
        m[1][3] / m[1][1] / scale[1],
        m[2][3] / m[2][2] / scale[2],
    ])
}

/// Fit the prefill model to its samples.
pub fn fit_prefill(samples: &[PrefillSample]) -> Result<PrefillModel, FitError> {
    let rows: Vec<([f64; 3], f64)> = samples
        .iter()
        .map(|s| {
            let sum: usize = s.lens.iter().sum();
            let squares: usize = s.lens.iter().map(|l| l * l).sum();
            ([1.0, sum as f64, squares as f64], s.seconds)
        })
        .collect();
    let [a, b, c] = least_squares3(&rows).ok_or(FitError::TooFew {
        what: "prefill",
        found: samples.len(),
    })?;
    Ok(PrefillModel { a, b, c })
}

/// Fit the decode model to its samples.
pub fn fit_decode(samples: &[DecodeSample]) -> Result<DecodeModel, FitError> {
    let rows: Vec<([f64; 3], f64)> = samples
        .iter()
        .map(|s| ([1.0, s.context_sum as f64, s.batch as f64], s.seconds))
        .collect();
    let [a, b, c] = least_squares3(&rows).ok_or(FitError::TooFew {
        what: "decode",
        found: samples.len(),
    })?;
    Ok(DecodeModel { a, b, c })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_recover_the_models_that_made_the_samples() {
        let prefill = PrefillModel {
            a: 2e-3,
            b: 5e-5,
            c: 3e-9,
        };
        let samples: Vec<PrefillSample> = [(1, 128), (1, 1024), (4, 512), (2, 4096), (8, 256)]
            .iter()
            .map(|&(n, l)| PrefillSample {
                lens: vec![l; n],
                seconds: prefill.seconds((0..n).map(|_| (0, l))),
            })
            .collect();
        let fitted = fit_prefill(&samples).unwrap();
        for (got, want) in [
            (fitted.a, prefill.a),
            (fitted.b, prefill.b),
            (fitted.c, prefill.c),
        ] {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-12) + 1e-15,
                "{fitted:?}"
            );
        }
        let decode = DecodeModel {
            a: 8e-3,
            b: 2e-8,
            c: 1e-5,
        };
        let samples: Vec<DecodeSample> = [(1, 512), (8, 512), (32, 2048), (64, 1024), (16, 4096)]
            .iter()
            .map(|&(b, c)| DecodeSample {
                batch: b,
                context_sum: b * c,
                seconds: decode.seconds(b, b * c),
            })
            .collect();
        let fitted = fit_decode(&samples).unwrap();
        assert!((fitted.a - decode.a).abs() < 1e-9, "{fitted:?}");
        assert!((fitted.b - decode.b).abs() < 1e-13, "{fitted:?}");
        assert!((fitted.c - decode.c).abs() < 1e-10, "{fitted:?}");
    }

    #[test]
    fn chunks_of_a_prompt_cost_its_quadratic_term_once() {
        let m = PrefillModel {
            a: 0.0,
            b: 0.0,
            c: 1.0,
        };
        let whole = m.seconds([(0, 1000)]);
        let chunked: f64 = [(0, 250), (250, 250), (500, 500)]
            .iter()
            .map(|&c| m.seconds([c]))
            .sum();
        assert_eq!(whole, 1e6);
        assert_eq!(chunked, whole);
    }

    #[test]
    fn too_few_or_collinear_samples_are_refused() {
        let same = PrefillSample {
            lens: vec![100],
            seconds: 1.0,
        };
        assert!(matches!(
            fit_prefill(&[same.clone(), same.clone(), same]),
            Err(FitError::TooFew { .. })
        ));
    }
}
