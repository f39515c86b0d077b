//! Model weights on disk: the GGUF reader (`gguf`) and safetensors (`safetensors`).

pub mod gguf;
