//! The planner role: every interval it observes the bus (the frontends' request statistics,
//! the pools' load reports), predicts the next interval's load, sizes each pool from the
//! capacity profile to meet the TTFT and ITL targets ([`dynamo_planner::Planner`]), and
//! carries the decision out through a [`connector::Connector`].
//!
//! - Every decision is logged with its inputs and published as a
//!   [`PlannerDecision`] on `dyn.ev.{ns}.planner.decisions.{instance}`
//!   (`dynamo-run watch planner`).
//! - Metrics: `dynamo_planner_desired_replicas{pool}` and `dynamo_planner_ready_replicas{pool}`
//!   (workers of the pool registered on the bus), `dynamo_planner_unmeetable` (1 while no
//!   replica count meets a target: the pools run at max), `dynamo_planner_stale_intervals`,
//!   `dynamo_planner_connector_errors_total`, `dynamo_planner_decisions_total{direction}`.
//! - A connector that fails is retried with backoff (the interval, doubling to five minutes);
//!   until it succeeds the planner keeps deciding from what runs, and the decisions say
//!   `deferred`. Signals that stop arriving hold the last decision (and warn).

pub mod connector;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dynamo_planner::{Planner, PlannerConfig, PoolRole, Pools, Profile, Replicas};
use dynamo_protocols::kv::{LoadReport, LOAD_TOPIC};
use dynamo_protocols::planner::{
    PlannerDecision, PoolDecision, DECISIONS_TOPIC, PLANNER_COMPONENT,
};
use dynamo_protocols::stats::{FrontendStats, FRONTEND_COMPONENT, STATS_TOPIC};
use dynamo_runtime::bus::Outgoing;
use dynamo_runtime::serve::{decode_event, encode_event};
use dynamo_runtime::subject::{ComponentId, Namespace, Subject, Topic};
use dynamo_runtime::telemetry::malformed;
use dynamo_runtime::{InstanceId, Runtime};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::membership::{MemberEvent, MembershipHandle};
use connector::{Connector, LocalConnector};

/// Which connector carries the decisions out.
#[derive(Clone)]
pub enum ConnectorChoice {
    /// The `dynamo-run serve` process running the pool ([`LocalConnector`]).
    Local,
    /// Any other (a test's).
    Custom(Arc<dyn Connector>),
    /// One built when the planner starts (Kubernetes: it reaches the API server then; a
    /// failure fails the start, and the supervisor retries with backoff).
    Deferred(ConnectorFactory),
}

/// Builds a connector when a planner starts.
pub type ConnectorFactory = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<Arc<dyn Connector>, String>>
        + Send
        + Sync,
>;

/// A planner role's settings.
#[derive(Clone)]
pub struct PlannerSettings {
    pub namespace: Namespace,
    pub config: PlannerConfig,
    pub profile: Profile,
    /// The component of the aggregated workers, or of the decode pool.
    pub pool: String,
    /// The component of the prefill pool (disaggregated; `config.policy.pools` says so too).
    pub prefill_pool: Option<String>,
    pub connector: ConnectorChoice,
}

impl PlannerSettings {
    fn pools(&self) -> Vec<(PoolRole, &str)> {
        let mut v = vec![(PoolRole::Main, self.pool.as_str())];
        if let Some(p) = &self.prefill_pool {
            v.push((PoolRole::Prefill, p.as_str()));
        }
        v
    }

    /// The component name of `role`'s pool.
    fn pool_of(&self, role: PoolRole) -> &str {
        match role {
            PoolRole::Prefill => self.prefill_pool.as_deref().unwrap_or(&self.pool),
            PoolRole::Main => &self.pool,
        }
    }

    fn kind(&self, role: PoolRole) -> &'static str {
        match (role, self.config.policy.pools) {
            (PoolRole::Prefill, _) => "prefill",
            (PoolRole::Main, Pools::Aggregated) => "aggregated",
            (PoolRole::Main, Pools::Disaggregated) => "decode",
        }
    }
}

fn pick(r: Replicas, role: PoolRole) -> u32 {
    match role {
        PoolRole::Main => r.main,
        PoolRole::Prefill => r.prefill,
    }
}

fn set(r: &mut Replicas, role: PoolRole, n: u32) {
    match role {
        PoolRole::Main => r.main = n,
        PoolRole::Prefill => r.prefill = n,
    }
}

enum Msg {
    Frontend(bytes::Bytes),
    Load {
        role: PoolRole,
        worker: String,
        payload: bytes::Bytes,
    },
    /// An instance registered, in the component named.
    Joined(InstanceId, String),
    Left(InstanceId),
    Tick,
}

struct PlannerActor {
    runtime: Runtime,
    settings: PlannerSettings,
    connector: Arc<dyn Connector>,
    membership: MembershipHandle,
    subject: Subject,
    last: watch::Sender<Option<PlannerDecision>>,
}

struct State {
    planner: Planner,
    /// What the connector runs, once known.
    target: Option<Replicas>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    last_tick: Instant,
    /// The instances registered now, with their component's name (their load reports count,
    /// on their own component's subject only).
    members: std::collections::HashMap<InstanceId, String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PlannerActor {
    /// The workers of each pool registered on the bus now.
    async fn ready(&self) -> Replicas {
        let mut r = Replicas::default();
        if let Ok(members) = self.membership.members().await {
            for (role, pool) in self.settings.pools() {
                let n = members
                    .iter()
                    .filter(|m| m.endpoint.component.component.as_str() == pool)
                    .count() as u32;
                set(&mut r, role, n);
            }
        }
        r
    }

    /// Asks the connector what it runs (at start, or after it was unreachable).
    async fn known(&self) -> Result<Replicas, String> {
        let mut r = Replicas::default();
        for (role, pool) in self.settings.pools() {
            let n = self
                .connector
                .replicas(pool)
                .await
                .map_err(|e| e.to_string())?;
            set(&mut r, role, n);
        }
        Ok(r)
    }

    async fn tick(&self, state: &mut State) {
        let now = Instant::now();
        let elapsed = now.duration_since(state.last_tick).as_secs_f64();
        state.last_tick = now;
        let interval = Duration::from_secs_f64(state.planner.config().interval_s);
        let ready = self.ready().await;
        let backing_off = state.retry_at.is_some_and(|t| now < t);
        if state.target.is_none() && !backing_off {
            match self.known().await {
                Ok(r) => state.target = Some(r),
                Err(e) => self.failed(state, e, interval),
            }
        }
        let current = state.target.unwrap_or(ready);
        let step = state.planner.tick(elapsed, current);
        let desired = step.decided.replicas;
        let backing_off = state.retry_at.is_some_and(|t| now < t);
        let applied = if state.target == Some(desired) {
            "unchanged".to_string()
        } else if backing_off {
            format!(
                "deferred: retrying in {:.0?} after: {}",
                state.retry_at.map(|t| t - now).unwrap_or_default(),
                state.last_error.as_deref().unwrap_or("an error")
            )
        } else {
            let mut result = Ok(());
            for (role, pool) in self.settings.pools() {
                let n = pick(desired, role);
                if state.target.is_some_and(|t| pick(t, role) == n) {
                    continue;
                }
                match self.connector.scale(pool, n).await {
                    Ok(_) => {
                        let mut t = state.target.unwrap_or(current);
                        set(&mut t, role, n);
                        state.target = Some(t);
                    }
                    Err(e) => {
                        result = Err(e.to_string());
                        break;
                    }
                }
            }
            match result {
                Ok(()) => {
                    state.failures = 0;
                    state.retry_at = None;
                    state.last_error = None;
                    "ok".to_string()
                }
                Err(e) => {
                    self.failed(state, e.clone(), interval);
                    format!("failed: {e}")
                }
            }
        };
        let unmeetable = step.decided.unmeetable.as_ref().map(|u| u.to_string());
        let decision = PlannerDecision {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            interval: step.interval,
            model: state.planner.config().model.clone(),
            observed: step.observed,
            predicted: step.predicted,
            latency: step.latency,
            ttft_target_ms: state.planner.config().targets.ttft_ms,
            itl_target_ms: state.planner.config().targets.itl_ms,
            pools: self
                .settings
                .pools()
                .into_iter()
                .map(|(role, pool)| PoolDecision {
                    component: pool.to_string(),
                    kind: self.settings.kind(role).to_string(),
                    wanted: pick(step.decided.wanted, role),
                    desired: pick(desired, role),
                    previous: pick(current, role),
                    ready: pick(ready, role),
                })
                .collect(),
            reason: step.decided.reason.clone(),
            unmeetable,
            stale_intervals: step.stale,
            applied,
        };
        self.record(&decision);
        let _ = self.last.send(Some(decision.clone()));
        match encode_event(&decision) {
            Ok(payload) => {
                if let Err(e) = self
                    .runtime
                    .bus()
                    .publish(Outgoing::new(self.subject.clone(), payload))
                    .await
                {
                    tracing::debug!(error = %e, "cannot publish the planner's decision");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the planner's decision"),
        }
    }

    fn failed(&self, state: &mut State, error: String, interval: Duration) {
        state.failures += 1;
        let delay = crate::backoff(interval, Duration::from_secs(300), state.failures);
        state.retry_at = Some(Instant::now() + delay);
        metrics::counter!("dynamo_planner_connector_errors_total").increment(1);
        tracing::warn!(connector = self.connector.name(), %error, retry_in = ?delay, "the planner's connector failed");
        state.last_error = Some(error);
    }

    /// Logs and records a decision's figures.
    fn record(&self, d: &PlannerDecision) {
        for p in &d.pools {
            metrics::gauge!("dynamo_planner_desired_replicas", "pool" => p.component.clone())
                .set(p.desired as f64);
            metrics::gauge!("dynamo_planner_ready_replicas", "pool" => p.component.clone())
                .set(p.ready as f64);
        }
        metrics::gauge!("dynamo_planner_unmeetable").set(d.unmeetable.is_some() as u8 as f64);
        metrics::gauge!("dynamo_planner_stale_intervals").set(d.stale_intervals as f64);
        metrics::gauge!("dynamo_planner_predicted_rate").set(d.predicted.rate);
        let direction = if d.pools.iter().any(|p| p.desired > p.previous) {
            "up"
        } else if d.pools.iter().any(|p| p.desired < p.previous) {
            "down"
        } else {
            "hold"
        };
        metrics::counter!("dynamo_planner_decisions_total", "direction" => direction).increment(1);
        if d.stale_intervals >= self.settings.config.stale_after.max(1) || d.unmeetable.is_some() {
            tracing::warn!("planner {d}");
        } else {
            tracing::info!("planner {d}");
        }
    }
}

impl Actor for PlannerActor {
    type Msg = Msg;
    type State = State;
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<Msg>, _: ()) -> Result<State, ActorProcessingErr> {
        let ns = self.settings.namespace.as_str();
        let mut tasks = Vec::new();
        let stats =
            ComponentId::new(ns, FRONTEND_COMPONENT)?.event_pattern(&Topic::new(STATS_TOPIC)?);
        let me = myself.clone();
        tasks.push(crate::follow(
            &self.runtime,
            stats,
            "the planner",
            move |_, p| me.cast(Msg::Frontend(p)).is_ok(),
        ));
        for (role, pool) in self.settings.pools() {
            let load = ComponentId::new(ns, pool)?.event_pattern(&Topic::new(LOAD_TOPIC)?);
            let me = myself.clone();
            tasks.push(crate::follow(
                &self.runtime,
                load,
                "the planner",
                move |subject, payload| {
                    me.cast(Msg::Load {
                        role,
                        worker: subject.last_token().to_string(),
                        payload,
                    })
                    .is_ok()
                },
            ));
        }
        let mut watch = self.membership.subscribe().await?;
        let me = myself.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(e) = watch.next().await {
                let msg = match e {
                    MemberEvent::Joined(m) => {
                        Msg::Joined(m.instance, m.endpoint.component.component.to_string())
                    }
                    MemberEvent::Left { instance, .. } => Msg::Left(instance),
                };
                if me.cast(msg).is_err() {
                    return;
                }
            }
        }));
        let every = Duration::from_secs_f64(self.settings.config.interval_s);
        let me = myself.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if me.cast(Msg::Tick).is_err() {
                    return;
                }
            }
        }));
        Ok(State {
            planner: Planner::new(self.settings.config.clone(), self.settings.profile.clone()),
            target: None,
            failures: 0,
            retry_at: None,
            last_error: None,
            last_tick: Instant::now(),
            members: Default::default(),
            tasks,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.tasks.drain(..) {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Msg>,
        msg: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Msg::Frontend(payload) => {
                match decode_event::<FrontendStats>(&payload).and_then(|s| s.check().map(|()| s)) {
                    Ok(s) => state.planner.observe_frontend(&s),
                    Err(e) => malformed("statistics", &format_args!("frontend statistics: {e}")),
                }
            }
            Msg::Load {
                role,
                worker,
                payload,
            } => {
                // Only registered workers count: a report naming anyone else is dropped, so
                // forged or stale instance ids leave nothing behind.
                match (
                    InstanceId::parse_hex(&worker),
                    decode_event::<LoadReport>(&payload),
                ) {
                    (Ok(w), Ok(r))
                        if r.worker.map(|p| p.0) == Some(w.as_u64())
                            && state.members.get(&w).map(String::as_str)
                                == Some(self.settings.pool_of(role)) =>
                    {
                        state.planner.observe_load(role, w.as_u64(), &r)
                    }
                    (Ok(_), Ok(_)) => {
                        // Not registered in this pool, or stamped with another instance.
                        metrics::counter!("dynamo_planner_rejected_load_reports_total")
                            .increment(1);
                    }
                    (w, r) => malformed(
                        "load",
                        &format_args!(
                            "load report on {worker:?}: {}",
                            w.err()
                                .map(|e| e.to_string())
                                .or(r.err())
                                .unwrap_or_default()
                        ),
                    ),
                }
            }
            Msg::Joined(instance, component) => {
                state.members.insert(instance, component);
            }
            Msg::Left(instance) => {
                state.members.remove(&instance);
                state.planner.forget_worker(instance.as_u64());
            }
            Msg::Tick => self.tick(state).await,
        }
        Ok(())
    }
}

/// A running planner role.
pub struct PlannerHandle {
    actor: ActorRef<Msg>,
    last: watch::Receiver<Option<PlannerDecision>>,
}

impl PlannerHandle {
    /// Starts a planner: it decides every `config.interval_s` until stopped.
    pub async fn start(runtime: &Runtime, settings: PlannerSettings) -> Result<Self, String> {
        crate::describe_metrics();
        let connector: Arc<dyn Connector> = match &settings.connector {
            ConnectorChoice::Local => Arc::new(LocalConnector::new(
                runtime.clone(),
                settings.namespace.clone(),
            )),
            ConnectorChoice::Custom(c) => c.clone(),
            ConnectorChoice::Deferred(make) => make().await?,
        };
        let membership = MembershipHandle::shared(runtime, &settings.namespace)
            .await
            .map_err(|e| e.to_string())?;
        let subject = ComponentId::new(settings.namespace.as_str(), PLANNER_COMPONENT)
            .map_err(|e| e.to_string())?
            .event_subject(
                &Topic::new(DECISIONS_TOPIC).map_err(|e| e.to_string())?,
                InstanceId::random(),
            );
        let (tx, last) = watch::channel(None);
        tracing::info!(
            pool = %settings.pool,
            prefill_pool = settings.prefill_pool.as_deref().unwrap_or("-"),
            connector = connector.name(),
            model = %settings.config.model,
            "planner started"
        );
        let (actor, _) = Actor::spawn(
            None,
            PlannerActor {
                runtime: runtime.clone(),
                settings,
                connector,
                membership,
                subject,
                last: tx,
            },
            (),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(Self { actor, last })
    }

    /// The planner's actor, for a supervisor to link.
    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    /// The last decision (none before the first interval ends).
    pub fn last(&self) -> watch::Receiver<Option<PlannerDecision>> {
        self.last.clone()
    }

    pub async fn shutdown(self) {
        self.actor.stop(None);
        let _ = self.actor.get_cell().wait(None).await;
    }
}
