//! Detokenization and stop strings, off the engine thread: the `vkv-detokenize` thread turns the
//! token ids the engine thread generates into text for each request and watches for its stop
//! strings, so that the thread driving the device spends no time on text (vLLM v1 moved its
//! detokenizer out of the engine core into the front end's output processor for the same
//! reason; TGI's router detokenizes outside its batching loop).
//!
//! The engine thread sends [`Output`]s over one channel, in order: `Start` when it takes a
//! request, then its `Token`s, then one `Finished` or `Failed`. This thread sends the client its
//! [`EngineEvent`]s: `Delta`s (token ids and the text that became final with them — text that
//! could still turn out to be the start of a stop string is held back), then exactly one final
//! event. When a stop string appears the text is cut before it, the client gets the rest of the
//! text at once, and the engine is told to end the request ([`Command::StopString`]); tokens the
//! engine generated meanwhile are dropped, and the final event counts the completion tokens up
//! to the one that completed the stop string, as a synchronous check would have. A client that
//! is gone (its receiver dropped) or a token that cannot be decoded aborts the request.
//!
//! Invariants: the text sent is a prefix of the text kept, which never contains a stop string;
//! bytes are sent only at UTF-8 boundaries; every request this thread was told of gets exactly
//! one final event; the finish counters are bumped before the final event is sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender};

use super::{Command, EngineEvent, EventKind, EventSender, FinishReason, Finished, RequestId};
use crate::model::LoadedModel;
use crate::sampler::TokenLogprob;
use crate::tokenizer::StreamDecoder;

/// What the engine thread tells the detokenizer, per request and in order.
pub(super) enum Output {
    /// A request the engine took: where its events go, its stop strings, its span.
    Start {
        id: RequestId,
        events: EventSender,
        stop: Vec<String>,
        span: tracing::Span,
    },
    /// A generated token. `text`: whether it is decoded (false for a stop token: EOS or a stop
    /// id, which ends the request without text); `last`: the engine ends the request after it.
    Token {
        id: RequestId,
        token: u32,
        /// Its log-probability, if the request asked for them.
        logprob: Option<TokenLogprob>,
        text: bool,
        last: bool,
    },
    /// An event that needs no text (the prompt's log-probabilities, an exported KV), passed on
    /// as it is, in order with the request's tokens.
    Pass { id: RequestId, kind: EventKind },
    /// The request's end as the engine saw it.
    Finished { id: RequestId, finished: Finished },
    /// The request failed in the engine (the forward pass or the scheduler broke).
    Failed { id: RequestId, why: String },
}

/// How requests ended, as their clients were told (the detokenizer decides a stop string's
/// `stop`, so it keeps these counters; [`super::Engine::metrics`] reads them).
#[derive(Debug, Default)]
pub(super) struct FinishCounts {
    pub(super) stop: AtomicU64,
    pub(super) length: AtomicU64,
    pub(super) abort: AtomicU64,
}

impl FinishCounts {
    fn count(&self, reason: FinishReason) {
        let counter = match reason {
            FinishReason::Stop => &self.stop,
            FinishReason::Length => &self.length,
            FinishReason::Abort => &self.abort,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One request's text on its way to the client.
struct TextStream<'m> {
    events: EventSender,
    /// `None` once flushed at the end.
    decoder: Option<StreamDecoder<'m>>,
    stop: Vec<String>,
    /// Bytes of the longest stop string minus one: output text that must wait for more.
    hold: usize,
    /// The output text so far (cut at a stop string once found).
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// Token ids not sent yet (the last one, sent with the rest of the text at the end), and
    /// their log-probabilities when asked for.
    unsent_ids: Vec<u32>,
    unsent_logprobs: Vec<TokenLogprob>,
    /// Tokens received.
    tokens: usize,
    /// Tokens up to the one that completed a stop string, once one did.
    stopped_at: Option<usize>,
    /// The client is gone, or was told the request failed: nothing more is sent.
    closed: Closed,
    span: tracing::Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    No,
    ClientGone,
    Failed,
}

impl<'m> TextStream<'m> {
    fn new(
        model: &'m LoadedModel,
        events: EventSender,
        stop: Vec<String>,
        span: tracing::Span,
    ) -> Self {
        let hold = stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        TextStream {
            events,
            decoder: Some(model.tokenizer.stream()),
            stop,
            hold,
            text: String::new(),
            sent: 0,
            unsent_ids: Vec::new(),
            unsent_logprobs: Vec::new(),
            tokens: 0,
            stopped_at: None,
            closed: Closed::No,
            span,
        }
    }

    /// Add decoded text; returns true if a stop string now appears (the text is cut before it).
    fn push_text(&mut self, piece: &str) -> bool {
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
    fn take_sendable(&mut self, all: bool) -> String {
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

    /// Send the unsent ids with the sendable text (if there is anything to send); false when
    /// the client is gone.
    fn send_delta(&mut self, id: RequestId, all: bool) -> bool {
        let text = self.take_sendable(all);
        let token_ids = std::mem::take(&mut self.unsent_ids);
        if text.is_empty() && token_ids.is_empty() {
            return true;
        }
        let logprobs = std::mem::take(&mut self.unsent_logprobs);
        let kind = EventKind::Delta {
            token_ids,
            text,
            logprobs,
        };
        self.events.send(EngineEvent { id, kind }).is_ok()
    }
}

/// What became of a request after one token.
enum AfterToken {
    Streaming,
    /// A stop string appeared: the engine must end the request.
    StopString,
    /// The client is gone or the token could not be decoded: the engine must abort it.
    Abort,
}

/// The detokenizer thread's loop: until the engine thread hangs up, turn its [`Output`]s into
/// client events. `engine` is the engine's command channel (stop strings, aborts).
pub(super) fn run(
    model: &LoadedModel,
    rx: &Receiver<Output>,
    engine: &Sender<Command>,
    counts: &FinishCounts,
) {
    let mut streams: HashMap<RequestId, TextStream<'_>> = HashMap::new();
    while let Ok(output) = rx.recv() {
        match output {
            Output::Start {
                id,
                events,
                stop,
                span,
            } => {
                streams.insert(id, TextStream::new(model, events, stop, span));
            }
            Output::Token {
                id,
                token,
                logprob,
                text,
                last,
            } => {
                let Some(s) = streams.get_mut(&id) else {
                    continue;
                };
                match token_arrived(id, s, token, logprob, text, last) {
                    AfterToken::Streaming => {}
                    AfterToken::StopString => {
                        let _ = engine.send(Command::StopString(id));
                    }
                    // The engine's final event still comes (and is counted), sent to no one.
                    AfterToken::Abort => {
                        let _ = engine.send(Command::Abort(id));
                    }
                }
            }
            Output::Pass { id, kind } => {
                if let Some(s) = streams.get(&id) {
                    let _ = s.events.send(EngineEvent { id, kind });
                }
            }
            Output::Finished { id, finished } => {
                if let Some(s) = streams.remove(&id) {
                    finish(id, s, finished, counts);
                }
            }
            Output::Failed { id, why } => {
                if let Some(s) = streams.remove(&id).filter(|s| s.closed == Closed::No) {
                    let kind = EventKind::Failed(why);
                    let _ = s.events.send(EngineEvent { id, kind });
                }
            }
        }
    }
}

fn token_arrived(
    id: RequestId,
    s: &mut TextStream<'_>,
    token: u32,
    logprob: Option<TokenLogprob>,
    text: bool,
    last: bool,
) -> AfterToken {
    if s.stopped_at.is_some() || s.closed != Closed::No {
        // Generated before the engine heard of the stop string or the abort: not output.
        return AfterToken::Streaming;
    }
    s.tokens += 1;
    s.unsent_ids.push(token);
    s.unsent_logprobs.extend(logprob);
    if text {
        let piece = match s.decoder.as_mut().map(|d| d.push(token)) {
            Some(Ok(piece)) => piece,
            Some(Err(e)) => {
                let why = format!("detokenizing token {token}: {e}");
                tracing::warn!(parent: &s.span, error = %why, "failed");
                let kind = EventKind::Failed(why);
                let _ = s.events.send(EngineEvent { id, kind });
                s.closed = Closed::Failed;
                return AfterToken::Abort;
            }
            None => String::new(),
        };
        if s.push_text(&piece) {
            s.stopped_at = Some(s.tokens);
            tracing::debug!(parent: &s.span, tokens = s.tokens, "stop string");
            if !s.send_delta(id, true) {
                s.closed = Closed::ClientGone;
                return AfterToken::Abort;
            }
            return AfterToken::StopString;
        }
    }
    if last {
        // Sent with the rest of the text when the engine's final event comes.
        return AfterToken::Streaming;
    }
    if s.send_delta(id, false) {
        AfterToken::Streaming
    } else {
        s.closed = Closed::ClientGone;
        AfterToken::Abort
    }
}

/// The request's last delta (unless aborted) and its final event; a stop string found here
/// makes the reason `stop` and the usage what the client was sent.
fn finish(id: RequestId, mut s: TextStream<'_>, mut finished: Finished, counts: &FinishCounts) {
    match s.closed {
        Closed::No => {}
        Closed::ClientGone => return counts.count(finished.reason),
        Closed::Failed => return,
    }
    if let Some(n) = s.stopped_at {
        finished.reason = FinishReason::Stop;
        finished.usage.completion_tokens = n;
        finished.timings.token_times.truncate(n);
    } else if finished.reason != FinishReason::Abort {
        if let Some(decoder) = s.decoder.take() {
            if let Ok(rest) = decoder.finish() {
                if s.push_text(&rest) {
                    finished.reason = FinishReason::Stop;
                }
            }
        }
        s.send_delta(id, true);
    }
    counts.count(finished.reason);
    let kind = EventKind::Finished(finished);
    let _ = s.events.send(EngineEvent { id, kind });
}
