//! A request while the engine thread serves it ([`Active`]): its sampler, its streaming
//! detokenizer, its stop strings and the output text held back because it could still become the
//! start of one (vLLM's detokenizer holds text back the same way), and its timestamps. Invariants:
//! the text sent is a prefix of the text kept; the text kept never contains a stop string; bytes are
//! sent only at UTF-8 boundaries.

use std::time::Instant;

use super::{EventSender, Finished, StopConditions, Timings, Usage};
use crate::engine::FinishReason;
use crate::sampler::Sampler;
use crate::tokenizer::StreamDecoder;

/// A request inside the loop.
pub(super) struct Active<'m> {
    pub(super) events: EventSender,
    pub(super) sampler: Sampler,
    /// `None` once flushed at the end.
    pub(super) stream: Option<StreamDecoder<'m>>,
    pub(super) stop: StopConditions,
    /// Bytes of the longest stop string minus one: output text that must wait for more.
    pub(super) hold: usize,
    pub(super) prompt_len: usize,
    pub(super) generated: usize,
    /// The output text so far (cut at a stop string once found).
    pub(super) text: String,
    /// Bytes of `text` already sent.
    pub(super) sent: usize,
    /// Token ids not sent yet (the last one, when it ends the request).
    pub(super) unsent_ids: Vec<u32>,
    pub(super) arrival: Instant,
    pub(super) first_scheduled: Option<Instant>,
    pub(super) token_times: Vec<f64>,
    pub(super) preemptions: u32,
    /// The request's span (see [`super::Engine::submit`]).
    pub(super) span: tracing::Span,
}

impl Active<'_> {
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

    /// Add decoded text; returns true if a stop string now appears (the text is cut before it).
    pub(super) fn push_text(&mut self, piece: &str) -> bool {
        if piece.is_empty() {
            return false;
        }
        // A stop string ending in the new piece starts at most `hold` bytes before it.
        let mut from = self.text.len().saturating_sub(self.hold);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(piece);
        let hit = self
            .stop
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.text.truncate(from + at);
            return true;
        }
        false
    }

    /// The text that can be sent now: all of it at the end, else all but the held-back tail.
    pub(super) fn take_sendable(&mut self, all: bool) -> String {
        let mut end = if all {
            self.text.len()
        } else {
            self.text.len().saturating_sub(self.hold)
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}
