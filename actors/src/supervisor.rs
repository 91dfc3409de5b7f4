//! The root supervisor of a process: every role of the process (from `dynamo-run` flags or a
//! graph) runs as its child, started and stopped through a [`SupervisorHandle`], also while
//! the process runs (the planner's local connector uses this).
//!
//! ```text
//! supervisor (one per process)
//! ├── frontend  ── model watcher actor, HTTP server task, [embedded router: event ingest actor]
//! ├── router    ── route actor (`{ns}.router.route`), event ingest actor
//! ├── worker    ── worker actor ── engine (scheduler task or thread), one task per request
//! └── planner   ── planner actor (signals in, decisions out through its connector)
//! ```
//!
//! What a child failure does (a role's actors are linked to the supervisor, so a panic or an
//! error in one reaches it as a supervision event):
//!
//! | role     | failure                          | policy                                                |
//! |----------|----------------------------------|-------------------------------------------------------|
//! | worker   | its engine fails                 | the worker restarts the engine itself (backoff), see [`crate::worker`] |
//! | worker   | the worker actor fails (also: its engine failed to start 5 times in a row) | restart the role with backoff (a new instance) |
//! | router   | route or ingest actor fails      | restart the role with backoff                         |
//! | frontend | model watcher or ingest fails    | stop the process (its clients must reconnect anyway; an orchestrator restarts it) |
//! | planner  | its actor fails                  | restart the role with backoff (it asks its connector what runs, then decides again) |
//!
//! Backoff: [`RESTART_INITIAL`] doubling to [`RESTART_MAX`], reset once a role has run for
//! [`STABLE_AFTER`]. Restarts are counted in `dynamo_supervisor_role_restarts_total{kind}`.
//!
//! Health: the supervisor registers a check with the runtime's telemetry, so the process's
//! `/health` (on `--metrics-port`, and a frontend's HTTP port) answers 200 only while every
//! role is healthy: workers serving (registered, engine up), routers running, frontends
//! listing at least one model ([`SupervisorHandle::health`]).
//!
//! Commands are handled one at a time, in order (a role starts fully before the next command;
//! a stopped role drains in the background, so a start need not wait for it);
//! at most [`MAX_PENDING`] may wait, and one more is refused with [`SupervisorError::Busy`].
//! Bad input gets a typed error and changes nothing: a name already running
//! ([`SupervisorError::Duplicate`]), a stop for an unknown name, a role that cannot start
//! (whatever it had started is stopped again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_engine::Engine;
use dynamo_runtime::subject::{ComponentId, Namespace};
use dynamo_runtime::{InstanceId, Runtime};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::frontend::{Frontend, FrontendSettings, Serving};
use crate::planner::{PlannerHandle, PlannerSettings};
use crate::router::{KvRouterSettings, RouterComponent};
use crate::worker::{EngineFactory, WorkerHandle, WorkerSettings};

/// Commands that may wait in the supervisor's mailbox.
pub const MAX_PENDING: usize = 64;
/// First delay before a failed role restarts...
pub const RESTART_INITIAL: Duration = Duration::from_millis(500);
/// ...doubling up to this.
pub const RESTART_MAX: Duration = Duration::from_secs(30);
/// A role that ran this long before failing restarts after the initial delay again.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The kinds of role a supervisor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    Frontend,
    Router,
    Worker,
    Planner,
}

impl RoleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleKind::Frontend => "frontend",
            RoleKind::Router => "router",
            RoleKind::Worker => "worker",
            RoleKind::Planner => "planner",
        }
    }
}

/// A worker role: the component it joins, its settings, and how to build its engine.
#[derive(Clone)]
pub struct WorkerSpec {
    pub component: ComponentId,
    /// `factory` builds every engine of the role (the first too, unless `first` is given).
    pub settings: WorkerSettings,
    pub factory: EngineFactory,
    /// An engine already built for the first start (e.g. loaded to size the model card).
    first: Arc<Mutex<Option<Arc<dyn Engine>>>>,
}

impl WorkerSpec {
    pub fn new(component: ComponentId, settings: WorkerSettings, factory: EngineFactory) -> Self {
        Self {
            component,
            settings,
            factory,
            first: Arc::default(),
        }
    }

    /// Uses `engine` for the first start instead of calling the factory.
    pub fn with_first_engine(self, engine: Arc<dyn Engine>) -> Self {
        *self.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(engine);
        self
    }
}

/// What a role is started from (kept to restart it).
#[derive(Clone)]
pub enum RoleSpec {
    Frontend(Box<FrontendSettings>),
    Router {
        namespace: Namespace,
        settings: Box<KvRouterSettings>,
    },
    Worker(Box<WorkerSpec>),
    Planner(Box<PlannerSettings>),
}

impl RoleSpec {
    pub fn kind(&self) -> RoleKind {
        match self {
            RoleSpec::Frontend(_) => RoleKind::Frontend,
            RoleSpec::Router { .. } => RoleKind::Router,
            RoleSpec::Worker(_) => RoleKind::Worker,
            RoleSpec::Planner(_) => RoleKind::Planner,
        }
    }
}

/// What a started role offers its caller.
#[derive(Clone)]
pub enum Started {
    Frontend {
        addr: Option<SocketAddr>,
        serving: Arc<Serving>,
    },
    Router {
        instance: InstanceId,
    },
    Worker {
        instance: InstanceId,
    },
    Planner {
        /// The planner's last decision (none before its first interval ends).
        decisions: tokio::sync::watch::Receiver<Option<dynamo_protocols::planner::PlannerDecision>>,
    },
}

/// One running role, as [`SupervisorHandle::roles`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub name: String,
    pub kind: RoleKind,
    /// False while a failed role waits for its restart.
    pub running: bool,
    pub restarts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("a role named {0:?} is already running; stop it first or pick another name")]
    Duplicate(String),
    #[error("no role named {0:?} runs in this process")]
    UnknownRole(String),
    #[error("role names are non-empty, without whitespace; got {0:?}")]
    BadName(String),
    #[error("role {name} could not start: {reason}")]
    Start { name: String, reason: String },
    #[error("{MAX_PENDING} supervisor commands are waiting; retry later")]
    Busy,
    #[error("the supervisor has stopped")]
    Stopped,
}

/// The running part of a role.
enum Running {
    Frontend(Frontend),
    Router(RouterComponent),
    Worker(WorkerHandle),
    Planner(PlannerHandle),
}

impl Running {
    fn cells(&self) -> Vec<ActorCell> {
        match self {
            Running::Frontend(f) => f.cells(),
            Running::Router(r) => r.cells(),
            Running::Worker(w) => vec![w.cell()],
            Running::Planner(p) => vec![p.cell()],
        }
    }

    fn started(&self) -> Started {
        match self {
            Running::Frontend(f) => Started::Frontend {
                addr: f.local_addr(),
                serving: f.serving().clone(),
            },
            Running::Router(r) => Started::Router {
                instance: r.instance().id(),
            },
            Running::Worker(w) => Started::Worker {
                instance: w.instance(),
            },
            Running::Planner(p) => Started::Planner {
                decisions: p.last(),
            },
        }
    }

    async fn stop(self, grace: Duration) {
        match self {
            Running::Frontend(f) => f.shutdown().await,
            Running::Router(r) => r.shutdown().await,
            Running::Worker(w) => {
                w.drain(grace).await;
            }
            Running::Planner(p) => p.shutdown().await,
        }
    }
}

struct Entry {
    name: String,
    spec: RoleSpec,
    running: Option<Running>,
    cells: Vec<ActorCell>,
    generation: u64,
    failures: u32,
    restarts: u64,
    started: Instant,
}

enum Msg {
    Start {
        name: String,
        spec: Box<RoleSpec>,
        reply: oneshot::Sender<Result<Started, SupervisorError>>,
    },
    Stop {
        name: String,
        grace: Duration,
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    List(oneshot::Sender<Vec<RoleInfo>>),
    Shutdown {
        grace: Duration,
        reply: oneshot::Sender<()>,
    },
    /// A failed role's backoff is over.
    Restart {
        name: String,
        generation: u64,
    },
}

struct Supervisor {
    runtime: Runtime,
    pending: Arc<AtomicUsize>,
    health: Arc<Mutex<Vec<RoleHealth>>>,
}

struct State {
    /// In start order; stopped in reverse.
    roles: Vec<Entry>,
    /// Roles stopped on request that are still draining.
    draining: Vec<tokio::task::JoinHandle<()>>,
    /// What the process's `/health` reads (see [`SupervisorHandle::health`]).
    health: Arc<Mutex<Vec<RoleHealth>>>,
    health_check: u64,
}

/// How one role's health is read.
enum HealthSource {
    /// Failed, waiting for its restart.
    Down,
    Up,
    Worker(tokio::sync::watch::Receiver<crate::worker::WorkerStatus>),
    Frontend(Arc<crate::frontend::ModelTable>),
}

struct RoleHealth {
    name: String,
    kind: RoleKind,
    source: HealthSource,
}

impl RoleHealth {
    fn read(&self) -> (bool, &'static str) {
        use crate::worker::WorkerStatus;
        match &self.source {
            HealthSource::Down => (false, "restarting"),
            HealthSource::Up => (true, "running"),
            HealthSource::Worker(s) => match *s.borrow() {
                WorkerStatus::Serving => (true, "serving"),
                WorkerStatus::Restarting => (false, "restarting its engine"),
                WorkerStatus::Stopped => (false, "stopped"),
            },
            HealthSource::Frontend(t) if t.list().is_empty() => (false, "no model served yet"),
            HealthSource::Frontend(_) => (true, "serving"),
        }
    }
}

/// Healthy when every role is: workers serving (registered, engine up), routers running,
/// frontends listing at least one model.
fn health_of(roles: &Mutex<Vec<RoleHealth>>) -> (bool, serde_json::Value) {
    let roles = roles.lock().unwrap_or_else(|p| p.into_inner());
    let mut ok = true;
    let shown: Vec<serde_json::Value> = roles
        .iter()
        .map(|r| {
            let (healthy, state) = r.read();
            ok &= healthy;
            serde_json::json!({ "role": r.name, "kind": r.kind.as_str(), "state": state })
        })
        .collect();
    (ok, serde_json::json!({ "roles": shown }))
}

impl State {
    fn refresh_health(&self) {
        let now = self
            .roles
            .iter()
            .map(|e| RoleHealth {
                name: e.name.clone(),
                kind: e.spec.kind(),
                source: match &e.running {
                    None => HealthSource::Down,
                    Some(Running::Worker(w)) => HealthSource::Worker(w.status()),
                    Some(Running::Frontend(f)) => HealthSource::Frontend(f.models().clone()),
                    Some(Running::Router(_) | Running::Planner(_)) => HealthSource::Up,
                },
            })
            .collect();
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }
}

impl Supervisor {
    async fn start_role(&self, spec: &RoleSpec) -> Result<Running, String> {
        Ok(match spec {
            RoleSpec::Frontend(s) => Running::Frontend(
                Frontend::start(&self.runtime, (**s).clone())
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            RoleSpec::Router {
                namespace,
                settings,
            } => Running::Router(
                RouterComponent::start(&self.runtime, namespace.clone(), (**settings).clone())
                    .await?,
            ),
            RoleSpec::Planner(p) => {
                Running::Planner(PlannerHandle::start(&self.runtime, (**p).clone()).await?)
            }
            RoleSpec::Worker(w) => {
                let first = w.first.lock().unwrap_or_else(|p| p.into_inner()).take();
                let engine = match first {
                    Some(e) => e,
                    None => (w.factory)().await?,
                };
                let instance = self
                    .runtime
                    .component(w.component.clone(), serde_json::json!({}))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut settings = w.settings.clone();
                settings.factory = Some(w.factory.clone());
                Running::Worker(
                    WorkerHandle::start(&instance, settings, engine)
                        .await
                        .map_err(|e| e.to_string())?,
                )
            }
        })
    }

    fn backoff(failures: u32) -> Duration {
        crate::backoff(RESTART_INITIAL, RESTART_MAX, failures)
    }

    fn schedule_restart(myself: &ActorRef<Msg>, name: String, generation: u64, delay: Duration) {
        let me = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = me.cast(Msg::Restart { name, generation });
        });
    }
}

fn link(cells: &[ActorCell], myself: &ActorRef<Msg>) {
    for c in cells {
        c.link(myself.get_cell());
    }
}

fn unlink(cells: &[ActorCell], myself: &ActorRef<Msg>) {
    for c in cells {
        c.unlink(myself.get_cell());
    }
}

impl Actor for Supervisor {
    type Msg = Msg;
    type State = State;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Msg>, _: ()) -> Result<State, ActorProcessingErr> {
        let health = self.health.clone();
        let check =
            dynamo_runtime::telemetry::add_health_check(Arc::new(move || health_of(&health)));
        Ok(State {
            roles: Vec::new(),
            draining: Vec::new(),
            health: self.health.clone(),
            health_check: check,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        dynamo_runtime::telemetry::remove_health_check(state.health_check);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, Msg::Restart { .. }) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        match msg {
            Msg::Start { name, spec, reply } => {
                let result = if state.roles.iter().any(|e| e.name == name) {
                    Err(SupervisorError::Duplicate(name))
                } else {
                    match self.start_role(&spec).await {
                        Ok(running) => {
                            let cells = running.cells();
                            link(&cells, &myself);
                            let started = running.started();
                            tracing::info!(role = %name, kind = spec.kind().as_str(), "role started");
                            state.roles.push(Entry {
                                name,
                                spec: *spec,
                                running: Some(running),
                                cells,
                                generation: 0,
                                failures: 0,
                                restarts: 0,
                                started: Instant::now(),
                            });
                            Ok(started)
                        }
                        Err(reason) => Err(SupervisorError::Start { name, reason }),
                    }
                };
                // Health shows the role before the caller hears it started: a caller that
                // announces readiness next must not have `/health` list no roles.
                state.refresh_health();
                let _ = reply.send(result);
            }
            Msg::Stop { name, grace, reply } => {
                let Some(i) = state.roles.iter().position(|e| e.name == name) else {
                    let _ = reply.send(Err(SupervisorError::UnknownRole(name)));
                    return Ok(());
                };
                let entry = state.roles.remove(i);
                unlink(&entry.cells, &myself);
                // The role drains on its own: the supervisor keeps taking commands (a planner
                // scaling up while another worker drains), and its shutdown waits for it.
                state.draining.retain(|t| !t.is_finished());
                state.draining.push(tokio::spawn(async move {
                    if let Some(r) = entry.running {
                        r.stop(grace).await;
                    }
                    tracing::info!(role = %name, "role stopped");
                    let _ = reply.send(Ok(()));
                }));
            }
            Msg::List(reply) => {
                let _ = reply.send(
                    state
                        .roles
                        .iter()
                        .map(|e| RoleInfo {
                            name: e.name.clone(),
                            kind: e.spec.kind(),
                            running: e.running.is_some(),
                            restarts: e.restarts,
                        })
                        .collect(),
                );
            }
            Msg::Shutdown { grace, reply } => {
                while let Some(entry) = state.roles.pop() {
                    unlink(&entry.cells, &myself);
                    if let Some(r) = entry.running {
                        r.stop(grace).await;
                    }
                }
                for t in state.draining.drain(..) {
                    let _ = t.await;
                }
                state.refresh_health();
                let _ = reply.send(());
                myself.stop(Some("shut down".into()));
            }
            Msg::Restart { name, generation } => {
                let Some(entry) = state
                    .roles
                    .iter_mut()
                    .find(|e| e.name == name && e.generation == generation && e.running.is_none())
                else {
                    return Ok(());
                };
                match self.start_role(&entry.spec).await {
                    Ok(running) => {
                        entry.cells = running.cells();
                        link(&entry.cells, &myself);
                        entry.running = Some(running);
                        entry.started = Instant::now();
                        entry.restarts += 1;
                        metrics::counter!("dynamo_supervisor_role_restarts_total", "kind" => entry.spec.kind().as_str())
                            .increment(1);
                        tracing::info!(role = %name, restarts = entry.restarts, "role restarted");
                    }
                    Err(reason) => {
                        entry.failures += 1;
                        let delay = Self::backoff(entry.failures);
                        tracing::error!(role = %name, %reason, retry_in = ?delay, "role restart failed");
                        Self::schedule_restart(&myself, name, generation, delay);
                    }
                }
            }
        }
        state.refresh_health();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Msg>,
        event: SupervisionEvent,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, error) = event else {
            // Started, or stopped as asked (a drain): nothing to do.
            return Ok(());
        };
        let id = cell.get_id();
        let Some(entry) = state
            .roles
            .iter_mut()
            .find(|e| e.cells.iter().any(|c| c.get_id() == id))
        else {
            return Ok(());
        };
        let kind = entry.spec.kind();
        tracing::error!(role = %entry.name, kind = kind.as_str(), %error, "role failed");
        unlink(&entry.cells, &myself);
        entry.cells.clear();
        if let Some(r) = entry.running.take() {
            // Whatever still runs of it (its endpoints, other actors) goes too.
            r.stop(Duration::ZERO).await;
        }
        match kind {
            RoleKind::Frontend => {
                tracing::error!(role = %entry.name, "a frontend failed: stopping the process");
                self.runtime.shutdown_token().cancel();
            }
            RoleKind::Router | RoleKind::Worker | RoleKind::Planner => {
                entry.failures = if entry.started.elapsed() >= STABLE_AFTER {
                    1
                } else {
                    entry.failures + 1
                };
                entry.generation += 1;
                let delay = Self::backoff(entry.failures);
                Self::schedule_restart(&myself, entry.name.clone(), entry.generation, delay);
            }
        }
        state.refresh_health();
        Ok(())
    }
}

/// The handle to a process's root supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<Msg>,
    pending: Arc<AtomicUsize>,
    health: Arc<Mutex<Vec<RoleHealth>>>,
}

impl SupervisorHandle {
    /// Starts a supervisor with no roles. Its shutdown hangs off the runtime's shutdown token
    /// (a child token): cancelling that token (SIGTERM in `dynamo-run`, a dead parent with
    /// `--exit-with-parent`) stops every role in reverse start order, draining workers for
    /// the runtime's `shutdown_grace`.
    pub async fn start(runtime: &Runtime) -> Result<Self, SupervisorError> {
        crate::describe_metrics();
        let pending = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Mutex::new(Vec::new()));
        let (actor, _) = Actor::spawn(
            None,
            Supervisor {
                runtime: runtime.clone(),
                pending: pending.clone(),
                health: health.clone(),
            },
            (),
        )
        .await
        .map_err(|_| SupervisorError::Stopped)?;
        let handle = Self {
            actor,
            pending,
            health,
        };
        let token = runtime.shutdown_token().child_token();
        let (me, grace) = (handle.clone(), runtime.settings().shutdown_grace);
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => me.shutdown(grace).await,
                // The supervisor stopped by itself (an explicit shutdown): nothing to do.
                _ = me.stopped() => {}
            }
        });
        Ok(handle)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Msg,
    ) -> Result<T, SupervisorError> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(SupervisorError::Busy);
        }
        let (tx, rx) = oneshot::channel();
        if self.actor.cast(make(tx)).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(SupervisorError::Stopped);
        }
        rx.await.map_err(|_| SupervisorError::Stopped)
    }

    /// Whether every role is healthy (workers serving, routers running, frontends listing a
    /// model), with each role's state: what the process's `/health` answers.
    pub fn health(&self) -> (bool, serde_json::Value) {
        health_of(&self.health)
    }

    /// Starts a role named `name` (unique in this process) and waits until it is up.
    pub async fn start_role(&self, name: &str, spec: RoleSpec) -> Result<Started, SupervisorError> {
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            return Err(SupervisorError::BadName(name.to_string()));
        }
        let name = name.to_string();
        let spec = Box::new(spec);
        self.ask(|reply| Msg::Start { name, spec, reply }).await?
    }

    /// Stops the role `name`: a worker drains (up to `grace`) and deregisters.
    pub async fn stop_role(&self, name: &str, grace: Duration) -> Result<(), SupervisorError> {
        let name = name.to_string();
        self.ask(|reply| Msg::Stop { name, grace, reply }).await?
    }

    /// The roles of this process, in start order.
    pub async fn roles(&self) -> Result<Vec<RoleInfo>, SupervisorError> {
        self.ask(Msg::List).await
    }

    /// Stops every role in reverse start order, then the supervisor.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.ask(|reply| Msg::Shutdown { grace, reply }).await;
    }

    /// Resolves once the supervisor has stopped (its roles stopped before it).
    pub async fn stopped(&self) {
        let _ = self.actor.get_cell().wait(None).await;
    }
}
