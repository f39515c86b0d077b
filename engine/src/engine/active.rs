//! A request while the engine thread serves it ([`Active`]): its sampler, the stop conditions
//! the engine checks on token ids (end-of-sequence, stop token ids; stop strings are the
//! detokenizer's, see [`super::detokenize`]), its counts and timestamps, and its span.
//! Invariant: `generated` is the number of tokens sent to the detokenizer, `token_times` holds
//! one entry per token, and `Finished` reports exactly these.

use std::time::Instant;

use super::{Finished, StopConditions, Timings, Usage};
use crate::engine::FinishReason;
use crate::sampler::Sampler;

/// A request inside the loop.
pub(super) struct Active {
    pub(super) sampler: Sampler,
    /// End-of-sequence handling and stop token ids (its stop strings went to the detokenizer).
    pub(super) stop: StopConditions,
    pub(super) prompt_len: usize,
    pub(super) generated: usize,
    pub(super) arrival: Instant,
    pub(super) first_scheduled: Option<Instant>,
    pub(super) token_times: Vec<f64>,
    pub(super) preemptions: u32,
    /// The request's span (see [`super::Engine::submit`]).
    pub(super) span: tracing::Span,
}

impl Active {
    pub(super) fn finished(&self, reason: FinishReason) -> Finished {
        let token_times = self.token_times.clone();
        Finished {
            reason,
            usage: Usage {
                prompt_tokens: self.prompt_len,
                completion_tokens: self.generated,
            },
            timings: Timings {
                queue: self
                    .first_scheduled
                    .map_or(0.0, |t| (t - self.arrival).as_secs_f64()),
                ttft: token_times.first().copied().unwrap_or(0.0),
                e2e: self.arrival.elapsed().as_secs_f64(),
                token_times,
            },
            preemptions: self.preemptions,
        }
    }
}
