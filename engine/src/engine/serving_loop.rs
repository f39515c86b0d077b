//! The serving loop on the engine thread ([`EngineLoop`]): take commands, plan a step with the
//! [`Scheduler`], run one batched forward pass on the backend, sample, stream deltas, finish or
//! abort requests and free their KV memory, refresh the metrics — repeat. vLLM's `EngineCore` busy
//! loop is the model. Invariants: every request gets exactly one final event; a request that
//! finished, failed or was aborted holds no KV memory after the step; nothing a request contains can
//! panic the thread.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use vkv_vmm::faults::{self, Fault};

use super::beam_search::BeamGroup;
use super::{
    lock, warm_plan, BeamSearch, Command, EngineConfig, EngineError, EngineEvent, EngineMetrics,
    EventKind, EventSender, ExportedKv, Finished, GenerationRequest, KvHandoff, MapMetrics, Output,
    RequestId, Shared, StopConditions, Timings, Usage,
};
use crate::device::{Backend, BackendError, Next};
use crate::engine::FinishReason;
use crate::kv::{KvBlob, SeqId};
use crate::model::LoadedModel;
use crate::model::SeqChunk;
use crate::sampler::{Sampler, TokenLogprob};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqRequest, Step};

/// A request while the engine thread serves it: its sampler, the stop conditions checked on
/// token ids (end-of-sequence, stop token ids; stop strings are the detokenizer's), its counts
/// and timestamps, and its span. `generated` tokens were sent to the detokenizer, one
/// `token_times` entry each, and `Finished` reports exactly these.
struct Active {
    sampler: Sampler,
    /// Alternatives to report with each token's log-probability; `None`: no log-probabilities.
    logprobs: Option<usize>,
    /// End-of-sequence handling and stop token ids (its stop strings went to the detokenizer).
    stop: StopConditions,
    prompt_len: usize,
    /// Tokens generated (sent to the detokenizer) so far.
    generated: usize,
    /// When `Engine::submit` took it.
    arrival: Instant,
    /// The start of the first step that computed any of it (its queue time ends there).
    first_scheduled: Option<Instant>,
    /// Seconds from arrival to each generated token.
    token_times: Vec<f64>,
    /// Times it was preempted (recomputed from its prompt and output so far).
    preemptions: u32,
    /// Prompt tokens whose KV the prefix cache held when it was first scheduled.
    cached_tokens: usize,
    /// The request's span (see [`super::Engine::submit`]).
    span: tracing::Span,
    /// With `prompt_logprobs`: what is gathered of them until they are sent.
    prompt_logprobs: Option<PromptLogprobs>,
    /// The prefill half of a disaggregated request: hand the prompt's KV out at the end.
    export_kv: bool,
    /// The decode half: the prompt's KV, written into the cache at admission.
    import_kv: Option<Arc<KvBlob>>,
}

/// A request's prompt log-probabilities while its prompt is computed: one entry per prompt
/// token so far (`None` for the first), each from the row of logits before it.
struct PromptLogprobs {
    top: usize,
    prompt: Vec<u32>,
    rows: Vec<Option<TokenLogprob>>,
    sent: bool,
}

impl PromptLogprobs {
    /// Whether chunk `c` must bring back every row's logits.
    fn wants(&self, c: &crate::scheduler::ScheduledChunk) -> bool {
        !self.sent && c.start < self.prompt.len()
    }

    /// Take the rows of chunk `c` (`logits`: `vocab` values per token of the chunk); returns
    /// the whole list once every prompt token has its entry.
    fn gather(
        &mut self,
        c: &crate::scheduler::ScheduledChunk,
        logits: &[f32],
        vocab: usize,
    ) -> Option<Vec<Option<TokenLogprob>>> {
        if c.start == 0 {
            // Computed again from the start (preempted): gather again.
            self.rows.truncate(1);
        }
        if c.start + 1 != self.rows.len() {
            return None;
        }
        for (j, row) in logits.chunks_exact(vocab).enumerate() {
            let Some(&next) = self.prompt.get(c.start + j + 1) else {
                break;
            };
            self.rows.push(Some(TokenLogprob::of(row, next, self.top)));
        }
        (self.rows.len() == self.prompt.len()).then(|| {
            self.sent = true;
            std::mem::take(&mut self.rows)
        })
    }
}

impl Active {
    fn finished(&self, reason: FinishReason) -> Finished {
        let token_times = self.token_times.clone();
        Finished {
            reason,
            usage: Usage {
                prompt_tokens: self.prompt_len,
                completion_tokens: self.generated,
                cached_tokens: self.cached_tokens,
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

/// The loop's state, owned by the engine thread.
pub(super) struct EngineLoop<'m> {
    backend: Box<dyn Backend>,
    config: &'m EngineConfig,
    shared: &'m Shared,
    scheduler: Scheduler,
    active: HashMap<RequestId, Active>,
    /// To the detokenizer thread, which turns tokens into the clients' events.
    output: Sender<Output>,
    eos: Vec<u32>,
    metrics: EngineMetrics,
    /// Commands received during a step that wait for its end (see `admit_while_computing`).
    deferred: Vec<Command>,
    /// Beam searches by request id (whose `Active` is the request's), and the request of each
    /// beam's sequence.
    groups: HashMap<RequestId, BeamGroup>,
    beam_of: HashMap<SeqId, RequestId>,
    vocab: usize,
}

impl<'m> EngineLoop<'m> {
    pub(super) fn new(
        model: &LoadedModel,
        backend: Box<dyn Backend>,
        config: &'m EngineConfig,
        shared: &'m Shared,
        output: Sender<Output>,
    ) -> Self {
        let metrics = lock(&shared.metrics).clone();
        EngineLoop {
            backend,
            config,
            shared,
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
            }),
            active: HashMap::new(),
            output,
            eos: model.tokenizer.stop_token_ids().to_vec(),
            metrics,
            deferred: Vec::new(),
            groups: HashMap::new(),
            beam_of: HashMap::new(),
            vocab: model.model.config.vocab_size,
        }
    }

    pub(super) fn run(mut self, rx: &Receiver<Command>, ready: &Sender<()>) {
        let mut draining = false;
        if let Err(e) = self.backend.bind_to_thread() {
            tracing::error!(error = %e, "the device is unusable: every request will fail");
            // Every request would fail: say why for each, and take none.
            self.shared.accepting.store(false, Ordering::Release);
            let _ = ready.send(());
            while let Ok(cmd) = rx.recv() {
                match cmd {
                    Command::Add { id, events, .. } => {
                        let _ = events.send(EngineEvent {
                            id,
                            kind: EventKind::Failed(format!("the device is unusable: {e}")),
                        });
                    }
                    Command::Audit(reply) => {
                        let _ = reply.send(Err(EngineError::Start(e.to_string())));
                    }
                    Command::Abort(_) | Command::StopString(_) => {}
                    Command::Shutdown { .. } => break,
                }
            }
            return;
        }
        self.warm_kv();
        self.publish();
        tracing::info!(
            kv_capacity_tokens = self.backend.kv().capacity_tokens(),
            kv_warm_pages = self.metrics.kv_warm_pages,
            max_num_seqs = self.config.max_num_seqs,
            "engine ready"
        );
        let _ = ready.send(());
        loop {
            // Block for work only when there is nothing to run.
            if self.scheduler.is_idle() {
                if draining {
                    break;
                }
                match rx.recv() {
                    Ok(cmd) => draining |= self.command(cmd),
                    Err(_) => break,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                draining |= self.command(cmd);
            }
            if !self.scheduler.is_idle() {
                let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| self.step(rx)));
                if let Err(panic) = stepped {
                    if !self.recover_from_panic(&vkv_vmm::faults::panic_message(panic.as_ref())) {
                        break;
                    }
                }
                // Commands that arrived during the step and had to wait for its end.
                for cmd in std::mem::take(&mut self.deferred) {
                    draining |= self.command(cmd);
                }
            }
            self.publish();
        }
        tracing::info!(in_flight = self.active.len(), "engine stopping");
        // The handle is gone or shut down: nothing may be left without its final event.
        let ids: Vec<RequestId> = self.active.keys().copied().collect();
        for id in ids {
            self.end(id, FinishReason::Abort);
        }
        self.publish();
    }

    /// vAttention's eager allocation, once before the first request: back the first tokens of
    /// the slots the first step may fill, so that an idle engine's first admissions find their
    /// pages mapped (later ones find them prepared a step ahead, or left by a finished request).
    /// See [`warm_plan`]. Surplus pages, reclaimed as soon as memory is short.
    pub(super) fn warm_kv(&mut self) {
        let plan = warm_plan(
            self.backend.kv().capacity_tokens(),
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
        );
        if let Some(m) = self.backend.kv_mut().map_ahead_mut() {
            self.metrics.kv_warm_pages = m.warm_free_slots(&plan);
        }
    }

    /// Handle one command; returns true on a shutdown.
    pub(super) fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add {
                id,
                request,
                events,
                arrival,
                span,
                beam,
            } => self.add(id, *request, events, arrival, span, beam),
            Command::Abort(id) => {
                // A beam search's answers are aborted together.
                let id = self
                    .groups
                    .iter()
                    .find(|(&key, g)| (key..key + g.width() as u64).contains(&id))
                    .map_or(id, |(&key, _)| key);
                if self.active.contains_key(&id) {
                    self.end(id, FinishReason::Abort);
                }
            }
            // The detokenizer found a stop string (it tells the client `stop` whatever the
            // reason here, which only the engine's logs see).
            Command::StopString(id) => {
                if self.active.contains_key(&id) {
                    self.end(id, FinishReason::Stop);
                }
            }
            Command::Audit(reply) => {
                let kv = self.backend.kv();
                let audit = kv.audit().map_err(|e| EngineError::KvAudit(e.to_string()));
                let _ = reply.send(audit.map(|()| kv.usage()));
            }
            Command::Shutdown { abort } => {
                if abort {
                    let ids: Vec<RequestId> = self.active.keys().copied().collect();
                    for id in ids {
                        self.end(id, FinishReason::Abort);
                    }
                }
                return true;
            }
        }
        false
    }

    fn add(
        &mut self,
        id: RequestId,
        mut request: GenerationRequest,
        events: EventSender,
        arrival: Instant,
        span: tracing::Span,
        beam: Option<BeamSearch>,
    ) {
        // A sample that forks its prompt computes none of it: the first sample reports them.
        let prompt_logprobs = request
            .prompt_logprobs
            .filter(|_| request.share_prompt_with.is_none())
            .map(|top| PromptLogprobs {
                top,
                prompt: request.prompt.clone(),
                rows: vec![None],
                sent: false,
            });
        let (export_kv, import_kv, handed_over) = match request.handoff.take() {
            None => (false, None, None),
            Some(KvHandoff::Export) => (true, None, None),
            Some(KvHandoff::Import { first_token, kv }) => (false, Some(kv), Some(first_token)),
        };
        let seq = SeqRequest {
            id,
            handed_over,
            whole_prompt: prompt_logprobs.is_some(),
            prompt: request.prompt,
            max_tokens: request.max_tokens,
            cache_salt: request.cache_salt.take(),
            fork_of: request.share_prompt_with,
            beam_width: beam.map(|b| b.width),
        };
        let prompt_len = seq.prompt.len();
        // A beam search answers with `width` requests, each told how it ends.
        let answers = beam.map_or(1, |b| b.width) as u64;
        if let Err(e) = self.scheduler.add(seq, self.backend.kv()) {
            tracing::warn!(parent: &span, error = %e, "refused");
            self.metrics.failed += 1;
            for answer in id..id + answers {
                let _ = events.send(EngineEvent {
                    id: answer,
                    kind: EventKind::Failed(e.to_string()),
                });
            }
            return;
        }
        // Text and stop strings are the detokenizer's; token-level stops stay here.
        for answer in id..id + answers {
            let _ = self.output.send(Output::Start {
                id: answer,
                events: events.clone(),
                stop: std::mem::take(&mut request.stop.stop),
                span: span.clone(),
            });
        }
        if let Some(beam) = beam {
            let stop_tokens = match request.stop.ignore_eos {
                true => request.stop.stop_token_ids.clone(),
                false => [&self.eos[..], &request.stop.stop_token_ids].concat(),
            };
            let group = BeamGroup::new(beam, id, prompt_len, request.max_tokens, stop_tokens);
            self.groups.insert(id, group);
            self.beam_of.insert(id, id);
        }
        self.active.insert(
            id,
            Active {
                sampler: Sampler::with_adjustments(request.sampling, request.adjust)
                    .with_grammar(request.grammar),
                logprobs: request.logprobs,
                stop: request.stop,
                prompt_len,
                generated: 0,
                arrival,
                first_scheduled: None,
                token_times: Vec::new(),
                preemptions: 0,
                cached_tokens: 0,
                span,
                prompt_logprobs,
                export_kv,
                import_kv,
            },
        );
        // The decode half: the prefill half's token is the first of the output.
        if let (Some(token), Some(a)) = (handed_over, self.active.get_mut(&id)) {
            a.sampler.observe(token);
            let at_length = request.max_tokens == 1;
            self.emit(id, token, None, at_length, Instant::now());
        }
    }

    /// Remove a request, free its KV, and send its final event (through the detokenizer, which
    /// sends the client what text is left first).
    pub(super) fn end(&mut self, id: RequestId, reason: FinishReason) {
        if self.groups.contains_key(&id) {
            return self.end_beam_search(id, Some(reason));
        }
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        // The scheduler frees the KV memory (it errs only on a sequence the cache never had).
        let _ = self.scheduler.finish(id, self.backend.kv_mut());
        self.prepare_admissions();
        // Whoever sees the final event sees the memory already free.
        self.publish();
        let finished = a.finished(reason);
        tracing::info!(
            parent: &a.span,
            reason = reason.as_str(),
            completion_tokens = finished.usage.completion_tokens,
            preemptions = finished.preemptions,
            queue_ms = as_ms(finished.timings.queue),
            ttft_ms = as_ms(finished.timings.ttft),
            e2e_ms = as_ms(finished.timings.e2e),
            "finished"
        );
        let _ = self.output.send(Output::Finished { id, finished });
    }

    /// The prefill half of request `id` sampled its one token (`first_token`): send its
    /// prompt's KV, before the scheduler frees it (and before the token and `Finished`).
    fn export_kv(&mut self, id: RequestId, first_token: u32) -> Result<(), String> {
        let Some(a) = self.active.get(&id) else {
            return Ok(());
        };
        let start = Instant::now();
        let (kv, stats) = self
            .backend
            .export_kv(id, a.prompt_len)
            .map_err(|e| e.to_string())?;
        let seconds = start.elapsed().as_secs_f64();
        self.metrics.kv_handoff.exported.count(stats, seconds);
        tracing::debug!(parent: &a.span, bytes = stats.bytes, copies = stats.copies, "KV handed out");
        let exported = ExportedKv {
            kv,
            first_token: Some(first_token),
            stats,
            seconds,
        };
        let kind = EventKind::KvExported(Arc::new(exported));
        let _ = self.output.send(Output::Pass { id, kind });
        Ok(())
    }

    /// Write the handed-over prompt KV of the decode halves `step` admitted; a request whose KV
    /// cannot be written fails and leaves the step.
    fn import_kv(&mut self, step: &mut Step) {
        for id in std::mem::take(&mut step.imported) {
            let Some(kv) = self.active.get_mut(&id).and_then(|a| a.import_kv.take()) else {
                continue;
            };
            let start = Instant::now();
            match self.backend.import_kv(id, &kv) {
                Ok(stats) => {
                    let seconds = start.elapsed().as_secs_f64();
                    self.metrics.kv_handoff.imported.count(stats, seconds);
                }
                Err(e) => {
                    step.chunks.retain(|c| c.seq != id);
                    self.fail(&[id], &e.to_string());
                }
            }
        }
    }

    /// A step panicked (a bug): end every request in flight with the error, so that no client
    /// waits forever, and go on serving if the KV books are still consistent (their audit
    /// passes once those requests are freed). Returns false when they are not: the engine then
    /// stops, as it would have without the catch, and the server answers 503.
    fn recover_from_panic(&mut self, why: &str) -> bool {
        tracing::error!(
            panic = why,
            "an engine step panicked: failing the requests in flight"
        );
        let ids: Vec<RequestId> = self.active.keys().copied().collect();
        self.fail(&ids, &format!("internal error in the engine step: {why}"));
        match self.backend.kv().audit() {
            Ok(()) if self.scheduler.is_idle() => true,
            Ok(()) => {
                tracing::error!("the scheduler still holds requests after a panic: stopping");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "the KV books are inconsistent after a panic: stopping");
                false
            }
        }
    }

    /// Fail every request of a step (the forward pass or the scheduler broke).
    fn fail(&mut self, ids: &[RequestId], why: &str) {
        for &id in ids {
            // A beam's failure fails its beam search.
            let id = self.beam_of.get(&id).copied().unwrap_or(id);
            let answers = match self.groups.remove(&id) {
                Some(group) => {
                    self.free_beams(&group);
                    group.width() as u64
                }
                None => 1,
            };
            if let Some(a) = self.active.remove(&id) {
                let _ = self.scheduler.finish(id, self.backend.kv_mut());
                self.prepare_admissions();
                self.metrics.failed += 1;
                tracing::warn!(parent: &a.span, error = why, "failed");
                for answer in id..id + answers {
                    let why = why.to_string();
                    let _ = self.output.send(Output::Failed { id: answer, why });
                }
            }
        }
    }

    pub(super) fn step(&mut self, rx: &Receiver<Command>) {
        if faults::plan().take(Fault::StepPanic) {
            panic!("injected fault: an engine step panics");
        }
        let start = Instant::now();
        let mut step = match self.scheduler.schedule(self.backend.kv_mut()) {
            Ok(step) => step,
            Err(e) => {
                let ids: Vec<RequestId> = self.active.keys().copied().collect();
                self.fail(&ids, &format!("scheduling failed: {e}"));
                return;
            }
        };
        for (id, why) in &step.failed {
            self.fail(&[*id], why);
        }
        for id in &step.preempted {
            if let Some(a) = self.active.get_mut(id) {
                a.preemptions += 1;
                tracing::info!(parent: &a.span, "preempted (recompute): KV memory is full");
            }
        }
        self.import_kv(&mut step);
        if step.chunks.is_empty() {
            // Nothing fits yet (cannot happen while the scheduler admits the queue's head into
            // an empty cache); do not spin.
            std::thread::yield_now();
            return;
        }
        self.map_ahead(&step);
        self.prepare_admissions();
        let batch: Vec<SeqChunk<'_>> = step
            .chunks
            .iter()
            .map(|c| SeqChunk {
                seq: c.seq,
                tokens: &c.tokens,
                start: c.start,
                all_logits: self
                    .active
                    .get(&c.seq)
                    .and_then(|a| a.prompt_logprobs.as_ref())
                    .is_some_and(|p| p.wants(c)),
            })
            .collect();
        // Logits come back only for rows sampled with temperature or reporting log-probabilities
        // (greedy ones may be picked on the device).
        let logits_for: Vec<bool> = step
            .chunks
            .iter()
            .map(|c| {
                c.samples
                    && (self.beam_of.contains_key(&c.seq)
                        || self
                            .active
                            .get(&c.seq)
                            .is_some_and(|a| !a.sampler.is_greedy() || a.logprobs.is_some()))
            })
            .collect();
        let launched = if faults::plan().take(Fault::Launch) {
            Err(BackendError::Injected("the forward pass did not launch"))
        } else {
            self.backend.launch(&batch, &logits_for)
        };
        if let Err(e) = launched {
            let ids: Vec<RequestId> = step.chunks.iter().map(|c| c.seq).collect();
            self.fail(&ids, &format!("forward pass failed: {e}"));
            return;
        }
        drop(batch);
        // Structured outputs: each grammar's next mask while the device computes the logits.
        for c in step.chunks.iter().filter(|c| c.samples) {
            if let Some(g) = self
                .active
                .get_mut(&c.seq)
                .and_then(|a| a.sampler.grammar_mut())
            {
                g.prepare();
            }
        }
        self.admit_while_computing(rx);
        let nexts = match self.backend.finish() {
            Ok(nexts) => nexts,
            Err(e) => {
                let ids: Vec<RequestId> = step.chunks.iter().map(|c| c.seq).collect();
                self.fail(&ids, &format!("forward pass failed: {e}"));
                return;
            }
        };
        let now = Instant::now();
        let mut sampled = Vec::new();
        let mut logprobs = Vec::new();
        let mut proposed = Vec::new();
        let mut grammar_failed = Vec::new();
        for (c, next) in step.chunks.iter().zip(&nexts) {
            if let Some(&key) = self.beam_of.get(&c.seq) {
                self.beam_computed(key, c, next, start, &step);
                proposed.push(key);
                continue;
            }
            let Some(a) = self.active.get_mut(&c.seq) else {
                continue;
            };
            if a.first_scheduled.is_none() {
                a.first_scheduled = Some(start);
                a.cached_tokens = step
                    .cached
                    .iter()
                    .find(|&&(id, _)| id == c.seq)
                    .map_or(0, |&(_, cached)| cached);
                tracing::debug!(
                    parent: &a.span,
                    queue_ms = as_ms((start - a.arrival).as_secs_f64()),
                    cached_tokens = a.cached_tokens,
                    "admitted"
                );
            }
            if let (Some(p), Next::Logits(logits)) = (a.prompt_logprobs.as_mut(), next) {
                if p.wants(c) {
                    if let Some(logprobs) = p.gather(c, logits, self.vocab) {
                        let _ = self.output.send(Output::Pass {
                            id: c.seq,
                            kind: EventKind::PromptLogprobs(logprobs),
                        });
                    }
                }
            }
            if c.samples {
                let (token, logprob) = match next {
                    Next::Token(t) => (*t, None),
                    Next::Logits(logits) => {
                        // Every row's with `all_logits`: the last one samples.
                        let logits = &logits[logits.len().saturating_sub(self.vocab)..];
                        let token = a.sampler.sample(logits);
                        if let Some(why) = a.sampler.grammar().and_then(|g| g.error()) {
                            grammar_failed.push((c.seq, why));
                        }
                        let logprob = a.logprobs.map(|k| TokenLogprob::of(logits, token, k));
                        (token, logprob)
                    }
                };
                sampled.push((c.seq, token));
                logprobs.push(logprob);
            }
            let decode = a.generated > 0 && c.start + 1 == a.prompt_len + a.generated;
            if !decode {
                self.metrics.prefill_tokens += c.tokens.len() as u64;
                tracing::debug!(
                    parent: &a.span,
                    start = c.start,
                    tokens = c.tokens.len(),
                    "prefill chunk"
                );
            } else {
                tracing::trace!(parent: &a.span, position = c.start, "decode");
            }
        }
        // Prefill halves hand their prompt's KV out before `update` frees it (their one token
        // ends them).
        let mut export_failed = Vec::new();
        for &(id, token) in &sampled {
            if self.active.get(&id).is_some_and(|a| a.export_kv) {
                if let Err(why) = self.export_kv(id, token) {
                    export_failed.push((id, why));
                }
            }
        }
        let at_length = match self
            .scheduler
            .update(&step, &sampled, self.backend.kv_mut())
        {
            Ok(done) => done,
            Err(e) => {
                let ids: Vec<RequestId> = step.chunks.iter().map(|c| c.seq).collect();
                self.fail(&ids, &format!("scheduler update failed: {e}"));
                return;
            }
        };
        self.metrics.generated_tokens += sampled.len() as u64;
        for ((id, token), logprob) in sampled.into_iter().zip(logprobs) {
            let failed = |f: &(RequestId, String)| f.0 == id;
            if !grammar_failed.iter().any(failed) && !export_failed.iter().any(failed) {
                self.emit(id, token, logprob, at_length.contains(&id), now);
            }
        }
        for (id, why) in grammar_failed {
            self.fail(&[id], &format!("structured output: {why}"));
        }
        for (id, why) in export_failed {
            self.fail(&[id], &why);
        }
        proposed.dedup();
        for key in proposed {
            self.advance_beam_search(key);
        }
        self.metrics.steps += 1;
        self.metrics.busy_seconds += start.elapsed().as_secs_f64();
    }

    /// While the device computes the launched batch (the GPU; the CPU is done at once): take
    /// in requests as they arrive and have their first pages prepared (vmm), so that the next
    /// step admits them without waiting for the Mapper — a request arriving during a step is
    /// admitted by the very next one. Other commands (aborts, audits, shutdown) concern
    /// sequences of the batch in flight: they wait for the step's end (`deferred`). Polls, as
    /// CUDA's own synchronization spins before it yields.
    fn admit_while_computing(&mut self, rx: &Receiver<Command>) {
        while !self.backend.ready() {
            let mut added = false;
            while let Ok(cmd) = rx.try_recv() {
                if matches!(cmd, Command::Add { .. }) {
                    // An add never shuts down: `command` returns false for it.
                    self.command(cmd);
                    added = true;
                } else {
                    self.deferred.push(cmd);
                }
            }
            if added {
                self.prepare_admissions();
            }
            std::thread::yield_now();
        }
    }

    /// Tell the cache which waiting requests the next step will likely admit, so their first
    /// pages are mapped while this step computes (and preparations for requests gone are
    /// dropped).
    fn prepare_admissions(&mut self) {
        let kv = self.backend.kv_mut();
        if kv.map_ahead().is_none() {
            return;
        }
        let next = self.scheduler.likely_admissions(&*kv);
        if let Some(m) = kv.map_ahead_mut() {
            m.prepare_admissions(&next);
        }
    }

    /// Tell the cache what each scheduled sequence needs next: one more token after a sampling
    /// chunk (plus look-ahead), the next prefill chunk otherwise.
    pub(super) fn map_ahead(&self, step: &Step) {
        let Some(mapper) = self.backend.kv().map_ahead() else {
            return;
        };
        for c in &step.chunks {
            let end = c.start + c.tokens.len();
            if self.beam_of.contains_key(&c.seq) {
                let next = end + usize::from(c.samples) * (1 + self.config.map_ahead_tokens);
                mapper.map_ahead(c.seq, next);
                continue;
            }
            let Some(a) = self.active.get(&c.seq) else {
                continue;
            };
            let next = if c.samples {
                end + 1 + self.config.map_ahead_tokens
            } else {
                let known = a.prompt_len + a.generated;
                end + (known - end).min(self.config.max_num_batched_tokens)
            };
            mapper.map_ahead(c.seq, next);
        }
    }

    /// Deliver one sampled token: token-level stop checks, then to the detokenizer.
    fn emit(
        &mut self,
        id: RequestId,
        token: u32,
        logprob: Option<TokenLogprob>,
        at_length: bool,
        now: Instant,
    ) {
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        a.generated += 1;
        a.token_times.push((now - a.arrival).as_secs_f64());
        let stop_token = (!a.stop.ignore_eos && self.eos.contains(&token))
            || a.stop.stop_token_ids.contains(&token);
        // A grammar matched whole ends the output even with `ignore_eos` (it allows nothing
        // but end-of-sequence any more).
        let matched = a.sampler.grammar().is_some_and(|g| g.finished());
        let last = stop_token || at_length || matched;
        let text = !stop_token;
        let _ = self.output.send(Output::Token {
            id,
            token,
            logprob,
            text,
            last,
        });
        if last {
            let reason = if stop_token || matched {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            self.end(id, reason);
        }
    }

    /// A chunk of a beam of search `key` was computed: the request's timings and counts, and,
    /// if it samples, the beam's proposals.
    fn beam_computed(
        &mut self,
        key: RequestId,
        c: &crate::scheduler::ScheduledChunk,
        next: &Next,
        start: Instant,
        step: &Step,
    ) {
        if let Some(a) = self.active.get_mut(&key) {
            if a.first_scheduled.is_none() {
                a.first_scheduled = Some(start);
                a.cached_tokens = step
                    .cached
                    .iter()
                    .find(|&&(id, _)| id == c.seq)
                    .map_or(0, |&(_, cached)| cached);
            }
        }
        if c.tokens.len() > 1 || !c.samples {
            self.metrics.prefill_tokens += c.tokens.len() as u64;
        }
        if !c.samples {
            return;
        }
        let (Some(group), Next::Logits(logits)) = (self.groups.get_mut(&key), next) else {
            // Beams always ask for logits; a device that gave a token instead is a bug.
            let why = "a beam's step came back without logits";
            return self.fail(&[key], why);
        };
        group.propose(c.seq, logits);
    }

    /// Once every beam of search `key` has proposed: choose the next beams and have the
    /// scheduler free, fork and extend their sequences; end the search when it is done.
    fn advance_beam_search(&mut self, key: RequestId) {
        let Some(group) = self.groups.get_mut(&key) else {
            return;
        };
        if !group.ready() {
            return;
        }
        let next_id = &self.shared.next_id;
        let selection = group.select(|| next_id.fetch_add(1, Ordering::Relaxed));
        let kv = self.backend.kv_mut();
        self.metrics.generated_tokens += (selection.appends.len() + selection.forks.len()) as u64;
        for seq in &selection.dropped {
            let _ = self.scheduler.finish(*seq, kv);
            self.beam_of.remove(seq);
        }
        for &(src, dst, token) in &selection.forks {
            match self.scheduler.fork_running(src, dst, token, kv) {
                Ok(_) => {
                    self.beam_of.insert(dst, key);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a beam could not be forked: searching without it");
                    group.lose(dst);
                }
            }
        }
        for &(seq, token) in &selection.appends {
            self.scheduler.append(seq, token);
        }
        if group.is_done() {
            self.end_beam_search(key, None);
        }
        self.prepare_admissions();
    }

    /// Free every live beam of `group` (its KV and its place in the scheduler).
    fn free_beams(&mut self, group: &BeamGroup) {
        for seq in group.seqs() {
            let _ = self.scheduler.finish(seq, self.backend.kv_mut());
            self.beam_of.remove(&seq);
        }
    }

    /// End beam search `key`: with `None` (it is done) each answer gets its hypothesis' tokens
    /// then its `Finished`; with a reason (an abort) each answer just ends.
    fn end_beam_search(&mut self, key: RequestId, aborted: Option<FinishReason>) {
        let (Some(group), Some(a)) = (self.groups.remove(&key), self.active.remove(&key)) else {
            return;
        };
        self.free_beams(&group);
        self.prepare_admissions();
        self.publish();
        let best = match aborted {
            Some(_) => Vec::new(),
            None => group.best(),
        };
        for (i, answer) in (key..key + group.width() as u64).enumerate() {
            let mut finished = a.finished(aborted.unwrap_or(FinishReason::Length));
            if let Some(h) = best.get(i) {
                for (j, &token) in h.tokens.iter().enumerate() {
                    let last = j + 1 == h.tokens.len();
                    let text = !(last && h.reason == FinishReason::Stop);
                    let _ = self.output.send(Output::Token {
                        id: answer,
                        token,
                        logprob: None,
                        text,
                        last,
                    });
                }
                finished.reason = h.reason;
                finished.usage.completion_tokens = h.tokens.len();
                finished.timings.token_times = vec![finished.timings.e2e; h.tokens.len()];
                finished.timings.ttft = finished.timings.e2e;
            }
            tracing::info!(
                parent: &a.span,
                answer = i,
                reason = finished.reason.as_str(),
                completion_tokens = finished.usage.completion_tokens,
                "beam search finished"
            );
            let _ = self.output.send(Output::Finished {
                id: answer,
                finished,
            });
        }
    }

    fn publish(&mut self) {
        let m = &mut self.metrics;
        m.running = self.scheduler.num_running();
        m.waiting = self.scheduler.num_waiting();
        m.peak_running = m.peak_running.max(m.running);
        m.kv = self.backend.kv().usage();
        m.preemptions = self.scheduler.preemptions();
        (m.cuda_graph_replays, m.cuda_graph_captures) = self.backend.graph_counts();
        m.map = self
            .backend
            .kv()
            .map_ahead()
            .map(|a| (a.mapper_stats(), a.growth_map_waits()))
            .map(|(s, growth_waits)| MapMetrics {
                waits: s.waits,
                growth_waits,
                wait_seconds: s.wait_seconds,
                pages_mapped_ahead: s.pages_mapped_ahead,
                pages_mapped_on_wait: s.pages_mapped_on_wait,
                mapper_restarts: s.restarts,
            });
        m.prefix = self.backend.kv().prefix_cache().map(|c| c.prefix_stats());
        *lock(&self.shared.metrics) = m.clone();
    }
}

/// Seconds as milliseconds to 0.1 ms, for logs.
fn as_ms(seconds: f64) -> f64 {
    (seconds * 1e4).round() / 10.0
}
