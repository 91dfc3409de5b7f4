//! `out=openai`: an engine that is another server (vLLM, SGLang, llama.cpp, or any
//! OpenAI-compatible one), so a fleet of them sits behind our frontend and KV router.
//!
//! **Requests.** Token ids go in and come back, in each server's own dialect:
//! - `vllm`: `POST /v1/completions` with the prompt as token ids and `return_token_ids`; each
//!   streamed choice carries its `token_ids`.
//! - `sglang`: `POST /generate` with `input_ids`; streamed `output_ids` (cumulative or
//!   incremental, told apart by `meta_info.completion_tokens`).
//! - `llamacpp`: `POST /completion` with the prompt as a token array and `return_tokens`;
//!   streamed `tokens`.
//! - `generic`: `POST /v1/completions` with the prompt as text (our detokenization) and the
//!   answer's text re-tokenized: **approximate** (a re-tokenization need not give the engine's
//!   ids), for servers with no token-id interface.
//!
//! Stop conditions are the request's: `max_tokens`, `min_tokens` and the stop token ids go to
//! the server where its dialect has them (EOS is ignored upstream exactly when it is not among
//! the request's stop tokens), and the sidecar enforces them again on what comes back, closing
//! the upstream request at the stop. What a dialect cannot express is refused with a 400
//! instead of being dropped silently (`logprobs`, guided decoding; `min_tokens` with EOS on
//! llama.cpp, which has no such setting). A migrated request continues exactly when greedy;
//! seeded draws continue from the server's own generator.
//!
//! **Failure** (counted in `dynamo_worker_external_errors_total{reason}`). A server that refuses
//! with 429/503 is `Overloaded` (the frontend tries another
//! worker); other 4xx are the request's fault (`BadRequest`, with the server's message); a
//! 5xx, a dropped connection or a stream silent for `stall_timeout` mid-request is `Stopped`,
//! which the frontend migrates. Cancellation (the client left, a stop token) drops the
//! upstream connection, which is how these servers learn to abort a request.
//!
//! **Health.** The server's health path is probed every `probe_interval`; after
//! `probe_failures` failures in a row the engine reports [`EngineState::Failed`], its worker
//! deregisters, and the restart ([`OpenAiEngine::connect`]) waits until the server answers
//! again before the worker registers again.
//!
//! **Load.** The worker's load report comes from what the sidecar has in flight (requests and
//! their blocks), replaced by the server's own Prometheus gauges where it exports them
//! (`vllm:num_requests_running|waiting`, `vllm:kv_cache_usage_perc`; `sglang:num_running_reqs`,
//! `sglang:num_queue_reqs`, `sglang:token_usage`; `llamacpp:requests_processing|deferred`),
//! which also count requests that did not come through us.
//!
//! **KV events.** With `kv_events` (the engine's ZeroMQ publisher), the engine's cache is
//! followed through [`crate::external_events`] and published as this worker's KV events, so
//! the KV router scores these workers by their cached prefixes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dynamo_protocols::kv::{KvDump, KvEvent, LoadReport};
use dynamo_protocols::llm::{EngineOutput, FinishReason, PreprocessedRequest, TokenId};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{Engine, EngineError, EngineState, EngineStream, KvHandle};

/// Which server is behind the sidecar (its request dialect, health path and metric names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Vllm,
    Sglang,
    Llamacpp,
    /// Any OpenAI-compatible server: text in and out, re-tokenized (approximate).
    Generic,
}

impl std::str::FromStr for ServerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vllm" => Ok(ServerKind::Vllm),
            "sglang" => Ok(ServerKind::Sglang),
            "llamacpp" | "llama.cpp" => Ok(ServerKind::Llamacpp),
            "generic" => Ok(ServerKind::Generic),
            other => Err(format!(
                "engine kind {other:?} is not known; use vllm, sglang, llamacpp or generic"
            )),
        }
    }
}

impl std::fmt::Display for ServerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerKind::Vllm => "vllm",
            ServerKind::Sglang => "sglang",
            ServerKind::Llamacpp => "llamacpp",
            ServerKind::Generic => "generic",
        })
    }
}

impl ServerKind {
    fn health_path(self) -> &'static str {
        match self {
            ServerKind::Generic => "/v1/models",
            _ => "/health",
        }
    }
}

/// Text for a `generic` server: our tokenizer's way between ids and text.
pub trait TextCodec: Send + Sync {
    fn decode(&self, ids: &[TokenId]) -> String;
    fn encode(&self, text: &str) -> Vec<TokenId>;
}

/// Where the server is and how to talk to it.
#[derive(Clone)]
pub struct OpenAiSettings {
    /// The server's base URL (`http://host:port`).
    pub url: String,
    pub kind: ServerKind,
    /// The model name the server serves (the `model` field of its requests); `None`: the
    /// first one its `/v1/models` lists (vLLM, SGLang, generic).
    pub model: Option<String>,
    /// A bearer token the server wants (vLLM's `--api-key`).
    pub api_key: Option<String>,
    /// The engine's ZeroMQ KV-event publisher (`tcp://host:port`), if it runs one.
    pub kv_events: Option<String>,
    pub kv_topic: String,
    /// The engine's KV-event replay socket (vLLM's `replay_endpoint`), to fill gaps.
    pub kv_replay: Option<String>,
    /// The engine's KV block size in tokens (vLLM's `--block-size`; our card's).
    pub block_size: usize,
    /// The engine's KV blocks, for load reports (the server's own figure wins when it has one).
    pub total_blocks: u64,
    /// The model's EOS ids: when a request's stop tokens include them, the server stops at
    /// EOS itself; otherwise it is told to ignore EOS.
    pub eos_token_ids: Vec<TokenId>,
    /// For `generic` servers.
    pub codec: Option<Arc<dyn TextCodec>>,
    pub probe_interval: Duration,
    pub probe_failures: u32,
    pub metrics_interval: Duration,
    /// A request whose stream sends nothing for this long has a hung server: `Stopped`.
    pub stall_timeout: Duration,
}

impl std::fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("url", &self.url)
            .field("kind", &self.kind)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("kv_events", &self.kv_events)
            .field("block_size", &self.block_size)
            .field("total_blocks", &self.total_blocks)
            .finish_non_exhaustive()
    }
}

impl PartialEq for OpenAiSettings {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.url,
            self.kind,
            &self.model,
            &self.api_key,
            &self.kv_events,
            &self.kv_topic,
            &self.kv_replay,
            self.block_size,
            self.total_blocks,
        ) == (
            &o.url,
            o.kind,
            &o.model,
            &o.api_key,
            &o.kv_events,
            &o.kv_topic,
            &o.kv_replay,
            o.block_size,
            o.total_blocks,
        ) && self.eos_token_ids == o.eos_token_ids
    }
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            kind: ServerKind::Vllm,
            model: None,
            api_key: None,
            kv_events: None,
            kv_topic: String::new(),
            kv_replay: None,
            block_size: 16,
            total_blocks: 0,
            eos_token_ids: Vec::new(),
            codec: None,
            probe_interval: Duration::from_secs(1),
            probe_failures: 3,
            metrics_interval: Duration::from_millis(250),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// What the sidecar has in flight (its own share of the server's load).
#[derive(Default)]
struct InFlight {
    requests: AtomicU64,
    blocks: AtomicU64,
}

/// Counts a request in flight until dropped.
struct Ticket {
    flight: Arc<InFlight>,
    blocks: u64,
}

impl Ticket {
    fn new(flight: Arc<InFlight>, blocks: u64) -> Self {
        flight.requests.fetch_add(1, Ordering::Relaxed);
        flight.blocks.fetch_add(blocks, Ordering::Relaxed);
        Self { flight, blocks }
    }

    fn grow(&mut self, blocks: u64) {
        self.flight.blocks.fetch_add(blocks, Ordering::Relaxed);
        self.blocks += blocks;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.flight.requests.fetch_sub(1, Ordering::Relaxed);
        self.flight.blocks.fetch_sub(self.blocks, Ordering::Relaxed);
    }
}

struct Inner {
    settings: OpenAiSettings,
    model: Option<String>,
    http: reqwest::Client,
    flight: Arc<InFlight>,
}

/// An external server as an [`Engine`] (see the module header).
pub struct OpenAiEngine {
    inner: Arc<Inner>,
    kv: KvHandle,
    health: watch::Receiver<EngineState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for OpenAiEngine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn client_error(url: &str, e: &reqwest::Error) -> String {
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    format!("{url}: {why}")
}

impl Inner {
    /// A request to the server's `path`, with its bearer token when it wants one.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method, format!("{}{path}", self.settings.url));
        match &self.settings.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    /// One health probe: `Ok` when the server answers its health path with a success.
    async fn probe(&self) -> Result<(), String> {
        let path = self.settings.kind.health_path();
        let r = self
            .get(path)
            .timeout(self.settings.probe_interval.max(Duration::from_millis(500)) * 2)
            .send()
            .await
            .map_err(|e| client_error(&self.settings.url, &e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("GET {path} answered {}", r.status()))
        }
    }
}

/// The server's Prometheus gauges this sidecar reads, summed over label sets.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ServerGauges {
    running: Option<f64>,
    waiting: Option<f64>,
    /// KV usage, 0..=1.
    usage: Option<f64>,
    total_blocks: Option<u64>,
}

fn parse_metrics(kind: ServerKind, text: &str) -> ServerGauges {
    let (running, waiting, usage): (&[&str], &[&str], &[&str]) = match kind {
        ServerKind::Vllm => (
            &["vllm:num_requests_running"],
            &["vllm:num_requests_waiting"],
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        ),
        ServerKind::Sglang => (
            &["sglang:num_running_reqs"],
            &["sglang:num_queue_reqs"],
            &["sglang:token_usage"],
        ),
        ServerKind::Llamacpp => (
            &["llamacpp:requests_processing"],
            &["llamacpp:requests_deferred"],
            &["llamacpp:kv_cache_usage_ratio"],
        ),
        ServerKind::Generic => (&[], &[], &[]),
    };
    let mut g = ServerGauges::default();
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.rfind('}') {
                Some(end) => (&r[..end], &r[end + 1..]),
                None => continue,
            },
            None => ("", rest),
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        if running.contains(&name) {
            add(&mut g.running, value);
        } else if waiting.contains(&name) {
            add(&mut g.waiting, value);
        } else if usage.contains(&name) && g.usage.is_none() {
            g.usage = Some(value.clamp(0.0, 1.0));
        } else if kind == ServerKind::Vllm && name == "vllm:cache_config_info" {
            g.total_blocks = labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == "num_gpu_blocks")
                    .then(|| v.trim().trim_matches('"').parse().ok())
                    .flatten()
            });
        }
    }
    g
}

impl OpenAiEngine {
    /// Connects to the server: waits until it answers its health path (a line on stderr
    /// every 10 s while it does not: a worker never registers a server that is down), learns
    /// the model name, and starts the health probe, the load reports and, with `kv_events`,
    /// the KV event subscriber.
    pub async fn connect(settings: OpenAiSettings) -> Result<Self, EngineError> {
        let url = settings.url.trim_end_matches('/').to_string();
        if !url.starts_with("http://") {
            return Err(EngineError::BadRequest(format!(
                "engine URL {url:?} must start with http:// (e.g. http://127.0.0.1:8000): the sidecar runs beside its engine server"
            )));
        }
        if settings.kind == ServerKind::Generic && settings.codec.is_none() {
            return Err(EngineError::BadRequest(
                "a generic engine needs the model's tokenizer (a text codec)".into(),
            ));
        }
        let settings = OpenAiSettings { url, ..settings };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| EngineError::Internal(format!("HTTP client: {e}")))?;
        let mut inner = Inner {
            settings,
            model: None,
            http,
            flight: Arc::default(),
        };
        let started = tokio::time::Instant::now();
        let mut said = tokio::time::Instant::now();
        loop {
            match inner.probe().await {
                Ok(()) => break,
                Err(why) => {
                    if said.elapsed() >= Duration::from_secs(10) {
                        said = tokio::time::Instant::now();
                        tracing::warn!(url = %inner.settings.url, waited = ?started.elapsed(), error = %why, "waiting for the engine server to answer; is it running?");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        inner.model = match (&inner.settings.model, inner.settings.kind) {
            (Some(m), _) => Some(m.clone()),
            (None, ServerKind::Llamacpp) => None,
            (None, _) => Some(first_model(&inner).await?),
        };
        let inner = Arc::new(inner);
        let (health_tx, health) = watch::channel(EngineState::Running);
        let (load_tx, load) = watch::channel(LoadReport {
            total_blocks: inner.settings.total_blocks,
            ..Default::default()
        });
        let (events, _) = broadcast::channel::<Vec<KvEvent>>(1024);
        let (dumps_tx, dumps) = mpsc::channel::<oneshot::Sender<KvDump>>(4);
        let mut tasks = Vec::new();
        match &inner.settings.kv_events {
            Some(endpoint) => tasks.push(
                crate::external_events::subscribe(
                    &crate::external_events::EventSource {
                        endpoint: endpoint.clone(),
                        topic: inner.settings.kv_topic.clone(),
                        replay: inner.settings.kv_replay.clone(),
                    },
                    inner.settings.block_size,
                    events.clone(),
                    dumps,
                )
                .await?,
            ),
            // No events: the cache is unknown, and a dump says so (nothing held).
            None => {
                let block_size = inner.settings.block_size as u32;
                let mut dumps = dumps;
                tasks.push(tokio::spawn(async move {
                    while let Some(reply) = dumps.recv().await {
                        let _ = reply.send(KvDump {
                            block_size,
                            ..Default::default()
                        });
                    }
                }));
            }
        }
        tasks.push(tokio::spawn(probe_loop(inner.clone(), health_tx)));
        tasks.push(tokio::spawn(load_loop(inner.clone(), load_tx)));
        let kv = KvHandle::new(events, load, dumps_tx, inner.settings.block_size as u32);
        Ok(Self {
            inner,
            kv,
            health,
            tasks,
        })
    }

    /// The upstream model name requests carry.
    pub fn model(&self) -> Option<&str> {
        self.inner.model.as_deref()
    }

    /// The server's KV blocks as its metrics report them (vLLM), else the settings'.
    pub async fn total_blocks(&self) -> u64 {
        match fetch_gauges(&self.inner).await {
            Some(ServerGauges {
                total_blocks: Some(n),
                ..
            }) => n,
            _ => self.inner.settings.total_blocks,
        }
    }
}

async fn first_model(inner: &Inner) -> Result<String, EngineError> {
    let r = inner
        .get("/v1/models")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| {
            EngineError::Internal(format!(
                "cannot list the server's models: {}",
                client_error(&inner.settings.url, &e)
            ))
        })?;
    let v: Value = r
        .json()
        .await
        .map_err(|e| EngineError::Internal(format!("GET /v1/models: {e}")))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| {
            EngineError::Internal(format!(
                "GET /v1/models on {} lists no model; name it with --engine-model",
                inner.settings.url
            ))
        })
}

async fn probe_loop(inner: Arc<Inner>, health: watch::Sender<EngineState>) {
    let mut failures = 0;
    loop {
        tokio::time::sleep(inner.settings.probe_interval).await;
        match inner.probe().await {
            Ok(()) => failures = 0,
            Err(why) => {
                failures += 1;
                metrics::counter!("dynamo_worker_engine_probe_failures_total").increment(1);
                if failures >= inner.settings.probe_failures.max(1) {
                    health.send_replace(EngineState::Failed(format!(
                        "the engine server stopped answering ({failures} health probes failed; last: {why})"
                    )));
                    return;
                }
            }
        }
    }
}

async fn fetch_gauges(inner: &Inner) -> Option<ServerGauges> {
    if inner.settings.kind == ServerKind::Generic {
        return None;
    }
    let r = inner
        .get("/metrics")
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(parse_metrics(inner.settings.kind, &r.text().await.ok()?))
}

async fn load_loop(inner: Arc<Inner>, load: watch::Sender<LoadReport>) {
    // A server without a metrics endpoint (llama.cpp without --metrics) is asked once a
    // minute again, not every interval.
    let mut skip_until = tokio::time::Instant::now();
    loop {
        let mut gauges = ServerGauges::default();
        if tokio::time::Instant::now() >= skip_until {
            match fetch_gauges(&inner).await {
                Some(g) => gauges = g,
                None => skip_until = tokio::time::Instant::now() + Duration::from_secs(60),
            }
        }
        let total = gauges.total_blocks.unwrap_or(inner.settings.total_blocks);
        let own_requests = inner.flight.requests.load(Ordering::Relaxed);
        let own_blocks = inner.flight.blocks.load(Ordering::Relaxed);
        let report = LoadReport {
            worker: None,
            active_blocks: match gauges.usage {
                Some(u) if total > 0 => (u * total as f64).round() as u64,
                _ => own_blocks,
            },
            total_blocks: total,
            waiting_requests: gauges.waiting.map_or(0, |w| w.max(0.0) as u64),
            queued_prefill_tokens: 0,
            running_requests: gauges.running.map_or(own_requests, |r| r.max(0.0) as u64),
            tiers: None,
            steps: None,
        };
        load.send_if_modified(|old| {
            let changed = *old != report;
            *old = report;
            changed
        });
        tokio::time::sleep(inner.settings.metrics_interval).await;
    }
}

/// `logit_bias` as OpenAI's map from token id (a string) to bias.
fn bias_map(bias: &[(TokenId, f32)]) -> Value {
    Value::Object(
        bias.iter()
            .map(|(t, b)| (t.to_string(), json!(b)))
            .collect(),
    )
}

/// The JSON body of one request, in the server's dialect.
fn request_body(
    inner: &Inner,
    request: &PreprocessedRequest,
    upstream_ignores_eos: bool,
) -> Result<(&'static str, Value), EngineError> {
    let s = &request.sampling;
    let kind = inner.settings.kind;
    let mut body = Map::new();
    let mut put = |k: &str, v: Value| {
        body.insert(k.to_string(), v);
    };
    let temperature = s.temperature.unwrap_or(0.0);
    match kind {
        ServerKind::Vllm | ServerKind::Generic => {
            if let Some(m) = &inner.model {
                put("model", json!(m));
            }
            if kind == ServerKind::Vllm {
                put("prompt", json!(request.token_ids));
                put("return_token_ids", json!(true));
                put("min_tokens", json!(request.stop.min_tokens));
                put("stop_token_ids", json!(request.stop.stop_token_ids));
                put("ignore_eos", json!(upstream_ignores_eos));
                if let Some(k) = s.top_k {
                    put("top_k", json!(k));
                }
            } else {
                let codec = inner.settings.codec.as_ref().expect("checked at connect");
                put("prompt", json!(codec.decode(&request.token_ids)));
            }
            put("max_tokens", json!(request.stop.max_tokens));
            put("temperature", json!(temperature));
            put("stream", json!(true));
            if let Some(p) = s.top_p {
                put("top_p", json!(p));
            }
            if let Some(seed) = s.seed {
                put("seed", json!(seed));
            }
            if let Some(p) = s.presence_penalty {
                put("presence_penalty", json!(p));
            }
            if let Some(p) = s.frequency_penalty {
                put("frequency_penalty", json!(p));
            }
            if !s.logit_bias.is_empty() {
                put("logit_bias", bias_map(&s.logit_bias));
            }
            Ok(("/v1/completions", Value::Object(body)))
        }
        ServerKind::Sglang => {
            let mut sp = Map::new();
            sp.insert("max_new_tokens".into(), json!(request.stop.max_tokens));
            sp.insert("min_new_tokens".into(), json!(request.stop.min_tokens));
            sp.insert("temperature".into(), json!(temperature));
            sp.insert("stop_token_ids".into(), json!(request.stop.stop_token_ids));
            sp.insert("ignore_eos".into(), json!(upstream_ignores_eos));
            if let Some(p) = s.top_p {
                sp.insert("top_p".into(), json!(p));
            }
            if let Some(k) = s.top_k {
                sp.insert("top_k".into(), json!(k));
            }
            if let Some(seed) = s.seed {
                sp.insert("sampling_seed".into(), json!(seed));
            }
            if let Some(p) = s.presence_penalty {
                sp.insert("presence_penalty".into(), json!(p));
            }
            if let Some(p) = s.frequency_penalty {
                sp.insert("frequency_penalty".into(), json!(p));
            }
            if !s.logit_bias.is_empty() {
                sp.insert("logit_bias".into(), bias_map(&s.logit_bias));
            }
            put("input_ids", json!(request.token_ids));
            put("sampling_params", Value::Object(sp));
            put("stream", json!(true));
            Ok(("/generate", Value::Object(body)))
        }
        ServerKind::Llamacpp => {
            if request.stop.min_tokens > 0 && !upstream_ignores_eos {
                return Err(EngineError::BadRequest(
                    "min_tokens: the llama.cpp server cannot hold off EOS for a number of tokens; \
                     leave min_tokens out or set ignore_eos"
                        .into(),
                ));
            }
            put("prompt", json!(request.token_ids));
            put("n_predict", json!(request.stop.max_tokens));
            put("stream", json!(true));
            put("return_tokens", json!(true));
            put("cache_prompt", json!(true));
            put("ignore_eos", json!(upstream_ignores_eos));
            put("temperature", json!(temperature));
            // Only the samplers the request asked for: llama.cpp's defaults (min_p 0.05,
            // repeat penalty 1.1, DRY...) would change the draws.
            put("top_k", json!(s.top_k.unwrap_or(0)));
            put("top_p", json!(s.top_p.unwrap_or(1.0)));
            put("min_p", json!(0.0));
            put("typical_p", json!(1.0));
            put("repeat_penalty", json!(1.0));
            put("presence_penalty", json!(s.presence_penalty.unwrap_or(0.0)));
            put(
                "frequency_penalty",
                json!(s.frequency_penalty.unwrap_or(0.0)),
            );
            put(
                "samplers",
                json!(["penalties", "top_k", "top_p", "temperature"]),
            );
            if let Some(seed) = s.seed {
                put("seed", json!(seed));
            }
            if !s.logit_bias.is_empty() {
                let bias: Vec<Value> = s.logit_bias.iter().map(|(t, b)| json!([t, b])).collect();
                put("logit_bias", Value::Array(bias));
            }
            Ok(("/completion", Value::Object(body)))
        }
    }
}

/// One streamed event of the server, in our terms.
#[derive(Debug, Default, PartialEq)]
struct Piece {
    tokens: Vec<TokenId>,
    /// The server finished the request (its reason, mapped).
    finish: Option<FinishReason>,
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "length" | "limit" => FinishReason::Length,
        _ => FinishReason::Stop,
    }
}

fn token_ids(v: &Value) -> Option<Vec<TokenId>> {
    v.as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| TokenId::try_from(t).ok()))
        .collect()
}

/// Reads one `data:` payload. `emitted` is how many tokens the request produced so far (SGLang
/// may send cumulative ids). A generic server's text is re-tokenized by the caller.
fn parse_piece(kind: ServerKind, v: &Value, emitted: usize) -> Result<Piece, String> {
    if let Some(e) = v.get("error") {
        return Err(format!("the server reported an error: {e}"));
    }
    match kind {
        ServerKind::Vllm | ServerKind::Generic => {
            let choice = &v["choices"][0];
            if choice.is_null() {
                // A usage-only chunk.
                return Ok(Piece::default());
            }
            let finish = choice["finish_reason"].as_str().map(finish_reason);
            let tokens = match (kind, choice.get("token_ids")) {
                (ServerKind::Vllm, Some(ids)) if !ids.is_null() => token_ids(ids)
                    .ok_or_else(|| format!("token_ids is not a list of token ids: {ids}"))?,
                (ServerKind::Vllm, _) => {
                    if choice["text"].as_str().is_some_and(|t| !t.is_empty()) {
                        return Err(
                            "the server returned text without token ids (is it a vLLM with return_token_ids? use --engine-kind generic for others)"
                                .into(),
                        );
                    }
                    Vec::new()
                }
                _ => Vec::new(),
            };
            Ok(Piece { tokens, finish })
        }
        ServerKind::Sglang => {
            let ids = v
                .get("output_ids")
                .ok_or("an SGLang chunk without output_ids")?;
            let ids = token_ids(ids).ok_or("output_ids is not a list of token ids")?;
            let meta = &v["meta_info"];
            // Cumulative ids (SGLang's default) repeat what was sent: keep the new tail.
            let new = match meta["completion_tokens"].as_u64() {
                Some(total) => (total as usize).saturating_sub(emitted).min(ids.len()),
                None => ids.len(),
            };
            let finish = match &meta["finish_reason"] {
                Value::Null => None,
                Value::String(s) => Some(finish_reason(s)),
                f => Some(finish_reason(f["type"].as_str().unwrap_or("stop"))),
            };
            Ok(Piece {
                tokens: ids[ids.len() - new..].to_vec(),
                finish,
            })
        }
        ServerKind::Llamacpp => {
            let tokens = match v.get("tokens") {
                Some(ids) => token_ids(ids).ok_or("tokens is not a list of token ids")?,
                None => {
                    if v["content"].as_str().is_some_and(|t| !t.is_empty()) {
                        return Err("the server returned text without token ids (is it llama.cpp's server?)".into());
                    }
                    Vec::new()
                }
            };
            let finish = if v["stop"].as_bool() == Some(true) {
                Some(finish_reason(v["stop_type"].as_str().unwrap_or("eos")))
            } else {
                None
            };
            Ok(Piece { tokens, finish })
        }
    }
}

/// The `data:` payloads of a server-sent event stream, one per line.
struct SseLines {
    buf: Vec<u8>,
}

impl SseLines {
    /// Appends bytes; returns the complete `data:` payloads they finish.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            }
        }
        out
    }
}

impl Engine for OpenAiEngine {
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        let s = &request.sampling;
        let unsupported = if s.logprobs.is_some() {
            Some("logprobs")
        } else if s.guided.is_some() {
            Some("guided decoding (response_format)")
        } else if request.remote_prefill.is_some() {
            Some("a remote prefill")
        } else {
            None
        };
        if let Some(what) = unsupported {
            return Err(EngineError::BadRequest(format!(
                "{what} is not forwarded to an external engine (out=openai); use a native worker"
            )));
        }
        if request.token_ids.is_empty() {
            return Err(EngineError::BadRequest("an empty prompt".into()));
        }
        let inner = self.inner.clone();
        let eos = &inner.settings.eos_token_ids;
        let upstream_ignores_eos =
            eos.is_empty() || !eos.iter().all(|e| request.stop.stop_token_ids.contains(e));
        let (path, body) = request_body(&inner, &request, upstream_ignores_eos)?;
        let bs = inner.settings.block_size.max(1) as u64;
        let prompt_len = request.token_ids.len() as u64;
        let (tx, rx) = mpsc::channel::<Result<EngineOutput, EngineError>>(64);
        tokio::spawn(async move {
            let mut ticket = Ticket::new(inner.flight.clone(), prompt_len.div_ceil(bs));
            let run = forward(&inner, path, body, &request, &tx, &mut ticket, prompt_len);
            let rest = tokio::select! {
                result = run => match result {
                    Ok(rest) => rest,
                    Err(e) => {
                        let reason = match &e {
                            EngineError::Overloaded(_) => "overloaded",
                            EngineError::BadRequest(_) => "bad_request",
                            _ => "failed",
                        };
                        metrics::counter!("dynamo_worker_external_errors_total", "reason" => reason).increment(1);
                        if reason == "failed" {
                            tracing::warn!(url = %inner.settings.url, error = %e, "a request to the engine server failed");
                        }
                        let _ = tx.send(Err(e)).await;
                        None
                    }
                },
                _ = cancel.cancelled() => None,
                _ = tx.closed() => None,
            };
            drop((tx, ticket));
            // A request the server is finishing too: read its last bytes (the final event,
            // `[DONE]`) so the connection goes back to the pool for the next request. Any
            // other way out drops the response: the connection closes and the server aborts
            // the request.
            if let Some(mut rest) = rest {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = rest.next().await {}
                })
                .await;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    fn kv(&self) -> Option<KvHandle> {
        Some(self.kv.clone())
    }

    fn health(&self) -> Option<watch::Receiver<EngineState>> {
        Some(self.health.clone())
    }
}

/// The rest of a server's response body.
type Upstream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send>>;

/// Sends one request upstream and streams its tokens to `tx` until a finish (ours or the
/// server's). Returns the rest of the response when the server is finishing as well, for the
/// caller to read out (so the connection is reused) after the stream ended.
async fn forward(
    inner: &Inner,
    path: &str,
    body: Value,
    request: &PreprocessedRequest,
    tx: &mpsc::Sender<Result<EngineOutput, EngineError>>,
    ticket: &mut Ticket,
    prompt_len: u64,
) -> Result<Option<Upstream>, EngineError> {
    let kind = inner.settings.kind;
    let url = &inner.settings.url;
    let response = inner
        .request(reqwest::Method::POST, path)
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            EngineError::Stopped(format!(
                "the engine server did not take the request: {}",
                client_error(url, &e)
            ))
        })?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(500).collect();
        let why = format!("the engine server answered {status}: {text}");
        return Err(match status.as_u16() {
            429 | 503 => EngineError::Overloaded(why),
            400..=499 => EngineError::BadRequest(why),
            _ => EngineError::Stopped(why),
        });
    }
    let stop = &request.stop;
    let bs = inner.settings.block_size.max(1) as u64;
    let mut produced: u32 = 0;
    let mut sse = SseLines { buf: Vec::new() };
    let mut body = response.bytes_stream();
    // Generic servers: the answer's text so far, and how many of its tokens went out.
    let mut text = String::new();
    loop {
        let chunk = match tokio::time::timeout(inner.settings.stall_timeout, body.next()).await {
            Err(_) => {
                return Err(EngineError::Stopped(format!(
                    "the engine server sent nothing for {:?} mid-request",
                    inner.settings.stall_timeout
                )))
            }
            Ok(None) => {
                return Err(EngineError::Stopped(
                    "the engine server ended the stream before the request finished".into(),
                ))
            }
            Ok(Some(Err(e))) => {
                return Err(EngineError::Stopped(format!(
                    "the engine server's stream broke: {}",
                    client_error(url, &e)
                )))
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        for data in sse.push(&chunk) {
            let mut done_by_server = false;
            let piece = if data == "[DONE]" {
                done_by_server = true;
                Piece {
                    tokens: Vec::new(),
                    finish: Some(FinishReason::Stop),
                }
            } else {
                let v: Value = serde_json::from_str(&data).map_err(|e| {
                    EngineError::Stopped(format!(
                        "the engine server sent an event that is not JSON: {e}"
                    ))
                })?;
                let mut piece =
                    parse_piece(kind, &v, produced as usize).map_err(EngineError::Stopped)?;
                if kind == ServerKind::Generic {
                    text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
                    let codec = inner.settings.codec.as_ref().expect("checked at connect");
                    let ids = codec.encode(&text);
                    // The last token may still change as text arrives: hold it back until
                    // the end.
                    let stable = if piece.finish.is_some() {
                        ids.len()
                    } else {
                        ids.len().saturating_sub(1)
                    };
                    piece.tokens = ids
                        .get(produced as usize..stable)
                        .map(<[TokenId]>::to_vec)
                        .unwrap_or_default();
                }
                piece
            };
            // Enforce the request's own stop conditions on what came back.
            let mut out = EngineOutput::default();
            let mut finish = None;
            for t in piece.tokens {
                out.token_ids.push(t);
                produced += 1;
                if produced >= stop.min_tokens && stop.stop_token_ids.contains(&t) {
                    finish = Some(FinishReason::Stop);
                    break;
                }
                if produced >= stop.max_tokens {
                    finish = Some(FinishReason::Length);
                    break;
                }
            }
            let finish = finish.or(piece.finish);
            let blocks_now = (prompt_len + produced as u64).div_ceil(bs);
            if blocks_now > ticket.blocks {
                ticket.grow(blocks_now - ticket.blocks);
            }
            if out.token_ids.is_empty() && finish.is_none() {
                continue;
            }
            out.finish_reason = finish;
            let last = finish.is_some();
            // The server stops by itself at its own finish, at the length it was given, and
            // (vLLM, SGLang) at the stop tokens it was given.
            let server_finishes = piece.finish.is_some()
                || done_by_server
                || finish == Some(FinishReason::Length)
                || (finish.is_some() && matches!(kind, ServerKind::Vllm | ServerKind::Sglang));
            if tx.send(Ok(out)).await.is_err() {
                return Ok(None);
            }
            if last || done_by_server {
                return Ok(server_finishes.then(|| Box::pin(body) as Upstream));
            }
        }
    }
}

#[cfg(test)]
mod tests;
