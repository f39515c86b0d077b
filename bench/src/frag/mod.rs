//! `vkv frag`: how much KV memory each allocation policy wastes, and how many requests it holds at
//! once, for a model and a workload — replayed through the allocators the engine uses.
//!
//! The replay is discrete-event at the granularity of decode steps (the setting of Fig. 2 of the
//! vLLM paper and of vAttention's batch-size study): requests arrive — all at step 0, or as a
//! Poisson process of `per_step` requests per step — and wait in a FCFS queue; at each step every
//! running request grows by one token (its prompt is allocated whole at admission, as prefill
//! writes it), requests that reached their final length (prompt + output) are freed, and waiting
//! requests are admitted in order while the policy can allocate them. When a running request
//! cannot grow, the newest running request is preempted (freed and put back at the head of the
//! queue keeping its progress, vLLM's recompute), until the growth succeeds.
//!
//! At every step the policy reports where the KV memory is ([`Composition`]); the report gives
//! time averages — over the steps that had a request running (`busy`) and over those that ended
//! with a request still waiting (`saturated`: memory, not demand, limits the batch; the regime
//! the papers' figures describe) — of the memory composition, the share of allocated memory that
//! holds token states and the running requests, plus peak running requests, preemptions and a
//! timeline.

mod policy;

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use serde::Serialize;

use crate::workload::RequestShape;
pub use policy::{Composition, Policy, PolicyError, PolicyParseError, Reservation};
use vkv_engine::presets::KvShape;

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// Every request is waiting at step 0.
    AllAtOnce,
    /// A Poisson process: exponential gaps with a mean of `1 / per_step` steps.
    Poisson { per_step: f64 },
}

/// The inputs of one study.
#[derive(Debug, Clone)]
pub struct FragConfig {
    pub shape: KvShape,
    /// KV memory budget in bytes.
    pub kv_memory: usize,
    /// Maximum request length (prompt + output) in tokens: Orca-Max reserves it, vmm slots span it.
    pub max_len: usize,
    pub requests: Vec<RequestShape>,
    pub arrival: Arrival,
    /// Seed of the arrival process.
    pub seed: u64,
    /// Points kept in each timeline (evenly spaced steps).
    pub timeline_points: usize,
}

/// Errors of the study; each names the problem.
#[derive(Debug, thiserror::Error)]
pub enum FragError {
    #[error("the workload has no requests")]
    NoRequests,
    #[error("KV budget of {budget} B is smaller than one request: under {policy}, request {index} ({tokens} tokens) needs {needs} B")]
    BudgetTooSmall {
        policy: String,
        index: usize,
        tokens: usize,
        needs: usize,
        budget: usize,
    },
    #[error("request {index} is {tokens} tokens long, over the maximum length {max_len}")]
    TooLong {
        index: usize,
        tokens: usize,
        max_len: usize,
    },
    /// A policy's allocator failed for a reason other than memory, or leaked memory.
    #[error("{policy}: {error}")]
    Policy { policy: String, error: PolicyError },
    #[error("{policy}: no progress after {steps} steps ({waiting} waiting, {running} running)")]
    Stuck {
        policy: String,
        steps: usize,
        waiting: usize,
        running: usize,
    },
}

/// Time-averaged memory composition, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MeanComposition {
    pub token_bytes: f64,
    pub reserved_bytes: f64,
    pub internal_bytes: f64,
    pub external_bytes: f64,
    pub free_bytes: f64,
}

impl MeanComposition {
    /// Memory in use: tokens + reserved + internal + external.
    pub fn in_use(&self) -> f64 {
        self.token_bytes + self.reserved_bytes + self.internal_bytes + self.external_bytes
    }
}

/// One point of a timeline: the step, the queue, and the composition as fractions of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimelinePoint {
    pub step: usize,
    pub running: usize,
    pub waiting: usize,
    pub token: f64,
    pub reserved: f64,
    pub internal: f64,
    pub external: f64,
}

/// Time averages over a set of steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Averages {
    /// Steps averaged over.
    pub steps: usize,
    pub mean_running: f64,
    /// Mean of (token bytes / allocated bytes).
    pub token_share_of_allocated: f64,
    pub mean: MeanComposition,
}

impl Averages {
    fn add(&mut self, running: usize, c: &Composition) {
        self.steps += 1;
        self.mean_running += running as f64;
        if c.allocated() > 0 {
            self.token_share_of_allocated += c.token_bytes as f64 / c.allocated() as f64;
        }
        let m = &mut self.mean;
        m.token_bytes += c.token_bytes as f64;
        m.reserved_bytes += c.reserved_bytes as f64;
        m.internal_bytes += c.internal_bytes as f64;
        m.external_bytes += c.external_bytes as f64;
        m.free_bytes += c.free_bytes as f64;
    }

    fn finish(mut self) -> Self {
        let n = self.steps.max(1) as f64;
        self.mean_running /= n;
        self.token_share_of_allocated /= n;
        let m = &mut self.mean;
        for x in [
            &mut m.token_bytes,
            &mut m.reserved_bytes,
            &mut m.internal_bytes,
            &mut m.external_bytes,
            &mut m.free_bytes,
        ] {
            *x /= n;
        }
        self
    }
}

/// What one policy did with the workload.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub policy: String,
    /// Tokens per allocation unit (block, or page in one region); none for reservations.
    pub granule_tokens: Option<f64>,
    pub steps: usize,
    pub finished: usize,
    pub preemptions: usize,
    pub peak_running: usize,
    /// Over every step with a request running.
    pub busy: Averages,
    /// Over the steps that ended with a request still waiting: memory is what limits the batch.
    pub saturated: Averages,
    pub timeline: Vec<TimelinePoint>,
}

impl PolicyReport {
    /// The saturated averages when there were saturated steps, else the busy ones.
    pub fn under_load(&self) -> &Averages {
        if self.saturated.steps > 0 {
            &self.saturated
        } else {
            &self.busy
        }
    }
}

/// The whole study: its inputs and one report per policy.
#[derive(Debug, Clone, Serialize)]
pub struct FragReport {
    pub model: String,
    pub bytes_per_token: usize,
    pub kv_memory: usize,
    pub max_len: usize,
    pub requests: usize,
    pub mean_prompt: f64,
    pub mean_output: f64,
    pub arrival: String,
    pub policies: Vec<PolicyReport>,
}

/// Run the study for every policy.
pub fn run(config: &FragConfig, policies: &[Policy]) -> Result<FragReport, FragError> {
    if config.requests.is_empty() {
        return Err(FragError::NoRequests);
    }
    let n = config.requests.len() as f64;
    Ok(FragReport {
        model: config.shape.name.clone(),
        bytes_per_token: config.shape.bytes_per_token(),
        kv_memory: config.kv_memory,
        max_len: config.max_len,
        requests: config.requests.len(),
        mean_prompt: config
            .requests
            .iter()
            .map(|r| r.prompt_len as f64)
            .sum::<f64>()
            / n,
        mean_output: config
            .requests
            .iter()
            .map(|r| r.output_len as f64)
            .sum::<f64>()
            / n,
        arrival: match config.arrival {
            Arrival::AllAtOnce => "all at once".into(),
            Arrival::Poisson { per_step } => format!("Poisson, {per_step} requests per step"),
        },
        policies: policies
            .iter()
            .map(|&p| replay(config, p))
            .collect::<Result<_, _>>()?,
    })
}

struct Running {
    id: usize,
    tokens: usize,
    final_len: usize,
}

/// Steps at which each request arrives (non-decreasing).
fn arrival_steps(config: &FragConfig) -> Vec<usize> {
    match config.arrival {
        Arrival::AllAtOnce => vec![0; config.requests.len()],
        Arrival::Poisson { per_step } => {
            let mut rng = StdRng::seed_from_u64(config.seed);
            let gap = Exp::new(per_step.max(1e-12)).expect("positive rate");
            let mut t = 0.0f64;
            config
                .requests
                .iter()
                .map(|_| {
                    t += gap.sample(&mut rng);
                    t as usize
                })
                .collect()
        }
    }
}

/// Replay the workload through one policy.
pub fn replay(config: &FragConfig, policy: Policy) -> Result<PolicyReport, FragError> {
    let name = policy.to_string();
    if config.requests.is_empty() {
        return Err(FragError::NoRequests);
    }
    for (index, r) in config.requests.iter().enumerate() {
        let tokens = r.total_len();
        if tokens > config.max_len {
            return Err(FragError::TooLong {
                index,
                tokens,
                max_len: config.max_len,
            });
        }
        let needs = policy::bytes_for(policy, &config.shape, config.max_len, tokens);
        if needs > config.kv_memory {
            return Err(FragError::BudgetTooSmall {
                policy: name,
                index,
                tokens,
                needs,
                budget: config.kv_memory,
            });
        }
    }
    let fail = |error: PolicyError| FragError::Policy {
        policy: name.clone(),
        error,
    };
    let n = config.requests.len();
    let mut kv =
        policy::build(policy, &config.shape, config.kv_memory, config.max_len, n).map_err(fail)?;
    let arrivals = arrival_steps(config);
    // Tokens each request holds when (re)admitted: its prompt, or its progress when preempted.
    let mut progress: Vec<usize> = config.requests.iter().map(|r| r.prompt_len).collect();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let (mut next, mut finished, mut preemptions, mut peak) = (0, 0, 0, 0);
    let (mut busy, mut saturated) = (Averages::default(), Averages::default());
    let mut points: Vec<TimelinePoint> = Vec::new();
    let mut step = 0;
    let mut idle_since_progress = 0;
    while finished < n {
        while next < n && arrivals[next] <= step {
            queue.push_back(next);
            next += 1;
        }
        let finished_before = finished;
        // Decode: every running request grows by one token; preempt the newest when one cannot.
        let mut i = 0;
        while i < running.len() {
            let want = running[i].tokens + 1;
            if kv.grow(running[i].id, want).map_err(fail)? {
                running[i].tokens = want;
                if want == running[i].final_len {
                    let done = running.remove(i);
                    kv.free(done.id).map_err(fail)?;
                    finished += 1;
                } else {
                    i += 1;
                }
                continue;
            }
            let victim = running.pop().expect("running is not empty");
            kv.free(victim.id).map_err(fail)?;
            progress[victim.id] = victim.tokens;
            queue.push_front(victim.id);
            preemptions += 1;
        }
        // Admission, first come first served.
        while let Some(&id) = queue.front() {
            let final_len = config.requests[id].total_len();
            if !kv.admit(id, progress[id], final_len).map_err(fail)? {
                break;
            }
            queue.pop_front();
            running.push(Running {
                id,
                tokens: progress[id],
                final_len,
            });
        }
        peak = peak.max(running.len());
        if !running.is_empty() {
            let live: Vec<(usize, usize)> =
                running.iter().map(|r| (r.tokens, r.final_len)).collect();
            let c = kv.composition(&live);
            busy.add(running.len(), &c);
            if !queue.is_empty() {
                saturated.add(running.len(), &c);
            }
            let budget = config.kv_memory as f64;
            points.push(TimelinePoint {
                step,
                running: running.len(),
                waiting: queue.len(),
                token: c.token_bytes as f64 / budget,
                reserved: c.reserved_bytes as f64 / budget,
                internal: c.internal_bytes as f64 / budget,
                external: c.external_bytes as f64 / budget,
            });
        }
        // Nothing running, nothing admitted, nothing left to arrive: no policy can go on.
        idle_since_progress = if running.is_empty() && finished == finished_before && next == n {
            idle_since_progress + 1
        } else {
            0
        };
        if idle_since_progress > 1 {
            return Err(FragError::Stuck {
                policy: name,
                steps: step,
                waiting: queue.len(),
                running: 0,
            });
        }
        step += 1;
    }
    // Everything finished: the policy must hold nothing (no leaked block, page or range).
    let left = kv.composition(&[]);
    if left.allocated() != 0 {
        return Err(fail(PolicyError::Leaked {
            bytes: left.allocated(),
        }));
    }
    let stride = points.len().div_ceil(config.timeline_points.max(1)).max(1);
    Ok(PolicyReport {
        policy: name,
        granule_tokens: policy.granule_tokens(&config.shape),
        steps: step,
        finished,
        preemptions,
        peak_running: peak,
        busy: busy.finish(),
        saturated: saturated.finish(),
        timeline: points.into_iter().step_by(stride).collect(),
    })
}

#[cfg(test)]
mod tests;
