//! Capacity planning (DistServe, Zhong et al., OSDI 2024, §4 and its artifact's `simdistserve`):
//! how many prefill and decode instances — or colocated replicas — serve a workload within its
//! latency targets at the least cost, from a [`Profile`] of step latencies measured on the card.
//!
//! - [`Profile`]: measured prefill and decode step latencies and the two models fitted to them
//!   by least squares, DistServe's forms: a prefill step of prompts (or chunks) of lengths `l_i`
//!   costs `a + b·Σl_i + c·Σl_i²`, a decode step of `B` sequences with contexts `c_i` costs
//!   `a + b·Σc_i + c·B`. `vkv profile` measures one through the engine (`profile` module).
//! - [`simulate`]: a discrete-event simulation of instances serving Poisson arrivals —
//!   colocated or disaggregated (prefill instances hand each request's KV to decode instances,
//!   at a cost per request, per copy of the exporting layout and per byte) — in which every
//!   instance is vkv's own scheduler (chunked prefill, continuous batching, KV reserved as
//!   tokens arrive, preemption by recompute) over the books of a cache of the profile's
//!   capacity, giving each request's TTFT and TPOT.
//! - [`search`]: the highest rate whose SLO attainment (TTFT and TPOT both met) reaches the
//!   target, found by bisection, and DistServe's placement search over instance counts for a
//!   GPU budget (low and high node-affinity): per-GPU goodput of every placement, best first.
//! - [`Profile::modelled`]: a profile of another model or tensor-parallel degree scaled from a
//!   measured one (FLOPs, weight and KV bytes, two all-reduces per layer), marked as modelled.
//!
//! What is modelled rather than measured: a mixed step (decodes and prefill chunks together)
//! costs its prefill part plus its decodes' attention and per-sequence terms (the decode
//! constant, the pass over the weights, once); the vmm caches' page-granular reservation is
//! approximated by blocks; the router's load is read exactly and at once (`vkv route` reads the
//! instances' `/metrics` when it probes them); the handoff is `latency + copies × copy cost +
//! bytes / bandwidth`; prefix caching is off (every prompt computed whole); tensor parallelism
//! only through modelled profiles.

pub mod profile;
pub mod search;
pub mod simulate;

pub use profile::{DecodeModel, ModelShape, PrefillModel, Profile, Scaling};
pub use search::{at_rates, max_rate, placements, PlacementResult, RatePoint, Slo};
pub use simulate::{
    simulate, Handoff, InstanceLimits, KvLayout, Outcome, Placement, SimRequest, Simulation,
};
