//! vkv-engine: everything between a request and the device.
//!
//! This crate owns the model (configuration from GGUF metadata or HF `config.json`, the Llama
//! family, named presets with seeded random weights), weights (own GGUF reader, safetensors), the
//! tokenizer, the two KV managers behind one `kv` trait (`PagedKv`: block allocator and block
//! tables as in vLLM; `VmmKv`: a [`vkv_vmm::KvSpace`] and its [`vkv_vmm::Mapper`] as in vAttention),
//! the continuous-batching scheduler (Orca's iteration-level scheduling, Sarathi-Serve's chunked
//! prefill, preemption by recompute), the sampler, and the engine thread that owns device, model,
//! KV and scheduler and is reached over channels. Everything above this crate is the same code in
//! both KV modes. Here: model presets, the KV caches (`kv`), the GGUF reader (`weights`), the
//! tokenizer, the Llama forward pass on the CPU and CUDA (`model`), sampling, single-prompt
//! generation, model fetching, the continuous-batching `scheduler` and the `engine` thread that
//! serves requests with them. What measures the engine rather than serving with it (workloads,
//! the offline benchmark, the fragmentation study) is the `vkv-bench` crate's.

pub mod device;
pub mod engine;
pub mod fetch;
pub mod generate;
pub mod kv;
pub mod model;
pub mod presets;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

pub use vkv_kernels::{KvAddressing, RuntimeSwitches};
pub use vkv_vmm::{KvLayout, KvSpace};
