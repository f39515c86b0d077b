//! The device the engine runs on, behind one small trait: a [`Backend`] owns a model and its KV
//! cache on one device and runs a scheduled batch (`forward`), while the scheduler keeps its
//! books through [`KvManager`], whatever the device (the shape of TGI's `Backend` and candle's
//! `BackendDevice`: the serving loop above is the same code on every device).
//!
//! - [`Device::Cpu`]: the f32 [`crate::model::Llama`] with a CPU [`crate::kv::KvCache`]
//!   (`PagedKv` or `VmmKv`); it returns logits and the engine samples every row.
//! - [`Device::Cuda`] (feature `cuda`): the bf16 [`crate::model::cuda::CudaLlama`] with its
//!   [`crate::model::cuda::GpuKv`] — paged (one preallocated block pool) or vmm (a `KvSpace` on
//!   `CudaVmm` with the same `Mapper` books as the CPU's vmm cache, every page created up front).
//!   Greedy rows are sampled on the device (argmax) and only their ids come back; rows with
//!   temperature > 0 come back as logits for the CPU sampler.
//!
//! KV memory on CUDA (vLLM's `gpu_memory_utilization`): after the weights and every activation
//! buffer are allocated, the KV cache gets `utilization × total − used` bytes of device memory
//! (`cuMemGetInfo`), unless `--kv-memory` names a size.
//!
//! `auto` picks CUDA when the crate was built with the feature and a GPU answers the probe
//! (`vkv_vmm::probe_cuda`, which never lets cudarc's loader panic), else the CPU.

use std::sync::Arc;

use crate::engine::EngineConfig;
use crate::generate::LoadedModel;
use crate::kv::{KvCache, KvDims, KvManager};
use crate::model::SeqChunk;

/// The next token of a chunk, or the logits to sample it from.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Picked on the device (greedy).
    Token(u32),
    /// The last token's logits (`vocab_size` f32), for the host's sampler.
    Logits(Vec<f32>),
}

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

    /// CUDA, or one line saying why it cannot be used.
    pub fn cuda() -> Result<Device, String> {
        vkv_vmm::probe_cuda()
            .map(|_| Device::Cuda)
            .map_err(|e| format!("--device cuda: no usable GPU ({e})"))
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
    fn bind_to_thread(&self) -> Result<(), String> {
        Ok(())
    }
    fn kv(&self) -> &dyn KvManager;
    fn kv_mut(&mut self) -> &mut dyn KvManager;
    /// Start one batch (reserving its KV through the cache). A device that computes on its
    /// own (the GPU) only queues the work, leaving the engine thread free until
    /// [`Backend::finish`]; the CPU computes the whole pass here.
    fn launch(&mut self, batch: &[SeqChunk<'_>], logits_for: &[bool]) -> Result<(), String>;
    /// Whether the launched batch is done (so [`Backend::finish`] would not wait).
    fn ready(&self) -> bool {
        true
    }
    /// The launched batch's result, per chunk its [`Next`]: logits where `logits_for[i]`, else
    /// whichever the device gives more cheaply.
    fn finish(&mut self) -> Result<Vec<Next>, String>;
    /// Decode steps replayed from CUDA graphs, and graphs captured (0 where there are none).
    fn graph_counts(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// The CPU device: the model's host weights and a CPU cache; every row comes back as logits.
struct CpuBackend {
    model: Arc<LoadedModel>,
    kv: Box<dyn KvCache>,
    /// The launched batch's result (computed by `launch`).
    done: Option<Result<Vec<Next>, String>>,
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

    fn launch(&mut self, batch: &[SeqChunk<'_>], _logits_for: &[bool]) -> Result<(), String> {
        let logits = self
            .model
            .model
            .forward(batch, self.kv.as_mut())
            .map_err(|e| e.to_string())?;
        self.done = Some(Ok(logits.into_iter().map(Next::Logits).collect()));
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<Next>, String> {
        self.done
            .take()
            .unwrap_or_else(|| Err("finish without a launched batch".into()))
    }
}

/// Build the backend of `config.device` for `model` (its KV cache sized as the module docs say).
pub fn start(
    model: &Arc<LoadedModel>,
    config: &EngineConfig,
    max_model_len: usize,
) -> Result<Box<dyn Backend>, String> {
    let c = &model.model.config;
    let dims = KvDims {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    match config.device {
        Device::Cpu => {
            model.model.cpu().map_err(|e| e.to_string())?;
            let kv = config
                .kv_mode
                .build(
                    dims,
                    config.kv_cache_dtype.cpu(),
                    config.max_num_seqs,
                    max_model_len,
                    config.kv_memory,
                )
                .map_err(|e| format!("KV cache: {e}"))?;
            Ok(Box::new(CpuBackend {
                model: model.clone(),
                kv,
                done: None,
            }))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => cuda::start(model, config, max_model_len),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err("--device cuda: vkv was built without the `cuda` feature".into()),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use vkv_vmm::CudaVmm;

    use super::{Backend, Next};
    use crate::engine::EngineConfig;
    use crate::generate::LoadedModel;
    use crate::kv::{KvManager, KvMode};
    use crate::model::cuda::{CudaLlama, GpuKv, GpuKvDims};
    use crate::model::SeqChunk;

    const BF16: usize = 2;

    pub(super) struct CudaBackend {
        name: String,
        model: CudaLlama,
        kv: GpuKv,
    }

    impl Backend for CudaBackend {
        fn device_name(&self) -> String {
            self.name.clone()
        }

        fn bind_to_thread(&self) -> Result<(), String> {
            self.model.bind_to_thread().map_err(|e| e.to_string())
        }

        fn kv(&self) -> &dyn KvManager {
            &self.kv
        }

        fn kv_mut(&mut self) -> &mut dyn KvManager {
            &mut self.kv
        }

        fn launch(&mut self, batch: &[SeqChunk<'_>], logits_for: &[bool]) -> Result<(), String> {
            self.model
                .launch_next(batch, &mut self.kv, logits_for)
                .map_err(|e| e.to_string())
        }

        fn ready(&self) -> bool {
            self.model.is_done()
        }

        fn finish(&mut self) -> Result<Vec<Next>, String> {
            self.model.finish_next().map_err(|e| e.to_string())
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
    ) -> Result<Box<dyn Backend>, String> {
        if config.kv_cache_dtype != crate::kv::KvCacheDtype::Auto {
            return Err(format!(
                "--kv-cache-dtype {:?}: the CUDA KV cache stores bf16; only auto applies",
                config.kv_cache_dtype
            ));
        }
        let probe =
            vkv_vmm::probe_cuda().map_err(|e| format!("--device cuda: no usable GPU ({e})"))?;
        let vmm = Arc::new(CudaVmm::new(0).map_err(|e| format!("opening CUDA device 0: {e}"))?);
        let ctx = vmm.context().clone();
        let weights = &loaded.model;
        let mut model = match weights.device_seed() {
            Some(seed) => CudaLlama::random_on_device(&ctx, weights.config.clone(), seed),
            None => CudaLlama::from_cpu(&ctx, weights.cpu().map_err(|e| e.to_string())?),
        }
        .map_err(|e| format!("loading the model onto the GPU: {e}"))?;
        model.set_cuda_graphs(!config.enforce_eager);
        model
            .preallocate(config.max_num_batched_tokens, config.max_num_seqs)
            .map_err(|e| format!("allocating activation buffers on the GPU: {e}"))?;
        let c = &model.config;
        let dims = GpuKvDims::of(c);
        let token_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * BF16;
        let kv_bytes = if config.kv_memory > 0 {
            config.kv_memory
        } else {
            let (free, total) = model.memory_info().map_err(|e| e.to_string())?;
            let u = config.gpu_memory_utilization;
            if !(u > 0.0 && u <= 1.0) {
                return Err(format!(
                    "--gpu-memory-utilization must be in (0, 1], found {u}"
                ));
            }
            let budget = (u * total as f64) as usize;
            let used = total - free;
            if budget <= used {
                return Err(format!(
                    "no GPU memory left for the KV cache: {:.2} GiB of {:.2} GiB are in use after \
                     the weights ({:.2} GiB) and activations, and --gpu-memory-utilization {u} \
                     allows {:.2} GiB",
                    used as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64,
                    model.weight_bytes() as f64 / (1u64 << 30) as f64,
                    budget as f64 / (1u64 << 30) as f64
                ));
            }
            budget - used
        };
        let kv = match config.kv_mode {
            KvMode::Paged { block_size } => {
                let blocks = kv_bytes / (block_size * token_bytes);
                GpuKv::paged(&ctx, dims, blocks, block_size)
            }
            KvMode::Vmm { layout, page_size } => {
                // No more pages than every slot full could map (slot_stride / page per region).
                let regions = match layout {
                    vkv_vmm::KvLayout::PerLayer => 2 * c.num_layers,
                    vkv_vmm::KvLayout::TokenMajor => 1,
                };
                let region_token = token_bytes / regions;
                let per_slot = regions * (max_model_len * region_token).div_ceil(page_size.max(1));
                let pages = (kv_bytes / page_size.max(1)).min(config.max_num_seqs * per_slot);
                GpuKv::vmm(
                    vmm.clone(),
                    dims,
                    layout,
                    config.max_num_seqs,
                    max_model_len,
                    page_size,
                    pages,
                )
                .and_then(|mut kv| {
                    kv.create_pages_ahead(pages)?;
                    Ok(kv)
                })
            }
        }
        .map_err(|e| format!("KV cache on the GPU ({kv_bytes} bytes): {e}"))?;
        Ok(Box::new(CudaBackend {
            name: format!("cuda ({})", probe.name),
            model,
            kv,
        }))
    }
}
