//! The worker role: hosts an [`Engine`] on the `generate` endpoint (a prefill worker's is
//! `prefill`) and publishes its model card; the actor supervises the engine.
//!
//! - `generate` takes a [`PreprocessedRequest`] and streams [`EngineOutput`]s; the last one
//!   carries the finish reason and ends the stream in the same message. Each request runs in
//!   its own task (`requests`); the engine sees the request's cancellation token, so a client
//!   that goes away stops generation within one engine step. A stream that ends without a
//!   finish reason is an engine that died: the request fails with `worker_failed`.
//! - Kinds ([`WorkerKind`]): aggregated; prefill (the first token only); decode (also takes
//!   requests prefilled elsewhere). The kind is in the discovery metadata.
//! - `model_files` serves the files named in the card, by content hash, in chunks under the
//!   bus payload limit, so a frontend can build the same preprocessor without the folder.
//! - The card is the `model` key of the generate endpoint's discovery metadata: a frontend
//!   lists the model while at least one worker serving it is registered.
//! - An engine with a KV cache (mocker, native) also gets: its KV event batches published on
//!   `dyn.ev.{ns}.{component}.kv_events.{instance}` as they happen; its load on
//!   `...load.{instance}`, on change (at most every [`LOAD_MIN_INTERVAL`]) and at least every
//!   [`LOAD_MAX_INTERVAL`] (also as `dynamo_worker_*` gauges per instance); and a `kv_dump`
//!   endpoint that streams its cached set (pieces of at most [`DUMP_PIECE`] blocks) for
//!   routers that must resync.
//! - Supervision: see [`WorkerHandle`]. An engine that fails is replaced from the settings'
//!   factory with backoff; after [`WorkerSettings::max_failed_starts`] failed starts in a row
//!   the worker fails itself and its supervisor restarts the role.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_engine::{Engine, EngineState};
use dynamo_preprocessor::ModelFiles;
use dynamo_protocols::kv::{KvDump, KvDumpRequest, KV_DUMP_ENDPOINT};
use dynamo_protocols::llm::{
    EngineOutput, FileChunk, FileRequest, KvFetchReply, KvFetchRequest, ModelCard, PrefillRequest,
    PreprocessedRequest, WorkerKind,
};
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::serve::{DrainReport, EndpointProbe, ServeError};
use dynamo_runtime::subject::EndpointName;
use dynamo_runtime::InstanceId;
use dynamo_runtime::{ComponentInstance, Request, ServedEndpoint};
use futures::future::BoxFuture;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

/// The usual name of the endpoint that generates tokens.
pub const GENERATE: &str = "generate";

/// Size of one model-file chunk on the bus (well under the 1 MiB NATS default).
pub(crate) const FILE_CHUNK: usize = 256 * 1024;
pub use dynamo_protocols::kv::{LOAD_MAX_INTERVAL, LOAD_MIN_INTERVAL};
/// Blocks per `kv_dump` piece (about 30 bytes each: well under the bus payload limit).
pub const DUMP_PIECE: usize = 8192;

mod disagg;
mod requests;
mod share;

use disagg::Disagg;
pub use disagg::{DisaggSettings, PrefillFallback};

use requests::{card_metadata, generate, send_dump, send_file, spawn_kv_publishers};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot spawn the worker actor: {0}")]
    Spawn(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The worker actor stopped before it answered (it failed, or is shutting down).
    #[error("the worker has stopped")]
    Stopped,
}

/// Builds a fresh engine for a worker whose engine failed (the same settings as the first).
pub type EngineFactory =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Engine>, String>> + Send + Sync>;

/// What a worker does and how it supervises its engine.
#[derive(Clone)]
pub struct WorkerSettings {
    /// Aggregated (the default), prefill or decode: see [`WorkerKind`].
    pub kind: WorkerKind,
    /// The endpoint that generates (usually [`GENERATE`]; a prefill worker's is `prefill`).
    pub endpoint: EndpointName,
    pub card: ModelCard,
    pub files: ModelFiles,
    /// Restarts a failed engine; without one, an engine failure stops the worker (escalated
    /// to its supervisor).
    pub factory: Option<EngineFactory>,
    /// Delay before the first restart of a failed engine; it doubles with each failure that
    /// follows within [`STABLE_AFTER`] of a restart, up to `restart_max`.
    pub restart_initial: Duration,
    pub restart_max: Duration,
    /// Engine starts that may fail in a row before the worker gives up and fails itself
    /// (escalating to its supervisor, which restarts the whole role).
    pub max_failed_starts: u32,
    /// KV transfers of a prefill or decode worker.
    pub disagg: DisaggSettings,
}

impl WorkerSettings {
    pub fn new(card: ModelCard, files: ModelFiles) -> Self {
        Self {
            kind: WorkerKind::Aggregated,
            endpoint: EndpointName::new(GENERATE).expect("the generate endpoint name is valid"),
            card,
            files,
            factory: None,
            restart_initial: Duration::from_millis(200),
            restart_max: Duration::from_secs(10),
            max_failed_starts: 5,
            disagg: DisaggSettings::default(),
        }
    }
}

/// An engine that ran this long before failing restarts after the initial delay again.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Where a worker stands, as its handle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    /// Registered, its engine running.
    Serving,
    /// Its engine failed: deregistered while a new engine starts.
    Restarting,
    /// Drained or failed for good.
    Stopped,
}

/// The worker actor's messages (private: callers use [`WorkerHandle`]; the runtime's hosting
/// casts requests through the `From` impls).
enum Msg {
    Generate(Request<PreprocessedRequest, EngineOutput>),
    Prefill(Request<PrefillRequest, EngineOutput>),
    Fetch(Request<KvFetchRequest, KvFetchReply>),
    File(Request<FileRequest, FileChunk>),
    Dump(Request<KvDumpRequest, KvDump>),
    /// Serve with this engine (the first, or a restarted one of `epoch`).
    Up {
        epoch: u64,
        engine: Result<Arc<dyn Engine>, String>,
        reply: Option<oneshot::Sender<Result<(), ServeError>>>,
    },
    /// The engine of `epoch` failed.
    EngineFailed {
        epoch: u64,
        reason: String,
    },
    Drain {
        grace: Duration,
        reply: oneshot::Sender<DrainReport>,
    },
}

impl From<Request<KvDumpRequest, KvDump>> for Msg {
    fn from(r: Request<KvDumpRequest, KvDump>) -> Self {
        Msg::Dump(r)
    }
}

impl From<Request<PreprocessedRequest, EngineOutput>> for Msg {
    fn from(r: Request<PreprocessedRequest, EngineOutput>) -> Self {
        Msg::Generate(r)
    }
}

impl From<Request<PrefillRequest, EngineOutput>> for Msg {
    fn from(r: Request<PrefillRequest, EngineOutput>) -> Self {
        Msg::Prefill(r)
    }
}

impl From<Request<KvFetchRequest, KvFetchReply>> for Msg {
    fn from(r: Request<KvFetchRequest, KvFetchReply>) -> Self {
        Msg::Fetch(r)
    }
}

impl From<Request<FileRequest, FileChunk>> for Msg {
    fn from(r: Request<FileRequest, FileChunk>) -> Self {
        Msg::File(r)
    }
}

/// The worker actor: immutable settings here, the engine and its endpoints in [`State`].
struct WorkerActor {
    instance: ComponentInstance,
    kind: WorkerKind,
    endpoint: EndpointName,
    card: ModelCard,
    files: Arc<ModelFiles>,
    factory: Option<EngineFactory>,
    restart_initial: Duration,
    restart_max: Duration,
    max_failed_starts: u32,
    restarts_total: metrics::Counter,
    /// A prefill or decode worker's transfer agent (outlives engine restarts).
    disagg: Option<Arc<Disagg>>,
}

/// One engine's life in the worker.
struct Running {
    engine: Arc<dyn Engine>,
    generate: ServedEndpoint,
    dump: Option<ServedEndpoint>,
    /// `kv_fetch`, when the worker shares its KV with peers.
    fetch: Option<ServedEndpoint>,
    /// KV event and load publishers and the health watch: none of them holds a request.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: tokio::time::Instant,
}

struct State {
    files: Option<ServedEndpoint>,
    running: Option<Running>,
    epoch: u64,
    /// Failures in a row (each within STABLE_AFTER of its start): sets the backoff.
    failures: u32,
    /// Engine starts that failed since the last one that worked.
    failed_starts: u32,
    draining: bool,
    status: watch::Sender<WorkerStatus>,
    restarts_seen: watch::Sender<u64>,
    /// The generate endpoint of the running engine, for the handle's `open_requests`.
    probe: Arc<Mutex<Option<EndpointProbe>>>,
}

impl WorkerActor {
    /// Serves `engine`: the dump endpoint, the generate endpoint (registers the card) and the
    /// KV publishers, and watches the engine's health.
    async fn up(
        &self,
        myself: &ActorRef<Msg>,
        epoch: u64,
        engine: Arc<dyn Engine>,
    ) -> Result<Running, ServeError> {
        let kv = engine.kv();
        let dump = match &kv {
            Some(_) => Some(
                self.instance
                    .serve::<KvDumpRequest, KvDump, _>(
                        name(KV_DUMP_ENDPOINT),
                        myself.clone(),
                        serde_json::json!({ "role": "kv_dump" }),
                    )
                    .await?,
            ),
            None => None,
        };
        let metadata = card_metadata(&self.card, self.kind, self.disagg.as_deref());
        let served = match self.kind {
            // A prefill worker's endpoint takes prefill requests (prompt, blocks to skip,
            // where to write the KV).
            WorkerKind::Prefill => {
                self.instance
                    .serve::<PrefillRequest, EngineOutput, _>(
                        self.endpoint.clone(),
                        myself.clone(),
                        metadata,
                    )
                    .await
            }
            _ => {
                self.instance
                    .serve::<PreprocessedRequest, EngineOutput, _>(
                        self.endpoint.clone(),
                        myself.clone(),
                        metadata,
                    )
                    .await
            }
        };
        let generate = match served {
            Ok(g) => g,
            Err(e) => {
                if let Some(d) = dump {
                    d.shutdown(Duration::ZERO).await;
                }
                return Err(e);
            }
        };
        let fetch = match (&self.disagg, &kv) {
            (Some(d), Some(_)) if d.shares() => match self
                .instance
                .serve::<KvFetchRequest, KvFetchReply, _>(
                    name(WorkerKind::KV_FETCH_ENDPOINT),
                    myself.clone(),
                    serde_json::json!({ "role": "kv_fetch" }),
                )
                .await
            {
                Ok(f) => Some(f),
                Err(e) => {
                    generate.shutdown(Duration::ZERO).await;
                    if let Some(d) = dump {
                        d.shutdown(Duration::ZERO).await;
                    }
                    return Err(e);
                }
            },
            _ => None,
        };
        let mut tasks = kv
            .as_ref()
            .map(|kv| spawn_kv_publishers(&self.instance, kv))
            .unwrap_or_default();
        if let Some(mut health) = engine.health() {
            let me = myself.clone();
            tasks.push(tokio::spawn(async move {
                let reason = loop {
                    if let EngineState::Failed(why) = &*health.borrow_and_update() {
                        break why.clone();
                    }
                    if health.changed().await.is_err() {
                        break "the engine dropped its health watch".to_string();
                    }
                };
                let _ = me.cast(Msg::EngineFailed { epoch, reason });
            }));
        }
        Ok(Running {
            engine,
            generate,
            dump,
            fetch,
            tasks,
            started: tokio::time::Instant::now(),
        })
    }

    /// Deregisters and stops the engine's endpoints and publishers; open requests get up to
    /// `grace` to finish.
    async fn down(running: Running, grace: Duration) -> DrainReport {
        let report = running.generate.shutdown(grace).await;
        if let Some(d) = running.dump {
            d.shutdown(Duration::from_millis(200)).await;
        }
        if let Some(f) = running.fetch {
            f.shutdown(Duration::from_millis(200)).await;
        }
        for t in running.tasks {
            t.abort();
        }
        report
    }

    fn schedule_restart(&self, myself: &ActorRef<Msg>, epoch: u64, delay: Duration) {
        let Some(factory) = self.factory.clone() else {
            return;
        };
        let me = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let engine = factory().await;
            // A worker that stopped meanwhile drops the engine.
            let _ = me.cast(Msg::Up {
                epoch,
                engine,
                reply: None,
            });
        });
    }

    fn backoff(&self, failures: u32) -> Duration {
        crate::backoff(self.restart_initial, self.restart_max, failures)
    }
}

/// Refuses a request this worker cannot serve now (`Unavailable`: the caller tries another).
fn unavailable<T: serde::Serialize + Send + 'static>(
    reply: dynamo_runtime::serve::ReplySender<T>,
    why: &'static str,
) {
    tokio::spawn(async move {
        let _ = reply.fail(RemoteErrorKind::Unavailable, why).await;
    });
}

fn name(s: &str) -> EndpointName {
    EndpointName::new(s).expect("endpoint names are valid constants")
}

impl Actor for WorkerActor {
    type Msg = Msg;
    type State = State;
    type Arguments = (
        watch::Sender<WorkerStatus>,
        watch::Sender<u64>,
        Arc<Mutex<Option<EndpointProbe>>>,
    );

    async fn pre_start(
        &self,
        myself: ActorRef<Msg>,
        (status, restarts_seen, probe): Self::Arguments,
    ) -> Result<State, ActorProcessingErr> {
        // Files first: a frontend that sees the card can fetch them.
        let files = self
            .instance
            .serve::<FileRequest, FileChunk, _>(
                name(ModelCard::FILES_ENDPOINT),
                myself,
                serde_json::json!({ "role": "model_files" }),
            )
            .await?;
        Ok(State {
            files: Some(files),
            running: None,
            epoch: 0,
            failures: 0,
            failed_starts: 0,
            draining: false,
            status,
            restarts_seen,
            probe,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Generate(req) => match &state.running {
                Some(r) => {
                    let span = req.ctx.span().clone();
                    let disagg = self.disagg.clone();
                    tokio::spawn(
                        generate(r.engine.clone(), self.kind, disagg, req).instrument(span),
                    );
                }
                // Arrived while the engine restarts: another worker can take it.
                None => unavailable(req.reply, "this worker's engine is restarting"),
            },
            Msg::Prefill(req) => {
                let span = req.ctx.span().clone();
                match (&state.running, &self.disagg) {
                    (Some(r), Some(d)) => {
                        tokio::spawn(d.clone().prefill(r.engine.clone(), req).instrument(span));
                    }
                    (running, _) => {
                        let why = match running {
                            Some(_) => "this worker does not prefill for others",
                            None => "this worker's engine is restarting",
                        };
                        unavailable(req.reply, why);
                    }
                }
            }
            Msg::Fetch(req) => {
                let span = req.ctx.span().clone();
                match (&state.running, &self.disagg) {
                    (Some(r), Some(d)) => {
                        tokio::spawn(
                            d.clone()
                                .serve_fetch(r.engine.clone(), req)
                                .instrument(span),
                        );
                    }
                    _ => unavailable(req.reply, "this worker's engine is restarting"),
                }
            }
            Msg::File(req) => {
                tokio::spawn(send_file(self.files.clone(), req));
            }
            Msg::Dump(req) => {
                let kv = state.running.as_ref().and_then(|r| r.engine.kv());
                tokio::spawn(send_dump(kv, req));
            }
            Msg::Up {
                epoch,
                engine,
                reply,
            } => {
                if state.draining || epoch != state.epoch || state.running.is_some() {
                    return Ok(());
                }
                let engine = match engine {
                    Ok(e) => e,
                    Err(why) => {
                        state.failures += 1;
                        state.failed_starts += 1;
                        if state.failed_starts >= self.max_failed_starts {
                            state.status.send_replace(WorkerStatus::Stopped);
                            return Err(format!(
                                "the engine failed to start {} times in a row (last: {why}); escalating",
                                state.failed_starts
                            )
                            .into());
                        }
                        let delay = self.backoff(state.failures);
                        tracing::error!(instance = %self.instance.id(), error = %why, retry_in = ?delay, "cannot restart the engine");
                        self.schedule_restart(&myself, epoch, delay);
                        return Ok(());
                    }
                };
                match self.up(&myself, epoch, engine).await {
                    Ok(r) => {
                        *lock(&state.probe) = Some(r.generate.probe());
                        state.running = Some(r);
                        state.failed_starts = 0;
                        if epoch > 0 {
                            tracing::info!(instance = %self.instance.id(), restarts = epoch, "engine restarted; serving again");
                        }
                        state.status.send_replace(WorkerStatus::Serving);
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Err(e) => match reply {
                        Some(reply) => {
                            let _ = reply.send(Err(e));
                        }
                        None => {
                            state.failures += 1;
                            let delay = self.backoff(state.failures);
                            tracing::error!(instance = %self.instance.id(), error = %e, retry_in = ?delay, "cannot serve the restarted engine");
                            self.schedule_restart(&myself, epoch, delay);
                        }
                    },
                }
            }
            Msg::EngineFailed { epoch, reason } => {
                if state.draining || epoch != state.epoch {
                    return Ok(());
                }
                let Some(running) = state.running.take() else {
                    return Ok(());
                };
                tracing::error!(instance = %self.instance.id(), %reason, "engine failed: deregistering; open requests end with worker_failed");
                state.status.send_replace(WorkerStatus::Restarting);
                let stable = running.started.elapsed() >= STABLE_AFTER;
                // Deregisters at once; the open streams have already ended (their engine
                // dropped them) or end within the grace.
                Self::down(running, Duration::from_secs(1)).await;
                if self.factory.is_none() {
                    state.status.send_replace(WorkerStatus::Stopped);
                    return Err(format!(
                        "engine failed and this worker cannot restart it: {reason}"
                    )
                    .into());
                }
                state.failures = if stable { 1 } else { state.failures + 1 };
                // Each engine after the first is a restart: the epoch counts them.
                state.epoch += 1;
                self.restarts_total.increment(1);
                state.restarts_seen.send_replace(state.epoch);
                self.schedule_restart(&myself, state.epoch, self.backoff(state.failures));
            }
            Msg::Drain { grace, reply } => {
                state.draining = true;
                let report = match state.running.take() {
                    Some(r) => Self::down(r, grace).await,
                    None => DrainReport::default(),
                };
                if let Some(f) = state.files.take() {
                    f.shutdown(Duration::from_secs(1)).await;
                }
                state.status.send_replace(WorkerStatus::Stopped);
                let _ = reply.send(report);
                myself.stop(Some("drained".into()));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped without a drain (its supervisor stopped it): deregister now.
        if let Some(r) = state.running.take() {
            Self::down(r, Duration::ZERO).await;
        }
        if let Some(f) = state.files.take() {
            f.shutdown(Duration::ZERO).await;
        }
        state.status.send_replace(WorkerStatus::Stopped);
        Ok(())
    }
}

/// A running worker: the handle to its actor.
///
/// The actor owns the engine and its endpoints (`model_files` for the card's files, `kv_dump`
/// for engines with a KV cache, and the generate endpoint, which registers the card), and
/// supervises the engine: when it fails (see [`Engine::health`]) the worker deregisters at
/// once, its open requests end with a `worker_failed` error, and a new engine from the
/// settings' factory takes over with backoff, then registers again (same instance id).
/// Restarts are counted in `dynamo_worker_engine_restarts_total`.
pub struct WorkerHandle {
    actor: ActorRef<Msg>,
    instance: InstanceId,
    status: watch::Receiver<WorkerStatus>,
    restarts: watch::Receiver<u64>,
    probe: Arc<Mutex<Option<EndpointProbe>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WorkerHandle {
    /// Starts a worker serving `engine` on `instance`.
    pub async fn start(
        instance: &ComponentInstance,
        settings: WorkerSettings,
        engine: Arc<dyn Engine>,
    ) -> Result<Self, WorkerError> {
        crate::describe_metrics();
        let (status_tx, status) = watch::channel(WorkerStatus::Restarting);
        let (restarts_tx, restarts) = watch::channel(0);
        let probe = Arc::new(Mutex::new(None));
        let disagg = Disagg::start(
            settings.kind,
            settings.disagg.clone(),
            &engine,
            instance.id(),
            instance.bus().clone(),
        )
        .await
        .map_err(WorkerError::Spawn)?;
        let actor = WorkerActor {
            disagg,
            instance: instance.clone(),
            kind: settings.kind,
            endpoint: settings.endpoint,
            card: settings.card,
            files: Arc::new(settings.files),
            factory: settings.factory,
            restart_initial: settings.restart_initial,
            restart_max: settings.restart_max,
            max_failed_starts: settings.max_failed_starts,
            restarts_total: metrics::counter!(
                "dynamo_worker_engine_restarts_total",
                "instance" => instance.id().to_string()
            ),
        };
        let (actor, _join) = Actor::spawn(None, actor, (status_tx, restarts_tx, probe.clone()))
            .await
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        let up = Msg::Up {
            epoch: 0,
            engine: Ok(engine),
            reply: Some(tx),
        };
        if actor.cast(up).is_err() {
            return Err(WorkerError::Stopped);
        }
        match rx.await {
            Ok(Ok(())) => Ok(Self {
                actor,
                instance: instance.id(),
                status,
                restarts,
                probe,
            }),
            Ok(Err(e)) => {
                actor.stop(None);
                Err(e.into())
            }
            Err(_) => Err(WorkerError::Stopped),
        }
    }

    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// Requests open on the generate endpoint right now.
    pub fn open_requests(&self) -> usize {
        lock(&self.probe)
            .as_ref()
            .map_or(0, EndpointProbe::open_requests)
    }

    /// Follows the worker's status (serving, restarting its engine, stopped).
    pub fn status(&self) -> watch::Receiver<WorkerStatus> {
        self.status.clone()
    }

    /// Engine restarts so far (follow them with [`watch::Receiver::changed`]).
    pub fn restarts(&self) -> watch::Receiver<u64> {
        self.restarts.clone()
    }

    /// The actor, for a supervisor to link.
    pub(crate) fn cell(&self) -> ractor::ActorCell {
        self.actor.get_cell()
    }

    /// Stops taking requests and deregisters, lets open requests finish for up to `grace`
    /// (cancelling the rest), then stops the worker.
    pub async fn drain(self, grace: Duration) -> DrainReport {
        let (reply, rx) = oneshot::channel();
        if self.actor.cast(Msg::Drain { grace, reply }).is_err() {
            return DrainReport::default();
        }
        let report = rx.await.unwrap_or_default();
        // The actor stops itself after the drain; wait for it so nothing outlives the call.
        let mut status = self.status.clone();
        let _ = status.wait_for(|s| *s == WorkerStatus::Stopped).await;
        report
    }
}
