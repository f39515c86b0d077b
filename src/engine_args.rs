//! Options shared by the commands that run a model: which model (`--model`, else the default one,
//! fetched on first use), its KV cache (`--kv-mode`, `--vmm-layout`, `--page-size`,
//! `--block-size`, `--kv-memory`, `--kv-cache-dtype`), the device (`--device auto|cpu|cuda`,
//! `--gpu-memory-utilization`) and the engine's limits (`--max-num-seqs`,
//! `--max-num-batched-tokens`, `--max-model-len`, `--batch-invariant`). `vkv bench offline` and
//! `vkv bench generate` (in `vkv-bench`) take them through its `EngineOptions` and `KvOptions`
//! traits, implemented at the end of this file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use vkv_bench::cmd::{EngineOptions, KvOptions};
use vkv_bench::units::parse_bytes;
use vkv_engine::device::Device;
use vkv_engine::engine::EngineConfig;
use vkv_engine::fetch;
use vkv_engine::kv::{KvCacheDtype, KvMode};
use vkv_vmm::KvLayout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvModeArg {
    Paged,
    Vmm,
    /// Both, one after the other (only for benchmarks that compare them).
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvDtypeArg {
    /// f16 on the CPU; the CUDA cache's bf16.
    Auto,
    /// CPU only: exact, twice the memory and the bytes read per decode step.
    F32,
    /// CPU only.
    F16,
    /// CPU only: FP8 E4M3, unscaled (vLLM's fp8): half f16's memory and bytes read per decode
    /// step; 4 significant bits.
    Fp8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    TokenMajor,
    PerLayer,
}

/// KV-cache options shared by the commands that run a model.
#[derive(Debug, ClapArgs)]
pub struct KvArgs {
    #[arg(long = "kv-mode", value_enum, default_value_t = KvModeArg::Vmm)]
    pub kv_mode: KvModeArg,
    #[arg(long = "vmm-layout", value_enum, default_value_t = LayoutArg::TokenMajor)]
    pub vmm_layout: LayoutArg,
    /// vmm page size (a multiple of the OS page on the CPU).
    #[arg(long = "page-size", default_value = "2MiB", value_parser = parse_bytes)]
    pub page_size: usize,
    /// Paged block size in tokens.
    #[arg(long = "block-size", default_value_t = 16)]
    pub block_size: usize,
    /// KV memory budget (default: 1GiB on the CPU; on CUDA what --gpu-memory-utilization
    /// leaves after the weights and activations).
    #[arg(long = "kv-memory", value_parser = parse_bytes)]
    pub kv_memory: Option<usize>,
    /// Element type of the KV cache (as vLLM's --kv-cache-dtype).
    #[arg(long = "kv-cache-dtype", value_enum, default_value_t = KvDtypeArg::Auto)]
    pub kv_cache_dtype: KvDtypeArg,
}

impl KvArgs {
    /// `--kv-memory`, or the CPU's default.
    pub fn host_kv_memory(&self) -> usize {
        self.kv_memory
            .unwrap_or(vkv_engine::device::DEFAULT_CPU_KV_MEMORY)
    }

    /// `--kv-cache-dtype`.
    pub fn kv_cache_dtype(&self) -> KvCacheDtype {
        match self.kv_cache_dtype {
            KvDtypeArg::Auto => KvCacheDtype::Auto,
            KvDtypeArg::F32 => KvCacheDtype::F32,
            KvDtypeArg::F16 => KvCacheDtype::F16,
            KvDtypeArg::Fp8 => KvCacheDtype::Fp8,
        }
    }

    /// The one mode asked for; `both` is an error here.
    pub fn mode(&self) -> Result<KvMode> {
        match self.modes().as_slice() {
            [one] => Ok(*one),
            _ => bail!("--kv-mode both compares the two modes: only `vkv bench offline` takes it"),
        }
    }

    /// The modes asked for: one, or paged then vmm for `both`.
    pub fn modes(&self) -> Vec<KvMode> {
        let paged = KvMode::Paged {
            block_size: self.block_size,
        };
        let vmm = KvMode::Vmm {
            layout: match self.vmm_layout {
                LayoutArg::TokenMajor => KvLayout::TokenMajor,
                LayoutArg::PerLayer => KvLayout::PerLayer,
            },
            page_size: self.page_size,
        };
        match self.kv_mode {
            KvModeArg::Paged => vec![paged],
            KvModeArg::Vmm => vec![vmm],
            KvModeArg::Both => vec![paged, vmm],
        }
    }
}

/// The model path: `--model`, or the default model from the cache (fetching it if needed).
pub fn model_path(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = model {
        if path.to_str().is_some_and(|p| p.starts_with("preset:")) {
            return Ok(path);
        }
        if !path.exists() {
            bail!(
                "model {} does not exist (give a GGUF file, an HF directory or preset:NAME)",
                path.display()
            );
        }
        return Ok(path);
    }
    fetch::ensure_model(&fetch::DEFAULT_MODEL, &mut |line| eprintln!("vkv: {line}"))
        .context("fetching the default model")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when built in and a GPU is found, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The engine's options (the KV cache's included).
#[derive(Debug, ClapArgs)]
pub struct EngineArgs {
    #[command(flatten)]
    pub kv: KvArgs,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// CUDA: share of the GPU's memory for weights, activations and KV together; the KV cache
    /// gets what is left of it (unless --kv-memory is given).
    #[arg(long = "gpu-memory-utilization", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Sequences running at once at most.
    #[arg(long = "max-num-seqs", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens in one forward pass at most (prefill chunks + decodes).
    #[arg(long = "max-num-batched-tokens", default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output (default: the model's context length).
    #[arg(long = "max-model-len")]
    pub max_model_len: Option<usize>,
    /// Make each request's output independent of what else runs (slower prefill).
    #[arg(long = "batch-invariant")]
    pub batch_invariant: bool,
    /// CUDA: run every step kernel by kernel, without CUDA graphs for decode steps (as vLLM's
    /// flag of the same name).
    #[arg(long = "enforce-eager")]
    pub enforce_eager: bool,
    /// Automatic prefix caching (vLLM's flag; on by default): the KV of every full block of a
    /// request's tokens stays cached after it ends, evicted only when memory is needed, and a
    /// request whose tokens start the same way (a shared system prompt, a chat's earlier turns)
    /// reuses it instead of computing it again.
    #[arg(
        long = "enable-prefix-caching",
        overrides_with = "no_enable_prefix_caching"
    )]
    pub enable_prefix_caching: bool,
    /// Turn automatic prefix caching off.
    #[arg(
        long = "no-enable-prefix-caching",
        overrides_with = "enable_prefix_caching"
    )]
    pub no_enable_prefix_caching: bool,
}

impl EngineArgs {
    /// The device asked for; `cuda` without a usable GPU is a one-line error.
    pub fn device(&self) -> Result<Device> {
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            bail!(
                "--gpu-memory-utilization must be in (0, 1], found {}",
                self.gpu_memory_utilization
            );
        }
        Ok(match self.device {
            DeviceArg::Auto => Device::auto(),
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::cuda().map_err(anyhow::Error::msg)?,
        })
    }

    /// The engine configuration for one KV mode on `device`.
    pub fn config(&self, kv_mode: KvMode, device: Device) -> EngineConfig {
        EngineConfig {
            device,
            gpu_memory_utilization: self.gpu_memory_utilization,
            kv_mode,
            kv_cache_dtype: self.kv.kv_cache_dtype(),
            kv_memory: self.kv.kv_memory,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            batch_invariant: self.batch_invariant,
            enforce_eager: self.enforce_eager,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            ..EngineConfig::default()
        }
    }
}

impl EngineOptions for EngineArgs {
    fn model_path(&self, model: Option<PathBuf>) -> Result<PathBuf> {
        model_path(model)
    }

    fn kv_modes(&self) -> Vec<KvMode> {
        self.kv.modes()
    }

    fn device(&self) -> Result<Device> {
        EngineArgs::device(self)
    }

    fn config(&self, kv_mode: KvMode, device: Device) -> EngineConfig {
        EngineArgs::config(self, kv_mode, device)
    }
}

impl KvOptions for KvArgs {
    fn model_path(&self, model: Option<PathBuf>) -> Result<PathBuf> {
        model_path(model)
    }

    fn kv_mode(&self) -> Result<KvMode> {
        self.mode()
    }

    fn kv_cache_dtype(&self) -> KvCacheDtype {
        KvArgs::kv_cache_dtype(self)
    }

    fn host_kv_memory(&self) -> usize {
        KvArgs::host_kv_memory(self)
    }
}
