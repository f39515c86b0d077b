//! `vkv serve`: load the model, start the engine, bind, print one startup line (model, address,
//! device, KV mode and capacity), and serve the OpenAI-compatible API until SIGINT or SIGTERM (a
//! second signal aborts what is still running). The server is [`vkv_server::serve`]'s.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vkv_bench::units::parse_bytes;
use vkv_engine::engine::Engine;
use vkv_engine::model::load_model;
use vkv_server::{Role, ServerConfig};

use crate::engine_args::{model_path, EngineArgs};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A GGUF file, an HF directory or preset:NAME (random weights; presets over 2 B parameters
    /// need --device cuda). Default: SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the startup line says which).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long = "api-key")]
    api_key: Option<String>,
    /// The model name clients use (default: the model file's name without `.gguf`).
    #[arg(long = "served-model-name")]
    served_model_name: Option<String>,
    /// Larger request bodies are refused with 413.
    #[arg(long = "max-body-size", default_value = "4MiB", value_parser = parse_bytes)]
    max_body_size: usize,
    /// Seconds requests in flight may run on after SIGINT/SIGTERM before they are aborted.
    #[arg(long = "shutdown-timeout", default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Seconds a request body may take to arrive after its headers (then 408 and the connection
    /// closes), so that slow or stalled uploads cannot hold connections for ever.
    #[arg(long = "request-timeout", default_value_t = 30.0)]
    request_timeout: f64,
    /// Connections open at once; more are answered 503 and closed. Default: the open-file limit
    /// (raised to its hard limit at start) less 256 for the process's own files.
    #[arg(long = "max-connections")]
    max_connections: Option<usize>,
    /// Disaggregated serving (DistServe, behind `vkv route`): `prefill` also serves the prefill
    /// halves of requests and holds their prompt KV for decode instances to pull; `decode` also
    /// serves the decode halves, pulling that KV; `both` serves requests whole only.
    #[arg(long, value_enum, default_value_t = RoleArg::Both)]
    role: RoleArg,
    /// Prefill role: seconds a prefill half's prompt KV waits for its decode instance before it
    /// is dropped; decode role: the longest a pull may take.
    #[arg(long = "kv-handoff-timeout", default_value_t = 30.0)]
    kv_handoff_timeout: f64,
    #[command(flatten)]
    engine: EngineArgs,
}

/// `--max-connections`, or the default: the open-file limit (raised to its hard limit here) less
/// 256 for the process's own files. `vkv serve`'s rule, and `vkv route`'s.
pub(crate) fn connection_cap(flag: Option<usize>) -> Result<usize> {
    let open_files = vkv_server::raise_open_files_limit().context("reading the open-file limit")?;
    Ok(match flag {
        Some(0) => bail!("--max-connections must be at least 1, found 0"),
        Some(n) => n,
        None => (open_files.saturating_sub(256) as usize).max(16),
    })
}

/// The async runtime the HTTP commands run on (the engine has its own threads).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Listen on `host:port` (0: a free port); the listener and the address it got.
pub(crate) async fn bind(
    host: &str,
    port: u16,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    Ok((listener, addr))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    Both,
    Prefill,
    Decode,
}

pub fn run(args: Args) -> Result<()> {
    for (flag, seconds) in [
        ("--shutdown-timeout", args.shutdown_timeout),
        ("--request-timeout", args.request_timeout),
        ("--kv-handoff-timeout", args.kv_handoff_timeout),
    ] {
        if !(seconds >= 0.0 && seconds.is_finite()) {
            bail!("{flag} must be a number of seconds ≥ 0, found {seconds}");
        }
    }
    let max_connections = connection_cap(args.max_connections)?;
    let role = match args.role {
        RoleArg::Both => Role::Both,
        RoleArg::Prefill => Role::Prefill,
        RoleArg::Decode => Role::Decode,
    };
    let mode = args.engine.kv.mode()?;
    let device = args.engine.device()?;
    let path = model_path(args.model.clone())?;
    let model = load_model(&path).context("loading the model")?;
    let served_model_name = args.served_model_name.clone().unwrap_or_else(|| {
        model
            .name
            .strip_suffix(".gguf")
            .unwrap_or(&model.name)
            .to_string()
    });
    let engine = Arc::new(
        Engine::start(model, args.engine.config(mode, device)).context("starting the engine")?,
    );
    let metrics = engine.metrics();
    runtime()?.block_on(async {
        let (listener, addr) = bind(&args.host, args.port).await?;
        println!(
            "vkv serve: {served_model_name} on http://{addr} (role {}, device {}, KV {}, capacity {} tokens, max model len {}, max num seqs {}; {})",
            role.as_str(),
            metrics.device,
            metrics.kv_name,
            engine.kv_capacity_tokens(),
            engine.max_model_len(),
            args.engine.max_num_seqs,
            vkv_engine::RuntimeSwitches::get(),
        );
        std::io::stdout().flush().ok();
        // The first signal starts the shutdown; a second one aborts what is left.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
        let mut signals = tokio::spawn(async move {
            vkv_server::shutdown_signal().await?;
            let _ = first_tx.send(());
            vkv_server::shutdown_signal().await?;
            let _ = second_tx.send(());
            Ok::<_, vkv_server::ServerError>(())
        });
        let config = ServerConfig {
            api_key: args.api_key.clone(),
            served_model_name,
            max_body_bytes: args.max_body_size,
            shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
            request_timeout: Duration::from_secs_f64(args.request_timeout),
            max_connections,
            role,
            kv_handoff_timeout: Duration::from_secs_f64(args.kv_handoff_timeout),
        };
        let serving = vkv_server::serve(
            engine.clone(),
            config,
            listener,
            async {
                let _ = first_rx.await;
                eprintln!("vkv serve: shutting down (a second signal aborts requests in flight)");
            },
            async {
                let _ = second_rx.await;
            },
        );
        let report = tokio::select! {
            report = serving => report?,
            // The signal handler could not be installed: nothing could stop the server cleanly.
            Ok(Err(e)) = &mut signals => return Err(e.into()),
        };
        signals.abort();
        eprintln!(
            "vkv serve: stopped ({})",
            if report.drained {
                "every request in flight finished"
            } else {
                "requests still in flight were aborted"
            }
        );
        Ok(())
    })
}
