//! Disaggregated serving on the instance side (DistServe): an instance's [`Role`], the prompt KV
//! a prefill instance holds until a decode instance pulls it ([`HeldKv`]), and the pull itself
//! ([`pull`]) — the KV transport over HTTP, which works between any two hosts.
//!
//! A prefill half's KV is handed out by the engine as an encoded [`KvBlob`] (`vkv_kv::export_kv`;
//! the engine's KV memory is freed when the request ends) and held here under a random ticket
//! until `POST /v1/kv/pull` takes it — once — or `--kv-handoff-timeout` passes (a decode
//! instance that died, or a router that gave up): then it is dropped and counted as expired, so
//! nothing a failed handoff leaves behind outlives the timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use vkv_engine::engine::HandoffMetrics;
use vkv_engine::kv::KvBlob;

use crate::metrics::single;

/// The path of the pull (`POST`, body `{"ticket": ...}`, answer the encoded blob); served by
/// prefill instances only, and not part of the OpenAI API (nor of `/openapi.json`).
pub const KV_PULL_PATH: &str = "/v1/kv/pull";

/// What an instance does in disaggregated serving (`vkv serve --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves requests whole (colocated), and neither half.
    #[default]
    Both,
    /// Serves prefill halves (`kv_transfer_params.do_remote_decode`) and whole requests.
    Prefill,
    /// Serves decode halves (`kv_transfer_params.do_remote_prefill`) and whole requests.
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Both => "both",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// Prompt KV held for decode instances, by ticket.
#[derive(Debug)]
pub struct HeldKv {
    timeout: Duration,
    entries: Mutex<HashMap<String, (Bytes, Instant)>>,
    pub held_total: AtomicU64,
    pub pulled_total: AtomicU64,
    pub expired_total: AtomicU64,
}

impl HeldKv {
    pub fn new(timeout: Duration) -> HeldKv {
        HeldKv {
            timeout,
            entries: Mutex::default(),
            held_total: AtomicU64::new(0),
            pulled_total: AtomicU64::new(0),
            expired_total: AtomicU64::new(0),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Bytes, Instant)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hold `blob` (encoded) until pulled or expired; returns its ticket.
    pub fn hold(&self, blob: Bytes) -> String {
        self.expire();
        let ticket = random_ticket();
        let deadline = Instant::now() + self.timeout;
        self.entries().insert(ticket.clone(), (blob, deadline));
        self.held_total.fetch_add(1, Ordering::Relaxed);
        ticket
    }

    /// The blob held under `ticket`, given up (a ticket is pulled once).
    pub fn take(&self, ticket: &str) -> Option<Bytes> {
        self.expire();
        let blob = self.entries().remove(ticket).map(|(b, _)| b);
        if blob.is_some() {
            self.pulled_total.fetch_add(1, Ordering::Relaxed);
        }
        blob
    }

    /// Drop what has waited past the timeout; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|_, (_, deadline)| *deadline > now);
        let expired = before - entries.len();
        self.expired_total
            .fetch_add(expired as u64, Ordering::Relaxed);
        expired
    }

    /// The handoff lines of `/metrics`: what is held now and what came and went, and the
    /// engine's copies in each direction.
    pub fn render(&self, out: &mut String, engine: &HandoffMetrics) {
        let (held, bytes) = self.held();
        single(
            out,
            "vkv_kv_handoff_held",
            "Prefill role: prompt KV blobs held for decode instances.",
            "gauge",
            held,
        );
        single(
            out,
            "vkv_kv_handoff_held_bytes",
            "Prefill role: bytes of the prompt KV held for decode instances.",
            "gauge",
            bytes,
        );
        for (name, help, counter) in [
            ("vkv_kv_handoff_pulled_total", "Prefill role: held prompt KV pulled by a decode instance.", &self.pulled_total),
            ("vkv_kv_handoff_expired_total", "Prefill role: held prompt KV dropped after --kv-handoff-timeout (its decode half never came).", &self.expired_total),
        ] {
            single(out, name, help, "counter", counter.load(Ordering::Relaxed));
        }
        for (way, c) in [("exported", engine.exported), ("imported", engine.imported)] {
            let name = |what: &str| format!("vkv_kv_handoff_{way}_{what}");
            single(
                out,
                &name("requests_total"),
                &format!("Requests whose prompt KV was {way}."),
                "counter",
                c.requests,
            );
            single(
                out,
                &name("bytes_total"),
                &format!("Bytes of prompt KV {way}."),
                "counter",
                c.bytes,
            );
            single(out, &name("copies_total"), &format!("Memory copies (contiguous runs) the {way} KV took: 1 per request for vmm token-major, 2 per layer for per-layer, per block for paged."), "counter", c.copies);
            single(
                out,
                &name("seconds_total"),
                &format!("Seconds the engine thread spent copying {way} KV."),
                "counter",
                c.seconds,
            );
        }
    }

    /// Blobs held now (those expired dropped first), and their bytes.
    pub fn held(&self) -> (usize, usize) {
        self.expire();
        let entries = self.entries();
        (entries.len(), entries.values().map(|(b, _)| b.len()).sum())
    }
}

/// 128 random bits in hex (the kernel's `getrandom`).
fn random_ticket() -> String {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most `len - filled` bytes into the rest of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Pull the KV held under `ticket` from the prefill instance at `remote_url` (within
/// `timeout`), with the bytes it took; the error says what went wrong in words.
pub async fn pull(
    remote_url: &str,
    ticket: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<(KvBlob, usize), String> {
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{remote_url}{KV_PULL_PATH}");
    let body = serde_json::json!({ "ticket": ticket }).to_string();
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(key) = api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("{url}: {e}"))?;
    let fetch = async {
        let response = client
            .request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        // Straight into one buffer of the announced size (up to 1 GiB reserved at once; a larger
        // blob grows it): the blob's only copy on this side.
        let length = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let mut bytes = Vec::with_capacity(length.min(1 << 30));
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{url}: reading the KV: {e}"))?;
            if let Some(data) = frame.data_ref() {
                bytes.extend_from_slice(data);
            }
        }
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
            return Err(format!("{url} answered {status}: {text}"));
        }
        let n = bytes.len();
        KvBlob::decode(bytes)
            .map(|blob| (blob, n))
            .map_err(|e| format!("{url}: {e}"))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{url}: no KV within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_kv_is_taken_once_or_expires() {
        let held = HeldKv::new(Duration::from_millis(50));
        let a = held.hold(Bytes::from_static(b"abc"));
        let b = held.hold(Bytes::from_static(b"de"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(held.held(), (2, 5));
        assert_eq!(held.take(&a).as_deref(), Some(&b"abc"[..]));
        assert_eq!(held.take(&a), None, "a ticket is pulled once");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(held.take(&b), None, "expired");
        assert_eq!(held.held(), (0, 0));
        assert_eq!(held.expired_total.load(Ordering::Relaxed), 1);
        assert_eq!(held.pulled_total.load(Ordering::Relaxed), 1);
    }
}
