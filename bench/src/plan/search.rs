//! Goodput and placement search (DistServe §4.1, its "low node-affinity" Algorithm 1 with
//! instance types from profiles): the highest request rate a placement serves with SLO
//! attainment at the target, by bisection over simulations of the same arrival pattern scaled
//! (common random numbers, so attainment falls with the rate without sampling noise); and, for
//! a GPU budget, every colocated and disaggregated placement that fits — prefill instances
//! sized by the rate one prefill instance sustains within the TTFT target, decode instances by
//! the rate one decode instance sustains within the TPOT target, combined in the ratio that
//! balances them, then checked (and its rate found again) by simulating the whole placement.

use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;

use super::profile::Profile;
use super::simulate::{simulate, Handoff, KvLayout, Outcome, Placement, SimRequest};
use crate::offline::Summary;
use crate::workload::RequestShape;

/// Latency targets: P-th percentile TTFT and TPOT (seconds), met together by `attainment` of
/// the requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    pub ttft: f64,
    pub tpot: f64,
    /// Share of requests that must meet both (DistServe's 90 %).
    pub attainment: f64,
}

impl Slo {
    /// The share of outcomes meeting both targets (a one-token request has no TPOT to miss).
    pub fn attained(&self, outcomes: &[Outcome]) -> f64 {
        if outcomes.is_empty() {
            return 1.0;
        }
        let met = outcomes
            .iter()
            .filter(|o| o.ttft <= self.ttft && o.tpot.is_none_or(|t| t <= self.tpot))
            .count();
        met as f64 / outcomes.len() as f64
    }
}

/// Requests of `shapes` arriving as a Poisson process (seeded), at any rate. The gaps are drawn
/// as `vkv bench offline --request-rate R --seed S` draws them (the same generator and seed,
/// `Exp(R)` being `Exp(1) / R`), so a simulation and a measured run with the same seed and
/// workload see the same requests at the same times. At a rate `R`, at least
/// `R × min_duration` requests arrive (the shapes repeated): with a fixed count, a high enough
/// rate turns into one burst that a fast instance may clear within the targets, which is not a
/// rate it sustains.
#[derive(Debug, Clone)]
pub struct Arrivals {
    shapes: Vec<RequestShape>,
    seed: u64,
    min_duration: f64,
}

impl Arrivals {
    pub fn new(shapes: &[RequestShape], seed: u64, min_duration: f64) -> Arrivals {
        Arrivals {
            shapes: shapes.to_vec(),
            seed,
            min_duration,
        }
    }

    pub fn at_rate(&self, rate: f64) -> Vec<SimRequest> {
        if self.shapes.is_empty() {
            return Vec::new();
        }
        let n = self
            .shapes
            .len()
            .max((rate * self.min_duration).ceil() as usize);
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ 0x5eed);
        let mut t = 0.0;
        (0..n)
            .map(|i| {
                let gap: f64 = rand_distr::Exp1.sample(&mut rng);
                t += gap / rate;
                let s = self.shapes[i % self.shapes.len()];
                SimRequest {
                    arrival: t,
                    prompt: s.prompt_len.max(1),
                    output: s.output_len.max(1),
                }
            })
            .collect()
    }
}

/// The highest rate (requests/s) at which `attained(rate)` reaches `target`: doubling from
/// `start` until it fails, then bisection until the bracket is within 0.5 % of the rate (at
/// most 20 steps); 0 if even `start / 2^20` fails.
fn highest_rate(start: f64, target: f64, attained: impl Fn(f64) -> f64) -> f64 {
    let (mut lo, mut hi) = (0.0, start);
    while attained(hi) >= target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e9 {
            return lo;
        }
    }
    for _ in 0..20 {
        if hi - lo <= 0.005 * hi {
            break;
        }
        let mid = (lo + hi) / 2.0;
        if attained(mid) >= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The highest rate `placement` serves with `slo` met.
pub fn max_rate(
    placement: Placement,
    prefill: &Profile,
    decode: &Profile,
    handoff: Handoff,
    arrivals: &Arrivals,
    slo: Slo,
) -> f64 {
    highest_rate(1.0, slo.attainment, |rate| {
        slo.attained(
            &simulate(placement, prefill, decode, handoff, &arrivals.at_rate(rate)).outcomes,
        )
    })
}

/// One placement's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacementResult {
    pub placement: Placement,
    /// Names of the profiles (prefill and decode; the same for colocated).
    pub prefill_profile: String,
    pub decode_profile: String,
    pub gpus: usize,
    /// Disaggregated: whether every prefill instance hands its KV to decode instances in its
    /// own node (the handoff at the in-node bandwidth) or across nodes (at the network's).
    pub handoff: Option<HandoffPath>,
    /// The highest rate meeting the SLO, requests/s, and per GPU.
    pub rate: f64,
    pub goodput_per_gpu: f64,
    /// P90 TTFT and TPOT (seconds), the attainment and the preemptions at that rate.
    pub p90_ttft: f64,
    pub p90_tpot: f64,
    pub attainment: f64,
    pub preemptions: u64,
    /// Some of the profiles are modelled, not measured (see `Profile::modelled`).
    pub modelled: bool,
}

/// Where a disaggregated placement's KV handoff goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoffPath {
    /// Prefill and decode instances share nodes in the placement's ratio (DistServe's high
    /// node-affinity placement): NVLink-class bandwidth.
    InNode,
    /// Across nodes (low node-affinity): the network's bandwidth.
    Network,
}

/// The KV handoff's costs: bandwidth in a node and across nodes, latency per request, the
/// exporting layout and the cost of each copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandoffCosts {
    pub in_node_bandwidth: f64,
    pub network_bandwidth: f64,
    pub latency: f64,
    pub layout: KvLayout,
    pub copy_seconds: f64,
}

impl HandoffCosts {
    /// The handoff of `profile`'s KV along `path`.
    pub fn of(&self, profile: &Profile, path: HandoffPath) -> Handoff {
        let bandwidth = match path {
            HandoffPath::InNode => self.in_node_bandwidth,
            HandoffPath::Network => self.network_bandwidth,
        };
        Handoff::of(profile, bandwidth, self.latency).with_layout(self.layout, self.copy_seconds)
    }
}

/// A placement to evaluate: its instances' profiles (by index) and handoff path.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    placement: Placement,
    prefill: usize,
    decode: usize,
    path: Option<HandoffPath>,
}

fn result(
    candidate: Candidate,
    profiles: &[(String, Profile)],
    costs: &HandoffCosts,
    arrivals: &Arrivals,
    slo: Slo,
) -> PlacementResult {
    let (prefill, decode) = (&profiles[candidate.prefill], &profiles[candidate.decode]);
    let handoff = costs.of(&prefill.1, candidate.path.unwrap_or(HandoffPath::InNode));
    let placement = candidate.placement;
    let rate = max_rate(placement, &prefill.1, &decode.1, handoff, arrivals, slo);
    let gpus = match placement {
        Placement::Colocated { replicas } => replicas * prefill.1.tensor_parallel.max(1),
        Placement::Disaggregated {
            prefill: p,
            decode: d,
        } => p * prefill.1.tensor_parallel.max(1) + d * decode.1.tensor_parallel.max(1),
    };
    let at = at_rates(
        placement,
        &prefill.1,
        &decode.1,
        handoff,
        arrivals,
        slo,
        &[rate.max(1e-9)],
    )
    .remove(0);
    PlacementResult {
        placement,
        prefill_profile: prefill.0.clone(),
        decode_profile: decode.0.clone(),
        gpus,
        handoff: candidate.path,
        rate,
        goodput_per_gpu: rate / gpus as f64,
        p90_ttft: at.p90_ttft,
        p90_tpot: at.p90_tpot,
        attainment: at.attainment,
        preemptions: at.preemptions,
        modelled: prefill.1.modelled.is_some() || decode.1.modelled.is_some(),
    }
}

/// One placement simulated at one rate (latencies in seconds, over the requests served).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RatePoint {
    pub rate: f64,
    pub p90_ttft: f64,
    pub p90_tpot: f64,
    pub median_ttft: f64,
    pub median_tpot: f64,
    pub p99_ttft: f64,
    pub p99_tpot: f64,
    pub attainment: f64,
    pub preemptions: u64,
    /// Requests an instance refused (they could never fit its KV).
    pub refused: usize,
}

/// `placement` simulated at each of `rates`: its P90s and attainment there (the curve of
/// attainment against rate, and what a measured run at those rates is compared with).
pub fn at_rates(
    placement: Placement,
    prefill: &Profile,
    decode: &Profile,
    handoff: Handoff,
    arrivals: &Arrivals,
    slo: Slo,
    rates: &[f64],
) -> Vec<RatePoint> {
    rates
        .iter()
        .map(|&rate| {
            let sim = simulate(placement, prefill, decode, handoff, &arrivals.at_rate(rate));
            let served = || sim.outcomes.iter().filter(|o| o.ttft.is_finite());
            let ttft = Summary::of(&served().map(|o| o.ttft).collect::<Vec<f64>>());
            let tpot = Summary::of(&served().filter_map(|o| o.tpot).collect::<Vec<f64>>());
            RatePoint {
                rate,
                p90_ttft: ttft.p90,
                p90_tpot: tpot.p90,
                median_ttft: ttft.median,
                median_tpot: tpot.median,
                p99_ttft: ttft.p99,
                p99_tpot: tpot.p99,
                attainment: slo.attained(&sim.outcomes),
                preemptions: sim.preemptions,
                refused: sim.outcomes.len() - served().count(),
            }
        })
        .collect()
}

/// Every placement of the named `profiles` within `gpus` GPUs worth reporting, best per-GPU
/// goodput first (DistServe §4: its Algorithm 1, low node-affinity, and 2, high):
///
/// - for each profile, the colocated replicas that fill the budget;
/// - for each (prefill, decode) pair of profiles, the prefill:decode counts that balance one
///   prefill instance's TTFT-bound rate against one decode instance's TPOT-bound rate within
///   the budget, handing KV over the network when the nodes are not shared (`gpus_per_node`
///   given and the counts' smallest repeating unit larger than a node), in the node otherwise;
/// - with `gpus_per_node`, also the best balanced unit that fits one node, repeated over the
///   budget's nodes (every handoff in its node).
///
/// An instance wider than a node is not placed. Every placement is simulated whole for its
/// rate, in parallel.
pub fn placements(
    profiles: &[(String, Profile)],
    gpus: usize,
    gpus_per_node: Option<usize>,
    arrivals: &Arrivals,
    slo: Slo,
    costs: &HandoffCosts,
) -> Vec<PlacementResult> {
    use rayon::prelude::*;
    let node = gpus_per_node.unwrap_or(gpus).max(1);
    let tp = |i: usize| profiles[i].1.tensor_parallel.max(1);
    let placeable: Vec<usize> = (0..profiles.len()).filter(|&i| tp(i) <= node).collect();
    let mut candidates = Vec::new();
    for &i in &placeable {
        let replicas = gpus / tp(i);
        if replicas > 0 {
            candidates.push(Candidate {
                placement: Placement::Colocated { replicas },
                prefill: i,
                decode: i,
                path: None,
            });
        }
    }
    // One instance of each phase alone, against its own target (the other met freely). A
    // prefill instance's TTFT does not depend on the decode side: once per profile.
    let only_ttft = Slo {
        tpot: f64::INFINITY,
        ..slo
    };
    let only_tpot = Slo {
        ttft: f64::INFINITY,
        ..slo
    };
    let prefill_rates: Vec<f64> = placeable
        .par_iter()
        .map(|&i| {
            let p = &profiles[i].1;
            let one_prefill = Placement::Disaggregated {
                prefill: 1,
                decode: 1,
            };
            let handoff = costs.of(p, HandoffPath::InNode);
            max_rate(one_prefill, p, p, handoff, arrivals, only_ttft)
        })
        .collect();
    let pairs: Vec<(usize, usize)> = placeable
        .iter()
        .flat_map(|&p| placeable.iter().map(move |&d| (p, d)))
        .collect();
    let decode_rates: Vec<f64> = pairs
        .par_iter()
        .map(|&(p, d)| {
            // Prefill instances enough that they never hold the decode instance back.
            let one_decode = Placement::Disaggregated {
                prefill: 64,
                decode: 1,
            };
            let handoff = costs.of(&profiles[p].1, HandoffPath::InNode);
            max_rate(
                one_decode,
                &profiles[p].1,
                &profiles[d].1,
                handoff,
                arrivals,
                only_tpot,
            )
        })
        .collect();
    for (&(p, d), &decode_rate) in pairs.iter().zip(&decode_rates) {
        let prefill_rate =
            prefill_rates[placeable.iter().position(|&i| i == p).expect("placeable")];
        let (tp_p, tp_d) = (tp(p), tp(d));
        // The weaker phase's capacity of `pc` prefill and `dc` decode instances.
        let capacity =
            |pc: usize, dc: usize| (pc as f64 * prefill_rate).min(dc as f64 * decode_rate);
        // The most balanced counts in `budget` GPUs: for each prefill count, the decode
        // instances the rest holds; keep the pair whose weaker phase is strongest.
        let balanced = |budget: usize| {
            (1..=budget / tp_p)
                .filter_map(|pc| {
                    let dc = (budget - pc * tp_p) / tp_d;
                    (dc >= 1).then_some((pc, dc))
                })
                .max_by(|a, b| {
                    capacity(a.0, a.1)
                        .total_cmp(&capacity(b.0, b.1))
                        .then(b.0.cmp(&a.0))
                })
        };
        if let Some((pc, dc)) = balanced(gpus) {
            let g = gcd(pc, dc);
            let unit = pc / g * tp_p + dc / g * tp_d;
            let path = if gpus_per_node.is_some() && unit > node {
                HandoffPath::Network
            } else {
                HandoffPath::InNode
            };
            candidates.push(Candidate {
                placement: Placement::Disaggregated {
                    prefill: pc,
                    decode: dc,
                },
                prefill: p,
                decode: d,
                path: Some(path),
            });
        }
        // High node-affinity: the best unit in one node, repeated on every node.
        if let (Some(_), Some((pc, dc))) = (gpus_per_node, balanced(node)) {
            let nodes = gpus / node;
            let placement = Placement::Disaggregated {
                prefill: pc * nodes,
                decode: dc * nodes,
            };
            let duplicate = candidates
                .iter()
                .any(|c| c.placement == placement && (c.prefill, c.decode) == (p, d));
            if nodes > 0 && !duplicate {
                candidates.push(Candidate {
                    placement,
                    prefill: p,
                    decode: d,
                    path: Some(HandoffPath::InNode),
                });
            }
        }
    }
    let mut out: Vec<PlacementResult> = candidates
        .par_iter()
        .map(|&c| result(c, profiles, costs, arrivals, slo))
        .collect();
    out.sort_by(|a, b| b.goodput_per_gpu.total_cmp(&a.goodput_per_gpu));
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::profile::{DecodeModel, PrefillModel};
    use proptest::prelude::*;

    fn profile(tp: usize) -> Profile {
        Profile {
            device: "model".into(),
            model: "model".into(),
            date: "2026-12-07".into(),
            tensor_parallel: tp,
            kv_bytes_per_token: 131_072,
            kv_capacity_tokens: 200_000,
            max_model_len: 0,
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
            kv_block_tokens: 16,
            shape: None,
            modelled: None,
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
            mixed_samples: Vec::new(),
            mixed_saving: None,
            prefill: PrefillModel {
                a: 0.01,
                b: 6e-5 / tp as f64,
                c: 1e-9,
            },
            decode: DecodeModel {
                a: 0.012 / tp as f64,
                b: 2e-8,
                c: 2e-5,
            },
        }
    }

    const COSTS: HandoffCosts = HandoffCosts {
        in_node_bandwidth: 50e9,
        network_bandwidth: 5e9,
        latency: 1e-4,
        layout: KvLayout::TokenMajor,
        copy_seconds: 0.0,
    };

    fn shapes(n: usize) -> Vec<RequestShape> {
        crate::workload::Workload::parse("sharegpt")
            .unwrap()
            .sample(n, 1, Some(4096))
    }

    #[test]
    fn attainment_falls_as_the_rate_rises_and_the_highest_rate_is_at_the_target() {
        let p = profile(1);
        let arrivals = Arrivals::new(&shapes(400), 5, 0.0);
        let slo = Slo {
            ttft: 0.5,
            tpot: 0.05,
            attainment: 0.9,
        };
        let handoff = Handoff::of(&p, f64::INFINITY, 0.0);
        let placement = Placement::Colocated { replicas: 1 };
        let at = |rate: f64| {
            slo.attained(&simulate(placement, &p, &p, handoff, &arrivals.at_rate(rate)).outcomes)
        };
        let rates = [0.5, 2.0, 8.0, 32.0];
        let attained: Vec<f64> = rates.iter().map(|&r| at(r)).collect();
        assert!(attained.windows(2).all(|w| w[0] >= w[1]), "{attained:?}");
        let best = max_rate(placement, &p, &p, handoff, &arrivals, slo);
        assert!(
            best > 0.0 && at(best) >= 0.9 && at(best * 1.05) < 0.9,
            "{best}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
        /// A bigger budget admits every placement a smaller one does, so the best total
        /// goodput (rate) never falls as GPUs are added.
        #[test]
        fn more_gpus_never_lower_the_best_goodput(gpus in 1usize..6, seed in 0u64..1000) {
            let profiles = vec![("tp1".to_string(), profile(1)), ("tp2".to_string(), profile(2))];
            let arrivals = Arrivals::new(&shapes(150), seed, 0.0);
            let slo = Slo { ttft: 0.4, tpot: 0.04, attainment: 0.9 };
            let best = |g: usize| {
                placements(&profiles, g, None, &arrivals, slo, &COSTS)
                    .iter()
                    .map(|r| r.rate)
                    .fold(0.0, f64::max)
            };
            let (small, large) = (best(gpus), best(gpus + 1));
            prop_assert!(large >= small * 0.999, "{gpus} GPUs: {small}, {} GPUs: {large}", gpus + 1);
        }
    }
}
