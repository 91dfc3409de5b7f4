//! The launcher's one configuration path: every launcher setting, from flags or from a graph,
//! is a [`Settings`] value (each key optional), resolved and validated once by [`resolve`] into
//! the per-role structs the roles take ([`LaunchSettings`], [`KvRouterSettings`], engine and
//! frontend settings).
//!
//! - A single process: defaults < the launcher keys of `--config FILE` ([`from_file`]) <
//!   `DYN_{KEY}` environment variables < flags, layered by [`overlay`], then [`resolve`]. The
//!   same file holds the runtime settings (bus, discovery, RPC, log), which come from
//!   `--config FILE` < `DYN_*` < flags too (`dynamo_runtime::config`).
//! - A graph: `defaults` < the component's keys < `DYN_GRAPH__*` < `--set` give each
//!   component's [`Settings`] ([`crate::graph`]); an embedded start calls [`resolve`] on it
//!   directly. A graph run as processes renders the same values as each child's flags
//!   ([`to_flags`]), which the child parses back into the same [`Settings`] (tested).
//!
//! Defaults live here only (`resolve`), never in the flag definitions.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dynamo_actors::frontend::RouterMode;
use dynamo_actors::planner::{ConnectorChoice, PlannerSettings};
use dynamo_actors::router::KvRouterSettings;
use dynamo_actors::worker::DisaggSettings;
use dynamo_engine::native::{Compute, KvDtype};
use dynamo_engine::{MockerFaults, MockerSettings, NativeSettings, OpenAiSettings, ServerKind};
use dynamo_planner::{
    Limits, PlannerConfig, PolicySettings, Pools, PredictorKind, Profile, Targets,
};
use dynamo_protocols::llm::WorkerKind;
use dynamo_runtime::subject::Namespace;
use dynamo_transfer::Route;
use serde::{Deserialize, Serialize};

use crate::launch::{Input, LaunchSettings, Output};

/// Every launcher setting; `None` is "not set here" (a lower layer or the default applies).
/// Secrets (API keys): serialized as they are, never shown by `Debug` (it says how many).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted(pub Vec<String>);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} redacted]", self.0.len())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    // Shared.
    pub model_path: Option<PathBuf>,
    pub model_name: Option<String>,
    pub block_size: Option<usize>,
    /// Prometheus `/metrics` port (a graph's replica i: + i).
    pub metrics_port: Option<u16>,
    pub log: Option<String>,
    // Workers.
    pub engine: Option<EngineKind>,
    pub endpoint: Option<String>,
    pub worker_kind: Option<WorkerKind>,
    pub num_gpu_blocks: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub speedup_ratio: Option<f64>,
    pub echo_delay_ms: Option<u64>,
    /// out=openai: the engine server it fronts.
    pub engine_url: Option<String>,
    pub engine_kind: Option<String>,
    pub engine_model: Option<String>,
    pub kv_events: Option<String>,
    pub kv_events_topic: Option<String>,
    pub kv_events_replay: Option<String>,
    pub kv_cache_memory: Option<String>,
    pub dtype: Option<String>,
    pub kv_cache_dtype: Option<String>,
    pub mocker_panic_at_step: Option<u64>,
    pub mocker_panic_on_token: Option<u32>,
    pub mocker_stall_at_step: Option<u64>,
    pub mocker_stall_ms: Option<u64>,
    pub mocker_drop_bus_after_ms: Option<u64>,
    pub mocker_transfer_gbps: Option<f64>,
    pub mocker_transfer_latency_ms: Option<f64>,
    pub mocker_kv_bytes_per_token: Option<u64>,
    pub host_kv_cache: Option<String>,
    pub mocker_host_gbps: Option<f64>,
    pub disk_kv_cache: Option<String>,
    pub disk_kv_dir: Option<PathBuf>,
    pub disk_min_uses: Option<u32>,
    pub mocker_disk_gbps: Option<f64>,
    pub mocker_disk_latency_ms: Option<f64>,
    pub kv_transfer: Option<String>,
    pub kv_transfer_listen: Option<String>,
    pub kv_staging_blocks: Option<usize>,
    pub kv_share: Option<bool>,
    pub prefill_fallback: Option<String>,
    pub prefill_timeout_ms: Option<u64>,
    // Routers, and frontends routing in-process.
    pub router_mode: Option<String>,
    pub kv_overlap_score_weight: Option<f64>,
    pub kv_host_credit: Option<f64>,
    pub kv_disk_credit: Option<f64>,
    pub kv_peer_credit: Option<f64>,
    pub router_temperature: Option<f64>,
    pub busy_threshold: Option<f64>,
    pub disagg_min_remote_tokens: Option<usize>,
    pub disagg_max_prefill_queue: Option<u64>,
    pub remote_router: Option<bool>,
    // Frontends.
    pub http_port: Option<u16>,
    pub http_host: Option<String>,
    pub max_inflight: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub migration_limit: Option<u32>,
    pub tool_call_parser: Option<String>,
    pub reasoning_parser: Option<String>,
    pub api_keys: Option<Redacted>,
    pub api_keys_file: Option<String>,
    pub api_key_max_inflight: Option<usize>,
    pub api_key_rpm: Option<usize>,
    pub api_key_protect_ops: Option<bool>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    // Planners.
    pub pool: Option<String>,
    pub prefill_pool: Option<String>,
    pub profile: Option<PathBuf>,
    pub ttft_target_ms: Option<f64>,
    pub itl_target_ms: Option<f64>,
    pub planner_interval_ms: Option<u64>,
    pub predictor: Option<String>,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub min_prefill_replicas: Option<u32>,
    pub max_prefill_replicas: Option<u32>,
    pub max_workers: Option<u32>,
    pub scale_down_after: Option<u32>,
    pub connector: Option<String>,
    pub k8s_namespace: Option<String>,
    pub k8s_deployment_prefix: Option<String>,
    // A single process only.
    pub num_workers: Option<usize>,
    pub batch_concurrency: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    Echo,
    Mocker,
    Native,
    /// An external engine server (out=openai).
    Openai,
}

/// Keys of a `--config` file that are the runtime's (`dynamo_runtime::config`), not the
/// launcher's.
const RUNTIME_KEYS: &[&str] = &["bus", "nats", "discovery", "rpc", "shutdown_grace"];

/// The launcher settings of a `--config` YAML file (its runtime keys are the runtime's); an
/// unknown key is an error naming it.
pub fn from_file(path: &std::path::Path) -> Result<Settings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("config file {}", path.display()))?;
    let mut doc: serde_yaml::Mapping = match serde_yaml::from_str(&text)
        .with_context(|| format!("config file {}", path.display()))?
    {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return Ok(Settings::default()),
        _ => bail!(
            "config file {}: expected a mapping of settings",
            path.display()
        ),
    };
    doc.retain(|k, _| !k.as_str().is_some_and(|k| RUNTIME_KEYS.contains(&k)));
    serde_yaml::from_value(serde_yaml::Value::Mapping(doc))
        .with_context(|| format!("config file {}", path.display()))
}

/// `top` over `base`: each key `top` sets wins.
pub fn overlay(base: Settings, top: Settings) -> Settings {
    let mut b = serde_json::to_value(base).expect("settings serialize");
    let t = serde_json::to_value(top).expect("settings serialize");
    if let (Some(b), Some(t)) = (b.as_object_mut(), t.as_object()) {
        for (k, v) in t {
            if !v.is_null() {
                b.insert(k.clone(), v.clone());
            }
        }
    }
    serde_json::from_value(b).expect("merged settings deserialize")
}

/// `1GiB`, `512MiB`, `64KiB`, `1000000` (bytes), `2GB`.
pub fn parse_bytes(s: &str) -> Result<usize> {
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

/// A bandwidth flag in GB/s as bytes per second (`default` when unset); it must be positive.
fn gbps(flag: &str, value: Option<f64>, default: f64) -> Result<f64> {
    match value {
        None => Ok(default),
        Some(g) if g.is_finite() && g > 0.0 => Ok(g * 1e9),
        Some(_) => bail!("{flag} must be a positive number"),
    }
}

/// A peer's block counts this much of a device hit when workers share KV (`--kv-share`):
/// below a local host hit (0.5), as the copy crosses the network.
pub const PEER_CREDIT: f64 = 0.4;

/// The KV router's settings (routers, and frontends routing by KV or load).
pub fn router_settings(s: &Settings) -> Result<KvRouterSettings> {
    let d = KvRouterSettings::default();
    let weight = s.kv_overlap_score_weight.unwrap_or(d.overlap_weight);
    if !(weight.is_finite() && weight >= 0.0) {
        bail!("--kv-overlap-score-weight must be a number >= 0");
    }
    let credit = |flag: &str, v: Option<f64>, default: f64| -> Result<f64> {
        match v {
            None => Ok(default),
            Some(c) if (0.0..=1.0).contains(&c) => Ok(c),
            Some(c) => bail!("{flag} {c}: a lower-tier hit counts between 0 and 1 of a device hit"),
        }
    };
    let host_credit = credit("--kv-host-credit", s.kv_host_credit, d.host_credit)?;
    let disk_credit = credit("--kv-disk-credit", s.kv_disk_credit, d.disk_credit)?;
    let peer_default = match s.kv_share {
        Some(true) => PEER_CREDIT,
        _ => d.peer_credit,
    };
    let peer_credit = credit("--kv-peer-credit", s.kv_peer_credit, peer_default)?;
    let temperature = s.router_temperature.unwrap_or(d.temperature);
    if !(temperature.is_finite() && temperature >= 0.0) {
        bail!("--router-temperature must be a number >= 0");
    }
    if s.busy_threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
        bail!("--busy-threshold must be in (0, 1]");
    }
    Ok(KvRouterSettings {
        overlap_weight: weight,
        host_credit,
        disk_credit,
        peer_credit,
        temperature,
        busy_threshold: s.busy_threshold,
        disagg_min_remote_tokens: s
            .disagg_min_remote_tokens
            .unwrap_or(d.disagg_min_remote_tokens),
        disagg_max_prefill_queue: s
            .disagg_max_prefill_queue
            .unwrap_or(d.disagg_max_prefill_queue),
        ..d
    })
}

/// A planner's settings from `s`: its pools, profile, targets and policy, checked (the
/// profile must load and be of the model the pools serve).
pub fn planner_settings(namespace: &str, s: &Settings) -> Result<PlannerSettings> {
    let namespace =
        Namespace::new(namespace).with_context(|| format!("namespace {namespace:?}"))?;
    let pool = s.pool.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "a planner needs --pool COMPONENT (graph key `pool`): the workers it scales"
        )
    })?;
    let (config, profile) = planner_core(s)?;
    let connector = match s.connector.as_deref().unwrap_or("local") {
        "local" => ConnectorChoice::Local,
        "kubernetes" => kubernetes(s)?,
        "virtual" => bail!("--connector virtual is the simulator's (`dynamo-run simulate`)"),
        other => bail!("--connector {other:?}: expected local or kubernetes"),
    };
    Ok(PlannerSettings {
        namespace,
        config,
        profile,
        pool,
        prefill_pool: s.prefill_pool.clone(),
        connector,
    })
}

/// The kubernetes connector: each pool a Deployment `{k8s_deployment_prefix}{pool}` (default
/// prefix `dynamo-`, as in config/k8s) in `k8s_namespace` (default: the pod's own).
#[cfg(feature = "kubernetes")]
fn kubernetes(s: &Settings) -> Result<ConnectorChoice> {
    let namespace = s.k8s_namespace.clone();
    let prefix = s
        .k8s_deployment_prefix
        .clone()
        .unwrap_or_else(|| "dynamo-".into());
    Ok(ConnectorChoice::Deferred(std::sync::Arc::new(move || {
        let (namespace, prefix) = (namespace.clone(), prefix.clone());
        Box::pin(async move {
            let k =
                dynamo_k8s::KubernetesConnector::from_env(namespace.as_deref(), &prefix).await?;
            Ok(std::sync::Arc::new(k)
                as std::sync::Arc<
                    dyn dynamo_actors::planner::connector::Connector,
                >)
        })
    })))
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes(_: &Settings) -> Result<ConnectorChoice> {
    bail!("--connector kubernetes: this build has no kubernetes connector; build with `cargo build --release --features kubernetes` (the image in config/k8s does)")
}

/// A planner's decision settings and profile from `s` (the planner role's and the
/// simulator's): the profile must load and be of the model the pools serve.
pub fn planner_core(s: &Settings) -> Result<(PlannerConfig, Profile)> {
    let profile_path = s.profile.as_deref().ok_or_else(|| {
        anyhow::anyhow!("a planner needs --profile FILE (graph key `profile`): measure one with `dynamo-run profile --engine mocker|native --out FILE`")
    })?;
    // The model the pools serve: named, or the model folder's name, or the profile's.
    let model = match (&s.model_name, &s.model_path) {
        (Some(m), _) => Some(m.clone()),
        (None, Some(p)) => Some(
            dynamo_preprocessor::ModelFolder::load(p)
                .with_context(|| format!("model folder {}", p.display()))?
                .default_name(),
        ),
        (None, None) => None,
    };
    let profile = Profile::load(profile_path, model.as_deref())
        .map_err(|e| anyhow::anyhow!("{e}; measure one with `dynamo-run profile`"))?;
    let target = |flag: &str, v: Option<f64>| -> Result<f64> {
        match v {
            Some(t) if t.is_finite() && t > 0.0 => Ok(t),
            Some(t) => bail!("{flag} {t}: a latency target is a positive number of milliseconds"),
            None => bail!("a planner needs {flag} (what it scales to hold)"),
        }
    };
    let targets = Targets {
        ttft_ms: target("--ttft-target-ms", s.ttft_target_ms)?,
        itl_ms: target("--itl-target-ms", s.itl_target_ms)?,
    };
    let interval_ms = s.planner_interval_ms.unwrap_or(5000);
    if !(100..=3_600_000).contains(&interval_ms) {
        bail!("--planner-interval-ms {interval_ms}: between 100 and 3600000");
    }
    let predictor: PredictorKind = s
        .predictor
        .as_deref()
        .unwrap_or("holt")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--{e}"))?;
    let limits =
        |what: &str, min: Option<u32>, max: Option<u32>, default_min: u32| -> Result<Limits> {
            let (min, max) = (min.unwrap_or(default_min), max.unwrap_or(8));
            if max == 0 || min > max {
                bail!(
                "{what}: min {min} and max {max} replicas must satisfy 0 <= min <= max, max >= 1"
            );
            }
            Ok(Limits { min, max })
        };
    let main = limits(
        "--min-replicas/--max-replicas",
        s.min_replicas,
        s.max_replicas,
        1,
    )?;
    let (pools, prefill) = match &s.prefill_pool {
        Some(_) => (
            Pools::Disaggregated,
            limits(
                "--min-prefill-replicas/--max-prefill-replicas",
                s.min_prefill_replicas,
                s.max_prefill_replicas,
                1,
            )?,
        ),
        None => {
            if s.min_prefill_replicas.is_some() || s.max_prefill_replicas.is_some() {
                bail!("--min/max-prefill-replicas need --prefill-pool");
            }
            (Pools::Aggregated, Limits { min: 0, max: 0 })
        }
    };
    let budget = s.max_workers.unwrap_or(main.max + prefill.max);
    if budget < main.min + prefill.min || budget == 0 {
        bail!(
            "--max-workers {budget}: below the pools' minimums ({})",
            main.min + prefill.min
        );
    }
    let down_after = s.scale_down_after.unwrap_or(3);
    if down_after == 0 {
        bail!("--scale-down-after: at least 1 interval");
    }
    Ok((
        PlannerConfig {
            model: model.unwrap_or_else(|| profile.model.clone()),
            targets,
            interval_s: interval_ms as f64 / 1e3,
            predictor,
            policy: PolicySettings {
                pools,
                main,
                prefill,
                budget,
                down_after,
            },
            stale_after: 3,
        },
        profile,
    ))
}

/// Resolves and validates `s` for a process (or role) taking requests from `input` and
/// answering with `output`.
pub fn resolve(
    input: Input,
    output: Output,
    namespace: &str,
    s: &Settings,
) -> Result<LaunchSettings> {
    // The launcher's engine defaults are the mocker's (the native engine takes the same
    // scheduler settings from the command line).
    let md = MockerSettings::default();
    let block_size = s.block_size.unwrap_or(md.block_size);
    if block_size == 0 {
        bail!("--block-size must be positive");
    }
    let max_num_seqs = s.max_num_seqs.unwrap_or(md.max_num_seqs);
    let max_num_batched_tokens = s
        .max_num_batched_tokens
        .unwrap_or(md.max_num_batched_tokens);
    let host_kv_cache = match s.host_kv_cache.as_deref() {
        Some(size) => parse_bytes(size).with_context(|| format!("--host-kv-cache {size:?}"))?,
        None => 0,
    };
    let disk_kv_cache = match s.disk_kv_cache.as_deref() {
        Some(size) => parse_bytes(size).with_context(|| format!("--disk-kv-cache {size:?}"))?,
        None => 0,
    };
    dynamo_engine::scheduler::check_disk(disk_kv_cache, s.disk_kv_dir.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    if s.mocker_disk_latency_ms
        .is_some_and(|l| !(l.is_finite() && l >= 0.0))
    {
        bail!("--mocker-disk-latency-ms must be a number >= 0");
    }
    let disk_min_uses = s
        .disk_min_uses
        .unwrap_or(dynamo_engine::scheduler::DISK_MIN_USES);
    if disk_min_uses == 0 {
        bail!("--disk-min-uses must be at least 1 (1: every block leaving host RAM goes to disk)");
    }
    let mocker = MockerSettings {
        num_gpu_blocks: s.num_gpu_blocks.unwrap_or(md.num_gpu_blocks),
        block_size,
        max_num_seqs,
        max_num_batched_tokens,
        speedup_ratio: s.speedup_ratio.unwrap_or(md.speedup_ratio),
        faults: MockerFaults {
            panic_at_step: s.mocker_panic_at_step,
            panic_on_token: s.mocker_panic_on_token,
            stall_at_step: s.mocker_stall_at_step,
            stall_for: Duration::from_millis(s.mocker_stall_ms.unwrap_or(0)),
        },
        kv_bytes_per_token: s.mocker_kv_bytes_per_token.unwrap_or(md.kv_bytes_per_token),
        transfer_bandwidth: gbps(
            "--mocker-transfer-gbps",
            s.mocker_transfer_gbps,
            md.transfer_bandwidth,
        )?,
        transfer_latency: s
            .mocker_transfer_latency_ms
            .map_or(md.transfer_latency, |ms| {
                Duration::from_secs_f64(ms.max(0.0) / 1e3)
            }),
        host_kv_cache,
        host_bandwidth: gbps("--mocker-host-gbps", s.mocker_host_gbps, md.host_bandwidth)?,
        disk_kv_cache,
        disk_kv_dir: s.disk_kv_dir.clone(),
        disk_min_uses,
        disk_bandwidth: gbps("--mocker-disk-gbps", s.mocker_disk_gbps, md.disk_bandwidth)?,
        disk_latency: s.mocker_disk_latency_ms.map_or(md.disk_latency, |ms| {
            Duration::from_secs_f64(ms.max(0.0) / 1e3)
        }),
        ..Default::default()
    };
    if s.mocker_kv_bytes_per_token == Some(0) {
        bail!("--mocker-kv-bytes-per-token must be positive");
    }
    if s.mocker_transfer_latency_ms
        .is_some_and(|l| !(l.is_finite() && l >= 0.0))
    {
        bail!("--mocker-transfer-latency-ms must be a number >= 0");
    }
    let dd = DisaggSettings::default();
    let disagg = DisaggSettings {
        route: match s.kv_transfer.as_deref() {
            None | Some("auto") => Route::Auto,
            Some("shm") => Route::Shm,
            Some("tcp") => Route::Tcp,
            Some(other) => bail!("--kv-transfer {other:?}: use auto, shm or tcp"),
        },
        listen: match &s.kv_transfer_listen {
            Some(a) => a.parse().map_err(|_| {
                anyhow::anyhow!("--kv-transfer-listen {a:?} is not an address like 10.0.0.5:0")
            })?,
            None => dd.listen,
        },
        staging_blocks: s.kv_staging_blocks.unwrap_or(dd.staging_blocks),
        share: s.kv_share.unwrap_or(dd.share),
        fallback: match &s.prefill_fallback {
            Some(f) => f
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--prefill-fallback: {e}"))?,
            None => dd.fallback,
        },
        prefill_timeout: s
            .prefill_timeout_ms
            .map_or(dd.prefill_timeout, Duration::from_millis),
        ..dd
    };
    if disagg.prefill_timeout.is_zero() {
        bail!("--prefill-timeout-ms must be positive");
    }
    if s.mocker_stall_at_step.is_some() != s.mocker_stall_ms.is_some() {
        bail!("--mocker-stall-at-step and --mocker-stall-ms go together");
    }
    if s.mocker_drop_bus_after_ms.is_some()
        && (output != Output::Mocker || !matches!(input, Input::Endpoint(_)))
    {
        bail!("--mocker-drop-bus-after-ms drops a mocker worker process's bus connection: use it with in=dyn://... out=mocker --bus nats://...");
    }
    let external = match (output, &s.engine_url) {
        (Output::OpenAi, None) => bail!(
            "out=openai fronts an engine server: give its address with --engine-url http://HOST:PORT"
        ),
        (Output::OpenAi, Some(url)) => {
            let kind: ServerKind = s
                .engine_kind
                .as_deref()
                .unwrap_or("vllm")
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--engine-kind: {e}"))?;
            if !url.starts_with("http://") {
                bail!("--engine-url {url:?} must start with http:// (e.g. http://127.0.0.1:8000)");
            }
            if let Some(ev) = &s.kv_events {
                if !ev.starts_with("tcp://") {
                    bail!("--kv-events {ev:?} must be the engine's ZeroMQ publisher, like tcp://127.0.0.1:5557");
                }
                if kind == ServerKind::Llamacpp || kind == ServerKind::Generic {
                    bail!("--kv-events: a {kind} server publishes no KV events (vLLM and SGLang do)");
                }
            }
            OpenAiSettings {
                url: url.clone(),
                kind,
                model: s.engine_model.clone(),
                // A secret: from the environment only (flags show in `ps`).
                api_key: std::env::var("DYN_ENGINE_API_KEY").ok().filter(|k| !k.is_empty()),
                kv_events: s.kv_events.clone(),
                kv_topic: s.kv_events_topic.clone().unwrap_or_default(),
                kv_replay: match (&s.kv_events_replay, &s.kv_events) {
                    (Some(r), Some(_)) if r.starts_with("tcp://") => Some(r.clone()),
                    (Some(r), Some(_)) => bail!("--kv-events-replay {r:?} must be like tcp://127.0.0.1:5558"),
                    (Some(_), None) => bail!("--kv-events-replay goes with --kv-events"),
                    (None, _) => None,
                },
                block_size,
                total_blocks: s.num_gpu_blocks.unwrap_or(0) as u64,
                ..Default::default()
            }
        }
        (_, Some(_)) => bail!("--engine-url is for out=openai (a worker fronting an engine server)"),
        (_, None) => {
            if s.engine_kind.is_some()
                || s.engine_model.is_some()
                || s.kv_events.is_some()
                || s.kv_events_replay.is_some()
            {
                bail!("--engine-kind, --engine-model and --kv-events are for out=openai with --engine-url");
            }
            OpenAiSettings::default()
        }
    };
    if output == Output::Mocker {
        mocker
            .validate()
            .map_err(|e| anyhow::anyhow!("mocker settings: {e}"))?;
    }
    let kv_cache_memory = match s.kv_cache_memory.as_deref() {
        Some(size) => parse_bytes(size).with_context(|| format!("--kv-cache-memory {size:?}"))?,
        None => NativeSettings::default().kv_cache_memory,
    };
    let native = NativeSettings {
        compute: match s.dtype.as_deref().unwrap_or("auto") {
            "auto" => None,
            "f32" => Some(Compute::F32),
            "bf16" => Some(Compute::Bf16),
            "f16" => Some(Compute::F16),
            other => bail!("--dtype {other:?}: use auto (the checkpoint's), f32, bf16 or f16"),
        },
        kv_cache_dtype: match s.kv_cache_dtype.as_deref().unwrap_or("auto") {
            "auto" => None,
            other => Some(KvDtype::parse(other).with_context(|| {
                format!(
                    "--kv-cache-dtype {other:?}: use auto (the weights' type), f32, f16 or bf16"
                )
            })?),
        },
        block_size,
        num_gpu_blocks: s.num_gpu_blocks,
        kv_cache_memory,
        max_num_seqs,
        max_num_batched_tokens,
        host_kv_cache,
        disk_kv_cache,
        disk_kv_dir: s.disk_kv_dir.clone(),
        disk_min_uses,
        ..Default::default()
    };
    let router_mode: RouterMode = match &s.router_mode {
        Some(m) => m
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--router-mode: {e}"))?,
        None => RouterMode::default(),
    };
    let remote_router = s.remote_router.unwrap_or(false);
    if remote_router && !router_mode.uses_kv_router() {
        bail!("--remote-router needs --router-mode kv or least-loaded");
    }
    let worker_kind = s.worker_kind.unwrap_or_default();
    if worker_kind == WorkerKind::Prefill && !matches!(input, Input::Endpoint(_)) {
        bail!("--worker-kind prefill serves prefill requests on the bus: run it as in=dyn://NAMESPACE.COMPONENT.prefill (a frontend never sends it whole requests)");
    }
    if let Some(name) = &s.model_name {
        if name.trim().is_empty() {
            bail!("--model-name must not be empty");
        }
    }
    let host: IpAddr = match &s.http_host {
        Some(h) => h
            .parse()
            .map_err(|_| anyhow::anyhow!("--http-host {h:?} is not an IP address"))?,
        None => IpAddr::from([0, 0, 0, 0]),
    };
    Ok(LaunchSettings {
        input,
        output,
        namespace: namespace.to_string(),
        model_path: s.model_path.clone(),
        model_name: s.model_name.clone(),
        http_addr: SocketAddr::new(host, s.http_port.unwrap_or(8080)),
        router_mode,
        kv_router: router_settings(s)?,
        remote_router,
        num_workers: s.num_workers.unwrap_or(1),
        worker_kind,
        echo_delay: Duration::from_millis(s.echo_delay_ms.unwrap_or(10)),
        external,
        mocker,
        native,
        drop_bus_after: s.mocker_drop_bus_after_ms.map(Duration::from_millis),
        disagg,
        max_inflight: s.max_inflight.unwrap_or(1024),
        max_body_bytes: s.max_body_bytes.unwrap_or(16 * 1024 * 1024),
        migration_limit: s
            .migration_limit
            .unwrap_or(dynamo_actors::frontend::DEFAULT_MIGRATION_LIMIT),
        tls: match (&s.tls_cert, &s.tls_key) {
            (Some(c), Some(k)) => Some((c.into(), k.into())),
            (None, None) => None,
            _ => anyhow::bail!("tls_cert and tls_key go together: set both or neither"),
        },
        auth: dynamo_actors::frontend::auth::AuthSettings {
            keys: s.api_keys.clone().map(|k| k.0).unwrap_or_default(),
            file: s.api_keys_file.as_ref().map(std::path::PathBuf::from),
            max_inflight: s.api_key_max_inflight,
            rpm: s.api_key_rpm,
            protect_ops: s.api_key_protect_ops.unwrap_or(false),
        },
        parsers: dynamo_preprocessor::tools::OutputParsers {
            tool_call_parser: match s.tool_call_parser.as_deref() {
                None | Some("auto") => None,
                Some(name) => Some(dynamo_preprocessor::tools::ToolFormat::parse(name).ok_or_else(
                    || anyhow::anyhow!("tool_call_parser {name:?} is not one of hermes, llama3_json, mistral, auto"),
                )?),
            },
            reasoning: match s.reasoning_parser.as_deref() {
                None | Some("none") => false,
                Some("think") => true,
                Some(other) => anyhow::bail!("reasoning_parser {other:?} is not one of think, none"),
            },
        },
        batch_concurrency: s.batch_concurrency.unwrap_or(16),
    })
}

/// Renders `s` as `dynamo-run` flags (each set key as `--key value`; `engine`, `endpoint`,
/// `metrics_port` and `log` are the caller's: `out=`, `in=`, a per-replica port, a global flag).
pub fn to_flags(s: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let value = serde_json::to_value(s).expect("settings serialize");
    for (k, v) in value.as_object().expect("a struct").iter() {
        if matches!(k.as_str(), "engine" | "endpoint" | "metrics_port" | "log") {
            continue;
        }
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::Bool(true) => out.push(flag),
            serde_json::Value::Bool(false) => {}
            serde_json::Value::String(t) => {
                out.push(flag);
                out.push(t.clone());
            }
            other => {
                out.push(flag);
                out.push(other.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use crate::graph::{self, Launch};

    /// What a child process of the graph resolves from its command line.
    fn from_args(args: &[String]) -> (Option<KvRouterSettings>, Option<LaunchSettings>) {
        let cli = crate::Cli::try_parse_from(
            std::iter::once("dynamo-run".to_string()).chain(args.iter().cloned()),
        )
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match &cli.command {
            Some(crate::Command::Router(r)) => {
                (Some(router_settings(&r.settings()).unwrap()), None)
            }
            _ => (None, Some(crate::launch_settings(&cli).unwrap())),
        }
    }

    /// Every component of every shipped graph resolves to the same settings in this process
    /// (directly) and as a child process (through its command line): one configuration path.
    #[test]
    fn a_graph_resolves_the_same_embedded_and_as_processes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml")
                || path.ends_with("runtime.yaml")
            {
                continue;
            }
            let sets = ["defaults.model_path=/m".to_string()];
            let g = graph::load(&path, &[], &sets)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for c in &g.components {
                let args = c.args(&g, Some("nats://127.0.0.1:4222"), 0);
                if let Launch::Planner(p) = c.launch(&g) {
                    // Resolving loads the profile and the model folder: the settings match.
                    let cli = crate::Cli::try_parse_from(
                        std::iter::once("dynamo-run".to_string()).chain(args.iter().cloned()),
                    )
                    .unwrap_or_else(|e| panic!("{args:?}: {e}"));
                    let Some(crate::Command::Planner(a)) = &cli.command else {
                        panic!("{args:?} is not a planner");
                    };
                    assert_eq!(a.settings(), p, "{}: {args:?}", c.name);
                    checked += 1;
                    continue;
                }
                let direct = match c.launch(&g) {
                    Launch::Router(r) => (Some(router_settings(&r).unwrap()), None),
                    Launch::Planner(_) => unreachable!("checked above"),
                    Launch::Process {
                        input,
                        output,
                        settings,
                    } => (
                        None,
                        Some(resolve(input, output, &g.namespace, &settings).unwrap()),
                    ),
                };
                assert_eq!(
                    from_args(&args),
                    direct,
                    "{}: {} {args:?}",
                    path.display(),
                    c.name
                );
                checked += 1;
            }
        }
        assert!(checked >= 6, "checked {checked} components");
    }

    /// Every key a graph may set renders as a flag the launcher takes back.
    #[test]
    fn every_settings_key_round_trips_through_flags() {
        let s = Settings {
            model_path: Some("/m".into()),
            model_name: Some("tiny".into()),
            block_size: Some(32),
            worker_kind: Some(WorkerKind::Decode),
            num_gpu_blocks: Some(100),
            max_num_seqs: Some(8),
            max_num_batched_tokens: Some(512),
            speedup_ratio: Some(2.5),
            echo_delay_ms: Some(3),
            kv_cache_memory: Some("64MiB".into()),
            dtype: Some("bf16".into()),
            kv_cache_dtype: Some("f16".into()),
            mocker_panic_at_step: Some(4),
            mocker_panic_on_token: Some(77),
            mocker_stall_at_step: Some(5),
            mocker_stall_ms: Some(250),
            mocker_drop_bus_after_ms: Some(1000),
            router_mode: Some("least-loaded".into()),
            kv_overlap_score_weight: Some(0.5),
            router_temperature: Some(0.25),
            busy_threshold: Some(0.9),
            remote_router: Some(true),
            http_port: Some(9000),
            http_host: Some("127.0.0.1".into()),
            max_inflight: Some(7),
            max_body_bytes: Some(4096),
            num_workers: Some(3),
            batch_concurrency: Some(2),
            ..Default::default()
        };
        let mut args = vec!["in=http".to_string(), "out=mocker".to_string()];
        args.extend(to_flags(&s));
        let cli = crate::Cli::try_parse_from(
            std::iter::once("dynamo-run".to_string()).chain(args.clone()),
        )
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(cli.launch.settings(), s);
        // A planner's keys, through `dynamo-run planner`.
        let p = Settings {
            model_path: Some("/m".into()),
            model_name: Some("tiny".into()),
            pool: Some("backend".into()),
            prefill_pool: Some("prefill".into()),
            profile: Some("/p.json".into()),
            ttft_target_ms: Some(200.0),
            itl_target_ms: Some(25.5),
            planner_interval_ms: Some(3000),
            predictor: Some("moving-average:4".into()),
            min_replicas: Some(2),
            max_replicas: Some(9),
            min_prefill_replicas: Some(1),
            max_prefill_replicas: Some(3),
            max_workers: Some(10),
            scale_down_after: Some(4),
            connector: Some("local".into()),
            k8s_namespace: Some("serving".into()),
            k8s_deployment_prefix: Some("llm-".into()),
            ..Default::default()
        };
        let mut args = vec!["planner".to_string()];
        args.extend(to_flags(&p));
        let cli = crate::Cli::try_parse_from(
            std::iter::once("dynamo-run".to_string()).chain(args.clone()),
        )
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let Some(crate::Command::Planner(a)) = &cli.command else {
            panic!("{args:?} is not a planner");
        };
        assert_eq!(a.settings(), p);
    }

    /// `--config FILE` < flags, key by key; runtime keys in the same file are left to the
    /// runtime; a typo is refused with its name.
    #[test]
    fn a_config_file_is_a_layer_below_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "bus: nats://127.0.0.1:4222\nrpc:\n  max_inflight: 9\nlog: warn\nhttp_port: 9001\nblock_size: 32\nrouter_mode: kv\n").unwrap();
        let file = from_file(&path).unwrap();
        assert_eq!(file.http_port, Some(9001));
        let flags = Settings {
            block_size: Some(16),
            ..Default::default()
        };
        let s = overlay(file, flags);
        assert_eq!((s.http_port, s.block_size), (Some(9001), Some(16)));
        assert_eq!(s.router_mode.as_deref(), Some("kv"));
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/runtime.yaml");
        from_file(&shipped).unwrap();
        std::fs::write(&path, "http_prot: 9001\n").unwrap();
        let e = format!("{:#}", from_file(&path).unwrap_err());
        assert!(e.contains("http_prot"), "{e}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let bad = |s: Settings| {
            resolve(Input::Http, Output::Mocker, "dynamo", &s)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(Settings {
            block_size: Some(0),
            ..Default::default()
        })
        .contains("--block-size"));
        assert!(bad(Settings {
            dtype: Some("f8".into()),
            ..Default::default()
        })
        .contains("--dtype"));
        assert!(bad(Settings {
            kv_cache_dtype: Some("fp8".into()),
            ..Default::default()
        })
        .contains("--kv-cache-dtype"));
        assert!(bad(Settings {
            router_mode: Some("fastest".into()),
            ..Default::default()
        })
        .contains("--router-mode"));
        assert!(bad(Settings {
            remote_router: Some(true),
            ..Default::default()
        })
        .contains("--remote-router"));
        assert!(bad(Settings {
            mocker_stall_ms: Some(5),
            ..Default::default()
        })
        .contains("--mocker-stall"));
        assert!(bad(Settings {
            http_host: Some("example".into()),
            ..Default::default()
        })
        .contains("--http-host"));
        assert!(bad(Settings {
            kv_transfer: Some("udp".into()),
            ..Default::default()
        })
        .contains("--kv-transfer"));
        assert!(bad(Settings {
            prefill_fallback: Some("retry".into()),
            ..Default::default()
        })
        .contains("--prefill-fallback"));
        assert!(bad(Settings {
            mocker_host_gbps: Some(0.0),
            ..Default::default()
        })
        .contains("--mocker-host-gbps"));
        assert!(bad(Settings {
            host_kv_cache: Some("lots".into()),
            ..Default::default()
        })
        .contains("--host-kv-cache"));
        assert!(bad(Settings {
            disk_kv_cache: Some("1GiB".into()),
            ..Default::default()
        })
        .contains("--disk-kv-dir"));
        assert!(bad(Settings {
            disk_kv_dir: Some("/tmp/kv".into()),
            ..Default::default()
        })
        .contains("--disk-kv-cache"));
        assert!(bad(Settings {
            kv_host_credit: Some(1.5),
            ..Default::default()
        })
        .contains("--kv-host-credit"));
        assert!(bad(Settings {
            disk_min_uses: Some(0),
            ..Default::default()
        })
        .contains("--disk-min-uses"));
        assert!(bad(Settings {
            mocker_disk_gbps: Some(-1.0),
            ..Default::default()
        })
        .contains("--mocker-disk-gbps"));
        assert!(bad(Settings {
            mocker_kv_bytes_per_token: Some(0),
            ..Default::default()
        })
        .contains("--mocker-kv-bytes-per-token"));
        assert!(bad(Settings {
            worker_kind: Some(WorkerKind::Prefill),
            ..Default::default()
        })
        .contains("prefill"));
    }
}
