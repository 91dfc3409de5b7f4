//! `dynamo-run`: the launcher.
//!
//! For now it starts the runtime and the echo role (the issues that add the OpenAI frontend,
//! engines and graphs extend it):
//! - `dynamo-run demo`: everything in one process on the embedded bus, a few streamed calls,
//!   what discovery and the service protocol show, then a graceful shutdown;
//! - `dynamo-run serve-echo`: serve the echo endpoint until SIGTERM/SIGINT;
//! - `dynamo-run call-echo`: one streamed call;
//! - `dynamo-run ls`: instances in discovery and services answering `$SRV.INFO`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use dynamo_actors::echo::{EchoRole, ENDPOINT};
use dynamo_protocols::echo::{EchoChunk, EchoRequest};
use dynamo_runtime::bus::Headers;
use dynamo_runtime::subject::{service_query_subject, ComponentId, DiscoveryFilter, ServiceVerb};
use dynamo_runtime::{config, telemetry, CallOptions, Runtime, RuntimeSettings, Target};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "dynamo-run", version, about = "Run dynamo components")]
struct Cli {
    /// A YAML file of runtime settings (overridden by DYN_* variables and flags).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// nats://HOST:PORT; without it everything runs in this process on the embedded bus.
    #[arg(long, global = true)]
    bus: Option<String>,
    /// Namespace of the components.
    #[arg(long, global = true, default_value = "dynamo")]
    namespace: String,
    /// Log filter (e.g. info, debug, dynamo_runtime=debug).
    #[arg(long, global = true)]
    log: Option<String>,
    /// Serve Prometheus metrics on this port.
    #[arg(long, global = true)]
    metrics_port: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an echo endpoint on the embedded bus, call it, show discovery, shut down.
    Demo {
        /// How many streamed calls to make.
        #[arg(long, default_value_t = 3)]
        requests: u32,
    },
    /// Serve the echo endpoint until SIGTERM or SIGINT.
    ServeEcho,
    /// Call the echo endpoint once and print each streamed chunk.
    CallEcho {
        #[arg(long, default_value = "hello")]
        text: String,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// List instances in discovery and services answering the NATS service protocol.
    Ls,
}

/// Flags that override settings; unset ones are skipped.
#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    bus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_port: Option<u16>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let overrides = Overrides {
        bus: cli.bus.clone(),
        log: cli.log.clone(),
        metrics_port: cli.metrics_port,
    };
    let settings: RuntimeSettings = config::load(cli.config.as_deref(), &overrides)?;
    settings.validate()?;
    telemetry::init_tracing(&settings.log)?;
    let listen = settings
        .metrics_port
        .map(|p| SocketAddr::from(([0, 0, 0, 0], p)));
    telemetry::install_metrics(listen)?;
    let component = ComponentId::new(&cli.namespace, "echo")
        .with_context(|| format!("--namespace {:?}", cli.namespace))?;
    let runtime = Runtime::start(settings)
        .await
        .context("starting the runtime")?;
    let result = match cli.command {
        Command::Demo { requests } => demo(&runtime, component, requests).await,
        Command::ServeEcho => serve_echo(&runtime, component).await,
        Command::CallEcho {
            text,
            repeat,
            delay_ms,
        } => {
            let req = EchoRequest {
                text,
                repeat,
                delay_ms,
            };
            call_echo(&runtime, &component, &req, true)
                .await
                .map(|_| ())
        }
        Command::Ls => ls(&runtime).await,
    };
    runtime.close().await;
    result
}

async fn serve_echo(runtime: &Runtime, component: ComponentId) -> Result<()> {
    let instance = runtime.component(component, serde_json::json!({})).await?;
    let role = EchoRole::start(&instance).await?;
    let ep = role.served().endpoint().clone();
    println!("ready endpoint={ep} instance={}", instance.id());
    std::io::stdout().flush()?;
    let stop = runtime.shutdown_token();
    let signal = tokio::select! {
        s = dynamo_runtime::shutdown_signal() => s,
        _ = stop.cancelled() => "runtime shutdown",
    };
    let grace = runtime.settings().shutdown_grace;
    eprintln!("{signal}: draining open requests (up to {grace:?})");
    let report = role.shutdown(grace).await;
    eprintln!(
        "stopped: {} open at shutdown, {} cancelled",
        report.open_at_start, report.cancelled
    );
    Ok(())
}

async fn call_echo(
    runtime: &Runtime,
    component: &ComponentId,
    req: &EchoRequest,
    print: bool,
) -> Result<Vec<EchoChunk>> {
    let ep = component.endpoint(ENDPOINT)?;
    let mut stream = runtime
        .client()
        .call::<_, EchoChunk>(Target::Any(ep), req, CallOptions::default())
        .await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if print {
            println!("  [{}] {}", chunk.index, chunk.text);
        }
        out.push(chunk);
    }
    Ok(out)
}

async fn demo(runtime: &Runtime, component: ComponentId, requests: u32) -> Result<()> {
    println!(
        "dynamo-run demo: runtime on the {} bus",
        runtime.bus().transport()
    );
    let instance = runtime
        .component(component.clone(), serde_json::json!({}))
        .await?;
    let role = EchoRole::start(&instance).await?;
    println!(
        "serving {} as instance {}",
        role.served().endpoint(),
        instance.id()
    );
    for i in 0..requests {
        let req = EchoRequest {
            text: format!("hello #{i} from the echo actor"),
            repeat: 3,
            delay_ms: 10,
        };
        let started = Instant::now();
        println!("request {i}: streaming {} chunks", req.repeat);
        let chunks = call_echo(runtime, &component, &req, true).await?;
        if chunks.len() != req.repeat as usize {
            bail!("expected {} chunks, got {}", req.repeat, chunks.len());
        }
        println!("request {i}: done in {:?}", started.elapsed());
    }
    ls(runtime).await?;
    let report = role.shutdown(Duration::from_secs(5)).await;
    println!(
        "shut down gracefully ({} requests open at shutdown)",
        report.open_at_start
    );
    Ok(())
}

async fn ls(runtime: &Runtime) -> Result<()> {
    let instances = runtime.discovery().list(&DiscoveryFilter::all()).await?;
    println!("instances in discovery: {}", instances.len());
    for i in &instances {
        println!("  {}  {}  {}", i.endpoint, i.instance, i.metadata);
    }
    let mut services = Vec::new();
    let bus = runtime.bus();
    match bus
        .request(
            service_query_subject(ServiceVerb::Info),
            Headers::new(),
            Bytes::new(),
            Duration::from_millis(500),
        )
        .await
    {
        Ok(mut replies) => {
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(200), replies.next()).await
            {
                services.push(serde_json::from_slice::<serde_json::Value>(&m.payload)?);
            }
        }
        Err(dynamo_runtime::BusError::NoResponders { .. })
        | Err(dynamo_runtime::BusError::Timeout { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    println!("services answering $SRV.INFO: {}", services.len());
    for s in &services {
        let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
        for e in endpoints {
            println!(
                "  {}  id={}  endpoint={}  subject={}",
                s["name"].as_str().unwrap_or("?"),
                s["id"].as_str().unwrap_or("?"),
                e["name"].as_str().unwrap_or("?"),
                e["subject"].as_str().unwrap_or("?"),
            );
        }
    }
    Ok(())
}
