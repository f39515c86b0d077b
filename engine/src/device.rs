//! The device the engine runs on, behind one small trait: a [`Backend`] owns a model and its KV
//! cache on one device and runs a scheduled batch (`forward`), while the scheduler keeps its
//! books through [`KvManager`], whatever the device (the shape of TGI's `Backend` and candle's
//! `BackendDevice`: the serving loop above is the same code on every device).
//!
//! - [`Device::Cpu`]: the f32 [`crate::model::Llama`] with a CPU [`crate::kv::KvCache`]
//!   (`PagedKv` or `VmmKv`); it returns logits and the engine samples every row.
//! - [`Device::Cuda`] (feature `cuda`): the bf16 [`crate::model::cuda::CudaLlama`] with a
//!   [`crate::kv::GpuKv`] — paged (the CPU's block allocator over one device pool) or vmm (a
//!   `KvSpace` on `CudaVmm` with the same `Mapper` books as the CPU's vmm cache, every page
//!   created up front).
//!   Greedy rows are sampled on the device (argmax) and only their ids come back; rows with
//!   temperature > 0 come back as logits for the CPU sampler.
//!
//! KV memory: `--kv-memory` bytes when given (on the CPU, [`DEFAULT_CPU_KV_MEMORY`] otherwise);
//! on CUDA without it (vLLM's `gpu_memory_utilization`), after the weights and every activation
//! buffer are allocated, `utilization × total − used` bytes of device memory (`cuMemGetInfo`).
//! Either way the bytes become blocks or pages by the one sizing rule, [`KvMode::units_for`].
//!
//! The backend only computes: the scheduler reserves every step's KV through [`Backend::kv_mut`]
//! before [`Backend::launch`], and the forward passes check, never reserve.
//!
//! `auto` picks CUDA when the crate was built with the feature and a GPU answers the probe
//! (`vkv_vmm::probe_cuda`, which never lets cudarc's loader panic), else the CPU.

use std::sync::Arc;

use crate::engine::EngineConfig;
#[cfg(doc)]
use crate::kv::KvMode;
use crate::kv::{KvBlob, KvBudget, KvCache, KvError, KvManager, SeqId, TransferStats};
use crate::model::LoadedModel;
use crate::model::{ModelError, SeqChunk};

/// KV memory of the CPU device when `--kv-memory` is not given.
pub const DEFAULT_CPU_KV_MEMORY: usize = 1 << 30;

/// Errors of starting or running a device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("--device cuda: no usable GPU ({0})")]
    NoGpu(String),
    #[error("--device cuda: vkv was built without the `cuda` feature")]
    NotBuilt,
    #[error("{option}: {detail}")]
    Option {
        option: &'static str,
        detail: String,
    },
    #[error("no GPU memory left for the KV cache: {used_gib:.2} GiB of {total_gib:.2} GiB are in use after the weights ({weights_gib:.2} GiB) and activations, and --gpu-memory-utilization {utilization} allows {budget_gib:.2} GiB")]
    NoMemoryForKv {
        used_gib: f64,
        total_gib: f64,
        weights_gib: f64,
        utilization: f64,
        budget_gib: f64,
    },
    #[error("KV cache ({bytes} bytes): {source}")]
    KvCache { bytes: usize, source: KvError },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[cfg(feature = "cuda")]
    #[error("{what}: {source}")]
    Cuda {
        what: &'static str,
        source: crate::model::cuda::CudaModelError,
    },
    #[error("finish without a launched batch")]
    NothingLaunched,
    /// A KV handoff could not be read or written (see [`Backend::export_kv`]).
    #[error("KV handoff: {0}")]
    Handoff(String),
    /// A fault injected by a test ([`vkv_vmm::faults`]).
    #[error("injected fault: {0}")]
    Injected(&'static str),
}

pub use crate::model::Next;

/// Which device: the command line's `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device 0.
    Cuda,
}

impl Device {
    /// `auto`: CUDA if built in and a GPU answers, else the CPU.
    pub fn auto() -> Device {
        if cfg!(feature = "cuda") && vkv_vmm::probe_cuda().is_ok() {
            Device::Cuda
        } else {
            Device::Cpu
        }
    }

    /// CUDA, or why it cannot be used.
    pub fn cuda() -> Result<Device, BackendError> {
        vkv_vmm::probe_cuda()
            .map(|_| Device::Cuda)
            .map_err(|e| BackendError::NoGpu(e.to_string()))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

/// A model and its KV cache on one device (see the module docs).
pub trait Backend: Send {
    /// `cpu`, `cuda (NVIDIA H100 80GB HBM3)`.
    fn device_name(&self) -> String;
    /// Called once on the engine thread before the first step.
    fn bind_to_thread(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn kv(&self) -> &dyn KvManager;
    fn kv_mut(&mut self) -> &mut dyn KvManager;
    /// Start one batch, its KV already reserved through [`Backend::kv_mut`]. A device that
    /// computes on its own (the GPU) only queues the work, leaving the engine thread free until
    /// [`Backend::finish`]; the CPU computes the whole pass here.
    fn launch(&mut self, batch: &[SeqChunk<'_>], logits_for: &[bool]) -> Result<(), BackendError>;
    /// Whether the launched batch is done (so [`Backend::finish`] would not wait).
    fn ready(&self) -> bool {
        true
    }
    /// The launched batch's result, per chunk its [`Next`]: logits where `logits_for[i]`, else
    /// whichever the device gives more cheaply.
    fn finish(&mut self) -> Result<Vec<Next>, BackendError>;
    /// Decode steps replayed from CUDA graphs, and graphs captured (0 where there are none).
    fn graph_counts(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Disaggregation: the KV of `seq`'s first `tokens` tokens (computed, between steps) as a
    /// blob for another instance ([`vkv_kv::export_kv`]).
    fn export_kv(
        &self,
        seq: SeqId,
        tokens: usize,
    ) -> Result<(KvBlob, TransferStats), BackendError> {
        let _ = (seq, tokens);
        Err(BackendError::Handoff(format!(
            "handing KV over is not built for {} yet",
            self.device_name()
        )))
    }
    /// Disaggregation: write a blob from another instance into `seq`'s first tokens (reserved,
    /// shared with no one: a fresh admission), between steps ([`vkv_kv::import_kv`]).
    fn import_kv(&self, seq: SeqId, blob: &KvBlob) -> Result<TransferStats, BackendError> {
        let _ = (seq, blob);
        Err(BackendError::Handoff(format!(
            "taking KV over is not built for {} yet",
            self.device_name()
        )))
    }
}

/// The CPU device: the model's host weights and a CPU cache; every row comes back as logits.
struct CpuBackend {
    model: Arc<LoadedModel>,
    kv: Box<dyn KvCache>,
    /// The launched batch's result (computed by `launch`).
    done: Option<Result<Vec<Next>, BackendError>>,
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn kv(&self) -> &dyn KvManager {
        self.kv.manager()
    }

    fn kv_mut(&mut self) -> &mut dyn KvManager {
        self.kv.manager_mut()
    }

    fn launch(&mut self, batch: &[SeqChunk<'_>], _logits_for: &[bool]) -> Result<(), BackendError> {
        let logits = self.model.model.forward(batch, self.kv.as_ref())?;
        self.done = Some(Ok(logits.into_iter().map(Next::Logits).collect()));
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<Next>, BackendError> {
        self.done
            .take()
            .unwrap_or(Err(BackendError::NothingLaunched))
    }

    fn export_kv(
        &self,
        seq: SeqId,
        tokens: usize,
    ) -> Result<(KvBlob, TransferStats), BackendError> {
        crate::kv::export_kv(self.kv.as_ref(), seq, tokens)
            .map_err(|e| BackendError::Handoff(e.to_string()))
    }

    fn import_kv(&self, seq: SeqId, blob: &KvBlob) -> Result<TransferStats, BackendError> {
        crate::kv::import_kv(self.kv.as_ref(), seq, blob)
            .map_err(|e| BackendError::Handoff(e.to_string()))
    }
}

/// Build the backend of `config.device` for `model` (its KV cache sized as the module docs say).
pub fn start(
    model: &Arc<LoadedModel>,
    config: &EngineConfig,
    max_model_len: usize,
) -> Result<Box<dyn Backend>, BackendError> {
    match config.device {
        Device::Cpu => {
            let dims = model.model.cpu()?.config.kv_dims();
            let bytes = config.kv_memory.unwrap_or(DEFAULT_CPU_KV_MEMORY);
            let mut kv = config
                .kv_mode
                .build(
                    dims,
                    config.kv_cache_dtype.cpu(),
                    KvBudget::new(config.max_num_seqs, max_model_len, bytes),
                )
                .map_err(|source| BackendError::KvCache { bytes, source })?;
            if config.enable_prefix_caching {
                kv.enable_prefix_caching()
                    .map_err(|source| BackendError::KvCache { bytes, source })?;
            }
            Ok(Box::new(CpuBackend {
                model: model.clone(),
                kv,
                done: None,
            }))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => cuda::start(model, config, max_model_len),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(BackendError::NotBuilt),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use vkv_vmm::CudaVmm;

    use super::{Backend, BackendError, Next};
    use crate::engine::EngineConfig;
    use crate::kv::{GpuKv, KvBudget, KvCacheDtype, KvManager};
    use crate::model::cuda::{CudaLlama, CudaModelError};
    use crate::model::LoadedModel;
    use crate::model::SeqChunk;

    fn cuda(what: &'static str) -> impl FnOnce(CudaModelError) -> BackendError {
        move |source| BackendError::Cuda { what, source }
    }

    pub(super) struct CudaBackend {
        name: String,
        model: CudaLlama,
        kv: GpuKv,
    }

    impl Backend for CudaBackend {
        fn device_name(&self) -> String {
            self.name.clone()
        }

        fn bind_to_thread(&self) -> Result<(), BackendError> {
            self.model
                .bind_to_thread()
                .map_err(cuda("binding the CUDA context"))
        }

        fn kv(&self) -> &dyn KvManager {
            &self.kv
        }

        fn kv_mut(&mut self) -> &mut dyn KvManager {
            &mut self.kv
        }

        fn launch(
            &mut self,
            batch: &[SeqChunk<'_>],
            logits_for: &[bool],
        ) -> Result<(), BackendError> {
            self.model
                .launch_next(batch, &self.kv, logits_for)
                .map_err(cuda("launching a step"))
        }

        fn ready(&self) -> bool {
            self.model.is_done()
        }

        fn finish(&mut self) -> Result<Vec<Next>, BackendError> {
            self.model.finish_next().map_err(cuda("finishing a step"))
        }

        fn graph_counts(&self) -> (u64, u64) {
            let g = self.model.graph_stats();
            (g.replays, g.captures)
        }
    }

    pub(super) fn start(
        loaded: &Arc<LoadedModel>,
        config: &EngineConfig,
        max_model_len: usize,
    ) -> Result<Box<dyn Backend>, BackendError> {
        if config.kv_cache_dtype != KvCacheDtype::Auto {
            return Err(BackendError::Option {
                option: "--kv-cache-dtype",
                detail: format!(
                    "{:?}: the CUDA KV cache stores bf16; only auto applies",
                    config.kv_cache_dtype
                ),
            });
        }
        let u = config.gpu_memory_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return Err(BackendError::Option {
                option: "--gpu-memory-utilization",
                detail: format!("must be in (0, 1], found {u}"),
            });
        }
        let probe = vkv_vmm::probe_cuda().map_err(|e| BackendError::NoGpu(e.to_string()))?;
        let vmm = Arc::new(CudaVmm::new(0).map_err(|e| BackendError::NoGpu(e.to_string()))?);
        let ctx = vmm.context().clone();
        let weights = &loaded.model;
        let mut model = match weights.device_seed() {
            Some(seed) => CudaLlama::random_on_device(&ctx, weights.config.clone(), seed),
            None => CudaLlama::from_cpu(&ctx, weights.cpu()?),
        }
        .map_err(cuda("loading the model onto the GPU"))?;
        model.set_cuda_graphs(!config.enforce_eager);
        model
            .preallocate(config.max_num_batched_tokens, config.max_num_seqs)
            .map_err(cuda("allocating activation buffers on the GPU"))?;
        let bytes = match config.kv_memory {
            Some(bytes) => bytes,
            None => {
                let (free, total) = model
                    .memory_info()
                    .map_err(cuda("asking the GPU for its free memory"))?;
                let budget = (u * total as f64) as usize;
                let used = total - free;
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                if budget <= used {
                    return Err(BackendError::NoMemoryForKv {
                        used_gib: gib(used),
                        total_gib: gib(total),
                        weights_gib: gib(model.weight_bytes()),
                        utilization: u,
                        budget_gib: gib(budget),
                    });
                }
                budget - used
            }
        };
        let mut kv = GpuKv::build(
            &vmm,
            config.kv_mode,
            model.config.kv_dims(),
            KvBudget::new(config.max_num_seqs, max_model_len, bytes),
        )
        .map_err(|source| BackendError::KvCache { bytes, source })?;
        if config.enable_prefix_caching {
            kv.enable_prefix_caching()
                .map_err(|source| BackendError::KvCache { bytes, source })?;
        }
        Ok(Box::new(CudaBackend {
            name: format!("cuda ({})", probe.name),
            model,
            kv,
        }))
    }
}
