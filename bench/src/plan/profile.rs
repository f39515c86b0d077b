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

/// One measured mixed step: prefill chunks of `lens` (from position 0) and `batch` decodes of
/// `context_sum` tokens of context in one forward pass, and its seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedSample {
    pub lens: Vec<usize>,
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
    /// Tokens per KV block (paged) or per page (vmm) of the measured cache: the unit KV is
    /// reserved in; 0 (older profiles): 16.
    #[serde(default)]
    pub kv_block_tokens: usize,
    /// The model's shape: what [`Profile::modelled`] scales by (`None` in older profiles).
    #[serde(default)]
    pub shape: Option<ModelShape>,
    /// `None`: measured. Otherwise how this profile was modelled from a measured one (see
    /// [`Profile::modelled`]), which a plan made with it must say.
    #[serde(default)]
    pub modelled: Option<String>,
    pub prefill_samples: Vec<PrefillSample>,
    pub decode_samples: Vec<DecodeSample>,
    /// Mixed steps measured: what [`Profile::mixed_saving`] is fitted to (see
    /// `simulate::step_seconds`).
    #[serde(default)]
    pub mixed_samples: Vec<MixedSample>,
    pub prefill: PrefillModel,
    pub decode: DecodeModel,
    /// Seconds a step that mixes prefill chunks with decodes saves against its two parts
    /// alone, fitted to the mixed samples ([`fit_mixed_saving`]; negative: mixing costs extra).
    /// `None` (no mixed samples): the decode model's constant, paid once.
    #[serde(default)]
    pub mixed_saving: Option<f64>,
}

impl Profile {
    /// The unit KV is reserved in, in tokens.
    pub fn kv_block_tokens(&self) -> usize {
        match self.kv_block_tokens {
            0 => 16,
            n => n,
        }
    }
}

/// A Llama-family model's shape, as far as step latencies and memory scale with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub parameters: usize,
}

impl ModelShape {
    pub fn of(config: &vkv_engine::model::LlamaConfig) -> ModelShape {
        ModelShape {
            layers: config.num_layers,
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
            parameters: config.num_parameters(),
        }
    }

    /// Parameters of the layers' projections (attention and MLP): a token's linear work, which
    /// prefill's per-token and decode's per-sequence terms scale with.
    fn projection_parameters(&self) -> f64 {
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        (self.layers * (h * q + 2 * h * kv + q * h + 3 * h * self.intermediate)) as f64
    }

    /// bf16 weights, the whole model.
    fn weight_bytes(&self) -> f64 {
        2.0 * self.parameters as f64
    }

    /// KV heads one of `tp` ranks holds (heads are replicated when there are fewer than ranks).
    fn kv_heads_per_rank(&self, tp: usize) -> usize {
        self.kv_heads.div_ceil(tp.max(1))
    }
}

/// What a modelled profile assumes besides the measured one (see [`Profile::modelled`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scaling {
    /// Tensor-parallel degree of the modelled instance.
    pub tensor_parallel: usize,
    /// All-reduce bus bandwidth (bytes/s) and the fixed time of one all-reduce (seconds).
    pub allreduce_bandwidth: f64,
    pub allreduce_latency: f64,
    /// Device memory bandwidth (bytes/s): the part of the measured decode constant that is the
    /// pass over the weights is `weights / bandwidth`.
    pub memory_bandwidth: f64,
}

/// Why a profile cannot be modelled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelledError {
    #[error("the measured profile has no model shape (it predates them): measure it again with this version of vkv profile")]
    NoShape,
    #[error("{model} at tensor parallel {tp} needs {needed_gib:.1} GiB of weights per GPU, more than the {usable_gib:.1} GiB a GPU of the measured profile offers")]
    DoesNotFit {
        model: String,
        tp: usize,
        needed_gib: f64,
        usable_gib: f64,
    },
    #[error("tensor parallel must be at least 1 and the bandwidths positive")]
    BadScaling,
}

impl Profile {
    /// A profile of `model` (`shape`) at `scaling.tensor_parallel` GPUs per instance, modelled
    /// from this measured one on the same card:
    ///
    /// - prefill: the constant scales with the layers; the per-token term with the projection
    ///   parameters per GPU; the quadratic (attention) term with layers × query heads × head
    ///   dim per GPU;
    /// - decode: the constant is the pass over the weights (`weights / memory bandwidth`, at
    ///   most the measured constant) plus the rest, which scales with the layers; the context
    ///   term scales with the KV bytes per token per GPU; the per-sequence term with the
    ///   projection parameters per GPU;
    /// - tensor parallelism adds two all-reduces per layer (Megatron) of `hidden` bf16 values
    ///   per token: `2(tp − 1)/tp` of those bytes over the bus bandwidth, and their fixed time
    ///   to the constants;
    /// - KV capacity: the memory a GPU of the measured profile gave weights and KV together,
    ///   times `tp`, less the weights, over the KV bytes per token (KV heads split over the
    ///   ranks, replicated when fewer than the ranks).
    ///
    /// The result carries no samples (so it is not fitted again) and says what it assumed in
    /// [`Profile::modelled`].
    pub fn modelled(
        &self,
        model: &str,
        shape: &ModelShape,
        scaling: Scaling,
    ) -> Result<Profile, ModelledError> {
        let src = self.shape.as_ref().ok_or(ModelledError::NoShape)?;
        let tp = scaling.tensor_parallel;
        if tp == 0 || !(scaling.allreduce_bandwidth > 0.0 && scaling.memory_bandwidth > 0.0) {
            return Err(ModelledError::BadScaling);
        }
        let tp_src = self.tensor_parallel.max(1);
        let layers = shape.layers as f64 / src.layers as f64;
        let projections = (shape.projection_parameters() / tp as f64)
            / (src.projection_parameters() / tp_src as f64);
        let attention = (shape.layers * shape.heads * shape.head_dim) as f64
            / tp as f64
            / ((src.layers * src.heads * src.head_dim) as f64 / tp_src as f64);
        let kv_read = (shape.layers * shape.kv_heads_per_rank(tp) * shape.head_dim) as f64
            / (src.layers * src.kv_heads_per_rank(tp_src) * src.head_dim) as f64;
        // Two all-reduces per layer of `hidden` bf16 values per token (ring: 2(tp − 1)/tp of
        // the bytes cross each GPU's link).
        let (allreduce_per_token, allreduce_fixed) = if tp > 1 {
            let bytes = 2.0 * shape.layers as f64 * shape.hidden as f64 * 2.0;
            (
                bytes * 2.0 * (tp - 1) as f64 / tp as f64 / scaling.allreduce_bandwidth,
                2.0 * shape.layers as f64 * scaling.allreduce_latency,
            )
        } else {
            (0.0, 0.0)
        };
        let prefill = PrefillModel {
            a: self.prefill.a * layers + allreduce_fixed,
            b: self.prefill.b * projections + allreduce_per_token,
            c: self.prefill.c * attention,
        };
        let weights_pass =
            |s: &ModelShape, tp: usize| s.weight_bytes() / tp as f64 / scaling.memory_bandwidth;
        let src_weights = weights_pass(src, tp_src).min(self.decode.a.max(0.0));
        let decode = DecodeModel {
            a: weights_pass(shape, tp)
                + (self.decode.a - src_weights).max(0.0) * layers
                + allreduce_fixed,
            b: self.decode.b * kv_read,
            c: self.decode.c * projections + allreduce_per_token,
        };
        // Per GPU: the KV bytes of a token on one rank, and the memory the measured GPU gave
        // weights and KV together.
        let elem =
            self.kv_bytes_per_token as f64 / (2 * src.layers * src.kv_heads * src.head_dim) as f64;
        let rank_kv = |s: &ModelShape, tp: usize| {
            (2 * s.layers * s.kv_heads_per_rank(tp) * s.head_dim) as f64 * elem
        };
        let usable = self.kv_capacity_tokens as f64 * rank_kv(src, tp_src)
            + src.weight_bytes() / tp_src as f64;
        let free = usable - shape.weight_bytes() / tp as f64;
        let capacity = (free / rank_kv(shape, tp)).floor();
        if capacity < 1.0 {
            return Err(ModelledError::DoesNotFit {
                model: model.to_string(),
                tp,
                needed_gib: shape.weight_bytes() / tp as f64 / (1u64 << 30) as f64,
                usable_gib: usable / (1u64 << 30) as f64,
            });
        }
        Ok(Profile {
            device: self.device.clone(),
            model: model.to_string(),
            date: self.date.clone(),
            tensor_parallel: tp,
            kv_bytes_per_token: ((2 * shape.layers * shape.kv_heads * shape.head_dim) as f64 * elem)
                .round() as usize,
            kv_capacity_tokens: capacity as usize,
            max_model_len: self.max_model_len,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            kv_block_tokens: self.kv_block_tokens,
            shape: Some(shape.clone()),
            modelled: Some(format!(
                "modelled from the measured profile of {} on {} ({}): {} at tensor parallel {tp}, \
                 all-reduce {:.0} GB/s + {:.0} µs, memory {:.2} TB/s",
                self.model,
                self.device,
                self.date,
                model,
                scaling.allreduce_bandwidth / 1e9,
                scaling.allreduce_latency * 1e6,
                scaling.memory_bandwidth / 1e12
            )),
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
            mixed_samples: Vec::new(),
            // What mixing saved or cost scales as the constant it comes from.
            mixed_saving: self
                .mixed_saving
                .map(|m| m * decode.a / self.decode.a.max(f64::MIN_POSITIVE)),
            prefill,
            decode,
        })
    }
}

/// The seconds a mixed step saves against its prefill and decode parts alone, as the models
/// predict them: the mean over `samples` of the parts' sum less the measured step (`None`
/// without samples). One constant, because the part a mixed step shares is a constant too (a
/// pass over the weights, the step's launches) — or, where it is negative, what mixing adds.
pub fn fit_mixed_saving(
    prefill: &PrefillModel,
    decode: &DecodeModel,
    samples: &[MixedSample],
) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let total: f64 = samples
        .iter()
        .map(|m| {
            prefill.seconds(m.lens.iter().map(|&l| (0, l))) + decode.seconds(m.batch, m.context_sum)
                - m.seconds
        })
        .sum();
    Some(total / samples.len() as f64)
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
    fn the_mixed_saving_is_what_the_parts_cost_beyond_the_measured_steps() {
        let p = llama8b();
        assert_eq!(fit_mixed_saving(&p.prefill, &p.decode, &[]), None);
        // Steps that cost their parts less 2 ms, and more 1 ms: a saving of 2 and of -1 ms.
        for extra in [-2e-3, 1e-3] {
            let samples: Vec<MixedSample> = [256, 1024, 1920]
                .iter()
                .map(|&chunk| MixedSample {
                    lens: vec![chunk],
                    batch: 32,
                    context_sum: 32 * 1024,
                    seconds: p.prefill.seconds([(0, chunk)])
                        + p.decode.seconds(32, 32 * 1024)
                        + extra,
                })
                .collect();
            let saving = fit_mixed_saving(&p.prefill, &p.decode, &samples).unwrap();
            assert!((saving + extra).abs() < 1e-12, "{saving}");
            // The simulation's step then costs what was measured.
            let fitted = Profile {
                mixed_saving: Some(saving),
                ..p.clone()
            };
            for m in &samples {
                let step = crate::plan::simulate::step_seconds(
                    &fitted,
                    &[(0, m.lens[0])],
                    m.batch,
                    m.context_sum,
                );
                assert!((step - m.seconds).abs() < 1e-12);
            }
        }
    }

    /// An H100-like measured profile of llama-3-8b: 400k tokens of KV beside the weights.
    fn llama8b() -> Profile {
        let shape = ModelShape::of(&vkv_engine::model::LlamaConfig::preset("llama-3-8b").unwrap());
        Profile {
            device: "cuda (H100)".into(),
            model: "llama-3-8b".into(),
            date: "2026-12-07".into(),
            tensor_parallel: 1,
            kv_bytes_per_token: 131_072,
            kv_capacity_tokens: 400_000,
            max_model_len: 8192,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            kv_block_tokens: 16,
            shape: Some(shape),
            modelled: None,
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
            mixed_samples: Vec::new(),
            mixed_saving: None,
            prefill: PrefillModel {
                a: 3e-3,
                b: 2e-5,
                c: 5e-10,
            },
            decode: DecodeModel {
                a: 7.5e-3,
                b: 4.5e-8,
                c: 3e-5,
            },
        }
    }

    fn scaling(tp: usize) -> Scaling {
        Scaling {
            tensor_parallel: tp,
            allreduce_bandwidth: 300e9,
            allreduce_latency: 10e-6,
            memory_bandwidth: 2.95e12,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
    }

    #[test]
    fn the_same_model_at_one_gpu_models_the_measured_profile() {
        let p = llama8b();
        let same = p
            .modelled("llama-3-8b", p.shape.as_ref().unwrap(), scaling(1))
            .unwrap();
        for (got, want) in [
            (same.prefill.a, p.prefill.a),
            (same.prefill.b, p.prefill.b),
            (same.prefill.c, p.prefill.c),
            (same.decode.a, p.decode.a),
            (same.decode.b, p.decode.b),
            (same.decode.c, p.decode.c),
        ] {
            assert!(close(got, want), "{same:?}");
        }
        assert!(same.kv_capacity_tokens.abs_diff(p.kv_capacity_tokens) <= 1);
        assert_eq!(same.kv_bytes_per_token, p.kv_bytes_per_token);
        assert!(same.modelled.is_some() && same.prefill_samples.is_empty());
    }

    #[test]
    fn tensor_parallelism_splits_the_work_adds_all_reduces_and_frees_memory_for_kv() {
        let p = llama8b();
        let shape = p.shape.clone().unwrap();
        let tp2 = p.modelled("llama-3-8b", &shape, scaling(2)).unwrap();
        // Per token: half the projections, plus 2 all-reduces per layer of 4096 bf16 values,
        // half of which cross the link.
        let allreduce = 2.0 * 32.0 * 4096.0 * 2.0 * 1.0 / 300e9;
        assert!(
            close(tp2.prefill.b, p.prefill.b / 2.0 + allreduce),
            "{tp2:?}"
        );
        assert!(close(tp2.prefill.c, p.prefill.c / 2.0));
        assert!(close(tp2.prefill.a, p.prefill.a + 64.0 * 10e-6));
        // Decode: half the weights to read, half the KV heads per GPU.
        let weights = 2.0 * shape.parameters as f64 / 2.95e12;
        assert!(close(
            tp2.decode.a,
            weights / 2.0 + (p.decode.a - weights) + 64.0 * 10e-6
        ));
        assert!(close(tp2.decode.b, p.decode.b / 2.0));
        // Each GPU gives up half the weights' memory to KV: more than twice the tokens.
        assert!(tp2.kv_capacity_tokens > 2 * p.kv_capacity_tokens, "{tp2:?}");
        assert_eq!(tp2.tensor_parallel, 2);
    }

    #[test]
    fn llama_70b_needs_several_gpus_and_is_slower_per_token() {
        let p = llama8b();
        let shape = ModelShape::of(&vkv_engine::model::LlamaConfig::preset("llama-3-70b").unwrap());
        let one = p.modelled("llama-3-70b", &shape, scaling(1)).unwrap_err();
        assert!(
            matches!(one, ModelledError::DoesNotFit { tp: 1, .. }),
            "{one}"
        );
        assert!(one.to_string().contains("llama-3-70b"), "{one}");
        let tp4 = p.modelled("llama-3-70b", &shape, scaling(4)).unwrap();
        assert!(
            tp4.kv_capacity_tokens > 0 && tp4.decode.a > p.decode.a,
            "{tp4:?}"
        );
        assert!(tp4.prefill.b > p.prefill.b, "{tp4:?}");
        assert_eq!(tp4.kv_bytes_per_token, 2 * 80 * 8 * 128 * 2);
        let no_shape = Profile {
            shape: None,
            ..p.clone()
        };
        assert_eq!(
            no_shape.modelled("llama-3-70b", &shape, scaling(4)),
            Err(ModelledError::NoShape)
        );
    }

    /// The profiles docs/plan.md plans with are profiles this version reads and can model from.
    #[test]
    fn the_profiles_of_docs_plan_still_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/plan");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with("-h100.json") && !name.contains("-h100-tp") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let p: Profile = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(p.shape.is_some() && p.kv_capacity_tokens > 0, "{name}");
            seen += 1;
        }
        assert!(seen >= 1, "no profiles in {}", dir.display());
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
