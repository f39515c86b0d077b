//! vkv-bench: everything that measures vkv rather than serves with it.
//!
//! The serving crates below (`vkv-engine`, `vkv-server`, `vkv-vmm`, `vkv-kernels`) hold no
//! benchmark code; this crate drives them from above, so arrows still point down
//! (`vkv → vkv-bench → {vkv-engine, vkv-kernels, vkv-vmm}`) and nothing below depends on it.
//!
//! Measurements (library code; errors are thiserror enums):
//! - [`workload`]: request-length workloads (named distributions, fixed and uniform shapes,
//!   JSONL traces, the prefix-sharing `prefix-repetition` and `multi-turn`) and seeded sampling
//!   of [`workload::RequestShape`]s;
//! - [`prefix`]: the token ids of the prefix-sharing workloads (shared prefixes, multi-turn
//!   prompt builders), the ideal prefix hit rate, and the prefix-cache numbers both benchmarks
//!   report;
//! - [`offline`]: `vkv bench offline` — a workload served by an in-process
//!   [`vkv_engine::engine::Engine`], vLLM's `benchmark_throughput`; [`offline::Summary`] is the one
//!   mean / median / p99 helper;
//! - [`serve`]: `vkv bench serve` — vLLM's `bench serve` method against any OpenAI-compatible
//!   server, with a hyper client;
//! - [`generate`]: `vkv bench generate` — CPU prefill and decode throughput on the
//!   single-sequence path;
//! - [`vmm`]: `vkv bench vmm` — backend calls, `KvSpace` operations and the `Mapper` on any
//!   `PhysicalMemory`;
//! - [`frag`]: `vkv frag` — the KV-memory fragmentation study, a discrete-event replay through
//!   the engine's own allocators.
//!
//! Commands ([`cmd`]): each `vkv bench` subcommand and `vkv frag` as a clap `Args` struct and a
//! `run` returning `anyhow::Result` (the CLI's error type) — options checked, progress on
//! stderr, the report on stdout through [`report::emit`] (JSON or a table), and the SVG plots of
//! `vkv frag`. `bench kernels` and `bench model` (CUDA only) measure inside their command module.
//! The engine options `vkv serve` shares with `bench offline` and `bench generate` stay the CLI's;
//! those two commands take them through the [`cmd::EngineOptions`] and [`cmd::KvOptions`] traits.
//! Byte sizes on the command line (`2MiB`) are parsed by [`units`], here because these commands
//! take them too.

pub mod cmd;
pub mod frag;
pub mod generate;
pub mod offline;
pub mod plan;
pub mod prefix;
pub mod report;
pub mod serve;
pub mod units;
pub mod vmm;
pub mod workload;
