//! Model weights on disk: the GGUF reader (`gguf`) and safetensors checkpoints (`safetensors`).

pub mod gguf;
pub mod safetensors;
