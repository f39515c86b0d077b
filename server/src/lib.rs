//! vkv-server: the HTTP face of vkv. (The load generator that measures it, `vkv bench serve`, is
//! the `vkv-bench` crate's.)
//!
//! - [`serve`]: hyper 1.x (HTTP/1.1) on tokio, one task per connection, answering the
//!   OpenAI-compatible API ([`api`]: completions and chat completions, whole or streamed as SSE
//!   ending in `data: [DONE]`; models; health; Prometheus [`metrics`]; the [`openapi`] document).
//!   Routes are an enum parsed once from method and path ([`route`]). Errors are OpenAI-shaped
//!   with a 4xx status for the client's mistakes ([`error`]); requests and responses are typed
//!   serde structs, checked once into the engine's request ([`openai`]), and the OpenAPI document
//!   is generated from the same types. It talks to the model only through the
//!   engine's request channel: one event channel per HTTP request, aborted when the client goes.
//! - Shutdown (SIGINT / SIGTERM through [`shutdown_signal`], or any future): stop accepting,
//!   let requests in flight finish for up to `shutdown_timeout` (a second signal cuts it short),
//!   abort the rest, close the connections, return.

pub mod api;
pub mod error;
pub mod handoff;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod route;
pub mod router;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use vkv_engine as engine;
use vkv_engine::engine::Engine;

use crate::api::AppState;
pub use crate::handoff::Role;

/// How the server answers (the engine's options are the engine's).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Required as `Authorization: Bearer KEY` on `/v1/*` when set.
    pub api_key: Option<String>,
    /// The `model` clients name (and `/v1/models` lists).
    pub served_model_name: String,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// How long requests in flight may run on after a shutdown signal before they are aborted.
    pub shutdown_timeout: Duration,
    /// How long a request's body may take to arrive once its headers have (408 after that, and
    /// the connection closes). Headers have hyper's own 30 s limit. Slow or stalled bodies thus
    /// hold a connection for a bounded time.
    pub request_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed at once (a process has a
    /// limited number of file descriptors, and running out of them would silence the server).
    pub max_connections: usize,
    /// Disaggregated serving: which halves of requests this instance serves.
    pub role: Role,
    /// Prefill role: how long the prompt KV of a prefill half waits for its decode instance.
    pub kv_handoff_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_key: None,
            served_model_name: "vkv".into(),
            max_body_bytes: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_connections: 4096,
            role: Role::Both,
            kv_handoff_timeout: Duration::from_secs(30),
        }
    }
}

/// Why serving stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("accepting connections: {0}")]
    Accept(#[source] std::io::Error),
    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// What happened at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Requests in flight when the signal came finished without being aborted.
    pub drained: bool,
    /// Connections still open when the server gave up waiting for them.
    pub connections_left: bool,
}

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> Result<(), ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Serve `engine` on `listener` until `shutdown` resolves, then shut down as the module docs say
/// (`hurry` resolving during the drain aborts what is left at once).
pub async fn serve(
    engine: Arc<Engine>,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<ShutdownReport, ServerError> {
    let timeout = config.shutdown_timeout;
    let max_connections = config.max_connections;
    let state = Arc::new(AppState::new(engine.clone(), config));
    // Prefill role: prompt KV no decode instance pulled is dropped once its time is up, even if
    // nothing else touches the store.
    let sweeper = (state.config.role == Role::Prefill).then(|| {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                state.held_kv.expire();
            }
        })
    });
    let graceful = GracefulShutdown::new();
    accept_connections(
        &listener,
        shutdown,
        max_connections,
        &graceful,
        move |req| {
            let state = state.clone();
            async move { state.handle(req).await }
        },
    )
    .await?;
    drop(listener);
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }

    // Finish what is in flight (new requests get 503 from now on), within the timeout.
    let draining = tokio::task::spawn_blocking({
        let engine = engine.clone();
        move || engine.shutdown(false)
    });
    let drained = tokio::select! {
        _ = draining => true,
        () = tokio::time::sleep(timeout) => false,
        () = hurry => false,
    };
    if !drained {
        let engine = engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.shutdown(true)).await;
    }
    // Every request has its final event now; let the connections write it and close.
    let connections_left = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err();
    Ok(ShutdownReport {
        drained,
        connections_left,
    })
}

/// Accept connections on `listener` until `shutdown` resolves, each served by `handle` on a task
/// of its own and watched by `graceful`; at most `max_connections` open at once (one more is
/// answered 503 and closed without parsing). The accept loop of `vkv serve` and `vkv route`.
pub(crate) async fn accept_connections<H, F, B>(
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
    max_connections: usize,
    graceful: &GracefulShutdown,
    handle: H,
) -> Result<(), ServerError>
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes, Error = std::convert::Infallible> + Send + 'static,
{
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of file descriptors and the like: wait a little rather than spin or die.
                Err(e) if is_transient(&e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(ServerError::Accept(e)),
            },
            () = &mut shutdown => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        // A connection over the cap is told so in one write and closed: no task, no parsing.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                max_connections,
                "connection refused: too many open connections"
            );
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        let handle = handle.clone();
        let service = service_fn(move |req| {
            let answer = handle(req);
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        // The timer enables hyper's 30 s limit on reading request headers (slow clients).
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that resets or times out is its own business.
            let _ = conn.await;
            drop(permit);
        });
    }
}

/// The answer to a connection over `max_connections`: a 503 without reading the request, then
/// close. Bounded by a short timeout so that a client that reads nothing cannot hold it.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = crate::error::ApiError::unavailable(
        "the server has too many open connections; retry later",
    )
    .with_code("too_many_connections")
    .json();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Raise this process's soft limit on open files to its hard limit (as servers do at start), so
/// that `max_connections` can be large; returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24) // EMFILE
        || e.raw_os_error() == Some(23) // ENFILE
}
