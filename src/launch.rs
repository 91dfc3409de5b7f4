//! `dynamo-run in=... out=...`: what runs in this process.
//!
//! - `out=echo`: this process hosts `--num-workers` echo workers for the model folder;
//!   `out=mocker`: simulated engines over real block pools; `out=native`: the model itself on
//!   the CPU (safetensors weights in the folder); `out=openai`: a sidecar for an external
//!   engine server (`--engine-url`; vLLM, SGLang, llama.cpp or generic, see
//!   `dynamo_engine::openai`); `out=dyn`: workers are elsewhere on the bus,
//!   found through discovery.
//! - `in=http`: the OpenAI frontend; `in=text`: a chat in the terminal; `in=batch:FILE`: prompts
//!   from JSONL, answers with timing as JSONL on stdout; `in=dyn://ns.component.endpoint`: this
//!   process is only a worker, serving that endpoint.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dynamo_actors::frontend::{Endpoint, FrontendSettings, ModelTable, RouterMode, Serving};
use dynamo_actors::router::KvRouterSettings;
use dynamo_actors::supervisor::{RoleSpec, Started, SupervisorHandle, WorkerSpec};
use dynamo_actors::worker::{EngineFactory, WorkerSettings};
use dynamo_engine::{
    EchoEngine, EchoSettings, Engine, MockerEngine, MockerSettings, NativeEngine, NativeSettings,
    OpenAiEngine, OpenAiSettings, ServerKind,
};
use dynamo_preprocessor::{ModelFolder, Preprocessor};
use dynamo_protocols::llm::{TokenId, WorkerKind};
use dynamo_runtime::subject::{ComponentId, EndpointId, Namespace};
use dynamo_runtime::{InstanceId, Runtime};
use futures::StreamExt;
use serde_json::{json, Value};

/// Where requests come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Http,
    Text,
    Batch(PathBuf),
    /// Serve this endpoint as a worker.
    Endpoint(EndpointId),
}

/// What answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Echo,
    /// The real scheduler and block pool with simulated execution.
    Mocker,
    /// The model on the CPU.
    Native,
    /// An external engine server (vLLM, SGLang, llama.cpp, any OpenAI-compatible one).
    OpenAi,
    /// Workers found on the bus.
    Dyn,
}

impl std::str::FromStr for Input {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "http" => Input::Http,
            "text" => Input::Text,
            _ if s.starts_with("batch:") => Input::Batch(PathBuf::from(&s["batch:".len()..])),
            _ if s.starts_with("dyn://") => Input::Endpoint(
                EndpointId::parse(&s["dyn://".len()..])
                    .with_context(|| format!("in={s}: expected dyn://namespace.component.endpoint"))?,
            ),
            other => bail!("in={other} is not an input; use http, text, batch:FILE.jsonl or dyn://namespace.component.endpoint"),
        })
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Http => f.write_str("http"),
            Input::Text => f.write_str("text"),
            Input::Batch(p) => write!(f, "batch:{}", p.display()),
            Input::Endpoint(ep) => write!(f, "dyn://{ep}"),
        }
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Output::Echo => "echo",
            Output::Mocker => "mocker",
            Output::Native => "native",
            Output::OpenAi => "openai",
            Output::Dyn => "dyn",
        })
    }
}

impl std::str::FromStr for Output {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "echo" => Ok(Output::Echo),
            "mocker" => Ok(Output::Mocker),
            "native" => Ok(Output::Native),
            "openai" => Ok(Output::OpenAi),
            "dyn" => Ok(Output::Dyn),
            other => bail!(
                "out={other} is not an engine; use echo, mocker, native, openai (an engine server), or dyn for workers on the bus"
            ),
        }
    }
}

/// Everything `in=/out=` runs need, resolved from flags or a graph (`settings.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchSettings {
    pub input: Input,
    pub output: Output,
    pub namespace: String,
    pub model_path: Option<PathBuf>,
    pub model_name: Option<String>,
    pub http_addr: SocketAddr,
    pub router_mode: RouterMode,
    pub kv_router: KvRouterSettings,
    pub remote_router: bool,
    pub num_workers: usize,
    pub worker_kind: WorkerKind,
    pub echo_delay: Duration,
    pub mocker: MockerSettings,
    /// out=openai: the engine server.
    pub external: OpenAiSettings,
    /// Fault injection: drop the bus connection this long after the worker is ready.
    pub drop_bus_after: Option<Duration>,
    /// KV transfers of prefill and decode workers.
    pub disagg: dynamo_actors::worker::DisaggSettings,
    /// out=native (model_path is filled in from `model_path`).
    pub native: NativeSettings,
    pub max_inflight: usize,
    pub max_body_bytes: usize,
    pub migration_limit: u32,
    /// How frontends read tool calls and reasoning out of model output.
    pub parsers: dynamo_preprocessor::tools::OutputParsers,
    /// Frontends' API keys.
    pub auth: dynamo_actors::frontend::auth::AuthSettings,
    /// Frontends' HTTPS certificate chain and key (PEM files).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub batch_concurrency: usize,
}

/// `dynamo-run profile`'s engine: the one a worker of `s` would run (its vocabulary, the
/// model's name, block size and KV blocks with it).
pub async fn profile_engine(
    s: &LaunchSettings,
) -> Result<(Arc<dyn Engine>, Range<TokenId>, String, u32, u64)> {
    let (_, name, pre) = model(s)?;
    let model = EngineModel::of(&pre);
    let (engine, block_size, blocks) = engine(s, &model, 0).await?;
    Ok((engine, model.vocab, name, block_size, blocks))
}

/// The model folder, name and preprocessor for engines hosted here.
fn model(s: &LaunchSettings) -> Result<(ModelFolder, String, Preprocessor)> {
    let path = s.model_path.as_deref().ok_or_else(|| {
        anyhow!("--model-path DIR is required to host an engine (`dynamo-run make-model --out DIR` writes a small model)")
    })?;
    eprintln!("loading model folder {}", path.display());
    let folder = ModelFolder::load(path)?;
    let name = s
        .model_name
        .clone()
        .unwrap_or_else(|| folder.default_name());
    // Build the preprocessor here so a broken folder fails now, not in the frontend.
    let pre = Preprocessor::new(&name, folder.files())
        .with_context(|| format!("model folder {}", path.display()))?;
    Ok((folder, name, pre))
}

/// The engine of worker number `index`, and its KV cache (block size, blocks) for the card;
/// What an engine needs of its model besides the settings.
#[derive(Clone)]
struct EngineModel {
    /// The model's ordinary tokens (the mocker samples from them).
    vocab: Range<TokenId>,
    eos: Vec<TokenId>,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl EngineModel {
    fn of(pre: &Preprocessor) -> Self {
        Self {
            vocab: pre.ordinary_tokens(),
            eos: pre.eos_ids().to_vec(),
            tokenizer: pre.tokenizer().clone(),
        }
    }
}

/// A generic engine server's text, through the model's tokenizer.
struct TokenizerCodec(Arc<tokenizers::Tokenizer>);

impl dynamo_engine::openai::TextCodec for TokenizerCodec {
    fn decode(&self, ids: &[TokenId]) -> String {
        self.0.decode(ids, false).unwrap_or_default()
    }

    fn encode(&self, text: &str) -> Vec<TokenId> {
        self.0
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

async fn engine(
    s: &LaunchSettings,
    model: &EngineModel,
    index: usize,
) -> Result<(Arc<dyn Engine>, u32, u64)> {
    Ok(match s.output {
        Output::OpenAi => {
            let mut o = s.external.clone();
            o.eos_token_ids = model.eos.clone();
            if o.kind == ServerKind::Generic {
                o.codec = Some(Arc::new(TokenizerCodec(model.tokenizer.clone())));
            }
            eprintln!("connecting to the {} server at {}", o.kind, o.url);
            let bs = o.block_size as u32;
            let e = OpenAiEngine::connect(o)
                .await
                .map_err(|e| anyhow!("out=openai: {e}"))?;
            let blocks = e.total_blocks().await;
            eprintln!(
                "engine server ready: model {:?}, {} KV blocks of {bs} tokens",
                e.model().unwrap_or("(the server's)"),
                blocks
            );
            (Arc::new(e), bs, blocks)
        }
        Output::Mocker => {
            let mut m = s.mocker.clone();
            m.vocab = model.vocab.clone();
            m.seed = index as u64;
            let (bs, blocks) = (m.block_size as u32, m.num_gpu_blocks as u64);
            let e = MockerEngine::start(m).map_err(|e| anyhow!("mocker settings: {e}"))?;
            (Arc::new(e), bs, blocks)
        }
        Output::Native => {
            let mut n = s.native.clone();
            n.model_path = s.model_path.clone().unwrap_or_default();
            n.seed = index as u64;
            let started = Instant::now();
            let e = tokio::task::spawn_blocking(move || {
                NativeEngine::start(n, &mut |done, total| {
                    progress("loading weights: layer", done, total)
                })
            })
            .await
            .map_err(|e| anyhow!("model loading failed: {e}"))?
            .map_err(|e| anyhow!("out=native: {e}"))?;
            let c = e.model().config();
            eprintln!(
                "native engine: {:?} with {} layers, {:.0}M parameters, {:.0} MiB of weights, {} KV blocks of {} tokens ({:.0} MiB), loaded in {:.1}s",
                c.arch,
                c.num_layers,
                c.parameters() as f64 / 1e6,
                e.model().weight_bytes() as f64 / (1 << 20) as f64,
                e.num_blocks(),
                s.native.block_size,
                (e.num_blocks() * e.kv_layout().block_bytes()) as f64 / (1 << 20) as f64,
                started.elapsed().as_secs_f64()
            );
            let (bs, blocks) = (s.native.block_size as u32, e.num_blocks() as u64);
            (Arc::new(e), bs, blocks)
        }
        _ => (
            Arc::new(EchoEngine::new(EchoSettings {
                delay_per_token: s.echo_delay,
            })),
            s.mocker.block_size as u32,
            0,
        ),
    })
}

/// Prints `what done/total` on one line that updates in a terminal, or once at the end (one
/// line, no carriage returns) when stderr is a file or a pipe.
pub(crate) fn progress(what: &str, done: usize, total: usize) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r{what} {done}/{total}");
        if done == total {
            eprintln!();
        }
    } else if done == total {
        eprintln!("{what} {done}/{total}");
    }
}

/// Worker `index` of several sharing one disk KV directory (`shared`) gets its own
/// subdirectory `worker-{index}` (a tier's directory is locked by its worker; the same index
/// finds it again after a restart).
pub(crate) fn own_disk_dir(s: &LaunchSettings, index: usize, shared: bool) -> LaunchSettings {
    let mut s = s.clone();
    if shared {
        let sub = format!("worker-{index}");
        for dir in [&mut s.mocker.disk_kv_dir, &mut s.native.disk_kv_dir] {
            if let Some(d) = dir.as_mut() {
                d.push(&sub);
            }
        }
    }
    s
}

/// Starts `n` worker roles `{name}-{i}` on `endpoint` under `sup`, each its own instance.
/// Each restarts its engine with the same settings should the engine fail. Returns their
/// instances and the model's name.
pub(crate) async fn start_workers(
    sup: &SupervisorHandle,
    s: &LaunchSettings,
    endpoint: &EndpointId,
    n: usize,
    name: &str,
) -> Result<(Vec<InstanceId>, String)> {
    let m = WorkerModel::load(s)?;
    let mut instances = Vec::new();
    for index in 0..n {
        let role = if n == 1 {
            name.to_string()
        } else {
            format!("{name}-{index}")
        };
        instances.push(start_worker(sup, s, endpoint, &m, index, n > 1, &role).await?);
    }
    Ok((instances, m.name))
}

/// A worker's model folder, served name and preprocessor, loaded once for its replicas.
pub(crate) struct WorkerModel {
    folder: ModelFolder,
    pub name: String,
    pre: Preprocessor,
}

impl WorkerModel {
    pub(crate) fn load(s: &LaunchSettings) -> Result<Self> {
        let (folder, name, pre) = model(s)?;
        Ok(Self { folder, name, pre })
    }
}

/// Starts worker replica `index` as role `role` (`own_dir`: its own disk-tier folder).
pub(crate) async fn start_worker(
    sup: &SupervisorHandle,
    s: &LaunchSettings,
    endpoint: &EndpointId,
    m: &WorkerModel,
    index: usize,
    own_dir: bool,
    role: &str,
) -> Result<InstanceId> {
    let own = own_disk_dir(s, index, own_dir);
    let s = &own;
    let shared = Arc::new(own.clone());
    let model = EngineModel::of(&m.pre);
    // The first engine sizes the card (a native engine's blocks depend on its layout).
    let (first, block_size, blocks) = engine(s, &model, index).await?;
    let card = m.folder.files().card(&m.name, block_size, blocks)?;
    let mut ws = WorkerSettings::new(card, m.folder.files().clone());
    ws.endpoint = endpoint.endpoint.clone();
    ws.kind = s.worker_kind;
    ws.disagg = s.disagg.clone();
    let s = shared.clone();
    let factory: EngineFactory = Arc::new(move || {
        let (s, model) = (s.clone(), model.clone());
        Box::pin(async move {
            engine(&s, &model, index)
                .await
                .map(|(e, _, _)| e)
                .map_err(|e| format!("{e:#}"))
        })
    });
    let spec = WorkerSpec::new(endpoint.component.clone(), ws, factory).with_first_engine(first);
    match sup
        .start_role(role, RoleSpec::Worker(Box::new(spec)))
        .await?
    {
        Started::Worker { instance } => Ok(instance),
        _ => unreachable!("a worker spec starts a worker"),
    }
}

pub(crate) async fn wait_for_stop(runtime: &Runtime) -> &'static str {
    let stop = runtime.shutdown_token();
    tokio::select! {
        s = dynamo_runtime::shutdown_signal() => s,
        _ = stop.cancelled() => "runtime shutdown",
    }
}

/// `dynamo-run router`: the KV router as its own component until SIGTERM.
pub async fn run_router(
    runtime: &Runtime,
    namespace: &str,
    settings: KvRouterSettings,
) -> Result<()> {
    let namespace =
        Namespace::new(namespace).with_context(|| format!("--namespace {namespace:?}"))?;
    let sup = SupervisorHandle::start(runtime).await?;
    let spec = RoleSpec::Router {
        namespace: namespace.clone(),
        settings: Box::new(settings),
    };
    let instance = match sup.start_role("router", spec).await? {
        Started::Router { instance } => instance,
        _ => unreachable!("a router spec starts a router"),
    };
    dynamo_runtime::telemetry::mark_ready();
    println!("ready endpoint={namespace}.router.route instance={instance}");
    std::io::stdout().flush()?;
    let signal = wait_for_stop(runtime).await;
    eprintln!("{signal}: stopping the router");
    sup.shutdown(runtime.settings().shutdown_grace).await;
    Ok(())
}

/// `dynamo-run planner`: a planner until SIGTERM.
pub async fn run_planner(
    runtime: &Runtime,
    settings: dynamo_actors::planner::PlannerSettings,
) -> Result<()> {
    let sup = SupervisorHandle::start(runtime).await?;
    let pool = settings.pool.clone();
    sup.start_role("planner", RoleSpec::Planner(Box::new(settings)))
        .await?;
    dynamo_runtime::telemetry::mark_ready();
    println!("ready: planner of pool {pool}");
    std::io::stdout().flush()?;
    let signal = wait_for_stop(runtime).await;
    eprintln!("{signal}: stopping the planner");
    sup.shutdown(runtime.settings().shutdown_grace).await;
    Ok(())
}

impl LaunchSettings {
    /// `https` with a TLS certificate, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// The frontend's settings from the command line (no HTTP address).
pub(crate) fn frontend_settings(s: &LaunchSettings, namespace: &Namespace) -> FrontendSettings {
    let mut fs = FrontendSettings::new(namespace.clone());
    fs.router_mode = s.router_mode;
    fs.kv_router = s.kv_router.clone();
    fs.remote_router = s.remote_router;
    fs.max_inflight = s.max_inflight;
    fs.max_body_bytes = s.max_body_bytes;
    fs.migration_limit = s.migration_limit;
    fs.parsers = s.parsers;
    fs.auth = s.auth.clone();
    fs.tls = s.tls.clone();
    fs
}

pub async fn run(runtime: &Runtime, s: LaunchSettings) -> Result<()> {
    let namespace =
        Namespace::new(&s.namespace).with_context(|| format!("--namespace {:?}", s.namespace))?;
    let grace = runtime.settings().shutdown_grace;
    let sup = SupervisorHandle::start(runtime).await?;
    if let Input::Endpoint(ep) = &s.input {
        if s.output == Output::Dyn {
            bail!("in=dyn://... makes this process a worker: give it an engine (out=echo, mocker, native, or openai for an engine server)");
        }
        let n = s.num_workers.max(1);
        let role = ep.component.component.to_string();
        let started = start_workers(&sup, &s, ep, n, &role).await;
        let (instances, name) = match started {
            Ok(w) => w,
            Err(e) => {
                sup.shutdown(grace).await;
                return Err(e);
            }
        };
        dynamo_runtime::telemetry::mark_ready();
        println!("ready endpoint={ep} model={name} instance={}", instances[0]);
        std::io::stdout().flush()?;
        if let Some(after) = s.drop_bus_after {
            let bus = runtime.bus().clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                match bus.sever().await {
                    Ok(()) => eprintln!("fault injection: dropped the bus connection"),
                    Err(e) => eprintln!("fault injection: cannot drop the bus connection: {e}"),
                }
            });
        }
        let signal = wait_for_stop(runtime).await;
        eprintln!("{signal}: draining open requests (up to {grace:?})");
        sup.shutdown(grace).await;
        return Ok(());
    }
    let result = serve_frontend(runtime, &sup, &s, &namespace).await;
    // Reverse start order: the frontend stops taking requests, then the workers drain.
    sup.shutdown(grace).await;
    result
}

/// Starts the in-process workers (if any) and the frontend, then serves until stopped.
async fn serve_frontend(
    runtime: &Runtime,
    sup: &SupervisorHandle,
    s: &LaunchSettings,
    namespace: &Namespace,
) -> Result<()> {
    let workers = match s.output {
        Output::Echo | Output::Mocker | Output::Native | Output::OpenAi => {
            let ep = ComponentId::new(namespace.as_str(), "backend")?.endpoint("generate")?;
            let n = s.num_workers.max(1);
            let (_, name) = start_workers(sup, s, &ep, n, "backend").await?;
            Some((name, n))
        }
        Output::Dyn => None,
    };
    let mut fs = frontend_settings(s, namespace);
    if s.input == Input::Http {
        fs.http_addr = Some(s.http_addr);
    }
    let (addr, serving) = match sup
        .start_role("frontend", RoleSpec::Frontend(Box::new(fs)))
        .await?
    {
        Started::Frontend { addr, serving } => (addr, serving),
        _ => unreachable!("a frontend spec starts a frontend"),
    };
    let table = serving.table().clone();
    let model = match &workers {
        Some((name, n)) => {
            wait_model(&table, Some(name), *n).await?;
            Some(name.clone())
        }
        None => {
            // A named model: "ready" once it can be served (workers may also come later).
            if let (Some(name), Input::Http) = (&s.model_name, &s.input) {
                if let Err(e) = wait_model(&table, Some(name), 1).await {
                    eprintln!("warning: {e}");
                }
            }
            s.model_name.clone()
        }
    };
    match &s.input {
        Input::Http => {
            let addr = addr.expect("http input binds");
            let scheme = s.scheme();
            dynamo_runtime::telemetry::mark_ready();
            match &model {
                Some(m) => println!(
                    "ready: model {m} at {scheme}://{addr}/v1 (on the {} bus)",
                    runtime.bus().transport()
                ),
                None => println!("ready: {scheme}://{addr}/v1, models from workers on the bus"),
            }
            std::io::stdout().flush()?;
            let signal = wait_for_stop(runtime).await;
            eprintln!("{signal}: shutting down");
            Ok(())
        }
        Input::Text => {
            let m = wait_model(&table, model.as_deref(), 1).await?;
            chat_loop(&serving, &m).await
        }
        Input::Batch(path) => {
            let m = wait_model(&table, model.as_deref(), 1).await?;
            batch(&serving, &m, path, s.batch_concurrency).await
        }
        Input::Endpoint(_) => unreachable!("handled by run"),
    }
}

/// Waits until `name` (or, without a name, any model) is served by `instances` instances.
pub(crate) async fn wait_model(
    table: &ModelTable,
    name: Option<&str>,
    instances: usize,
) -> Result<String> {
    const WAIT: Duration = Duration::from_secs(30);
    let found = tokio::time::timeout(WAIT, async {
        match name {
            Some(n) => {
                table.wait_for(n, instances).await;
                n.to_string()
            }
            None => {
                let mut rx = table.changes();
                loop {
                    if let Some(m) = table.list().first() {
                        return m.card.name.clone();
                    }
                    let _ = rx.changed().await;
                }
            }
        }
    })
    .await;
    found.map_err(|_| match name {
        Some(n) => anyhow!("model {n} did not appear within {WAIT:?}; are its workers running on this bus and namespace?"),
        None => anyhow!("no model appeared within {WAIT:?}; start a worker (dynamo-run in=dyn://NAMESPACE.backend.generate out=echo --model-path DIR --bus ...)"),
    })
}

/// Streams one chat request's answer through `on_text`; returns (finish reason, usage json, ttft).
async fn run_one(
    serving: &Arc<Serving>,
    endpoint: Endpoint,
    body: &Value,
    mut on_text: impl FnMut(&str),
) -> Result<(Option<&'static str>, Value, Option<Duration>), dynamo_actors::frontend::ApiError> {
    let started = Instant::now();
    let mut gen = serving.start(endpoint, body).await?;
    let mut finish = None;
    let mut ttft = None;
    while let Some(piece) = gen.next().await {
        let piece = piece?;
        if !piece.text.is_empty() {
            ttft.get_or_insert_with(|| started.elapsed());
            on_text(&piece.text);
        }
        if let Some(f) = piece.finish {
            finish = Some(f.as_str());
        }
    }
    Ok((
        finish,
        serde_json::to_value(gen.usage()).unwrap_or_default(),
        ttft,
    ))
}

async fn chat_loop(serving: &Arc<Serving>, model: &str) -> Result<()> {
    eprintln!("chatting with {model}; an empty line or end of input quits");
    let mut messages: Vec<Value> = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    loop {
        eprint!("> ");
        let Some(line) = rx.recv().await else { break };
        if line.trim().is_empty() {
            break;
        }
        messages.push(json!({"role": "user", "content": line}));
        let body = json!({"model": model, "messages": messages});
        let mut answer = String::new();
        let result = run_one(serving, Endpoint::Chat, &body, |t| {
            answer.push_str(t);
            print!("{t}");
            let _ = std::io::stdout().flush();
        })
        .await;
        println!();
        match result {
            Ok(_) => messages.push(json!({"role": "assistant", "content": answer})),
            Err(e) => {
                eprintln!("error ({}): {}", e.status, e.message);
                messages.pop();
            }
        }
    }
    Ok(())
}

/// One batch line: `{"text": ...}` (a user message), `{"messages": [...]}` or
/// `{"prompt": ...}`, with optional request parameters beside it.
fn batch_request(model: &str, line: &str) -> Result<(Endpoint, Value), String> {
    let mut v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object_mut().ok_or("not a JSON object")?;
    obj.insert("model".into(), json!(model));
    obj.remove("stream");
    if let Some(text) = obj.remove("text") {
        obj.insert(
            "messages".into(),
            json!([{"role": "user", "content": text}]),
        );
    }
    let endpoint = if obj.contains_key("messages") {
        Endpoint::Chat
    } else if obj.contains_key("prompt") {
        Endpoint::Completions
    } else {
        return Err("needs \"text\", \"messages\" or \"prompt\"".into());
    };
    Ok((endpoint, v))
}

async fn batch(serving: &Arc<Serving>, model: &str, path: &Path, concurrency: usize) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    eprintln!(
        "batch: {} requests from {} to {model}",
        lines.len(),
        path.display()
    );
    let started = Instant::now();
    let total = lines.len();
    let mut results = futures::stream::iter(lines)
        .map(|(i, line)| async move {
            let t0 = Instant::now();
            let out = match batch_request(model, line) {
                Err(e) => json!({"line": i + 1, "error": e}),
                Ok((endpoint, body)) => {
                    let mut response = String::new();
                    match run_one(serving, endpoint, &body, |t| response.push_str(t)).await {
                        Ok((finish, usage, ttft)) => json!({
                            "line": i + 1,
                            "response": response,
                            "finish_reason": finish,
                            "usage": usage,
                            "ttft_ms": ttft.map(|d| d.as_secs_f64() * 1e3),
                            "duration_ms": t0.elapsed().as_secs_f64() * 1e3,
                        }),
                        Err(e) => json!({"line": i + 1, "error": e.message, "status": e.status}),
                    }
                }
            };
            out
        })
        .buffered(concurrency.max(1));
    let (mut done, mut failed, mut tokens) = (0usize, 0usize, 0u64);
    let mut stdout = std::io::stdout().lock();
    while let Some(out) = results.next().await {
        done += 1;
        if out.get("error").is_some() {
            failed += 1;
        }
        tokens += out["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        writeln!(stdout, "{out}")?;
        if done % 100 == 0 {
            eprintln!("batch: {done}/{total} done");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "batch: {done} requests ({failed} failed) in {secs:.2}s; {tokens} completion tokens, {:.1} tokens/s",
        tokens as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        bail!("{failed} of {done} batch requests failed (see the \"error\" fields)");
    }
    Ok(())
}
