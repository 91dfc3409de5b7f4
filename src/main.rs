//! `dynamo-run`: the launcher.
//!
//! - `dynamo-run in=http|text|batch:FILE out=echo|dyn [flags]`: a frontend (OpenAI HTTP, a
//!   terminal chat, or a JSONL batch) with engines in this process or on the bus;
//! - `dynamo-run in=dyn://NAMESPACE.COMPONENT.ENDPOINT out=echo --model-path DIR`: a worker;
//! - `dynamo-run router`: the KV router as its own component (`{ns}.router.route`);
//! - `dynamo-run serve GRAPH.yaml`: a component graph, in this process or as child processes;
//! - `dynamo-run make-model --out DIR`: a small Hugging Face-style model folder;
//! - `dynamo-run bench --url URL --model NAME --workload ...`: an OpenAI-HTTP load generator;
//! - `dynamo-run ls`: instances in discovery (models, load) and services answering the NATS
//!   service protocol; `dynamo-run watch events|load`: the namespace's KV events or load, tailed;
//! - `demo`, `serve-echo`, `call-echo`: the runtime's echo diagnostics.
//!
//! Without `--bus` everything runs in this process on the embedded bus.
#![forbid(unsafe_code)]

mod bench;
mod diag;
mod graph;
mod launch;
mod serve;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dynamo_actors::frontend::RouterMode;
use dynamo_actors::router::KvRouterSettings;
use dynamo_engine::native::random::RandomModel;
use dynamo_engine::native::weights::Dtype;
use dynamo_engine::native::Compute;
use dynamo_engine::{MockerFaults, MockerSettings, NativeSettings};
use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
use dynamo_protocols::echo::EchoRequest;
use dynamo_protocols::llm::WorkerKind;
use dynamo_runtime::subject::ComponentId;
use dynamo_runtime::{config, telemetry, Runtime, RuntimeSettings};
use serde::Serialize;

use launch::{Input, LaunchSettings, Output};

#[derive(Parser)]
#[command(
    name = "dynamo-run",
    version,
    about = "Serve language models over the OpenAI API, in one process or across many",
    after_help = "Examples:\n  dynamo-run make-model --out /tmp/tiny\n  dynamo-run in=http out=echo --model-path /tmp/tiny\n  dynamo-run in=dyn://dynamo.backend.generate out=echo --model-path /tmp/tiny --bus nats://127.0.0.1:4222\n  dynamo-run in=http out=dyn --bus nats://127.0.0.1:4222"
)]
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
    /// Serve Prometheus metrics on this port (the frontend also serves /metrics).
    #[arg(long, global = true)]
    metrics_port: Option<u16>,
    /// Stop (gracefully) when the parent process dies: set by `serve` on its children, so a
    /// supervisor killed with SIGKILL leaves no orphans.
    #[arg(long, global = true, hide = true)]
    exit_with_parent: bool,
    #[command(flatten)]
    launch: LaunchArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct LaunchArgs {
    /// `in=http|text|batch:FILE.jsonl|dyn://NS.COMPONENT.ENDPOINT` and `out=echo|mocker|dyn`
    /// (defaults: in=http out=echo).
    #[arg(value_name = "in=... out=...")]
    io: Vec<String>,
    /// A Hugging Face model folder (tokenizer.json, tokenizer_config.json, config.json).
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// The name clients use; default: the folder's name.
    #[arg(long)]
    model_name: Option<String>,
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    http_host: IpAddr,
    /// kv, round-robin, random, least-loaded, or direct (requests name the worker in
    /// nvext.backend_instance_id).
    #[arg(long, default_value = "round-robin")]
    router_mode: RouterMode,
    #[command(flatten)]
    router: RouterArgs,
    /// Modes kv and least-loaded: ask the router component (`dynamo-run router`) on the bus
    /// for each request's worker instead of routing in this process.
    #[arg(long)]
    remote_router: bool,
    /// What the workers of this process do: aggregated (prefill and decode), prefill (answers
    /// `prefill` requests; only with in=dyn://...) or decode.
    #[arg(long, default_value = "aggregated")]
    worker_kind: WorkerKind,
    /// Workers to host in this process (out=echo, out=mocker).
    #[arg(long, default_value_t = 1)]
    num_workers: usize,
    /// Echo engine: time per generated token.
    #[arg(long, default_value_t = 10)]
    echo_delay_ms: u64,
    /// KV cache block size in tokens (mocker; published in the model card).
    #[arg(long, alias = "kv-block-size", default_value_t = 64)]
    block_size: usize,
    /// KV cache blocks per worker (mocker default 16384; native default: what
    /// --kv-cache-memory holds).
    #[arg(long)]
    num_gpu_blocks: Option<usize>,
    /// Native: KV cache size per worker when --num-gpu-blocks is unset (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "1GiB")]
    kv_cache_memory: String,
    /// Native: arithmetic type of the weights, f32 or bf16 (activations and KV stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Sequences per batch at most (mocker, native).
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Tokens per step at most, prefill chunks plus decodes (mocker, native).
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    /// Mocker: simulated time is divided by this.
    #[arg(long, default_value_t = 1.0)]
    speedup_ratio: f64,
    /// Mocker fault injection (tests, chaos runs): the engine panics at this step (counted
    /// from 1 at each engine start); the worker fails its open requests and restarts it.
    #[arg(long, value_name = "STEP")]
    mocker_panic_at_step: Option<u64>,
    /// Mocker fault injection: the engine panics when it computes a prompt holding this token id.
    #[arg(long, value_name = "TOKEN_ID")]
    mocker_panic_on_token: Option<u32>,
    /// Mocker fault injection: this step stalls for --mocker-stall-ms (a hung engine).
    #[arg(long, value_name = "STEP", requires = "mocker_stall_ms")]
    mocker_stall_at_step: Option<u64>,
    #[arg(long, value_name = "MS", requires = "mocker_stall_at_step")]
    mocker_stall_ms: Option<u64>,
    /// Requests in flight beyond this get 429.
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,
    /// Request bodies over this many bytes get 413.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,
    /// in=batch: requests in flight at once.
    #[arg(long, default_value_t = 16)]
    batch_concurrency: usize,
}

/// The KV router's settings (frontends with --router-mode kv, and `dynamo-run router`).
#[derive(Args, Clone)]
struct RouterArgs {
    /// KV router: weight of prefill work (blocks not cached) against decode load.
    #[arg(long, default_value_t = 1.0)]
    kv_overlap_score_weight: f64,
    /// KV router: 0 picks the lowest cost; above 0 samples with a softmax at this temperature.
    #[arg(long, default_value_t = 0.0)]
    router_temperature: f64,
    /// KV router: skip workers whose KV usage fraction is above this (all busy: 503).
    /// Unset: never skip (the engines queue).
    #[arg(long)]
    busy_threshold: Option<f64>,
}

impl RouterArgs {
    fn settings(&self) -> Result<KvRouterSettings> {
        if !(self.kv_overlap_score_weight.is_finite() && self.kv_overlap_score_weight >= 0.0) {
            bail!("--kv-overlap-score-weight must be a number >= 0");
        }
        if !(self.router_temperature.is_finite() && self.router_temperature >= 0.0) {
            bail!("--router-temperature must be a number >= 0");
        }
        if self.busy_threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            bail!("--busy-threshold must be in (0, 1]");
        }
        Ok(KvRouterSettings {
            overlap_weight: self.kv_overlap_score_weight,
            temperature: self.router_temperature,
            busy_threshold: self.busy_threshold,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start a component graph (config/*.yaml): in this process on the embedded bus, or with
    /// --bus as supervised child processes, one per component replica.
    Serve {
        /// The graph file.
        file: PathBuf,
        /// With --bus: start only this component (a graph spread over machines).
        #[arg(long)]
        only: Option<String>,
        /// Override a setting: COMPONENT.KEY=VALUE or defaults.KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "COMPONENT.KEY=VALUE")]
        set: Vec<String>,
    },
    /// Run the KV router as its own component (`{namespace}.router.route`) until SIGTERM;
    /// frontends use it with --router-mode kv --remote-router.
    Router(RouterArgs),
    /// Write a small Hugging Face-style model folder (tokenizer, chat template, config).
    /// With deterministic random safetensors weights: `tiny` (2 layers, hidden 64; for tests)
    /// or `small` (SmolLM2-135M's layer shapes; for benchmarks).
    MakeModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value_t = 4096)]
        context_length: u32,
        /// tiny or small.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Element type of the weight files: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        weights_dtype: String,
    },
    /// Load-test an OpenAI frontend and report throughput and latency.
    Bench(Box<bench::BenchArgs>),
    /// List instances in discovery (with their models and load) and services answering the
    /// NATS service protocol.
    Ls,
    /// Tail the namespace's KV events (`events`) or load reports (`load`) as readable lines.
    Watch {
        /// events or load.
        what: String,
    },
    /// Runtime diagnostics: serve the echo role on the embedded bus, call it, shut down.
    Demo {
        #[arg(long, default_value_t = 3)]
        requests: u32,
    },
    /// Runtime diagnostics: serve the echo role until SIGTERM or SIGINT.
    ServeEcho,
    /// Runtime diagnostics: call the echo role once and print each streamed chunk.
    CallEcho {
        #[arg(long, default_value = "hello")]
        text: String,
        #[arg(long, default_value_t = 3)]
        repeat: u32,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
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

/// `1GiB`, `512MiB`, `64KiB`, `1000000` (bytes), `2GB`.
fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("expected a size like 512MiB or 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => (1u64 << 20) as f64,
        "g" | "gb" => 1e9,
        "gib" => (1u64 << 30) as f64,
        other => bail!("unknown unit {other:?}; use B, KiB, MiB or GiB"),
    };
    let bytes = n * mult;
    if !(bytes.is_finite() && bytes >= 1.0) {
        bail!("expected a positive size");
    }
    Ok(bytes as usize)
}

fn launch_settings(cli: &Cli) -> Result<LaunchSettings> {
    let a = &cli.launch;
    let (mut input, mut output) = (Input::Http, Output::Echo);
    for arg in &a.io {
        match arg.split_once('=') {
            Some(("in", v)) => input = v.parse()?,
            Some(("out", v)) => output = v.parse()?,
            _ => bail!("unexpected argument {arg:?}; expected in=... or out=... (see --help)"),
        }
    }
    let mocker = MockerSettings {
        num_gpu_blocks: a.num_gpu_blocks.unwrap_or(16384),
        block_size: a.block_size,
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        speedup_ratio: a.speedup_ratio,
        faults: MockerFaults {
            panic_at_step: a.mocker_panic_at_step,
            panic_on_token: a.mocker_panic_on_token,
            stall_at_step: a.mocker_stall_at_step,
            stall_for: Duration::from_millis(a.mocker_stall_ms.unwrap_or(0)),
        },
        ..Default::default()
    };
    if output == Output::Mocker {
        mocker
            .validate()
            .map_err(|e| anyhow::anyhow!("mocker settings: {e}"))?;
    }
    let native = NativeSettings {
        compute: match a.dtype.as_str() {
            "f32" => Compute::F32,
            "bf16" => Compute::Bf16,
            other => bail!("--dtype {other:?}: use f32 or bf16"),
        },
        block_size: a.block_size,
        num_gpu_blocks: a.num_gpu_blocks,
        kv_cache_memory: parse_bytes(&a.kv_cache_memory)
            .with_context(|| format!("--kv-cache-memory {:?}", a.kv_cache_memory))?,
        max_num_seqs: a.max_num_seqs,
        max_num_batched_tokens: a.max_num_batched_tokens,
        ..Default::default()
    };
    if a.block_size == 0 {
        bail!("--block-size must be positive");
    }
    let kv_router = a.router.settings()?;
    if a.remote_router && !a.router_mode.uses_kv_router() {
        bail!("--remote-router needs --router-mode kv or least-loaded");
    }
    if a.worker_kind == WorkerKind::Prefill && !matches!(input, Input::Endpoint(_)) {
        bail!("--worker-kind prefill serves prefill requests on the bus: run it as in=dyn://NAMESPACE.COMPONENT.prefill (a frontend never sends it whole requests)");
    }
    if let Some(name) = &a.model_name {
        if name.trim().is_empty() {
            bail!("--model-name must not be empty");
        }
    }
    Ok(LaunchSettings {
        input,
        output,
        namespace: cli.namespace.clone(),
        model_path: a.model_path.clone(),
        model_name: a.model_name.clone(),
        http_addr: SocketAddr::new(a.http_host, a.http_port),
        router_mode: a.router_mode,
        kv_router,
        remote_router: a.remote_router,
        num_workers: a.num_workers,
        worker_kind: a.worker_kind,
        echo_delay: Duration::from_millis(a.echo_delay_ms),
        mocker,
        native,
        max_inflight: a.max_inflight,
        max_body_bytes: a.max_body_bytes,
        batch_concurrency: a.batch_concurrency,
    })
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(Command::MakeModel {
        out,
        vocab_size,
        context_length,
        preset,
        weights_dtype,
    }) = &cli.command
    {
        if *vocab_size < 512 {
            bail!("--vocab-size must be at least 512");
        }
        let dtype = match weights_dtype.as_str() {
            "f32" => Dtype::F32,
            "bf16" => Dtype::Bf16,
            "f16" => Dtype::F16,
            other => bail!("--weights-dtype {other:?}: use f32, bf16 or f16"),
        };
        // Checked before training the tokenizer.
        RandomModel::preset(preset, *vocab_size).map_err(|e| anyhow::anyhow!("--preset: {e}"))?;
        eprintln!("training a {vocab_size}-token byte-level BPE tokenizer...");
        let s = MakeModelSettings {
            vocab_size: *vocab_size,
            context_length: *context_length,
            ..Default::default()
        };
        let vocab = make_model(out, &s)?;
        let mut weights = RandomModel::preset(preset, vocab).map_err(|e| anyhow::anyhow!("{e}"))?;
        weights.max_position_embeddings = *context_length as usize;
        weights.dtype = dtype;
        eprintln!(
            "writing {preset} weights ({:.1}M parameters, {weights_dtype})...",
            dynamo_engine::native::config::ModelConfig::parse(&weights.config_keys().to_string())
                .map(|c| c.parameters() as f64 / 1e6)
                .unwrap_or(0.0)
        );
        weights
            .write(out, &mut |done, total| {
                if done == total || done % 50 == 0 {
                    launch::progress("tensors", done, total);
                }
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!(
            "wrote {} (vocabulary {vocab}, context {context_length})",
            out.display()
        );
        return Ok(());
    }
    if let Some(Command::Bench(args)) = &cli.command {
        return bench::run((**args).clone()).await;
    }
    let launch = match &cli.command {
        None => Some(launch_settings(&cli)?),
        Some(_) => None,
    };
    let router = match &cli.command {
        Some(Command::Router(args)) => Some(args.settings()?),
        _ => None,
    };
    // A graph is validated before anything starts.
    let graph = match &cli.command {
        Some(Command::Serve { file, set, .. }) => {
            // `DYN_GRAPH__*` overrides: read here, with the other command-line settings.
            let env: Vec<(String, String)> = std::env::vars().collect();
            Some(graph::load(file, &env, set)?)
        }
        _ => None,
    };
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
    if cli.exit_with_parent {
        let (parent, stop) = (nix::unistd::getppid(), runtime.shutdown_token());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if nix::unistd::getppid() != parent {
                    stop.cancel();
                    // Its end of our stderr may be gone too: never panic on the write.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "the supervising process is gone: shutting down"
                    );
                    return;
                }
            }
        });
    }
    let result = match cli.command {
        None => launch::run(&runtime, launch.expect("parsed above")).await,
        Some(Command::MakeModel { .. }) | Some(Command::Bench(_)) => unreachable!("handled above"),
        Some(Command::Demo { requests }) => diag::demo(&runtime, component, requests).await,
        Some(Command::ServeEcho) => diag::serve_echo(&runtime, component).await,
        Some(Command::CallEcho {
            text,
            repeat,
            delay_ms,
        }) => {
            let req = EchoRequest {
                text,
                repeat,
                delay_ms,
            };
            diag::call_echo(&runtime, &component, &req, true)
                .await
                .map(|_| ())
        }
        Some(Command::Ls) => diag::ls(&runtime).await,
        Some(Command::Watch { what }) => diag::watch(&runtime, &cli.namespace, &what).await,
        Some(Command::Serve { only, .. }) => {
            let g = graph.expect("loaded above");
            match cli.bus.clone().or_else(|| g.bus.clone()) {
                Some(bus) => serve::supervised(&runtime, &g, &bus, only.as_deref()).await,
                None if only.is_some() => {
                    Err(anyhow::anyhow!("--only needs a bus (--bus nats://...): without one the whole graph runs in this process"))
                }
                None => serve::embedded(&runtime, &g).await,
            }
        }
        Some(Command::Router(_)) => {
            launch::run_router(&runtime, &cli.namespace, router.expect("parsed above")).await
        }
    };
    runtime.close().await;
    result
}
