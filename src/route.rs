//! `vkv route`: the front of disaggregated serving — an OpenAI-compatible server that splits
//! each request between a prefill instance and a decode instance (`vkv_server::router`).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vkv_bench::units::parse_bytes;
use vkv_server::router::{route, RouterConfig};

use crate::serve::{bind, connection_cap, runtime};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Base URL of a prefill instance (`vkv serve --role prefill`), e.g. http://10.0.0.1:8001;
    /// repeat for several.
    #[arg(long, required = true)]
    prefill: Vec<String>,
    /// Base URL of a decode instance (`vkv serve --role decode`); repeat for several.
    #[arg(long, required = true)]
    decode: Vec<String>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (the startup line says which).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*, and send it to the instances (started with
    /// the same `--api-key`).
    #[arg(long = "api-key")]
    api_key: Option<String>,
    /// Seconds between health probes of every instance.
    #[arg(long = "health-interval", default_value_t = 1.0)]
    health_interval: f64,
    /// Larger request bodies are refused with 413.
    #[arg(long = "max-body-size", default_value = "4MiB", value_parser = parse_bytes)]
    max_body_size: usize,
    /// Connections open at once; more are answered 503 and closed. Default: as `vkv serve`'s.
    #[arg(long = "max-connections")]
    max_connections: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    if !(args.health_interval > 0.0 && args.health_interval.is_finite()) {
        bail!(
            "--health-interval must be a number of seconds above 0, found {}",
            args.health_interval
        );
    }
    for url in args.prefill.iter().chain(&args.decode) {
        if !url.starts_with("http://") {
            bail!("instance URLs must be http://host:port, found {url:?}");
        }
    }
    let config = RouterConfig {
        prefill: args.prefill.clone(),
        decode: args.decode.clone(),
        api_key: args.api_key.clone(),
        health_interval: Duration::from_secs_f64(args.health_interval),
        max_body_bytes: args.max_body_size,
        max_connections: connection_cap(args.max_connections)?,
    };
    runtime()?.block_on(async {
        let (listener, addr) = bind(&args.host, args.port).await?;
        println!(
            "vkv route: on http://{addr} (prefill {}; decode {})",
            args.prefill.join(", "),
            args.decode.join(", ")
        );
        std::io::stdout().flush().ok();
        let shutdown = async {
            let _ = vkv_server::shutdown_signal().await;
        };
        route(config, listener, shutdown).await.context("routing")?;
        eprintln!("vkv route: stopped");
        Ok(())
    })
}
