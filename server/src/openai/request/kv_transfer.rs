//! `kv_transfer_params` (vLLM's name for it): the extension by which `vkv route` splits a request
//! between a prefill instance and a decode instance (disaggregated serving, DistServe). Not a
//! client field: the router writes it, and the OpenAPI document leaves it out.
//!
//! - To a prefill instance (`--role prefill`): `{"do_remote_decode": true}` — compute the
//!   prompt and one token, keep the prompt's KV for a decode instance to pull
//!   (`GET /v1/kv/{ticket}`), and say in the answer's `kv_transfer_params` which ticket and
//!   first token.
//! - To a decode instance (`--role decode`): `{"do_remote_prefill": true, "remote_url": ...,
//!   "ticket": ..., "first_token": ...}` — pull the prompt's KV from the prefill instance at
//!   `remote_url` and generate from the first token on.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The request's `kv_transfer_params`, as sent.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KvTransferParams {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub do_remote_decode: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub do_remote_prefill: bool,
    /// The prefill instance's base URL (`http://host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_url: Option<String>,
    /// Which held KV to pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// The token the prefill instance generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token: Option<u32>,
    /// The prompt tokens whose KV is held (in a prefill instance's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
}

/// What a request's `kv_transfer_params` ask for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// The prefill half: one token, the prompt's KV held for a decode instance.
    Prefill,
    /// The decode half: pull the prompt's KV, start from `first_token`.
    Decode {
        remote_url: String,
        ticket: String,
        first_token: u32,
    },
}

const FIELD: &str = "kv_transfer_params";

impl KvTransferParams {
    /// Check the parameters: one half or the other, with what that half needs.
    pub fn handoff(&self) -> Result<Handoff, ApiError> {
        let invalid = |m: &str| Err(ApiError::field(FIELD, format!("`{FIELD}`: {m}")));
        match (self.do_remote_decode, self.do_remote_prefill) {
            (true, false) => Ok(Handoff::Prefill),
            (false, true) => {
                let (Some(remote_url), Some(ticket), Some(first_token)) =
                    (&self.remote_url, &self.ticket, self.first_token)
                else {
                    return invalid(
                        "`do_remote_prefill` needs `remote_url`, `ticket` and `first_token`",
                    );
                };
                if !remote_url.starts_with("http://") {
                    return invalid("`remote_url` must be an http:// URL");
                }
                if ticket.is_empty() || !ticket.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return invalid("`ticket` must be a hexadecimal string");
                }
                Ok(Handoff::Decode {
                    remote_url: remote_url.trim_end_matches('/').to_string(),
                    ticket: ticket.clone(),
                    first_token,
                })
            }
            _ => invalid("exactly one of `do_remote_decode` and `do_remote_prefill` must be true"),
        }
    }
}
