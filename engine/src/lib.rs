//! vkv-engine: serving requests on a model — requests and their events, the continuous-batching
//! [`scheduler`] (Orca's iteration-level scheduling, Sarathi-Serve's chunked prefill, preemption
//! by recompute; the only code that reserves KV memory), the [`device`] backends (CPU and CUDA:
//! a model and its KV cache behind one `Backend` trait), the [`sampler`] (with [`structured_output`]'s grammars), the [`engine`] thread
//! that owns them and is reached over channels, and single-prompt [`generate`]. The model itself
//! (weights, tokenizer, forward passes) is the `vkv-model` crate and KV memory the `vkv-kv`
//! crate; both are re-exported here under the names the engine's code uses. Everything above
//! this crate is the same code in both KV modes. What measures the engine rather than serving
//! with it (workloads, the offline benchmark, the fragmentation study) is the `vkv-bench` crate's.

pub mod device;
pub mod engine;
pub mod generate;
pub mod sampler;
pub mod scheduler;
pub mod structured_output;

pub use vkv_kernels::{KvAddressing, RuntimeSwitches};
/// KV memory (its own crate, `vkv-kv`), here under the name the engine's code uses.
pub use vkv_kv as kv;
/// The model crate (`vkv-model`) and its modules, under the names the engine's code uses.
pub use vkv_model as model;
pub use vkv_model::{fetch, presets, tokenizer, weights};
pub use vkv_vmm::{KvLayout, KvSpace};
