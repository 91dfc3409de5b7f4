//! `dynamo-run`: the launcher.
//!
//! - `dynamo-run in=http|text|batch:FILE out=echo|dyn [flags]`: a frontend (OpenAI HTTP, a
//!   terminal chat, or a JSONL batch) with engines in this process or on the bus;
//! - `dynamo-run in=dyn://NAMESPACE.COMPONENT.ENDPOINT out=echo --model-path DIR`: a worker;
//! - `dynamo-run router`: the KV router as its own component (`{ns}.router.route`);
//! - `dynamo-run planner`: scales worker pools to hold latency targets;
//! - `dynamo-run serve GRAPH.yaml`: a component graph, in this process or as child processes;
//! - `dynamo-run make-model --out DIR`: a small Hugging Face-style model folder;
//! - `dynamo-run bench --url URL --model NAME --workload ...`: an OpenAI-HTTP load generator;
//! - `dynamo-run ls`: instances in discovery (models, load) and services answering the NATS
//!   service protocol; `dynamo-run watch events|load|stats`: the namespace's KV events,
//!   workers' load and steps, or frontends' request statistics, tailed;
//! - `demo`, `serve-echo`, `call-echo`: the runtime's echo diagnostics.
//!
//! Without `--bus` everything runs in this process on the embedded bus.
#![forbid(unsafe_code)]

mod bench;
mod diag;
mod graph;
mod launch;
mod profile;
mod scale;
mod serve;
mod settings;
mod simulate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use dynamo_engine::native::random::RandomModel;
use dynamo_engine::native::weights::Dtype;
use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
use dynamo_protocols::echo::EchoRequest;
use dynamo_protocols::llm::WorkerKind;
use dynamo_runtime::subject::ComponentId;
use dynamo_runtime::{config, telemetry, Runtime, RuntimeSettings};
use serde::Serialize;

use launch::{Input, LaunchSettings, Output};
use settings::Settings;

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
    /// NATS credentials file (JWT and NKey seed, as `nsc generate creds` writes it). User and
    /// password, token or NKey seed: DYN_NATS__USER/PASSWORD, DYN_NATS__TOKEN,
    /// DYN_NATS__NKEY_SEED or `nats:` in --config, never flags (ps shows flags).
    #[arg(long, global = true, value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// PEM certificate authority that signed nats-server's certificate (implies TLS).
    #[arg(long, global = true, value_name = "FILE")]
    nats_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS with nats-server (with --nats-key).
    #[arg(long, global = true, value_name = "FILE", requires = "nats_key")]
    nats_cert: Option<PathBuf>,
    /// PEM private key of --nats-cert.
    #[arg(long, global = true, value_name = "FILE", requires = "nats_cert")]
    nats_key: Option<PathBuf>,
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

/// `dynamo-run profile`: the measurement's flags and the engine's (those workers take).
#[derive(Args)]
struct ProfileCommand {
    #[command(flatten)]
    profile: profile::ProfileArgs,
    #[command(flatten)]
    launch: LaunchArgs,
}

/// Launcher settings (see `settings.rs`): each flag can also come from `DYN_{FLAG}` in the
/// environment (flags win); unset ones take the documented default.
#[derive(Args)]
struct LaunchArgs {
    /// `in=http|text|batch:FILE.jsonl|dyn://NS.COMPONENT.ENDPOINT` and `out=echo|mocker|native|openai|dyn`
    /// (defaults: in=http out=echo).
    #[arg(value_name = "in=... out=...")]
    io: Vec<String>,
    /// A Hugging Face model folder (tokenizer.json, tokenizer_config.json, config.json).
    #[arg(long, env = "DYN_MODEL_PATH")]
    model_path: Option<PathBuf>,
    /// The name clients use; default: the folder's name.
    #[arg(long, env = "DYN_MODEL_NAME")]
    model_name: Option<String>,
    /// [default: 8080]
    #[arg(long, env = "DYN_HTTP_PORT")]
    http_port: Option<u16>,
    /// [default: 0.0.0.0]
    #[arg(long, env = "DYN_HTTP_HOST")]
    http_host: Option<String>,
    /// kv, round-robin, random, least-loaded, or direct (requests name the worker in
    /// nvext.backend_instance_id). [default: round-robin]
    #[arg(long, env = "DYN_ROUTER_MODE")]
    router_mode: Option<String>,
    #[command(flatten)]
    router: RouterArgs,
    /// Modes kv and least-loaded: ask the router component (`dynamo-run router`) on the bus
    /// for each request's worker instead of routing in this process.
    #[arg(long, env = "DYN_REMOTE_ROUTER")]
    remote_router: bool,
    /// What the workers of this process do: aggregated (prefill and decode), prefill (answers
    /// `prefill` requests; only with in=dyn://...) or decode. [default: aggregated]
    #[arg(long, env = "DYN_WORKER_KIND")]
    worker_kind: Option<WorkerKind>,
    /// Workers to host in this process (out=echo, mocker, native). [default: 1]
    #[arg(long, env = "DYN_NUM_WORKERS")]
    num_workers: Option<usize>,
    /// Echo engine: time per generated token. [default: 10]
    #[arg(long, env = "DYN_ECHO_DELAY_MS")]
    echo_delay_ms: Option<u64>,
    /// out=openai: the engine server this worker fronts (vLLM, SGLang, llama.cpp or any
    /// OpenAI-compatible server), e.g. http://127.0.0.1:8000. A bearer token it wants goes in
    /// $DYN_ENGINE_API_KEY.
    #[arg(long, env = "DYN_ENGINE_URL")]
    engine_url: Option<String>,
    /// out=openai: vllm, sglang, llamacpp, or generic (text in and out, re-tokenized:
    /// approximate). [default: vllm]
    #[arg(long, env = "DYN_ENGINE_KIND")]
    engine_kind: Option<String>,
    /// out=openai: the model name the engine server serves. [default: the first in its
    /// /v1/models]
    #[arg(long, env = "DYN_ENGINE_MODEL")]
    engine_model: Option<String>,
    /// out=openai: the engine's ZeroMQ KV-event publisher (vLLM's or SGLang's), e.g.
    /// tcp://127.0.0.1:5557, so the KV router sees its cache. Set --block-size to the engine's.
    #[arg(long, env = "DYN_KV_EVENTS")]
    kv_events: Option<String>,
    /// out=openai: the topic the engine publishes its KV events on. [default: all]
    #[arg(long, env = "DYN_KV_EVENTS_TOPIC")]
    kv_events_topic: Option<String>,
    /// out=openai: the engine's KV-event replay socket (vLLM's `replay_endpoint`), e.g.
    /// tcp://127.0.0.1:5558: lost events are fetched from it instead of dropping the engine's
    /// blocks from the index until it stores them again.
    #[arg(long, env = "DYN_KV_EVENTS_REPLAY")]
    kv_events_replay: Option<String>,
    /// KV cache block size in tokens (mocker, native; published in the model card). [default: 64]
    #[arg(long, alias = "kv-block-size", env = "DYN_BLOCK_SIZE")]
    block_size: Option<usize>,
    /// KV cache blocks per worker (mocker default 16384; native default: what
    /// --kv-cache-memory holds).
    #[arg(long, env = "DYN_NUM_GPU_BLOCKS")]
    num_gpu_blocks: Option<usize>,
    /// Native: KV cache size per worker when --num-gpu-blocks is unset (e.g. 512MiB, 2GiB).
    /// [default: 1GiB]
    #[arg(long, env = "DYN_KV_CACHE_MEMORY")]
    kv_cache_memory: Option<String>,
    /// Native: the type the weights are held in: auto (the checkpoint's), f32, bf16 or f16.
    /// Activations stay f32; bf16 uses the CPU's bf16 dot product where it has one (activations
    /// rounded to bf16), f16 is widened in registers. [default: auto]
    #[arg(long, env = "DYN_DTYPE")]
    dtype: Option<String>,
    /// Native: the KV cache's element type: auto (the weights' type), f32, f16 or bf16. f16 or
    /// bf16 halve the cache's memory per token and the bytes attention reads. [default: auto]
    #[arg(long, env = "DYN_KV_CACHE_DTYPE")]
    kv_cache_dtype: Option<String>,
    /// Sequences per batch at most (mocker, native). [default: 256]
    #[arg(long, env = "DYN_MAX_NUM_SEQS")]
    max_num_seqs: Option<usize>,
    /// Tokens per step at most, prefill chunks plus decodes (mocker, native). [default: 8192]
    #[arg(long, env = "DYN_MAX_NUM_BATCHED_TOKENS")]
    max_num_batched_tokens: Option<usize>,
    /// Mocker: simulated time is divided by this. [default: 1]
    #[arg(long, env = "DYN_SPEEDUP_RATIO")]
    speedup_ratio: Option<f64>,
    /// Mocker fault injection (tests, chaos runs): the engine panics at this step (counted
    /// from 1 at each engine start); the worker fails its open requests and restarts it.
    #[arg(long, value_name = "STEP", env = "DYN_MOCKER_PANIC_AT_STEP")]
    mocker_panic_at_step: Option<u64>,
    /// Mocker fault injection: the engine panics when it computes a prompt holding this token id.
    #[arg(long, value_name = "TOKEN_ID", env = "DYN_MOCKER_PANIC_ON_TOKEN")]
    mocker_panic_on_token: Option<u32>,
    /// Mocker fault injection: this step stalls for --mocker-stall-ms (a hung engine).
    #[arg(long, value_name = "STEP", env = "DYN_MOCKER_STALL_AT_STEP")]
    mocker_stall_at_step: Option<u64>,
    #[arg(long, value_name = "MS", env = "DYN_MOCKER_STALL_MS")]
    mocker_stall_ms: Option<u64>,
    /// Mocker fault injection: this long after it is ready, the worker process drops its bus
    /// connection without deregistering (its subscriptions vanish, its leases run out); the
    /// process keeps running. Needs --bus.
    #[arg(long, value_name = "MS", env = "DYN_MOCKER_DROP_BUS_AFTER_MS")]
    mocker_drop_bus_after_ms: Option<u64>,
    /// Host RAM tier below each worker's KV cache (mocker, native), e.g. 4GiB: evicted blocks
    /// go there and come back on a prefix hit instead of being recomputed. [default: none]
    #[arg(long, value_name = "SIZE", env = "DYN_HOST_KV_CACHE")]
    host_kv_cache: Option<String>,
    /// Mocker: simulated host-to-device bandwidth for onboarding, in GB/s. [default: 25]
    #[arg(long, value_name = "GBPS", env = "DYN_MOCKER_HOST_GBPS")]
    mocker_host_gbps: Option<f64>,
    /// Disk tier below the host tier (mocker, native), e.g. 100GiB, in --disk-kv-dir: blocks
    /// leaving the host tier that enough requests used (--disk-min-uses) are written there
    /// (one checksummed file each) and survive a restart. [default: none]
    #[arg(long, value_name = "SIZE", env = "DYN_DISK_KV_CACHE")]
    disk_kv_cache: Option<String>,
    /// The disk tier's directory (created if missing; one per worker, locked while in use;
    /// several workers of one process or graph component each get a subdirectory worker-N).
    #[arg(long, value_name = "DIR", env = "DYN_DISK_KV_DIR")]
    disk_kv_dir: Option<PathBuf>,
    /// The disk tier's frequency filter: a block leaving host RAM is written to disk only if
    /// this many requests used it (3: computed once and reused twice; 1: every block).
    /// [default: 3]
    #[arg(long, value_name = "N", env = "DYN_DISK_MIN_USES")]
    disk_min_uses: Option<u32>,
    /// Mocker: simulated disk read bandwidth for onboarding, in GB/s. [default: 3]
    #[arg(long, value_name = "GBPS", env = "DYN_MOCKER_DISK_GBPS")]
    mocker_disk_gbps: Option<f64>,
    /// Mocker: simulated latency of one disk read for onboarding. [default: 0.2]
    #[arg(long, value_name = "MS", env = "DYN_MOCKER_DISK_LATENCY_MS")]
    mocker_disk_latency_ms: Option<f64>,
    /// Mocker, disaggregated: simulated KV link bandwidth in GB/s. [default: 25]
    #[arg(long, value_name = "GBPS", env = "DYN_MOCKER_TRANSFER_GBPS")]
    mocker_transfer_gbps: Option<f64>,
    /// Mocker, disaggregated: simulated latency of one KV transfer. [default: 1]
    #[arg(long, value_name = "MS", env = "DYN_MOCKER_TRANSFER_LATENCY_MS")]
    mocker_transfer_latency_ms: Option<f64>,
    /// Mocker, disaggregated: KV bytes per token of the simulated model. [default: 131072]
    #[arg(long, value_name = "BYTES", env = "DYN_MOCKER_KV_BYTES_PER_TOKEN")]
    mocker_kv_bytes_per_token: Option<u64>,
    /// Prefill and decode workers: how KV moves between them: auto (same host: shared
    /// memory, else TCP), shm, or tcp. [default: auto]
    #[arg(long, env = "DYN_KV_TRANSFER")]
    kv_transfer: Option<String>,
    /// Decode workers: listen for TCP KV transfers here (port 0: any); use an address the
    /// prefill workers' hosts can reach. [default: 127.0.0.1:0]
    #[arg(long, value_name = "ADDR", env = "DYN_KV_TRANSFER_LISTEN")]
    kv_transfer_listen: Option<String>,
    /// Decode workers: blocks of KV that may be in transfer at once. [default: 512]
    #[arg(long, env = "DYN_KV_STAGING_BLOCKS")]
    kv_staging_blocks: Option<usize>,
    /// Cluster-wide KV sharing: workers serve their cached blocks (device and host tier) to
    /// peers and fetch a prefix a peer holds when the router says so and the copy beats the
    /// prefill (the KV router's --kv-peer-credit defaults to 0.4 with it in one process).
    #[arg(long, env = "DYN_KV_SHARE")]
    kv_share: bool,
    /// Decode workers: when a remote prefill fails, prefill locally (local) or fail the
    /// request (fail). [default: local]
    #[arg(long, env = "DYN_PREFILL_FALLBACK")]
    prefill_fallback: Option<String>,
    /// Decode workers: how long to wait for a prefill worker. [default: 30000]
    #[arg(long, value_name = "MS", env = "DYN_PREFILL_TIMEOUT_MS")]
    prefill_timeout_ms: Option<u64>,
    /// Requests in flight beyond this get 429. [default: 1024]
    #[arg(long, env = "DYN_MAX_INFLIGHT")]
    max_inflight: Option<usize>,
    /// Request bodies over this many bytes get 413. [default: 16777216]
    #[arg(long, env = "DYN_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Times a streaming request may move to another worker when its worker dies or fails
    /// (0: never). [default: 3]
    #[arg(long, env = "DYN_MIGRATION_LIMIT")]
    migration_limit: Option<u32>,
    /// The tool-call format of the served models' output: hermes (Hermes, Qwen), llama3_json
    /// or mistral. [default: recognised from each model's chat template]
    #[arg(long, env = "DYN_TOOL_CALL_PARSER")]
    tool_call_parser: Option<String>,
    /// Split reasoning out of the answer into `reasoning_content`: `think` (`<think>...</think>`,
    /// DeepSeek-R1, Qwen3 and others) or `none`. [default: none]
    #[arg(long, env = "DYN_REASONING_PARSER")]
    reasoning_parser: Option<String>,
    /// An API key clients must present (`Authorization: Bearer KEY`, or `x-api-key`);
    /// repeatable. Keys are never logged. [env: DYN_API_KEYS, comma-separated]
    #[arg(
        long = "api-key",
        env = "DYN_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// A file of API keys, one a line: `KEY` or `NAME KEY`, optionally `inflight=N rpm=N`;
    /// re-read on SIGHUP.
    #[arg(long, env = "DYN_API_KEYS_FILE")]
    api_keys_file: Option<String>,
    /// Requests in flight per API key (keys without their own limit). [default: unlimited]
    #[arg(long, env = "DYN_API_KEY_MAX_INFLIGHT")]
    api_key_max_inflight: Option<usize>,
    /// Requests a minute per API key (keys without their own limit). [default: unlimited]
    #[arg(long, env = "DYN_API_KEY_RPM")]
    api_key_rpm: Option<usize>,
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key).
    #[arg(long, env = "DYN_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<String>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DYN_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<String>,
    /// Require a key on /health, /live, /metrics and the status page too.
    #[arg(long, env = "DYN_API_KEY_PROTECT_OPS")]
    api_key_protect_ops: bool,
    /// in=batch: requests in flight at once. [default: 16]
    #[arg(long, env = "DYN_BATCH_CONCURRENCY")]
    batch_concurrency: Option<usize>,
}

impl LaunchArgs {
    /// These flags as the launcher's one settings layer.
    fn settings(&self) -> Settings {
        Settings {
            model_path: self.model_path.clone(),
            model_name: self.model_name.clone(),
            block_size: self.block_size,
            worker_kind: self.worker_kind,
            num_gpu_blocks: self.num_gpu_blocks,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            speedup_ratio: self.speedup_ratio,
            echo_delay_ms: self.echo_delay_ms,
            engine_url: self.engine_url.clone(),
            engine_kind: self.engine_kind.clone(),
            engine_model: self.engine_model.clone(),
            kv_events: self.kv_events.clone(),
            kv_events_topic: self.kv_events_topic.clone(),
            kv_events_replay: self.kv_events_replay.clone(),
            kv_cache_memory: self.kv_cache_memory.clone(),
            dtype: self.dtype.clone(),
            kv_cache_dtype: self.kv_cache_dtype.clone(),
            mocker_panic_at_step: self.mocker_panic_at_step,
            mocker_panic_on_token: self.mocker_panic_on_token,
            mocker_stall_at_step: self.mocker_stall_at_step,
            mocker_stall_ms: self.mocker_stall_ms,
            mocker_drop_bus_after_ms: self.mocker_drop_bus_after_ms,
            host_kv_cache: self.host_kv_cache.clone(),
            mocker_host_gbps: self.mocker_host_gbps,
            disk_kv_cache: self.disk_kv_cache.clone(),
            disk_kv_dir: self.disk_kv_dir.clone(),
            disk_min_uses: self.disk_min_uses,
            mocker_disk_gbps: self.mocker_disk_gbps,
            mocker_disk_latency_ms: self.mocker_disk_latency_ms,
            mocker_transfer_gbps: self.mocker_transfer_gbps,
            mocker_transfer_latency_ms: self.mocker_transfer_latency_ms,
            mocker_kv_bytes_per_token: self.mocker_kv_bytes_per_token,
            kv_transfer: self.kv_transfer.clone(),
            kv_transfer_listen: self.kv_transfer_listen.clone(),
            kv_staging_blocks: self.kv_staging_blocks,
            kv_share: self.kv_share.then_some(true),
            prefill_fallback: self.prefill_fallback.clone(),
            prefill_timeout_ms: self.prefill_timeout_ms,
            router_mode: self.router_mode.clone(),
            remote_router: self.remote_router.then_some(true),
            http_port: self.http_port,
            http_host: self.http_host.clone(),
            max_inflight: self.max_inflight,
            max_body_bytes: self.max_body_bytes,
            migration_limit: self.migration_limit,
            tool_call_parser: self.tool_call_parser.clone(),
            api_keys: (!self.api_keys.is_empty())
                .then(|| settings::Redacted(self.api_keys.clone())),
            api_keys_file: self.api_keys_file.clone(),
            api_key_max_inflight: self.api_key_max_inflight,
            api_key_rpm: self.api_key_rpm,
            api_key_protect_ops: self.api_key_protect_ops.then_some(true),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            reasoning_parser: self.reasoning_parser.clone(),
            num_workers: self.num_workers,
            batch_concurrency: self.batch_concurrency,
            ..self.router.settings()
        }
    }
}

/// The KV router's settings (frontends with --router-mode kv, and `dynamo-run router`).
#[derive(Args, Clone, Debug)]
pub(crate) struct RouterArgs {
    /// KV router: weight of prefill work (blocks not cached) against decode load. [default: 1]
    #[arg(long, env = "DYN_KV_OVERLAP_SCORE_WEIGHT")]
    kv_overlap_score_weight: Option<f64>,
    /// KV router: a prefix block held on a worker's host tier counts this much of a device
    /// hit (it still costs a copy). [default: 0.5]
    #[arg(long, env = "DYN_KV_HOST_CREDIT")]
    kv_host_credit: Option<f64>,
    /// KV router: the same for a block on a worker's disk tier. [default: 0.25]
    #[arg(long, env = "DYN_KV_DISK_CREDIT")]
    kv_disk_credit: Option<f64>,
    /// KV router: a prefix block a peer worker holds (device or host) that the chosen worker
    /// would fetch counts this much of a device hit; above 0 the router suggests such
    /// fetches (workers need --kv-share). [default: 0; 0.4 with --kv-share]
    #[arg(long, env = "DYN_KV_PEER_CREDIT")]
    kv_peer_credit: Option<f64>,
    /// KV router: 0 picks the lowest cost; above 0 samples with a softmax at this
    /// temperature. [default: 0]
    #[arg(long, env = "DYN_ROUTER_TEMPERATURE")]
    router_temperature: Option<f64>,
    /// KV router: skip workers whose KV usage fraction is above this (all busy: 503).
    /// Unset: never skip (the engines queue).
    #[arg(long, env = "DYN_BUSY_THRESHOLD")]
    busy_threshold: Option<f64>,
    /// Disaggregated serving: prefill on the decode worker when fewer prompt tokens than
    /// this are uncached there. [default: 512]
    #[arg(long, env = "DYN_DISAGG_MIN_REMOTE_TOKENS")]
    disagg_min_remote_tokens: Option<usize>,
    /// Disaggregated serving: prefill on the decode worker when every prefill worker has
    /// more prompt tokens than this queued. [default: 32768]
    #[arg(long, env = "DYN_DISAGG_MAX_PREFILL_QUEUE")]
    disagg_max_prefill_queue: Option<u64>,
}

impl RouterArgs {
    pub(crate) fn settings(&self) -> Settings {
        Settings {
            kv_overlap_score_weight: self.kv_overlap_score_weight,
            kv_host_credit: self.kv_host_credit,
            kv_disk_credit: self.kv_disk_credit,
            kv_peer_credit: self.kv_peer_credit,
            router_temperature: self.router_temperature,
            busy_threshold: self.busy_threshold,
            disagg_min_remote_tokens: self.disagg_min_remote_tokens,
            disagg_max_prefill_queue: self.disagg_max_prefill_queue,
            ..Default::default()
        }
    }
}

/// A planner's settings (`dynamo-run planner`, graph role `planner`).
#[derive(Args, Clone, Debug)]
pub(crate) struct PlannerArgs {
    /// The component of the workers to scale (aggregated, or the decode pool).
    #[arg(long)]
    pool: Option<String>,
    /// The component of the prefill pool (disaggregated serving).
    #[arg(long)]
    prefill_pool: Option<String>,
    /// The workers' capacity profile (`dynamo-run profile --out FILE`).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Time to first token to hold, milliseconds.
    #[arg(long)]
    ttft_target_ms: Option<f64>,
    /// Inter-token latency to hold, milliseconds.
    #[arg(long)]
    itl_target_ms: Option<f64>,
    /// Milliseconds between decisions. [default: 5000]
    #[arg(long)]
    planner_interval_ms: Option<u64>,
    /// constant, moving-average[:WINDOW] or holt[:ALPHA,BETA]. [default: holt]
    #[arg(long)]
    predictor: Option<String>,
    /// Bounds of the pool. [default: 1 and 8]
    #[arg(long)]
    min_replicas: Option<u32>,
    #[arg(long)]
    max_replicas: Option<u32>,
    /// Bounds of the prefill pool. [default: 1 and 8]
    #[arg(long)]
    min_prefill_replicas: Option<u32>,
    #[arg(long)]
    max_prefill_replicas: Option<u32>,
    /// Most workers in all pools together. [default: the pools' maxima]
    #[arg(long)]
    max_workers: Option<u32>,
    /// Intervals in a row that must want fewer workers before a pool shrinks. [default: 3]
    #[arg(long)]
    scale_down_after: Option<u32>,
    /// Who carries decisions out: local (the `dynamo-run serve` running the pool) or
    /// kubernetes (each pool a Deployment; build with --features kubernetes). [default: local]
    #[arg(long)]
    connector: Option<String>,
    /// kubernetes: the Deployments' namespace. [default: the pod's own]
    #[arg(long)]
    k8s_namespace: Option<String>,
    /// kubernetes: pool P is the Deployment PREFIX + P. [default: dynamo-]
    #[arg(long)]
    k8s_deployment_prefix: Option<String>,
    /// The model the pools serve (default: the model folder's name, else the profile's).
    #[arg(long)]
    model_name: Option<String>,
    #[arg(long)]
    model_path: Option<PathBuf>,
}

impl PlannerArgs {
    pub(crate) fn settings(&self) -> Settings {
        Settings {
            pool: self.pool.clone(),
            prefill_pool: self.prefill_pool.clone(),
            profile: self.profile.clone(),
            ttft_target_ms: self.ttft_target_ms,
            itl_target_ms: self.itl_target_ms,
            planner_interval_ms: self.planner_interval_ms,
            predictor: self.predictor.clone(),
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            min_prefill_replicas: self.min_prefill_replicas,
            max_prefill_replicas: self.max_prefill_replicas,
            max_workers: self.max_workers,
            scale_down_after: self.scale_down_after,
            connector: self.connector.clone(),
            k8s_namespace: self.k8s_namespace.clone(),
            k8s_deployment_prefix: self.k8s_deployment_prefix.clone(),
            model_name: self.model_name.clone(),
            model_path: self.model_path.clone(),
            ..Default::default()
        }
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
    /// Run a planner until SIGTERM: every interval it sizes --pool (and --prefill-pool) from
    /// the frontends' statistics and the capacity profile, and has its connector apply it.
    Planner(Box<PlannerArgs>),
    /// Run the cluster in virtual time: the KV router, mocker workers and (with --profile)
    /// the planner, driven by a trace or a load curve; report latency, SLA attainment and
    /// worker-seconds.
    Simulate(Box<simulate::SimulateArgs>),
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
        /// Whether the output projection is the embedding matrix (the preset's choice when
        /// unset; `small` ties them, as SmolLM2 does). With random weights a tied head makes
        /// greedy decoding repeat one token; untied, continuations vary.
        #[arg(long)]
        tie_word_embeddings: Option<bool>,
    },
    /// Load-test an OpenAI frontend and report throughput and latency.
    Bench(Box<bench::BenchArgs>),
    /// Measure what one worker sustains (TTFT against input length, ITL against batch and
    /// context) and write a capacity profile for the planner.
    Profile(Box<ProfileCommand>),
    /// List instances in discovery (with their models and load) and services answering the
    /// NATS service protocol.
    Ls,
    /// Tail the namespace's KV events (`events`), workers' load reports with their engine
    /// steps (`load`), frontends' request statistics per interval (`stats`) or the planners'
    /// decisions (`planner`) as readable lines.
    Watch {
        /// events, load, stats or planner.
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
    #[serde(skip_serializing_if = "NatsFlags::is_empty")]
    nats: NatsFlags,
}

/// The NATS flags, nested as the runtime settings' `nats:` section.
#[derive(Serialize, Default)]
struct NatsFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    creds_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "NatsTlsFlags::is_empty")]
    tls: NatsTlsFlags,
}

#[derive(Serialize, Default)]
struct NatsTlsFlags {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<PathBuf>,
}

impl NatsFlags {
    fn is_empty(&self) -> bool {
        self.creds_file.is_none() && self.tls.is_empty()
    }
}

impl NatsTlsFlags {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The in=/out= of a command line.
fn io(io: &[String]) -> Result<(Input, Output)> {
    let (mut input, mut output) = (Input::Http, Output::Echo);
    for arg in io {
        match arg.split_once('=') {
            Some(("in", v)) => input = v.parse()?,
            Some(("out", v)) => output = v.parse()?,
            _ => bail!("unexpected argument {arg:?}; expected in=... or out=... (see --help)"),
        }
    }
    Ok((input, output))
}

/// The `--config` file's launcher settings (none without a file).
fn file_settings(cli: &Cli) -> Result<Settings> {
    cli.config
        .as_deref()
        .map(settings::from_file)
        .transpose()
        .map(Option::unwrap_or_default)
}

/// The command line's launch settings over the config file's, resolved and validated (see
/// `settings.rs`).
fn launch_settings(cli: &Cli) -> Result<LaunchSettings> {
    let (input, output) = io(&cli.launch.io)?;
    let s = settings::overlay(file_settings(cli)?, cli.launch.settings());
    settings::resolve(input, output, &cli.namespace, &s)
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(Command::MakeModel {
        out,
        vocab_size,
        context_length,
        preset,
        weights_dtype,
        tie_word_embeddings,
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
        if let Some(tie) = tie_word_embeddings {
            weights.tie_word_embeddings = *tie;
        }
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
    if let Some(Command::Simulate(args)) = &cli.command {
        return simulate::run(args);
    }
    if let Some(Command::Bench(args)) = &cli.command {
        return bench::run((**args).clone()).await;
    }
    if let Some(Command::Profile(p)) = &cli.command {
        let s = settings::overlay(file_settings(&cli)?, p.launch.settings());
        let engine = p.profile.output()?;
        let ls = settings::resolve(launch::Input::Http, engine, &cli.namespace, &s)?;
        return profile::run(&p.profile, ls).await;
    }
    let launch = match &cli.command {
        None => Some(launch_settings(&cli)?),
        Some(_) => None,
    };
    let router = match &cli.command {
        Some(Command::Router(args)) => Some(settings::router_settings(&settings::overlay(
            file_settings(&cli)?,
            args.settings(),
        ))?),
        _ => None,
    };
    let planner = match &cli.command {
        Some(Command::Planner(args)) => Some(settings::planner_settings(
            &cli.namespace,
            &settings::overlay(file_settings(&cli)?, args.settings()),
        )?),
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
        // A graph's `bus:` is this process's bus too (its scaler answers planners there).
        bus: cli
            .bus
            .clone()
            .or_else(|| graph.as_ref().and_then(|g| g.bus.clone())),
        log: cli.log.clone(),
        metrics_port: cli.metrics_port,
        nats: NatsFlags {
            creds_file: cli.nats_creds.clone(),
            tls: NatsTlsFlags {
                ca_file: cli.nats_ca.clone(),
                cert_file: cli.nats_cert.clone(),
                key_file: cli.nats_key.clone(),
            },
        },
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
        Some(Command::MakeModel { .. })
        | Some(Command::Bench(_))
        | Some(Command::Profile(_))
        | Some(Command::Simulate(_)) => {
            unreachable!("handled above")
        }
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
        Some(Command::Planner(_)) => {
            launch::run_planner(&runtime, planner.expect("parsed above")).await
        }
    };
    runtime.close().await;
    result
}
