//! The continuous-batching scheduler: which tokens of which sequences the next forward pass
//! computes.
//!
//! Iteration-level scheduling (Orca) with chunked prefill (Sarathi-Serve, vLLM v1). Each step:
//! 1. Running sequences first, oldest first. A sequence waiting to decode (one pending token)
//!    goes before one still prefilling, which gets a chunk of what the budget leaves.
//! 2. Then admissions in arrival order (preempted sequences at the head), while there is token
//!    budget (`max_num_batched_tokens`), a free place (`max_num_seqs`) and KV memory for the
//!    first chunk.
//!
//! KV memory is reserved here, through the same [`KvManager`] the forward pass uses. When a
//! running sequence cannot grow, the newest running sequence is preempted, by recompute: its KV
//! is freed, its tokens (prompt and generated) are kept, and it goes back to the head of the
//! queue to be prefilled again — possibly the sequence itself, if it is the newest. Requests that
//! could never fit (prompt + max_tokens over the cache's capacity) are refused at `add`. A
//! sequence whose reservation fails otherwise — a device call failed, or the device itself is
//! out of memory while nothing else runs — leaves with the error ([`Step::failed`]); the others
//! go on.
//!
//! With automatic prefix caching on (the cache has a [`crate::kv::PrefixCache`]), an admission
//! first starts the sequence with the cached blocks its tokens begin with and computes only from
//! there — its first chunk, and its share of the budget, shrink by the tokens covered — and
//! after every step the full blocks of each sequence's computed tokens are recorded in the
//! cache. A preempted sequence's blocks stay cached after its KV is freed, so its readmission
//! usually finds them. What each admission found is in [`Step::cached`].
//!
//! Parallel sampling (`n > 1`; PagedAttention §4.4): a sequence may name another with the same
//! prompt as its fork source ([`SeqRequest::fork_of`]). It waits until the source has computed
//! all but the last prompt token, then starts with the source's KV of those tokens —
//! [`KvManager::fork`]: whole blocks or pages shared (one more reference), the one the prefix
//! ends inside copied — and computes only the last prompt token itself, so that it samples its
//! first token from logits of its own. Forks are taken as soon as the source's chunk is computed
//! ([`Scheduler::update`], so a source that finishes at its first token still shares), or at
//! admission; a sequence whose source is no longer scheduled is admitted as any other (and with
//! prefix caching finds the source's blocks cached). A fork source that is preempted and comes
//! back is forked from again; a fork that does not fit waits, as an admission does.
//!
//! Beam search (see `engine::beam_search`): a sequence whose sampling chunk gets no token in
//! [`Scheduler::update`] is *held* — it keeps its KV and is not scheduled — until
//! [`Scheduler::append`] gives it a token or [`Scheduler::fork_running`] starts a copy of it
//! (its KV forked as above) with a token of its own. A beam group takes its width in places of
//! `max_num_seqs` from admission to end ([`SeqRequest::beam_width`]), so its forks always find
//! one. When nothing can be scheduled because only held sequences run and the queue's head does
//! not fit beside them, the newest is preempted to the back of the queue.
//!
//! Invariants, property-tested below: a step never exceeds the token budget or `max_num_seqs`;
//! a chunk starts where its sequence's KV ends; the cache never holds a sequence that is not
//! running; every request finishes; once all finish, the cache is empty.

use std::collections::VecDeque;

use crate::kv::{KvError, KvManager, LikelyAdmission, SeqId};

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Running sequences at most.
    pub max_num_seqs: usize,
    /// Tokens computed in one forward pass at most (prefill chunks + decodes).
    pub max_num_batched_tokens: usize,
}

/// A sequence to run: its prompt and how many tokens it may generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqRequest {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// With prefix caching: only KV cached under the same salt is reused (vLLM's `cache_salt`).
    pub cache_salt: Option<String>,
    /// Parallel sampling: a sequence with the same prompt whose prompt KV this one starts from,
    /// shared (see the module docs). Ignored if that sequence is not scheduled or its prompt
    /// differs.
    pub fork_of: Option<SeqId>,
    /// Beam search of this width: the sequence is the first beam of a group that takes `width`
    /// places of `max_num_seqs` from its admission to its end, so that its beams never wait
    /// for a place (see [`Scheduler::fork_running`]).
    pub beam_width: Option<usize>,
    /// Compute the whole prompt (its every row's logits are wanted): no prefix-cache hit.
    pub whole_prompt: bool,
    /// Disaggregated decode: the first token, sampled by the prefill instance that computed the
    /// prompt's KV. The sequence starts as prompt + this token with the prompt's KV arriving
    /// from outside: its admission reserves the prompt and the token and lists it in
    /// [`Step::imported`], whose caller writes the KV before the step runs; the step decodes
    /// the token.
    pub handed_over: Option<u32>,
}

/// One chunk of the next forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub seq: SeqId,
    /// Position of the first token.
    pub start: usize,
    pub tokens: Vec<u32>,
    /// The chunk reaches the sequence's last known token: sample the next one from its logits.
    pub samples: bool,
}

/// What the next forward pass computes, who was preempted to make room, and who failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub chunks: Vec<ScheduledChunk>,
    pub preempted: Vec<SeqId>,
    /// Sequences whose KV could not be reserved, with why: a device call failed, or the device
    /// was out of memory with nothing else running (so preempting could not help). They have
    /// left the scheduler, their KV freed; the caller ends them with the error.
    pub failed: Vec<(SeqId, String)>,
    /// Sequences admitted this step with KV from the prefix cache: the tokens it covered (the
    /// sequence's first chunk starts there).
    pub cached: Vec<(SeqId, usize)>,
    /// Sequences admitted this step by forking their source's prompt KV: the tokens shared.
    pub forked: Vec<(SeqId, usize)>,
    /// Sequences admitted this step whose prompt KV comes from outside
    /// ([`SeqRequest::handed_over`]): the caller writes it into their reserved KV before the
    /// step runs.
    pub imported: Vec<SeqId>,
}

/// Errors a caller can provoke.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("sequence {0} is already scheduled")]
    Duplicate(SeqId),
    #[error("sequence {id}: empty prompt or max_tokens 0")]
    Empty { id: SeqId },
    #[error("sequence {id} needs {needed} tokens of KV (prompt {prompt} + max_tokens {max_tokens}), more than the cache holds ({capacity})")]
    TooLong {
        id: SeqId,
        needed: usize,
        prompt: usize,
        max_tokens: usize,
        capacity: usize,
    },
    #[error("sequence {0} is not scheduled")]
    Unknown(SeqId),
    #[error(transparent)]
    Kv(#[from] KvError),
}

#[derive(Debug, Clone)]
struct Seq {
    id: SeqId,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    cache_salt: Option<String>,
    fork_of: Option<SeqId>,
    /// Beam search: the group (its first sequence's id) and its width; forks inherit it.
    beam: Option<(SeqId, usize)>,
    whole_prompt: bool,
    /// The prompt's KV arrives from outside at admission (see [`SeqRequest::handed_over`]);
    /// false once admitted (a preempted sequence recomputes).
    imported: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The tokens a fork starts with: all of the prompt but the last token, whose logits the
    /// forked sequence computes itself.
    fn fork_len(&self) -> usize {
        self.prompt_len - 1
    }
}

/// Where a waiting sequence stands with its fork source.
enum ForkState {
    /// No source (or it left, or shares nothing): admitted as any sequence.
    None,
    /// The source is running with the tokens to share computed: fork from it.
    Ready(SeqId),
    /// The source is scheduled but has not computed them yet: wait for it.
    Wait,
}

/// The scheduler (see the module docs).
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    waiting: VecDeque<Seq>,
    /// In admission order: the last is the newest (the first to be preempted).
    running: Vec<Seq>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    /// Queue a sequence. Refused if it could never fit the cache alone.
    pub fn add(&mut self, req: SeqRequest, kv: &dyn KvManager) -> Result<(), SchedulerError> {
        if req.prompt.is_empty() || req.max_tokens == 0 {
            return Err(SchedulerError::Empty { id: req.id });
        }
        if self.contains(req.id) {
            return Err(SchedulerError::Duplicate(req.id));
        }
        let needed = req.prompt.len() + req.max_tokens;
        let capacity = kv.capacity_tokens();
        if needed > capacity {
            return Err(SchedulerError::TooLong {
                id: req.id,
                needed,
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                capacity,
            });
        }
        let prompt_len = req.prompt.len();
        let mut tokens = req.prompt;
        tokens.extend(req.handed_over);
        self.waiting.push_back(Seq {
            id: req.id,
            prompt_len,
            tokens,
            max_tokens: req.max_tokens,
            computed: 0,
            cache_salt: req.cache_salt,
            fork_of: req.fork_of,
            beam: req.beam_width.map(|w| (req.id, w.max(1))),
            whole_prompt: req.whole_prompt,
            imported: req.handed_over.is_some(),
        });
        Ok(())
    }

    fn contains(&self, id: SeqId) -> bool {
        self.waiting.iter().chain(&self.running).any(|s| s.id == id)
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Places of `max_num_seqs` taken: one per running sequence, a beam group's width for all
    /// its sequences together.
    fn places_used(&self) -> usize {
        let mut groups: Vec<(SeqId, usize)> = Vec::new();
        let mut used = 0;
        for s in &self.running {
            match s.beam {
                None => used += 1,
                Some(g) if !groups.contains(&g) => groups.push(g),
                Some(_) => {}
            }
        }
        used + groups.iter().map(|g| g.1).sum::<usize>()
    }

    /// Whether `seq` (not running) finds a place: its beam group's, if the group runs already.
    fn has_place(&self, seq: &Seq) -> bool {
        let needed = match seq.beam {
            Some(g) if self.running.iter().any(|s| s.beam == Some(g)) => 0,
            Some((_, width)) => width,
            None => 1,
        };
        self.places_used() + needed <= self.config.max_num_seqs
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Preemptions so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// The waiting sequences the next step would likely admit — if every running sequence took
    /// one token of the budget — with the prefix-cache hit each would get now (read from `kv`,
    /// referencing nothing) and the KV length each would reserve: what a cache can prepare
    /// while the current step computes ([`crate::kv::MapAhead::prepare_admissions`]). As at
    /// admission, a hit's tokens take none of the budget.
    pub fn likely_admissions(&self, kv: &dyn KvManager) -> Vec<LikelyAdmission> {
        let mut budget = (self.config.max_num_batched_tokens).saturating_sub(self.running.len());
        let places = self.config.max_num_seqs.saturating_sub(self.places_used());
        let mut next = Vec::new();
        // Forks map their source's pages, not fresh ones: nothing to prepare.
        let fresh = self
            .waiting
            .iter()
            .filter(|s| matches!(self.fork_state(s), ForkState::None));
        let cache = kv.prefix_cache();
        for seq in fresh.take(places) {
            if budget == 0 {
                break;
            }
            let hit = match cache {
                Some(c) if seq.computed == 0 && !seq.whole_prompt => {
                    let salt = seq.cache_salt.as_deref().map(str::as_bytes);
                    c.cached_tokens(&seq.tokens, salt)
                }
                _ => 0,
            };
            let start = seq.computed.max(hit);
            let n = (seq.tokens.len() - start).min(budget);
            next.push(LikelyAdmission {
                seq: seq.id,
                hit,
                len: start + n,
            });
            budget -= n;
        }
        next
    }

    /// Plan the next forward pass, reserving its KV in `kv`.
    pub fn schedule(&mut self, kv: &mut dyn KvManager) -> Result<Step, SchedulerError> {
        let mut step = Step::default();
        let mut budget = self.config.max_num_batched_tokens;
        // Decodes (one pending token) before prefill chunks, oldest first within each.
        let mut order: Vec<SeqId> = self
            .running
            .iter()
            .filter(|s| s.tokens.len() - s.computed == 1)
            .map(|s| s.id)
            .collect();
        order.extend(
            self.running
                .iter()
                .filter(|s| s.tokens.len() - s.computed > 1)
                .map(|s| s.id),
        );
        for id in order {
            if budget == 0 {
                break;
            }
            // The sequence may have been preempted to make room for an earlier one.
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let pending = self.running[i].tokens.len() - self.running[i].computed;
            let n = pending.min(budget);
            if self.grow(i, n, kv, &mut step)? {
                budget -= n;
            }
        }
        // Admissions in queue order; a fork whose source has not computed its prompt yet lets
        // those behind it go first.
        let mut i = 0;
        while budget > 0 {
            let Some(seq) = self.waiting.get(i) else {
                break;
            };
            if !self.has_place(seq) {
                break;
            }
            let forked = match self.fork_state(seq) {
                ForkState::Wait => {
                    i += 1;
                    continue;
                }
                ForkState::Ready(src) => match self.fork(i, src, kv) {
                    Ok(shared) => Some(shared),
                    Err(KvError::OutOfMemory { .. }) => break,
                    // Not a memory shortage: left to its own admission, which will say why.
                    Err(_) => {
                        self.waiting[i].fork_of = None;
                        continue;
                    }
                },
                ForkState::None => None,
            };
            let seq = &mut self.waiting[i];
            let cached = match forked {
                Some(_) => 0,
                // The prompt's KV arrives with it: only the handed-over token is computed.
                None if seq.imported => {
                    seq.computed = seq.prompt_len;
                    0
                }
                None => match match_prefix(seq, kv) {
                    Ok(cached) => cached,
                    // A hit needs a place to map it (vmm: a free slot); as for `reserve` below.
                    Err(KvError::OutOfMemory { .. }) if !self.running.is_empty() => break,
                    Err(e) => {
                        let seq = self.waiting.remove(i).expect("index in range");
                        self.fail(seq, e, kv, &mut step)?;
                        continue;
                    }
                },
            };
            let n = (seq.tokens.len() - seq.computed).min(budget);
            match kv.reserve(seq.id, seq.computed + n) {
                Ok(()) => {}
                // With nothing running, the budget always holds one sequence (`add` checks):
                // only the device itself can be out of memory, and waiting would not end.
                Err(KvError::OutOfMemory { .. }) if !self.running.is_empty() => {
                    // Back to holding nothing: the blocks it found stay cached for next time, and
                    // the lookup counts when it is admitted.
                    if cached > 0 || forked.is_some() {
                        seq.computed = 0;
                        kv.free(seq.id)?;
                    }
                    if seq.imported {
                        seq.computed = 0;
                    } else if forked.is_none() {
                        if let Some(cache) = kv.prefix_cache_mut() {
                            cache.retract_lookup(seq.tokens.len(), cached);
                        }
                    }
                    break;
                }
                Err(e) => {
                    let seq = self.waiting.remove(i).expect("index in range");
                    self.fail(seq, e, kv, &mut step)?;
                    continue;
                }
            }
            let mut seq = self.waiting.remove(i).expect("index in range");
            if cached > 0 {
                step.cached.push((seq.id, cached));
            }
            if seq.imported {
                seq.imported = false;
                step.imported.push(seq.id);
            }
            if let Some(shared) = forked {
                step.forked.push((seq.id, shared));
            }
            step.chunks.push(chunk(&seq, n));
            self.running.push(seq);
            budget -= n;
        }
        if step.chunks.is_empty() && !self.waiting.is_empty() {
            // Every running sequence is held (beam search: it waits for its siblings' logits)
            // and the queue's head finds no place or memory beside them. Preempt the newest to
            // the back of the queue, so that the head goes in, and plan again.
            if let Some(victim) = self.running.pop() {
                self.preempt(victim, kv, &mut step)?;
                let victim = self.waiting.pop_front().expect("just queued");
                self.waiting.push_back(victim);
                let mut next = self.schedule(kv)?;
                next.preempted.splice(0..0, step.preempted);
                next.failed.splice(0..0, step.failed);
                return Ok(next);
            }
        }
        Ok(step)
    }

    /// Reserve `n` more tokens for running sequence `i`, preempting the newest running
    /// sequences until it fits. Returns false if `i` itself, being the newest, was preempted.
    fn grow(
        &mut self,
        i: usize,
        n: usize,
        kv: &mut dyn KvManager,
        step: &mut Step,
    ) -> Result<bool, SchedulerError> {
        loop {
            let seq = &self.running[i];
            match kv.reserve(seq.id, seq.computed + n) {
                Ok(()) => {
                    step.chunks.push(chunk(seq, n));
                    return Ok(true);
                }
                // Alone, a sequence always fits the budget (`add` checks): only the device itself
                // can be out of memory, and preempting itself would only start it over.
                Err(KvError::OutOfMemory { .. }) if self.running.len() > 1 => {
                    // Victims are the newest, so they come after `i` until `i` is the newest.
                    let was_i = i + 1 == self.running.len();
                    let victim = self.running.pop().expect("sequence i is running");
                    self.preempt(victim, kv, step)?;
                    if was_i {
                        return Ok(false);
                    }
                }
                Err(e) => {
                    let seq = self.running.remove(i);
                    self.fail(seq, e, kv, step)?;
                    return Ok(false);
                }
            }
        }
    }

    /// Where waiting `seq` stands with its fork source.
    fn fork_state(&self, seq: &Seq) -> ForkState {
        let Some(src) = seq.fork_of else {
            return ForkState::None;
        };
        let len = seq.fork_len();
        let same_prompt = |s: &Seq| s.tokens.len() >= len && s.tokens[..len] == seq.tokens[..len];
        if len == 0 {
            return ForkState::None;
        }
        if let Some(s) = self.running.iter().find(|s| s.id == src) {
            return match (same_prompt(s), s.computed >= len) {
                (false, _) => ForkState::None,
                (true, true) => ForkState::Ready(src),
                (true, false) => ForkState::Wait,
            };
        }
        match self.waiting.iter().find(|s| s.id == src) {
            Some(s) if same_prompt(s) => ForkState::Wait,
            _ => ForkState::None,
        }
    }

    /// Start waiting sequence `i` (holding no KV) with running `src`'s KV of its prompt but
    /// the last token; returns the tokens shared. Nothing changes on an error.
    fn fork(&mut self, i: usize, src: SeqId, kv: &mut dyn KvManager) -> Result<usize, KvError> {
        let seq = &mut self.waiting[i];
        let shared = seq.fork_len();
        kv.fork(src, seq.id, shared)?;
        seq.computed = shared;
        Ok(shared)
    }

    /// Move every waiting fork whose source has just computed its prompt into the running set,
    /// sharing the source's KV, while there are places: they compute their last prompt token in
    /// the next step. Taken in `update`, before a source that finished at its first token is
    /// freed. One that does not fit stays waiting.
    fn take_ready_forks(&mut self, kv: &mut dyn KvManager) {
        let mut i = 0;
        while i < self.waiting.len() && self.has_place(&self.waiting[i]) {
            let ForkState::Ready(src) = self.fork_state(&self.waiting[i]) else {
                i += 1;
                continue;
            };
            match self.fork(i, src, kv) {
                Ok(_) => {
                    let seq = self.waiting.remove(i).expect("index in range");
                    self.running.push(seq);
                }
                Err(KvError::OutOfMemory { .. }) => return,
                Err(_) => {
                    self.waiting[i].fork_of = None;
                    i += 1;
                }
            }
        }
    }

    /// `seq` (out of the queues already) failed to reserve its KV: free what it holds and hand
    /// it to the caller through `step.failed`.
    fn fail(
        &mut self,
        seq: Seq,
        why: KvError,
        kv: &mut dyn KvManager,
        step: &mut Step,
    ) -> Result<(), SchedulerError> {
        unplan(seq.id, kv, step)?;
        step.failed
            .push((seq.id, format!("reserving KV memory: {why}")));
        Ok(())
    }

    fn preempt(
        &mut self,
        mut victim: Seq,
        kv: &mut dyn KvManager,
        step: &mut Step,
    ) -> Result<(), SchedulerError> {
        unplan(victim.id, kv, step)?;
        victim.computed = 0;
        step.preempted.push(victim.id);
        self.preemptions += 1;
        self.waiting.push_front(victim);
        Ok(())
    }

    /// Record a finished forward pass: every chunk's tokens are now in the cache, and `sampled`
    /// holds the new token of every chunk that `samples`. Returns the sequences that reached
    /// `max_tokens` (their KV is freed and they leave the scheduler).
    pub fn update(
        &mut self,
        step: &Step,
        sampled: &[(SeqId, u32)],
        kv: &mut dyn KvManager,
    ) -> Result<Vec<SeqId>, SchedulerError> {
        // With prefix caching, each chunk's full blocks are recorded as it is marked computed.
        let mut cache = kv.prefix_cache_mut();
        for c in &step.chunks {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == c.seq) {
                s.computed = c.start + c.tokens.len();
                if let Some(cache) = cache.as_deref_mut() {
                    let salt = s.cache_salt.as_deref().map(str::as_bytes);
                    cache.cache_computed(s.id, &s.tokens[..s.computed], salt)?;
                }
            }
        }
        for &(id, token) in sampled {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
                s.tokens.push(token);
            }
        }
        self.take_ready_forks(kv);
        let done: Vec<SeqId> = self
            .running
            .iter()
            .filter(|s| s.generated() >= s.max_tokens)
            .map(|s| s.id)
            .collect();
        for &id in &done {
            self.finish(id, kv)?;
        }
        Ok(done)
    }

    /// Remove a sequence (finished by a stop token or string, or aborted) wherever it is, and
    /// free its KV. Returns whether it was known.
    pub fn finish(&mut self, id: SeqId, kv: &mut dyn KvManager) -> Result<bool, SchedulerError> {
        let known = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i);
            true
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            true
        } else {
            false
        };
        if kv.reserved(id).is_some() {
            kv.free(id)?;
        }
        Ok(known)
    }

    /// Beam search: give held sequence `id` (one that sampled without a token in
    /// [`Scheduler::update`], so it holds the KV of all its tokens and is not scheduled) its next
    /// token. Returns whether `id` is known.
    pub fn append(&mut self, id: SeqId, token: u32) -> bool {
        match self
            .waiting
            .iter_mut()
            .chain(&mut self.running)
            .find(|s| s.id == id)
        {
            Some(s) => {
                s.tokens.push(token);
                true
            }
            None => false,
        }
    }

    /// Beam search: start sequence `dst` as a copy of held sequence `src` followed by `token`,
    /// sharing `src`'s KV ([`KvManager::fork`]: whole blocks or pages shared, the one the
    /// tokens end inside copied). Where `src` holds no KV (it was preempted) or no place or
    /// memory is free, `dst` waits at the head of the queue and is computed from scratch (with
    /// prefix caching it finds `src`'s blocks cached). Returns the tokens shared.
    pub fn fork_running(
        &mut self,
        src: SeqId,
        dst: SeqId,
        token: u32,
        kv: &mut dyn KvManager,
    ) -> Result<usize, SchedulerError> {
        if self.contains(dst) {
            return Err(SchedulerError::Duplicate(dst));
        }
        let Some(source) = self
            .running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == src)
        else {
            return Err(SchedulerError::Unknown(src));
        };
        let mut seq = Seq {
            id: dst,
            fork_of: None,
            computed: 0,
            ..source.clone()
        };
        seq.tokens.push(token);
        let shared = source.computed.min(seq.tokens.len() - 1);
        let place = self.has_place(&seq);
        if shared > 0 && place && kv.fork(src, dst, shared).is_ok() {
            seq.computed = shared;
            self.running.push(seq);
            Ok(shared)
        } else {
            self.waiting.push_front(seq);
            Ok(0)
        }
    }

    /// The tokens generated so far for `id`.
    pub fn generated(&self, id: SeqId) -> Option<&[u32]> {
        self.running
            .iter()
            .chain(&self.waiting)
            .find(|s| s.id == id)
            .map(|s| &s.tokens[s.prompt_len..])
    }
}

/// Start a sequence about to be admitted (holding no KV) with what the prefix cache holds of its
/// tokens, if the cache has one; returns the tokens covered, now computed.
fn match_prefix(seq: &mut Seq, kv: &mut dyn KvManager) -> Result<usize, KvError> {
    let Some(cache) = kv.prefix_cache_mut() else {
        return Ok(0);
    };
    if seq.computed > 0 || seq.whole_prompt {
        return Ok(0);
    }
    let salt = seq.cache_salt.as_deref().map(str::as_bytes);
    let cached = cache.match_prefix(seq.id, &seq.tokens, salt)?;
    seq.computed = cached;
    Ok(cached)
}

/// Free what `id` holds in the cache and drop a chunk already planned for it this step.
fn unplan(id: SeqId, kv: &mut dyn KvManager, step: &mut Step) -> Result<(), SchedulerError> {
    if kv.reserved(id).is_some() {
        kv.free(id)?;
    }
    step.chunks.retain(|c| c.seq != id);
    step.cached.retain(|&(seq, _)| seq != id);
    Ok(())
}

fn chunk(seq: &Seq, n: usize) -> ScheduledChunk {
    ScheduledChunk {
        seq: seq.id,
        start: seq.computed,
        tokens: seq.tokens[seq.computed..seq.computed + n].to_vec(),
        samples: seq.computed + n == seq.tokens.len(),
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
