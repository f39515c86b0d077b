//! The discrete-event simulation of a placement serving a list of requests (see the `plan`
//! module for what is modelled). Each instance runs vkv's scheduling as steps: a colocated or
//! decode instance decodes every running sequence each step; a colocated or prefill instance
//! fills the rest of its step token budget with prefill chunks of waiting requests, first come
//! first served, admitting a request only while `max_num_seqs` and its KV capacity (the
//! request's whole prompt plus output) allow. A request's first token comes at the end of the
//! step that computes its prompt's last chunk (on a prefill instance too: it is streamed from
//! there, as DistServe counts it); its later tokens one per decode step. Requests go to
//! instances round-robin in arrival order (to decode instances, in the order their prefill ends).

use super::profile::Profile;

/// One request: when it arrives (seconds), its prompt and output tokens (output ≥ 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimRequest {
    pub arrival: f64,
    pub prompt: usize,
    pub output: usize,
}

/// What a request saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Arrival to the first token.
    pub ttft: f64,
    /// Time per output token after the first; `None` with one output token.
    pub tpot: Option<f64>,
}

/// How instances are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// This many instances each running both phases.
    Colocated { replicas: usize },
    /// Prefill instances handing their KV to decode instances.
    Disaggregated { prefill: usize, decode: usize },
}

impl Placement {
    /// Instances in all.
    pub fn instances(&self) -> usize {
        match *self {
            Placement::Colocated { replicas } => replicas,
            Placement::Disaggregated { prefill, decode } => prefill + decode,
        }
    }
}

/// An instance's scheduling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub kv_capacity_tokens: usize,
}

impl InstanceLimits {
    pub fn of(profile: &Profile) -> InstanceLimits {
        InstanceLimits {
            max_num_batched_tokens: profile.max_num_batched_tokens,
            max_num_seqs: profile.max_num_seqs,
            kv_capacity_tokens: profile.kv_capacity_tokens,
        }
    }
}

/// The KV handoff from a prefill to a decode instance: `latency + bytes / bandwidth` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Handoff {
    pub kv_bytes_per_token: usize,
    /// Bytes per second.
    pub bandwidth: f64,
    /// Seconds per request besides the bytes.
    pub latency: f64,
}

impl Handoff {
    /// Handing off KV of `profile`'s model over `bandwidth` bytes/s, `latency` s per request.
    pub fn of(profile: &Profile, bandwidth: f64, latency: f64) -> Handoff {
        Handoff {
            kv_bytes_per_token: profile.kv_bytes_per_token,
            bandwidth,
            latency,
        }
    }

    pub fn seconds(&self, tokens: usize) -> f64 {
        self.latency + (tokens * self.kv_bytes_per_token) as f64 / self.bandwidth
    }
}

/// A request on an instance: what is computed of it and what it has produced.
#[derive(Debug, Clone, Copy)]
struct Seq {
    index: usize,
    /// Prompt tokens computed (== prompt once prefilled).
    computed: usize,
    prompt: usize,
    output: usize,
    /// Output tokens produced so far.
    produced: usize,
}

/// What one instance does with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Both,
    Prefill,
    Decode,
}

/// Run one instance over `(ready time, request index)` in time order; for every request, when
/// each of its tokens was produced on this instance (a prefill instance produces the first
/// only; a decode instance the rest, its requests arriving with the first already produced).
fn run_instance(
    role: Role,
    profile: &Profile,
    requests: &[SimRequest],
    arrivals: &[(f64, usize)],
) -> Vec<(usize, Vec<f64>)> {
    let limits = InstanceLimits::of(profile);
    let mut out: Vec<(usize, Vec<f64>)> = Vec::with_capacity(arrivals.len());
    let mut slot_of = vec![usize::MAX; requests.len()];
    let mut next = 0;
    let mut waiting: std::collections::VecDeque<Seq> = Default::default();
    let mut running: Vec<Seq> = Vec::new();
    let mut reserved = 0usize;
    let mut t = 0f64;
    loop {
        while next < arrivals.len() && arrivals[next].0 <= t {
            let i = arrivals[next].1;
            let r = requests[i];
            slot_of[i] = out.len();
            out.push((i, Vec::new()));
            let computed = if role == Role::Decode { r.prompt } else { 0 };
            let produced = usize::from(role == Role::Decode);
            waiting.push_back(Seq {
                index: i,
                computed,
                prompt: r.prompt,
                output: r.output,
                produced,
            });
            next += 1;
        }
        if waiting.is_empty() && running.is_empty() {
            match arrivals.get(next) {
                Some(&(at, _)) => {
                    t = t.max(at);
                    continue;
                }
                None => break,
            }
        }
        // Admit from the head while places and KV allow (a request larger than the whole KV
        // is admitted alone, so the simulation cannot stall).
        while let Some(s) = waiting.front() {
            let need = if role == Role::Prefill {
                s.prompt
            } else {
                s.prompt + s.output
            };
            let fits = reserved + need <= limits.kv_capacity_tokens || running.is_empty();
            if running.len() >= limits.max_num_seqs || !fits {
                break;
            }
            reserved += need;
            running.push(waiting.pop_front().expect("the head"));
        }
        // The step: every prefilled sequence decodes a token; prompts fill the budget left.
        let mut budget = limits.max_num_batched_tokens;
        let (mut batch, mut context_sum) = (0, 0);
        let mut chunks = Vec::new();
        let mut planned = Vec::with_capacity(running.len());
        for s in running.iter() {
            if s.computed == s.prompt {
                batch += 1;
                context_sum += s.prompt + s.produced;
                budget = budget.saturating_sub(1);
                planned.push(0);
            } else {
                planned.push(usize::MAX);
            }
        }
        for (s, take) in running.iter().zip(planned.iter_mut()) {
            if *take == usize::MAX {
                let k = (s.prompt - s.computed).min(budget);
                budget -= k;
                *take = k;
                if k > 0 {
                    chunks.push((s.computed, k));
                }
            }
        }
        if batch == 0 && chunks.is_empty() {
            // Nothing can run yet (budget of 0): wait for the next arrival.
            match arrivals.get(next) {
                Some(&(at, _)) => {
                    t = t.max(at);
                    continue;
                }
                None => break,
            }
        }
        t += profile.prefill.seconds(chunks.iter().copied())
            + profile.decode.seconds(batch, context_sum);
        let mut kept = Vec::with_capacity(running.len());
        for (mut s, take) in running.drain(..).zip(planned) {
            let times = &mut out[slot_of[s.index]].1;
            if s.computed == s.prompt {
                s.produced += 1;
                times.push(t);
            } else {
                s.computed += take;
                if s.computed == s.prompt {
                    s.produced += 1;
                    times.push(t);
                }
            }
            let done = s.produced >= s.output || (role == Role::Prefill && s.produced == 1);
            if done {
                reserved -= if role == Role::Prefill {
                    s.prompt
                } else {
                    s.prompt + s.output
                };
            } else {
                kept.push(s);
            }
        }
        running = kept;
    }
    out
}

/// `ready` (in time order) dealt to `instances` instances (at least one) in turn.
fn round_robin(ready: &[(f64, usize)], instances: usize) -> Vec<Vec<(f64, usize)>> {
    let n = instances.max(1);
    (0..n)
        .map(|r| ready.iter().skip(r).step_by(n).copied().collect())
        .collect()
}

/// Serve `requests` (in arrival order) on `placement`, every instance of `prefill` (colocated:
/// every instance) and `decode` profiles; each request's outcome, in order.
pub fn simulate(
    placement: Placement,
    prefill: &Profile,
    decode: &Profile,
    handoff: Handoff,
    requests: &[SimRequest],
) -> Vec<Outcome> {
    let mut token_times: Vec<Vec<f64>> = vec![Vec::new(); requests.len()];
    let arrived: Vec<(f64, usize)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.arrival, i))
        .collect();
    match placement {
        Placement::Colocated { replicas } => {
            for arrivals in round_robin(&arrived, replicas) {
                for (i, times) in run_instance(Role::Both, prefill, requests, &arrivals) {
                    token_times[i] = times;
                }
            }
        }
        Placement::Disaggregated {
            prefill: p,
            decode: d,
        } => {
            let mut first = Vec::with_capacity(requests.len());
            for arrivals in round_robin(&arrived, p) {
                for (i, times) in run_instance(Role::Prefill, prefill, requests, &arrivals) {
                    let at = times[0];
                    token_times[i] = times;
                    if requests[i].output > 1 {
                        first.push((at + handoff.seconds(requests[i].prompt), i));
                    }
                }
            }
            first.sort_by(|a, b| a.0.total_cmp(&b.0));
            for arrivals in round_robin(&first, d) {
                for (i, times) in run_instance(Role::Decode, decode, requests, &arrivals) {
                    token_times[i].extend(times);
                }
            }
        }
    }
    requests
        .iter()
        .zip(token_times)
        .map(|(r, times)| {
            let first = times[0];
            let last = *times.last().expect("a first token");
            Outcome {
                ttft: first - r.arrival,
                tpot: (times.len() > 1).then(|| (last - first) / (times.len() - 1) as f64),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::profile::{DecodeModel, PrefillModel};

    pub(crate) fn profile(
        prefill: PrefillModel,
        decode: DecodeModel,
        limits: InstanceLimits,
    ) -> Profile {
        Profile {
            device: "model".into(),
            model: "model".into(),
            date: "2026-12-07".into(),
            tensor_parallel: 1,
            kv_bytes_per_token: 131_072,
            kv_capacity_tokens: limits.kv_capacity_tokens,
            max_model_len: 0,
            max_num_batched_tokens: limits.max_num_batched_tokens,
            max_num_seqs: limits.max_num_seqs,
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
            prefill,
            decode,
        }
    }

    /// Poisson arrivals at `rate`, seeded.
    fn poisson(n: usize, rate: f64, prompt: usize, output: usize, seed: u64) -> Vec<SimRequest> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = 0.0;
        (0..n)
            .map(|_| {
                let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                t += -u.ln() / rate;
                SimRequest {
                    arrival: t,
                    prompt,
                    output,
                }
            })
            .collect()
    }

    const NO_HANDOFF: Handoff = Handoff {
        kv_bytes_per_token: 0,
        bandwidth: 1.0,
        latency: 0.0,
    };

    /// One prompt per step (the budget is one prompt), a fixed service time: an M/D/1 queue,
    /// whose mean wait is ρS / (2(1 − ρ)) (Pollaczek–Khinchine).
    #[test]
    fn a_prefill_instance_one_prompt_at_a_time_is_an_m_d_1_queue() {
        let service = 0.1;
        let p = profile(
            PrefillModel {
                a: service,
                b: 0.0,
                c: 0.0,
            },
            DecodeModel {
                a: 0.0,
                b: 0.0,
                c: 0.0,
            },
            InstanceLimits {
                max_num_batched_tokens: 512,
                max_num_seqs: 64,
                kv_capacity_tokens: 1 << 20,
            },
        );
        for rho in [0.3, 0.6, 0.8] {
            let requests = poisson(200_000, rho / service, 512, 1, 7);
            let out = simulate(
                Placement::Disaggregated {
                    prefill: 1,
                    decode: 1,
                },
                &p,
                &p,
                NO_HANDOFF,
                &requests,
            );
            let mean = out.iter().map(|o| o.ttft).sum::<f64>() / out.len() as f64;
            let expected = service + rho * service / (2.0 * (1.0 - rho));
            assert!(
                (mean - expected).abs() / expected < 0.03,
                "ρ {rho}: mean TTFT {mean:.4} s, M/D/1 says {expected:.4} s"
            );
        }
    }

    /// A batch arriving at once on a decode instance: step `k` takes `a + b·(B·(P + k)) + c·B`
    /// (every sequence's context grows by one per step), so its token times are their sums.
    #[test]
    fn a_fixed_batch_decodes_on_the_timeline_of_its_steps() {
        let decode = DecodeModel {
            a: 0.01,
            b: 1e-6,
            c: 1e-4,
        };
        let limits = InstanceLimits {
            max_num_batched_tokens: 8192,
            max_num_seqs: 8,
            kv_capacity_tokens: 1 << 20,
        };
        let p = profile(
            PrefillModel {
                a: 0.0,
                b: 0.0,
                c: 0.0,
            },
            decode,
            limits,
        );
        let (batch, prompt, output) = (8, 1000, 5);
        let requests = vec![
            SimRequest {
                arrival: 0.0,
                prompt,
                output,
            };
            batch
        ];
        let arrivals: Vec<(f64, usize)> = (0..batch).map(|i| (0.0, i)).collect();
        let out = run_instance(Role::Decode, &p, &requests, &arrivals);
        let mut t = 0.0;
        let mut expected = Vec::new();
        for k in 1..output {
            t += decode.a + decode.b * (batch * (prompt + k)) as f64 + decode.c * batch as f64;
            expected.push(t);
        }
        for (_, times) in out {
            assert_eq!(times.len(), output - 1);
            for (got, want) in times.iter().zip(&expected) {
                assert!((got - want).abs() < 1e-12, "{times:?} vs {expected:?}");
            }
        }
    }

    /// Every request gets all its tokens, in time order, after it arrives; KV never overcommits
    /// (shown by the tiny capacity still finishing everything).
    #[test]
    fn every_request_finishes_in_both_placements() {
        let p = profile(
            PrefillModel {
                a: 0.005,
                b: 1e-5,
                c: 1e-9,
            },
            DecodeModel {
                a: 0.008,
                b: 1e-8,
                c: 1e-5,
            },
            InstanceLimits {
                max_num_batched_tokens: 256,
                max_num_seqs: 4,
                kv_capacity_tokens: 3000,
            },
        );
        let mut requests = poisson(300, 20.0, 700, 30, 3);
        requests[5].prompt = 5000; // larger than the KV: admitted alone
        for placement in [
            Placement::Colocated { replicas: 2 },
            Placement::Disaggregated {
                prefill: 1,
                decode: 2,
            },
        ] {
            let handoff = Handoff {
                kv_bytes_per_token: 1000,
                bandwidth: 1e9,
                latency: 1e-4,
            };
            let out = simulate(placement, &p, &p, handoff, &requests);
            assert_eq!(out.len(), requests.len());
            for o in &out {
                assert!(
                    o.ttft > 0.0 && o.tpot.is_some_and(|t| t > 0.0),
                    "{placement:?}: {o:?}"
                );
            }
        }
    }
}
