//! Capacity planning (DistServe, Zhong et al., OSDI 2024, §4 and its artifact's `simdistserve`):
//! how many prefill and decode instances — or colocated replicas — serve a workload within its
//! latency targets at the least cost, from a [`Profile`] of step latencies measured on the card.
//!
//! - [`Profile`]: measured prefill and decode step latencies and the two models fitted to them
//!   by least squares, DistServe's forms: a prefill step of prompts (or chunks) of lengths `l_i`
//!   costs `a + b·Σl_i + c·Σl_i²`, a decode step of `B` sequences with contexts `c_i` costs
//!   `a + b·Σc_i + c·B`. `vkv profile` measures one through the engine (`profile` module).
//! - [`simulate`]: a discrete-event simulation of instances serving Poisson arrivals — colocated
//!   (continuous batching with chunked prefill, as vkv's scheduler does) or disaggregated
//!   (prefill instances hand each request's KV, at a cost per token, to decode instances) —
//!   giving each request's TTFT and TPOT.
//! - [`search`]: the highest rate whose SLO attainment (TTFT and TPOT both met) reaches the
//!   target, found by bisection, and DistServe's placement search over instance counts for a
//!   GPU budget: per-GPU goodput of every placement, best first.
//!
//! What is modelled rather than measured: a mixed step (decodes and prefill chunks together)
//! costs its prefill part plus its decode part; requests reserve their whole KV (prompt plus
//! output) when admitted, so there is no preemption; requests go to instances round-robin; the
//! handoff is `kv_bytes_per_token × prompt / bandwidth` plus a fixed latency.

pub mod profile;
pub mod search;
pub mod simulate;

pub use profile::{DecodeModel, PrefillModel, Profile};
pub use search::{at_rates, max_rate, placements, PlacementResult, RatePoint, Slo};
pub use simulate::{simulate, Handoff, InstanceLimits, Outcome, Placement, SimRequest};
