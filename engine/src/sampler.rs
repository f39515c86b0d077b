//! Sampling the next token from logits: greedy, or temperature with top-k and top-p (nucleus)
//! filtering, from a seeded generator so a request with a seed is reproducible. The order of the
//! filters is vLLM's and HF's: temperature, then top-k, then top-p over what remains. Before them,
//! a request's [`LogitsAdjustments`] (penalties, `logit_bias`) and its grammar's mask
//! (structured outputs) change the logits.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::structured_output::Grammar;

/// How to pick tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// A sampling parameter outside the range OpenAI and vLLM accept; the message starts with the
/// field's name (the server's 400 takes its `param` from it).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// `temperature` outside [0, 2].
    #[error("temperature must be in [0, 2], found {found}")]
    Temperature { found: f32 },
    /// `top_p` outside (0, 1].
    #[error("top_p must be in (0, 1], found {found}")]
    TopP { found: f32 },
}

impl SamplingParams {
    /// Check the ranges OpenAI and vLLM accept; the error names the field.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(SamplingError::Temperature {
                found: self.temperature,
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP { found: self.top_p });
        }
        Ok(())
    }
}

/// What a request changes in the logits before sampling (OpenAI's penalties and `logit_bias`):
/// `logit_bias` adds its value to its token's logit; each token generated so far lowers its logit
/// by `presence_penalty` once and by `frequency_penalty` per time it was generated (OpenAI's
/// definition; over the generated tokens, as vLLM's). Log-probabilities stay those of the raw
/// logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitsAdjustments {
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
}

/// An adjustment outside the range OpenAI accepts; the message starts with the field's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdjustmentError {
    #[error("{field} must be in [-2, 2], found {found}")]
    Penalty { field: &'static str, found: f32 },
    #[error("logit_bias values must be in [-100, 100], found {found} for token {token}")]
    Bias { token: u32, found: f32 },
    #[error("logit_bias token id {token} is outside the vocabulary of {vocab_size} tokens")]
    BiasToken { token: u32, vocab_size: usize },
}

impl LogitsAdjustments {
    /// Whether anything changes the logits.
    pub fn is_none(&self) -> bool {
        self.presence_penalty == 0.0 && self.frequency_penalty == 0.0 && self.logit_bias.is_empty()
    }

    /// Check OpenAI's ranges and the token ids against a vocabulary of `vocab_size`.
    pub fn validate(&self, vocab_size: usize) -> Result<(), AdjustmentError> {
        for (field, found) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&found) {
                return Err(AdjustmentError::Penalty { field, found });
            }
        }
        for &(token, found) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(AdjustmentError::BiasToken { token, vocab_size });
            }
            if !(-100.0..=100.0).contains(&found) {
                return Err(AdjustmentError::Bias { token, found });
            }
        }
        Ok(())
    }
}

/// A sampler with its own random generator (one per request).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    adjust: LogitsAdjustments,
    /// With penalties: how many times each token was generated so far.
    counts: std::collections::HashMap<u32, u32>,
    /// Structured outputs: the grammar the tokens must follow.
    grammar: Option<Grammar>,
}

/// Index of the largest value (the first one on ties; 0 when the first value is NaN, which
/// nothing compares greater than; other NaNs are passed over).
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    // The maximum in 16 independent lanes (compare-and-select vectorizes; a running index does
    // not), then the first index holding it: two passes over a row of logits, ~4x faster than
    // one scalar pass whose compares wait on each other.
    let mut lanes = [first; 16];
    let chunks = logits.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(first, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Sampler {
            params,
            rng,
            adjust: LogitsAdjustments::default(),
            counts: Default::default(),
            grammar: None,
        }
    }

    /// A sampler that adjusts the logits first (see [`LogitsAdjustments`]).
    pub fn with_adjustments(params: SamplingParams, adjust: LogitsAdjustments) -> Self {
        Sampler {
            adjust,
            ..Sampler::new(params)
        }
    }

    /// This sampler, picking only tokens `grammar` allows and advancing it by each (see
    /// [`crate::structured_output`]).
    pub fn with_grammar(self, grammar: Option<Grammar>) -> Self {
        Sampler { grammar, ..self }
    }

    /// The grammar the tokens follow, if any.
    pub fn grammar(&self) -> Option<&Grammar> {
        self.grammar.as_ref()
    }

    /// The grammar, to compute its next mask ahead ([`Grammar::prepare`]).
    pub fn grammar_mut(&mut self) -> Option<&mut Grammar> {
        self.grammar.as_mut()
    }

    /// Whether [`Sampler::sample`] is the argmax of the raw logits (so a device may pick the
    /// token itself).
    pub fn is_greedy(&self) -> bool {
        (self.params.temperature == 0.0 || self.params.top_k == 1)
            && self.adjust.is_none()
            && self.grammar.is_none()
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.adjust.is_none() && self.grammar.is_none() {
            return self.pick(logits);
        }
        let mut adjusted = logits.to_vec();
        for &(token, bias) in &self.adjust.logit_bias {
            if let Some(l) = adjusted.get_mut(token as usize) {
                *l += bias;
            }
        }
        let (presence, frequency) = (self.adjust.presence_penalty, self.adjust.frequency_penalty);
        for (&token, &n) in &self.counts {
            if let Some(l) = adjusted.get_mut(token as usize) {
                *l -= presence + frequency * n as f32;
            }
        }
        if let Some(g) = &mut self.grammar {
            g.mask(&mut adjusted);
        }
        let token = self.pick(&adjusted);
        self.observe(token);
        token
    }

    /// Take `token` as if this sampler had picked it (a token sampled elsewhere: the first
    /// token of a disaggregated request, sampled by its prefill instance): penalties count it
    /// and the grammar advances by it.
    pub fn observe(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
        if let Some(g) = &mut self.grammar {
            g.accept(token);
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        // Ranked by the raw logits (temperature does not change the order); top-k keeps the k
        // largest, found by selection before the sort of what is left. Only the kept ones are
        // scaled, after subtracting the largest logit, so that a tiny temperature (1e-38 passes
        // the range check) gives -inf, not inf - inf = NaN, for everything but the top.
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let descending = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, descending);
            cands.truncate(p.top_k);
        }
        cands.sort_unstable_by(descending);
        let Some(&(_, top)) = cands.first() else {
            return 0;
        };
        for c in cands.iter_mut() {
            c.1 = (c.1 - top) / p.temperature;
        }
        let max = cands[0].1;
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0f64;
            let keep = cands
                .iter()
                .position(|c| {
                    acc += c.1 as f64 / total;
                    acc >= p.top_p as f64
                })
                .map_or(cands.len(), |i| i + 1);
            cands.truncate(keep);
            total = cands.iter().map(|c| c.1 as f64).sum();
        }
        if !(total.is_finite() && total > 0.0) {
            // Logits the model should never give (NaN, all -inf): the most likely token.
            return argmax(logits);
        }
        let mut r = self.rng.random_range(0.0..total);
        for &(id, w) in &cands {
            r -= w as f64;
            if r < 0.0 {
                return id;
            }
        }
        cands.last().map_or(0, |c| c.0)
    }
}

/// Most alternatives a request may ask for beside each sampled token (OpenAI's `top_logprobs`
/// bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A sampled token's log-probability under the model (log-softmax of its raw logits: before
/// temperature, top-k and top-p, as vLLM reports by default), and the `top` most likely tokens
/// with theirs, most likely first.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// `token`'s log-probability in `logits` and the `top` largest (ties: the lower id first).
    pub fn of(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
        // log p_i = l_i − (max + ln Σ exp(l_j − max)), summed in f64.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let log_z = max as f64 + sum.ln();
        let logprob = |l: f32| (l as f64 - log_z) as f32;
        let mut best: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let top = top.min(best.len());
        if top > 0 && top < best.len() {
            best.select_nth_unstable_by(top - 1, order);
        }
        best.truncate(top);
        best.sort_unstable_by(order);
        TokenLogprob {
            token,
            logprob: logits
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
            top: best.into_iter().map(|(i, l)| (i, logprob(l))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_and_penalties_move_the_greedy_choice_and_only_when_set() {
        let logits = [1.0f32, 3.0, 2.5, 0.0];
        let mut plain = Sampler::with_adjustments(SamplingParams::default(), Default::default());
        assert!(plain.is_greedy());
        assert_eq!(plain.sample(&logits), 1);
        // A bias of +5 on token 3 makes it the argmax; the device may no longer pick.
        let bias = LogitsAdjustments {
            logit_bias: vec![(3, 5.0)],
            ..Default::default()
        };
        let mut biased = Sampler::with_adjustments(SamplingParams::default(), bias);
        assert!(!biased.is_greedy());
        assert_eq!(biased.sample(&logits), 3);
        // A presence penalty of 1 makes token 1 (3.0 − 1) lose to token 2 after its first time.
        let penalty = LogitsAdjustments {
            presence_penalty: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::with_adjustments(SamplingParams::default(), penalty);
        assert_eq!(
            [s.sample(&logits), s.sample(&logits), s.sample(&logits)],
            [1, 2, 1]
        );
        // Frequency: each repetition costs more (token 1: 3, 2, 1; token 2: 2.5, 1.5).
        let frequency = LogitsAdjustments {
            frequency_penalty: 1.0,
            ..Default::default()
        };
        let mut s = Sampler::with_adjustments(SamplingParams::default(), frequency);
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
        assert!(LogitsAdjustments {
            presence_penalty: 2.5,
            ..Default::default()
        }
        .validate(4)
        .is_err());
        let out_of_vocab = LogitsAdjustments {
            logit_bias: vec![(4, 1.0)],
            ..Default::default()
        };
        assert!(out_of_vocab.validate(4).is_err());
        assert!(out_of_vocab.validate(5).is_ok());
    }

    #[test]
    fn logprobs_are_a_log_softmax_and_the_top_come_most_likely_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1e30];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = TokenLogprob::of(&logits, 2, 3);
        assert!((lp.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6, "{lp:?}");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((lp.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        let total: f64 = (0..5)
            .map(|t| (TokenLogprob::of(&logits, t, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(TokenLogprob::of(&logits, 9, 9).logprob.is_infinite());
        assert_eq!(TokenLogprob::of(&logits, 0, 9).top.len(), 5);
    }

    #[test]
    fn argmax_takes_the_first_largest_value() {
        fn scalar(logits: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            best as u32
        }
        let mut rng = StdRng::seed_from_u64(8);
        for n in [1usize, 5, 16, 17, 100, 49152] {
            for _ in 0..20 {
                // Few distinct values, so ties are common.
                let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(0..7) as f32).collect();
                if rng.random_range(0..4) == 0 {
                    let at = rng.random_range(0..n);
                    v[at] = f32::NAN;
                }
                assert_eq!(argmax(&v), scalar(&v), "{v:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_and_top_k_1_take_the_argmax() {
        let logits = [0.1, 2.0, -1.0, 2.0, 0.5];
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&logits), 1);
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(p).sample(&logits), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_follows_the_distribution() {
        let logits = [0f32, (3f32).ln(), f32::NEG_INFINITY]; // probabilities 1/4, 3/4, 0
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut s = Sampler::new(p);
        let ones = (0..4000).filter(|_| s.sample(&logits) == 1).count();
        assert!(
            (2850..3150).contains(&ones),
            "{ones} of 4000, expected ~3000"
        );
        assert!((0..1000).all(|_| s.sample(&logits) != 2));
    }

    #[test]
    fn a_tiny_temperature_or_broken_logits_give_the_argmax_not_a_panic() {
        // 1e-38 passes the range check; dividing logits by it overflowed to inf (inf - inf =
        // NaN) and the engine thread panicked on an empty range (schemathesis found it).
        let logits = [1.0f32, 5.0, -3.0, 4.99];
        for temperature in [1e-38, f32::MIN_POSITIVE, 1e-30] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                top_p: 0.5,
                seed: Some(3),
                ..Default::default()
            });
            assert!((0..100).all(|_| s.sample(&logits) == 1), "{temperature}");
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(4),
            ..Default::default()
        });
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4]), 0);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ≈ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two only.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            seed: Some(1),
            ..Default::default()
        });
        let seen: std::collections::HashSet<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: Some(2),
            ..Default::default()
        });
        assert!((0..2000).all(|_| s.sample(&logits) != 3));
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(SamplingError::Temperature { found }) if found == -1.0
        ));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("temperature"));
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().starts_with("top_p"));
    }
}
