//! The discrete-event simulation of a placement serving a list of requests (see the `plan`
//! module for what is modelled). Every instance is vkv's own [`Scheduler`] — the one the engine
//! runs — deciding each step (decodes first, then prefill chunks within the token budget,
//! admissions while places and KV allow, preemption by recompute when KV runs out) against the
//! books of a paged cache of the profile's capacity; the step then takes the time the profile's
//! models give its chunks and decodes ([`step_seconds`]). A request's first token comes at the
//! end of the step that computes its prompt's last chunk (on a prefill instance too: it is
//! streamed from there, as DistServe counts it); its later tokens one per decode step. Each
//! request goes, when it arrives (to a decode instance: when its prefill and handoff end), to
//! the least loaded instance as `vkv route` judges load — prompt tokens in flight for prefill,
//! requests in flight then KV in use otherwise.

use vkv_engine::kv::{KvDims, NoPools, PagedKv, SeqId};
use vkv_engine::scheduler::{Scheduler, SchedulerConfig, SeqRequest};

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

/// How the exporting instance's KV is laid out, which sets the copies a handoff takes (what
/// `vkv bench handoff` counts; see `kv::handoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvLayout {
    /// vmm token-major: a prompt's KV is one contiguous run.
    TokenMajor,
    /// vmm per-layer: one run per layer and K/V.
    PerLayer,
    /// paged: one run per block, layer, K/V and KV head (blocks scatter in serving).
    Paged { block_tokens: usize },
}

impl KvLayout {
    /// `token-major`, `per-layer` or `paged` (16-token blocks), as `--kv-layout` takes them.
    pub fn parse(spec: &str) -> Option<KvLayout> {
        match spec {
            "token-major" | "vmm" => Some(KvLayout::TokenMajor),
            "per-layer" => Some(KvLayout::PerLayer),
            "paged" => Some(KvLayout::Paged { block_tokens: 16 }),
            _ => None,
        }
    }

    /// Copies to hand over `tokens` tokens of a model of `layers` layers and `kv_heads` KV heads.
    pub fn copies(&self, tokens: usize, layers: usize, kv_heads: usize) -> usize {
        match *self {
            KvLayout::TokenMajor => 1,
            KvLayout::PerLayer => 2 * layers,
            KvLayout::Paged { block_tokens } => {
                tokens.div_ceil(block_tokens.max(1)) * 2 * layers * kv_heads
            }
        }
    }
}

/// The KV handoff from a prefill to a decode instance: `latency + copies × copy_seconds +
/// bytes / bandwidth` seconds per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Handoff {
    pub kv_bytes_per_token: usize,
    /// Bytes per second.
    pub bandwidth: f64,
    /// Seconds per request besides the bytes.
    pub latency: f64,
    pub layout: KvLayout,
    /// Seconds each copy costs besides its bytes (a copy call's issue cost).
    pub copy_seconds: f64,
    /// The model's layers and KV heads (what a paged or per-layer handoff's copies scale with).
    pub layers: usize,
    pub kv_heads: usize,
}

impl Handoff {
    /// Handing off KV of `profile`'s model over `bandwidth` bytes/s, `latency` s per request,
    /// from a token-major layout (one copy).
    pub fn of(profile: &Profile, bandwidth: f64, latency: f64) -> Handoff {
        let (layers, kv_heads) = profile
            .shape
            .as_ref()
            .map_or((1, 1), |s| (s.layers, s.kv_heads));
        Handoff {
            kv_bytes_per_token: profile.kv_bytes_per_token,
            bandwidth,
            latency,
            layout: KvLayout::TokenMajor,
            copy_seconds: 0.0,
            layers,
            kv_heads,
        }
    }

    /// The same handoff from `layout`, each copy costing `copy_seconds`.
    pub fn with_layout(self, layout: KvLayout, copy_seconds: f64) -> Handoff {
        Handoff {
            layout,
            copy_seconds,
            ..self
        }
    }

    pub fn seconds(&self, tokens: usize) -> f64 {
        let copies = self.layout.copies(tokens, self.layers, self.kv_heads);
        self.latency
            + copies as f64 * self.copy_seconds
            + (tokens * self.kv_bytes_per_token) as f64 / self.bandwidth
    }
}

/// What one instance does with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Both,
    Prefill,
    Decode,
}

/// The seconds of one step computing prefill `chunks` (`(start, tokens)`) and decoding `batch`
/// sequences of `context_sum` tokens of context together. Alone, each is its model. Together,
/// the two parts less what mixing saves (at least either part alone): the profile's fitted
/// [`Profile::mixed_saving`] where it measured mixed steps, else the decode model's constant —
/// a pass over the weights and the per-step launches, which the prefill part pays already.
pub fn step_seconds(
    profile: &Profile,
    chunks: &[(usize, usize)],
    batch: usize,
    context_sum: usize,
) -> f64 {
    let prefill = profile.prefill.seconds(chunks.iter().copied());
    let decode = profile.decode.seconds(batch, context_sum);
    if chunks.is_empty() || batch == 0 {
        return prefill + decode;
    }
    let saving = profile
        .mixed_saving
        .unwrap_or_else(|| profile.decode.a.max(0.0));
    (prefill + decode - saving).max(prefill.max(decode))
}

/// One instance: vkv's own [`Scheduler`] deciding each step against the books of a paged cache
/// of the profile's capacity ([`PagedKv::books_only`]) — KV reserved as tokens arrive,
/// preemption by recompute when it runs out — and the clock of its steps. A prefill instance
/// produces each request's first token only; a decode instance the rest, its requests arriving
/// with the prompt's KV and the first token (as `handed_over` sequences, exactly as the engine
/// admits them).
struct Instance<'a> {
    role: Role,
    profile: &'a Profile,
    scheduler: Scheduler,
    kv: PagedKv<NoPools>,
    /// When its last step ended (or since when it has been idle).
    t: f64,
    /// What `vkv route` counts of its requests there until they leave: how many, and (prefill)
    /// their prompt tokens.
    in_flight: usize,
    prompt_tokens_in_flight: usize,
    chunks: Vec<(usize, usize)>,
    sampled: Vec<(SeqId, u32)>,
}

impl<'a> Instance<'a> {
    fn new(role: Role, profile: &'a Profile) -> Instance<'a> {
        let limits = InstanceLimits::of(profile);
        let block = profile.kv_block_tokens();
        let dims = KvDims {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
        };
        Instance {
            role,
            profile,
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: limits.max_num_seqs.max(1),
                max_num_batched_tokens: limits.max_num_batched_tokens.max(1),
            }),
            kv: PagedKv::books_only(dims, 1, (limits.kv_capacity_tokens / block).max(1), block)
                .expect("a block size of at least 1 token"),
            t: 0.0,
            in_flight: 0,
            prompt_tokens_in_flight: 0,
            chunks: Vec::new(),
            sampled: Vec::new(),
        }
    }

    /// How loaded `vkv route` finds it, smaller first: a prefill instance by the prompt tokens
    /// of the requests there, a decode (or colocated) instance by the requests there, then by
    /// its KV in use (blocks held; no prefix caching, so none is kept evictable).
    fn load(&self) -> (usize, usize) {
        match self.role {
            Role::Prefill => (self.prompt_tokens_in_flight, self.in_flight),
            _ => (self.in_flight, self.kv.num_blocks() - self.kv.free_blocks()),
        }
    }

    /// Take request `i` (at the instance's present time).
    fn add(&mut self, i: usize, r: SimRequest) {
        let request = SeqRequest {
            id: i as SeqId,
            prompt: vec![0; r.prompt.max(1)],
            max_tokens: if self.role == Role::Prefill {
                1
            } else {
                r.output
            },
            cache_salt: None,
            fork_of: None,
            beam_width: None,
            whole_prompt: false,
            handed_over: (self.role == Role::Decode).then_some(0),
        };
        // Refused (it could never fit this instance's KV): no tokens, a TTFT of infinity.
        if self.scheduler.add(request, &self.kv).is_ok() {
            self.in_flight += 1;
            self.prompt_tokens_in_flight += r.prompt;
        }
    }

    /// Run one step if there is anything to compute, each token it produces timed in `times`
    /// (by request); whether there was.
    fn step(&mut self, requests: &[SimRequest], times: &mut [Vec<f64>]) -> bool {
        if self.scheduler.is_idle() {
            return false;
        }
        let step = self
            .scheduler
            .schedule(&mut self.kv)
            .expect("books without memory fail only on a bug");
        if step.chunks.is_empty() {
            return false;
        }
        self.chunks.clear();
        self.sampled.clear();
        let (mut batch, mut context_sum) = (0, 0);
        for c in &step.chunks {
            let prompt = requests[c.seq as usize].prompt.max(1);
            if c.tokens.len() == 1 && c.start >= prompt {
                batch += 1;
                context_sum += c.start + 1;
            } else {
                self.chunks.push((c.start, c.tokens.len()));
            }
            if c.samples {
                self.sampled.push((c.seq, 0u32));
            }
        }
        self.t += step_seconds(self.profile, &self.chunks, batch, context_sum);
        for &(seq, _) in &self.sampled {
            times[seq as usize].push(self.t);
        }
        let done = self
            .scheduler
            .update(&step, &self.sampled, &mut self.kv)
            .expect("books without memory fail only on a bug");
        for seq in done {
            self.in_flight -= 1;
            self.prompt_tokens_in_flight -= requests[seq as usize].prompt;
        }
        true
    }

    /// Run steps until one ends at or after `at` (a step under way then goes on), or until
    /// there is nothing to compute (then it idles until `at`).
    fn advance_to(&mut self, at: f64, requests: &[SimRequest], times: &mut [Vec<f64>]) {
        while self.t < at {
            if !self.step(requests, times) {
                self.t = at;
            }
        }
    }

    /// Run until everything given to it is done.
    fn drain(&mut self, requests: &[SimRequest], times: &mut [Vec<f64>]) {
        while self.step(requests, times) {}
    }
}

/// Instances of one role serving `ready` (`(time, request index)` in time order), each request
/// sent on arrival to the least loaded instance as `vkv route` sends it ([`Instance::load`],
/// the first on a tie); the times of the tokens they produce are added to `times` (by request:
/// none for one refused, as it could never fit an instance's KV). Returns the preemptions.
fn serve(
    role: Role,
    profile: &Profile,
    instances: usize,
    requests: &[SimRequest],
    ready: &[(f64, usize)],
    times: &mut [Vec<f64>],
) -> u64 {
    let mut pool: Vec<Instance> = (0..instances.max(1))
        .map(|_| Instance::new(role, profile))
        .collect();
    for &(at, i) in ready {
        for instance in pool.iter_mut() {
            instance.advance_to(at, requests, times);
        }
        let target = pool
            .iter_mut()
            .min_by_key(|x| x.load())
            .expect("at least one instance");
        target.add(i, requests[i]);
    }
    pool.iter_mut()
        .map(|instance| {
            instance.drain(requests, times);
            instance.scheduler.preemptions()
        })
        .sum()
}

/// What a placement did with a list of requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Each request's outcome, in the order given.
    pub outcomes: Vec<Outcome>,
    /// Preemptions (by recompute) over all instances.
    pub preemptions: u64,
}

/// Serve `requests` (in arrival order) on `placement`, every instance of `prefill` (colocated:
/// every instance) and `decode` profiles. A request an instance refuses (its prompt and output
/// could never fit the instance's KV) has a TTFT of infinity and no TPOT.
pub fn simulate(
    placement: Placement,
    prefill: &Profile,
    decode: &Profile,
    handoff: Handoff,
    requests: &[SimRequest],
) -> Simulation {
    let mut token_times: Vec<Vec<f64>> = vec![Vec::new(); requests.len()];
    let arrived: Vec<(f64, usize)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.arrival, i))
        .collect();
    let preemptions = match placement {
        Placement::Colocated { replicas } => serve(
            Role::Both,
            prefill,
            replicas,
            requests,
            &arrived,
            &mut token_times,
        ),
        Placement::Disaggregated {
            prefill: p,
            decode: d,
        } => {
            let on_prefill = serve(
                Role::Prefill,
                prefill,
                p,
                requests,
                &arrived,
                &mut token_times,
            );
            // Each request with more to generate goes on once its first token and KV handoff are
            // done; the decode instances add its later tokens.
            let mut first: Vec<(f64, usize)> = token_times
                .iter()
                .enumerate()
                .filter(|&(i, t)| requests[i].output > 1 && !t.is_empty())
                .map(|(i, t)| (t[0] + handoff.seconds(requests[i].prompt), i))
                .collect();
            first.sort_by(|a, b| a.0.total_cmp(&b.0));
            on_prefill + serve(Role::Decode, decode, d, requests, &first, &mut token_times)
        }
    };
    let outcomes = requests
        .iter()
        .zip(token_times)
        .map(|(r, times)| match (times.first(), times.last()) {
            (Some(&first), Some(&last)) if times.len() >= r.output.min(2) => Outcome {
                ttft: first - r.arrival,
                tpot: (times.len() > 1).then(|| (last - first) / (times.len() - 1) as f64),
            },
            // Refused, by the prefill instance or by the decode instance.
            _ => Outcome {
                ttft: f64::INFINITY,
                tpot: None,
            },
        })
        .collect();
    Simulation {
        outcomes,
        preemptions,
    }
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
            kv_block_tokens: 16,
            shape: None,
            modelled: None,
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
            mixed_samples: Vec::new(),
            mixed_saving: None,
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
        layout: KvLayout::TokenMajor,
        copy_seconds: 0.0,
        layers: 1,
        kv_heads: 1,
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
            )
            .outcomes;
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
        let mut out = vec![Vec::new(); requests.len()];
        serve(Role::Decode, &p, 1, &requests, &arrivals, &mut out);
        let mut t = 0.0;
        let mut expected = Vec::new();
        for k in 1..output {
            t += decode.a + decode.b * (batch * (prompt + k)) as f64 + decode.c * batch as f64;
            expected.push(t);
        }
        for times in out {
            assert_eq!(times.len(), output - 1);
            for (got, want) in times.iter().zip(&expected) {
                assert!((got - want).abs() < 1e-12, "{times:?} vs {expected:?}");
            }
        }
    }

    /// Every request that fits gets all its tokens after it arrives, through preemptions when
    /// the KV is short; one that could never fit is refused, as the engine refuses it.
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
                // Two requests of 1100 tokens do not fit: the scheduler preempts (on a decode
                // instance too, where two are admitted at 701 tokens and grow).
                kv_capacity_tokens: 2000,
            },
        );
        let mut requests = poisson(300, 10.0, 700, 400, 3);
        requests[5].prompt = 5000; // larger than the KV: refused
        for placement in [
            Placement::Colocated { replicas: 2 },
            Placement::Disaggregated {
                prefill: 1,
                decode: 1,
            },
        ] {
            let handoff = Handoff {
                kv_bytes_per_token: 1000,
                bandwidth: 1e9,
                latency: 1e-4,
                ..NO_HANDOFF
            };
            let sim = simulate(placement, &p, &p, handoff, &requests);
            assert_eq!(sim.outcomes.len(), requests.len());
            assert!(sim.preemptions > 0, "{placement:?}");
            for (i, o) in sim.outcomes.iter().enumerate() {
                if i == 5 {
                    assert!(o.ttft.is_infinite() && o.tpot.is_none(), "{o:?}");
                } else {
                    assert!(
                        o.ttft > 0.0 && o.ttft.is_finite() && o.tpot.is_some_and(|t| t > 0.0),
                        "{placement:?}: {o:?}"
                    );
                }
            }
        }
    }

    /// Requests go to the least loaded instance, as `vkv route` sends them: beside one long
    /// request, every short one finds the other instance free and decodes alone.
    #[test]
    fn requests_go_to_the_least_loaded_instance() {
        let decode = DecodeModel {
            a: 0.01,
            b: 0.0,
            c: 0.005,
        };
        let p = profile(
            PrefillModel {
                a: 0.0,
                b: 0.0,
                c: 0.0,
            },
            decode,
            InstanceLimits {
                max_num_batched_tokens: 2048,
                max_num_seqs: 8,
                kv_capacity_tokens: 1 << 20,
            },
        );
        let mut requests = vec![SimRequest {
            arrival: 0.0,
            prompt: 100,
            output: 2000,
        }];
        // Each short request ends (10 tokens of 15 ms) before the next arrives.
        requests.extend((1..20).map(|k| SimRequest {
            arrival: k as f64 * 0.5,
            prompt: 100,
            output: 10,
        }));
        let ready: Vec<(f64, usize)> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.arrival, i))
            .collect();
        let mut times = vec![Vec::new(); requests.len()];
        serve(Role::Decode, &p, 2, &requests, &ready, &mut times);
        let alone = decode.seconds(1, 0);
        for (i, t) in times.iter().enumerate().skip(1) {
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(
                gaps.iter().all(|g| (g - alone).abs() < 1e-9),
                "request {i} shared its steps: {gaps:?}"
            );
        }
    }

    /// A step of prefill chunks and decodes together pays the decode constant once; alone,
    /// each part is its model.
    #[test]
    fn a_mixed_step_counts_the_pass_over_the_weights_once() {
        let p = profile(
            PrefillModel {
                a: 0.01,
                b: 1e-4,
                c: 0.0,
            },
            DecodeModel {
                a: 0.008,
                b: 1e-7,
                c: 1e-5,
            },
            InstanceLimits {
                max_num_batched_tokens: 2048,
                max_num_seqs: 64,
                kv_capacity_tokens: 1 << 20,
            },
        );
        let prefill = 0.01 + 1e-4 * 100.0;
        let decode = 0.008 + 1e-7 * 4000.0 + 1e-5 * 4.0;
        assert!((step_seconds(&p, &[(0, 100)], 0, 0) - prefill).abs() < 1e-12);
        assert!((step_seconds(&p, &[], 4, 4000) - decode).abs() < 1e-12);
        let mixed = step_seconds(&p, &[(0, 100)], 4, 4000);
        assert!(
            (mixed - (prefill + decode - 0.008)).abs() < 1e-12,
            "{mixed}"
        );
    }

    /// The copies of a handoff: one for token-major, one per layer and K/V for per-layer, one
    /// per block, layer, K/V and head for paged; each copy adds its cost.
    #[test]
    fn a_handoff_costs_its_layouts_copies() {
        let (tokens, layers, heads) = (1000, 32, 8);
        assert_eq!(KvLayout::TokenMajor.copies(tokens, layers, heads), 1);
        assert_eq!(KvLayout::PerLayer.copies(tokens, layers, heads), 64);
        let paged = KvLayout::Paged { block_tokens: 16 };
        assert_eq!(paged.copies(tokens, layers, heads), 63 * 64 * 8);
        let base = Handoff {
            kv_bytes_per_token: 131_072,
            bandwidth: 100e9,
            latency: 1e-4,
            layers,
            kv_heads: heads,
            ..NO_HANDOFF
        };
        let bytes = 1e-4 + 131_072.0 * 1000.0 / 100e9;
        assert!((base.seconds(tokens) - bytes).abs() < 1e-12);
        let paged = base.with_layout(paged, 1e-6);
        assert!((paged.seconds(tokens) - (bytes + 32_256e-6)).abs() < 1e-9);
    }
}
