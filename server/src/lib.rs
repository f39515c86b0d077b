//! vkv-server: the HTTP face of vkv.
//!
//! This crate will own the OpenAI-compatible API on hyper 1.x + tokio (`POST /v1/completions`,
//! `POST /v1/chat/completions` with SSE streaming ending in `data: [DONE]`, `GET /v1/models`,
//! `GET /health`, `GET /metrics` in Prometheus text, `GET /openapi.json`), OpenAI-shaped errors
//! with 4xx statuses for client mistakes, abort-on-disconnect, and the `vkv bench serve` load
//! generator (vLLM's `bench serve` method: Poisson/Gamma arrivals, TTFT, TPOT, ITL, goodput). It
//! talks to the model only through the engine crate's request channel. Empty until the server
//! issue lands.

pub use vkv_engine as engine;
