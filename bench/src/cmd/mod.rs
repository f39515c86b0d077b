//! The measuring commands of the `vkv` CLI: one module per command, each a clap `Args` and a
//! `run(args) -> anyhow::Result<()>` that checks the options, measures (or calls the library
//! module that does), shows progress on stderr and emits the report on stdout through
//! [`crate::report::emit`]. `src/main.rs` only parses and dispatches to these.
//!
//! - [`kernels`]: `vkv bench kernels` (CUDA attention kernels over a grid);
//! - [`model`]: `vkv bench model` (a preset's whole CUDA forward pass);
//! - [`vmm`]: `vkv bench vmm` (backend choice around [`crate::vmm`]);
//! - [`generate`]: `vkv bench generate` (around [`crate::generate`]);
//! - [`offline`]: `vkv bench offline` (repeats and both KV modes around [`crate::offline`]);
//! - [`serve`]: `vkv bench serve` (around [`crate::serve`]);
//! - [`frag`]: `vkv frag` (around [`crate::frag`]: table, JSON and SVG plots);
//! - [`profile`]: `vkv profile` (step latencies through the engine, fitted: a [`crate::plan::Profile`]);
//! - [`plan`]: `vkv plan` (around [`crate::plan`]'s placement search).
//!
//! `bench offline` and `bench generate` run a model with the engine options `vkv serve` takes
//! too (`--kv-mode`, `--device`, ...). Those flags are the CLI's (`src/engine_args.rs`), so the two
//! commands' `Args` are generic over them and reach them through [`EngineOptions`] and
//! [`KvOptions`], which the CLI implements: the flags, their help and their order stay as one
//! definition, and this crate does not depend on the binary.

pub mod frag;
pub mod generate;
pub mod handoff;
pub mod kernels;
pub mod model;
pub mod offline;
pub mod plan;
pub mod profile;
pub mod serve;
pub mod vmm;

use std::path::PathBuf;

use anyhow::Result;
use vkv_engine::device::Device;
use vkv_engine::engine::EngineConfig;
use vkv_engine::kv::{KvCacheDtype, KvMode};

/// The engine options (KV cache, device, limits) of a command that runs the engine, as the CLI
/// parses them for `vkv serve` too.
pub trait EngineOptions: clap::Args {
    /// `--model`, or the default model (fetched on first use).
    fn model_path(&self, model: Option<PathBuf>) -> Result<PathBuf>;
    /// The KV modes asked for: one, or paged then vmm for `--kv-mode both`.
    fn kv_modes(&self) -> Vec<KvMode>;
    /// The device asked for; an unusable one is a one-line error.
    fn device(&self) -> Result<Device>;
    /// The engine configuration for one KV mode on `device`.
    fn config(&self, kv_mode: KvMode, device: Device) -> EngineConfig;
}

/// The KV-cache options of a command that runs a model without the engine.
pub trait KvOptions: clap::Args {
    /// `--model`, or the default model (fetched on first use).
    fn model_path(&self, model: Option<PathBuf>) -> Result<PathBuf>;
    /// The one KV mode asked for (`both` is an error).
    fn kv_mode(&self) -> Result<KvMode>;
    /// `--kv-cache-dtype`.
    fn kv_cache_dtype(&self) -> KvCacheDtype;
    /// `--kv-memory`, or the CPU's default.
    fn host_kv_memory(&self) -> usize;
}

/// What a GPU-only measurement is in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub fn without_cuda<A, R>(_: &A) -> anyhow::Result<R> {
    anyhow::bail!("this vkv was built without the cuda feature")
}

/// Hand over what a measuring command measured (see [`crate::report::emit`]), or why it could not.
pub fn emit_measured<R: serde::Serialize>(
    report: anyhow::Result<R>,
    json: bool,
    print_table: impl FnOnce(&R),
) -> anyhow::Result<()> {
    Ok(crate::report::emit(&report?, json, print_table)?)
}
