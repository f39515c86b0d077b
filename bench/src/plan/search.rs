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
use super::simulate::{simulate, Handoff, Outcome, Placement, SimRequest};
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
/// `start` until it fails, then 20 bisection steps; 0 if even `start / 2^20` fails.
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
        slo.attained(&simulate(
            placement,
            prefill,
            decode,
            handoff,
            &arrivals.at_rate(rate),
        ))
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
    /// The highest rate meeting the SLO, requests/s, and per GPU.
    pub rate: f64,
    pub goodput_per_gpu: f64,
    /// P90 TTFT and TPOT (seconds) and the attainment at that rate.
    pub p90_ttft: f64,
    pub p90_tpot: f64,
    pub attainment: f64,
}

fn p90(v: Vec<f64>) -> f64 {
    crate::offline::Summary::of(&v).p90
}

fn result(
    placement: Placement,
    prefill: (&str, &Profile),
    decode: (&str, &Profile),
    handoff: Handoff,
    arrivals: &Arrivals,
    slo: Slo,
) -> PlacementResult {
    let rate = max_rate(placement, prefill.1, decode.1, handoff, arrivals, slo);
    let gpus = match placement {
        Placement::Colocated { replicas } => replicas * prefill.1.tensor_parallel,
        Placement::Disaggregated {
            prefill: p,
            decode: d,
        } => p * prefill.1.tensor_parallel + d * decode.1.tensor_parallel,
    };
    let at = at_rates(
        placement,
        prefill.1,
        decode.1,
        handoff,
        arrivals,
        slo,
        &[rate.max(1e-9)],
    )
    .remove(0);
    PlacementResult {
        placement,
        prefill_profile: prefill.0.to_string(),
        decode_profile: decode.0.to_string(),
        gpus,
        rate,
        goodput_per_gpu: rate / gpus as f64,
        p90_ttft: at.p90_ttft,
        p90_tpot: at.p90_tpot,
        attainment: at.attainment,
    }
}

/// One placement simulated at one rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RatePoint {
    pub rate: f64,
    pub p90_ttft: f64,
    pub p90_tpot: f64,
    pub attainment: f64,
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
            let outcomes = simulate(placement, prefill, decode, handoff, &arrivals.at_rate(rate));
            RatePoint {
                rate,
                p90_ttft: p90(outcomes.iter().map(|o| o.ttft).collect()),
                p90_tpot: p90(outcomes.iter().filter_map(|o| o.tpot).collect()),
                attainment: slo.attained(&outcomes),
            }
        })
        .collect()
}

/// Every placement of the named `profiles` within `gpus` GPUs worth reporting, best per-GPU
/// goodput first: for each profile, the colocated replicas that fill the budget; for each
/// (prefill, decode) pair of profiles, the prefill:decode ratio that balances one prefill
/// instance's TTFT-bound rate against one decode instance's TPOT-bound rate, scaled to the
/// budget. `handoff_bandwidth` and `handoff_latency` price the KV handoff.
pub fn placements(
    profiles: &[(String, Profile)],
    gpus: usize,
    arrivals: &Arrivals,
    slo: Slo,
    handoff_bandwidth: f64,
    handoff_latency: f64,
) -> Vec<PlacementResult> {
    let mut out = Vec::new();
    for (name, p) in profiles {
        let replicas = gpus / p.tensor_parallel.max(1);
        if replicas == 0 {
            continue;
        }
        let handoff = Handoff::of(p, handoff_bandwidth, handoff_latency);
        out.push(result(
            Placement::Colocated { replicas },
            (name, p),
            (name, p),
            handoff,
            arrivals,
            slo,
        ));
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
    let one_prefill = Placement::Disaggregated {
        prefill: 1,
        decode: 1,
    };
    let prefill_rates: Vec<f64> = profiles
        .iter()
        .map(|(_, p)| {
            let handoff = Handoff::of(p, handoff_bandwidth, handoff_latency);
            max_rate(one_prefill, p, p, handoff, arrivals, only_ttft)
        })
        .collect();
    for ((pn, pp), &prefill_rate) in profiles.iter().zip(&prefill_rates) {
        for (dn, dp) in profiles {
            let handoff = Handoff::of(pp, handoff_bandwidth, handoff_latency);
            // Prefill instances enough that they never hold the decode instance back.
            let one_decode = Placement::Disaggregated {
                prefill: 64,
                decode: 1,
            };
            let decode_rate = max_rate(one_decode, pp, dp, handoff, arrivals, only_tpot);
            let (tp_p, tp_d) = (pp.tensor_parallel.max(1), dp.tensor_parallel.max(1));
            // The most balanced counts within the budget: for each prefill count, the decode
            // instances the rest of the GPUs hold; keep the pair whose weaker phase is strongest.
            let best = (1..=gpus / tp_p)
                .filter_map(|p| {
                    let d = (gpus - p * tp_p) / tp_d;
                    (d >= 1).then_some((p, d))
                })
                .max_by(|a, b| {
                    let cap = |&(p, d): &(usize, usize)| {
                        (p as f64 * prefill_rate).min(d as f64 * decode_rate)
                    };
                    cap(a).total_cmp(&cap(b)).then(b.0.cmp(&a.0))
                });
            if let Some((p, d)) = best {
                out.push(result(
                    Placement::Disaggregated {
                        prefill: p,
                        decode: d,
                    },
                    (pn, pp),
                    (dn, dp),
                    handoff,
                    arrivals,
                    slo,
                ));
            }
        }
    }
    out.sort_by(|a, b| b.goodput_per_gpu.total_cmp(&a.goodput_per_gpu));
    out
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
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
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
        let handoff = Handoff {
            kv_bytes_per_token: 0,
            bandwidth: 1.0,
            latency: 0.0,
        };
        let placement = Placement::Colocated { replicas: 1 };
        let at = |rate: f64| {
            slo.attained(&simulate(
                placement,
                &p,
                &p,
                handoff,
                &arrivals.at_rate(rate),
            ))
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
                placements(&profiles, g, &arrivals, slo, 50e9, 1e-4)
                    .iter()
                    .map(|r| r.rate)
                    .fold(0.0, f64::max)
            };
            let (small, large) = (best(gpus), best(gpus + 1));
            prop_assert!(large >= small * 0.999, "{gpus} GPUs: {small}, {} GPUs: {large}", gpus + 1);
        }
    }
}
