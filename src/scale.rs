//! The `local` connector's far end: a `dynamo-run serve` process answers scale requests
//! (`{ns}.serve.scale`, [`ScaleRequest`]) for the components its graph's planners scale, and
//! lists them in its discovery metadata so a planner anywhere on the bus finds it.
//!
//! - On the embedded bus a pool's replicas are worker roles of this process's supervisor
//!   (`{component}-{i}`); over NATS they are child processes (`[{component}.{i}]`).
//! - Scaling up starts replicas with fresh indices; scaling down drains the newest first: the
//!   worker deregisters (routers stop sending), finishes what it holds within the shutdown
//!   grace, then stops (a child process gets SIGTERM and does the same).
//! - Each change is printed (`[backend] scale 1 -> 3`, `[backend] backend-2 drained`).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use dynamo_actors::supervisor::SupervisorHandle;
use dynamo_protocols::planner::{
    ScaleReply, ScaleRequest, ScalerMetadata, SCALER_COMPONENT, SCALE_ENDPOINT,
};
use dynamo_runtime::rpc::RemoteErrorKind;
use dynamo_runtime::subject::{ComponentId, EndpointId, EndpointName};
use dynamo_runtime::{ComponentInstance, Request, Runtime, ServedEndpoint};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::graph::{Component, Graph};
use crate::launch::{self, LaunchSettings, WorkerModel};

/// Most replicas one pool may be asked for (as a graph's `replicas`).
const MAX_REPLICAS: u32 = 4096;

/// A pool's worker roles in this process.
pub(crate) struct EmbeddedPool {
    pub sup: SupervisorHandle,
    pub settings: LaunchSettings,
    pub endpoint: EndpointId,
    pub model: Arc<WorkerModel>,
    pub grace: Duration,
}

/// A pool's child processes.
pub(crate) struct ProcessPool {
    pub component: Component,
    pub graph: Arc<Graph>,
    pub bus: String,
    pub grace: Duration,
    pub shutting_down: CancellationToken,
    pub ready: mpsc::UnboundedSender<(String, String)>,
    pub reaper: crate::serve::Reaper,
    /// The component's own environment (its NATS credentials).
    pub env: Arc<crate::serve::OwnEnv>,
}

enum Replica {
    Role(String),
    Process {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    },
}

enum Kind {
    Embedded(Box<EmbeddedPool>),
    Processes(Box<ProcessPool>),
}

/// One scaled component: its replicas, newest last.
pub(crate) struct Pool {
    name: String,
    kind: Kind,
    running: Vec<(usize, Replica)>,
    next: usize,
    draining: Arc<AtomicU32>,
    drains: Vec<tokio::task::JoinHandle<()>>,
}

impl Pool {
    pub fn embedded(name: &str, p: EmbeddedPool) -> Self {
        Self::new(name, Kind::Embedded(Box::new(p)))
    }

    pub fn processes(name: &str, p: ProcessPool) -> Self {
        Self::new(name, Kind::Processes(Box::new(p)))
    }

    fn new(name: &str, kind: Kind) -> Self {
        Self {
            name: name.to_string(),
            kind,
            running: Vec::new(),
            next: 0,
            draining: Arc::default(),
            drains: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn reply(&self) -> ScaleReply {
        ScaleReply {
            component: self.name.clone(),
            replicas: self.running.len() as u32,
            draining: self.draining.load(Ordering::Acquire),
        }
    }

    /// Starts or drains replicas until `n` run. Embedded replicas are up when this returns;
    /// child processes are started (they print `ready` when they are).
    pub async fn scale_to(&mut self, n: usize) -> Result<()> {
        while self.running.len() < n {
            let index = self.next;
            self.next += 1;
            let replica = match &self.kind {
                Kind::Embedded(p) => {
                    let role = format!("{}-{index}", self.name);
                    launch::start_worker(
                        &p.sup,
                        &p.settings,
                        &p.endpoint,
                        &p.model,
                        index,
                        true,
                        &role,
                    )
                    .await?;
                    Replica::Role(role)
                }
                Kind::Processes(p) => {
                    let stop = CancellationToken::new();
                    let task = tokio::spawn(crate::serve::supervise(
                        crate::serve::Child {
                            label: format!("{}.{index}", self.name),
                            args: p.component.args(&p.graph, Some(&p.bus), index),
                            env: p.env.clone(),
                        },
                        p.ready.clone(),
                        stop.clone(),
                        p.shutting_down.clone(),
                        p.grace,
                        p.reaper.clone(),
                    ));
                    Replica::Process { stop, task }
                }
            };
            self.running.push((index, replica));
        }
        while self.running.len() > n {
            let Some((index, replica)) = self.running.pop() else {
                break;
            };
            let (name, draining) = (self.name.clone(), self.draining.clone());
            draining.fetch_add(1, Ordering::AcqRel);
            let drain = match (&self.kind, replica) {
                (Kind::Embedded(p), Replica::Role(role)) => {
                    let (sup, grace) = (p.sup.clone(), p.grace);
                    tokio::spawn(async move {
                        if let Err(e) = sup.stop_role(&role, grace).await {
                            eprintln!("[{name}] {role}: {e}");
                        }
                        println!("[{name}] {role} drained and stopped");
                        draining.fetch_sub(1, Ordering::AcqRel);
                    })
                }
                (_, Replica::Process { stop, task }) => {
                    stop.cancel();
                    tokio::spawn(async move {
                        let _ = task.await;
                        println!("[{name}] replica {name}.{index} drained and stopped");
                        draining.fetch_sub(1, Ordering::AcqRel);
                    })
                }
                (_, Replica::Role(_)) => unreachable!("roles are embedded replicas"),
            };
            self.drains.retain(|t| !t.is_finished());
            self.drains.push(drain);
        }
        Ok(())
    }

    /// Stops every replica (draining) and waits for them.
    pub async fn stop(mut self) {
        let _ = self.scale_to(0).await;
        for t in self.drains {
            let _ = t.await;
        }
    }
}

enum Msg {
    Scale(Request<ScaleRequest, ScaleReply>),
    Stop(oneshot::Sender<()>),
}

impl From<Request<ScaleRequest, ScaleReply>> for Msg {
    fn from(r: Request<ScaleRequest, ScaleReply>) -> Self {
        Msg::Scale(r)
    }
}

struct ScalerActor;

struct State {
    pools: BTreeMap<String, Pool>,
    stopped: bool,
}

impl Actor for ScalerActor {
    type Msg = Msg;
    type State = State;
    type Arguments = BTreeMap<String, Pool>;

    async fn pre_start(
        &self,
        _: ActorRef<Msg>,
        pools: BTreeMap<String, Pool>,
    ) -> Result<State, ActorProcessingErr> {
        Ok(State {
            pools,
            stopped: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Stop(done) => {
                state.stopped = true;
                for (_, p) in std::mem::take(&mut state.pools) {
                    p.stop().await;
                }
                let _ = done.send(());
                myself.stop(None);
            }
            Msg::Scale(Request { body, reply, .. }) => {
                let known: Vec<String> = state.pools.keys().cloned().collect();
                let Some(pool) = state.pools.get_mut(&body.component) else {
                    let _ = reply
                        .fail(
                            RemoteErrorKind::BadRequest,
                            format!(
                                "this process does not scale component {:?} (it scales: {})",
                                body.component,
                                known.join(", ")
                            ),
                        )
                        .await;
                    return Ok(());
                };
                let Some(n) = body.replicas else {
                    let _ = reply.finish_with(&pool.reply()).await;
                    return Ok(());
                };
                if n > MAX_REPLICAS {
                    let _ = reply
                        .fail(
                            RemoteErrorKind::BadRequest,
                            format!("{n} replicas: at most {MAX_REPLICAS}"),
                        )
                        .await;
                    return Ok(());
                }
                let before = pool.running.len();
                if n as usize != before {
                    println!("[{}] scale {before} -> {n}", pool.name());
                    let _ = std::io::stdout().flush();
                }
                let result = pool.scale_to(n as usize).await;
                let _ = match result {
                    Ok(()) => reply.finish_with(&pool.reply()).await,
                    Err(e) => {
                        eprintln!("[{}] cannot scale to {n}: {e:#}", pool.name());
                        reply
                            .fail(
                                RemoteErrorKind::Internal,
                                format!("{} of {n} replicas run: {e:#}", pool.running.len()),
                            )
                            .await
                    }
                };
            }
        }
        Ok(())
    }
}

/// The scaler of a `serve` process.
pub(crate) struct Scaler {
    actor: ActorRef<Msg>,
    served: ServedEndpoint,
    _instance: ComponentInstance,
}

impl Scaler {
    /// Serves `{namespace}.serve.scale` for `pools`.
    pub async fn start(
        runtime: &Runtime,
        namespace: &str,
        pools: BTreeMap<String, Pool>,
    ) -> Result<Self> {
        let meta = serde_json::to_value(ScalerMetadata {
            components: pools.keys().cloned().collect(),
        })?;
        let instance = runtime
            .component(ComponentId::new(namespace, SCALER_COMPONENT)?, meta.clone())
            .await?;
        let (actor, _) = Actor::spawn(None, ScalerActor, pools).await?;
        let served = instance
            .serve::<ScaleRequest, ScaleReply, _>(
                EndpointName::new(SCALE_ENDPOINT)?,
                actor.clone(),
                meta,
            )
            .await?;
        Ok(Self {
            actor,
            served,
            _instance: instance,
        })
    }

    /// Stops scaling and drains every pool's replicas.
    pub async fn stop(self) {
        // Planners no longer find it, then the pools drain.
        self.served.shutdown(Duration::from_secs(1)).await;
        let (tx, rx) = oneshot::channel();
        if self.actor.cast(Msg::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
        let _ = self.actor.get_cell().wait(None).await;
    }
}
