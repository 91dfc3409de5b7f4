//! Hosting: binds a `ractor` actor to an endpoint on the bus.
//!
//! [`ComponentInstance::serve`] subscribes the endpoint's load-balanced subject (in the
//! endpoint's queue group) and the instance's own subject, decodes each request with
//! `rmp-serde`, and casts a [`Request`] (body, context, typed [`ReplySender`]) to the actor.
//! It also listens on the endpoint's control subjects for cancellations, registers the
//! instance in discovery, and answers the NATS service protocol (see [`service`]).
//!
//! Bad input never stops an endpoint: a message with no reply subject, an envelope that does
//! not decode, an unknown protocol version or a body that is not the endpoint's request type
//! is logged once (one line per message, at `warn`), counted in
//! `dynamo_runtime_bad_requests_total{reason}` and, where a reply subject exists, answered with
//! a `BadRequest` error frame.
//!
//! Backpressure: at most `rpc.max_inflight` requests are open per endpoint; one more is refused
//! at once with `Overloaded` (the actor's mailbox never grows past that).
//!
//! Shutdown ([`ServedEndpoint::shutdown`]): deregister from discovery, unsubscribe (new requests
//! go to other instances or get `NoResponders`), wait for open requests up to the grace period,
//! then cancel what is left.

mod reply;
mod service;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use ractor::ActorRef;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use reply::{ReplyError, ReplySender, Request, RequestContext};
pub(crate) use service::ServiceResponder;

use crate::bus::{Bus, BusError, Message, Outgoing};
use crate::discovery::{Discovery, DiscoveryError, InstanceInfo};
use crate::rpc::wire::{self, Control, Frame, FrameKind, RequestEnvelope, PROTOCOL_VERSION};
use crate::rpc::{RemoteError, RemoteErrorKind, RequestId, RpcSettings};
use crate::subject::{ComponentId, EndpointId, EndpointName, InstanceId, SubjectPattern, Topic};

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0} is already served by this instance")]
    AlreadyServed(String),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// Counters the service protocol reports (`$SRV.STATS`).
#[derive(Default)]
pub(crate) struct EndpointStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub processing_ns: AtomicU64,
    pub last_error: Mutex<String>,
}

impl EndpointStats {
    pub fn record_error(&self, e: &RemoteError) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
    }
}

/// What the control listener changes in an open request: cancellation and flow-control credit.
pub(crate) struct Flow {
    pub cancel: CancellationToken,
    /// Data frames the caller has consumed (acknowledged).
    pub consumed: AtomicU64,
    pub credit: Notify,
    /// Cancelled by a shutdown whose grace ran out: the caller is told `Unavailable` (it
    /// moves the request to another instance) instead of nothing.
    pub handoff: AtomicBool,
}

/// State one served endpoint shares with its open requests.
pub(crate) struct EndpointShared {
    pub endpoint: EndpointId,
    pub instance: InstanceId,
    pub bus: Arc<dyn Bus>,
    pub stats: EndpointStats,
    /// Metric handles, resolved once (labels: the endpoint path, from validated names).
    requests_total: metrics::Counter,
    overloaded_total: metrics::Counter,
    open: DashMap<RequestId, Arc<Flow>>,
    drained: Notify,
}

impl EndpointShared {
    /// Returns once no request is open.
    async fn all_closed(&self) {
        loop {
            let notified = self.drained.notified();
            if self.open.is_empty() {
                return;
            }
            notified.await;
        }
    }

    fn finish(&self, id: RequestId, took: Duration, failed: bool) {
        self.stats
            .processing_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        if failed {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.open.remove(&id).is_some() && self.open.is_empty() {
            self.drained.notify_waiters();
        }
    }
}

/// One running instance of a component in this process: owns an [`InstanceId`] and answers
/// the service protocol for all the endpoints it serves.
#[derive(Clone)]
pub struct ComponentInstance {
    component: ComponentId,
    id: InstanceId,
    bus: Arc<dyn Bus>,
    discovery: Arc<dyn Discovery>,
    settings: RpcSettings,
    service: Arc<ServiceResponder>,
}

impl std::fmt::Debug for ComponentInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentInstance")
            .field("component", &self.component.to_string())
            .field("id", &self.id.to_string())
            .finish()
    }
}

/// Encodes an event as [`ComponentInstance::publish_event`] does (MessagePack, named fields).
pub fn encode_event<T: Serialize + ?Sized>(event: &T) -> Result<bytes::Bytes, String> {
    wire::encode(event).map_err(|e| e.to_string())
}

/// Decodes an event published with [`ComponentInstance::publish_event`].
pub fn decode_event<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    wire::decode(payload).map_err(|e| e.to_string())
}

impl ComponentInstance {
    pub(crate) async fn start(
        component: ComponentId,
        id: InstanceId,
        bus: Arc<dyn Bus>,
        discovery: Arc<dyn Discovery>,
        settings: RpcSettings,
        metadata: serde_json::Value,
    ) -> Result<Self, BusError> {
        let service = ServiceResponder::start(bus.clone(), &component, id, metadata).await?;
        Ok(Self {
            component,
            id,
            bus,
            discovery,
            settings,
            service,
        })
    }

    pub fn id(&self) -> InstanceId {
        self.id
    }

    pub fn component(&self) -> &ComponentId {
        &self.component
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Publishes `event` (MessagePack) on this instance's subject for `topic`
    /// (`dyn.ev.{ns}.{component}.{topic}.{instance}`); see [`decode_event`].
    pub async fn publish_event<T: Serialize + ?Sized>(
        &self,
        topic: &Topic,
        event: &T,
    ) -> Result<(), BusError> {
        let payload = wire::encode(event).map_err(|e| BusError::Operation(e.to_string()))?;
        let subject = self.component.event_subject(topic, self.id);
        self.bus.publish(Outgoing::new(subject, payload)).await
    }

    /// Serves `endpoint` with `actor`: every request arrives as `M::from(Request<Req, Resp>)`.
    /// `metadata` is published in discovery with the instance.
    pub async fn serve<Req, Resp, M>(
        &self,
        endpoint: EndpointName,
        actor: ActorRef<M>,
        metadata: serde_json::Value,
    ) -> Result<ServedEndpoint, ServeError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        M: ractor::Message + From<Request<Req, Resp>>,
    {
        let endpoint = EndpointId {
            component: self.component.clone(),
            endpoint,
        };
        let shared = Arc::new(EndpointShared {
            endpoint: endpoint.clone(),
            instance: self.id,
            bus: self.bus.clone(),
            stats: EndpointStats::default(),
            // Per instance: many workers in one process each get their own series.
            requests_total: metrics::counter!("dynamo_runtime_requests_total",
                "endpoint" => endpoint.to_string(), "instance" => self.id.to_string()),
            overloaded_total: metrics::counter!("dynamo_runtime_overloaded_total",
                "endpoint" => endpoint.to_string(), "instance" => self.id.to_string()),
            open: DashMap::new(),
            drained: Notify::new(),
        });
        if !self.service.add_endpoint(shared.clone()) {
            return Err(ServeError::AlreadyServed(endpoint.to_string()));
        }
        let subs = async {
            let queue = self
                .bus
                .subscribe(endpoint.subject().into(), Some(endpoint.queue_group()))
                .await?;
            let own = self
                .bus
                .subscribe(endpoint.instance_subject(self.id).into(), None)
                .await?;
            let ctl = self
                .bus
                .subscribe(endpoint.control_subject(self.id).into(), None)
                .await?;
            let ctl_all = self
                .bus
                .subscribe(
                    SubjectPattern::from(endpoint.control_broadcast_subject()),
                    None,
                )
                .await?;
            // Subscriptions must be live on the server before discovery announces us.
            self.bus.flush().await?;
            Ok::<_, BusError>((queue, own, ctl, ctl_all))
        }
        .await;
        let (queue, own, ctl, ctl_all) = match subs {
            Ok(s) => s,
            Err(e) => {
                self.service.remove_endpoint(&endpoint);
                return Err(e.into());
            }
        };
        let info = InstanceInfo {
            endpoint: endpoint.clone(),
            instance: self.id,
            metadata,
            process: Some(crate::discovery::ProcessId::this()),
            lease: None,
        };
        if let Err(e) = self.discovery.register(info).await {
            self.service.remove_endpoint(&endpoint);
            return Err(e.into());
        }
        let stop = CancellationToken::new();
        let stop_requests = CancellationToken::new();
        let accepting = Arc::new(AtomicBool::new(true));
        let server = Server {
            shared: shared.clone(),
            actor,
            settings: self.settings.clone(),
            accepting: accepting.clone(),
            _types: std::marker::PhantomData::<fn(Req, Resp)>,
        };
        let requests = futures::stream::select(queue, own);
        let controls = futures::stream::select(ctl, ctl_all);
        let task =
            tokio::spawn(server.run(requests, controls, stop_requests.clone(), stop.clone()));
        tracing::info!(endpoint = %endpoint, instance = %self.id, "serving");
        Ok(ServedEndpoint {
            shared,
            stop,
            stop_requests,
            accepting,
            task: Some(task),
            discovery: self.discovery.clone(),
            service: self.service.clone(),
        })
    }
}

struct Server<Req, Resp, M: ractor::Message> {
    shared: Arc<EndpointShared>,
    actor: ActorRef<M>,
    settings: RpcSettings,
    accepting: Arc<AtomicBool>,
    _types: std::marker::PhantomData<fn(Req, Resp)>,
}

/// How long a shutdown whose grace ran out waits for its cancelled handlers to tell their
/// callers to go elsewhere.
const HANDOFF_WAIT: Duration = Duration::from_secs(1);

impl<Req, Resp, M> Server<Req, Resp, M>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    M: ractor::Message + From<Request<Req, Resp>>,
{
    async fn run(
        self,
        requests: impl futures::Stream<Item = Message> + Unpin,
        mut controls: impl futures::Stream<Item = Message> + Unpin,
        stop_requests: CancellationToken,
        stop: CancellationToken,
    ) {
        use futures::StreamExt;
        let mut requests = Some(requests);
        // The actor's exit, as an event: no timer per endpoint (a process hosting thousands
        // of workers has three endpoints each, and polling them all twice a second was most
        // of an idle fleet's CPU).
        let cell = self.actor.get_cell();
        let actor_gone = cell.wait(None);
        tokio::pin!(actor_gone);
        let mut actor_alive = true;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                // Unsubscribing takes new work away from this instance; cancellations for the
                // requests still draining keep arriving on the control subjects.
                _ = stop_requests.cancelled(), if requests.is_some() => requests = None,
                Some(m) = controls.next() => self.control(m),
                Some(m) = async { requests.as_mut()?.next().await }, if requests.is_some() => {
                    self.request(m).await
                }
                _ = &mut actor_gone, if actor_alive => {
                    actor_alive = false;
                    tracing::warn!(endpoint = %self.shared.endpoint, "actor stopped; endpoint stops serving");
                    self.accepting.store(false, Ordering::Relaxed);
                    requests = None;
                }
            }
        }
    }

    fn control(&self, m: Message) {
        match wire::decode::<Control>(&m.payload) {
            Ok(Control::Cancel { id }) => {
                if let Some(flow) = self.shared.open.get(&id) {
                    tracing::debug!(%id, "cancelled by caller");
                    flow.cancel.cancel();
                }
            }
            Ok(Control::Ack { id, consumed }) => {
                if let Some(flow) = self.shared.open.get(&id) {
                    flow.consumed.fetch_max(consumed, Ordering::Relaxed);
                    flow.credit.notify_waiters();
                }
            }
            Ok(Control::Ping { id }) => {
                let (Some(reply), true) = (m.reply, self.shared.open.contains_key(&id)) else {
                    return;
                };
                let frame = Frame {
                    seq: 0,
                    from: self.shared.instance,
                    kind: FrameKind::Heartbeat,
                };
                if let Ok(payload) = wire::encode(&frame) {
                    let bus = self.shared.bus.clone();
                    tokio::spawn(async move {
                        let _ = bus.publish(Outgoing::new(reply, payload)).await;
                    });
                }
            }
            Err(e) => bad_input(
                &self.shared,
                "control",
                &format!("malformed control message: {e}"),
            ),
        }
    }

    async fn request(&self, m: Message) {
        let Some(reply) = m.reply.clone() else {
            bad_input(&self.shared, "no_reply", "request without a reply subject");
            return;
        };
        let refuse = |kind, msg: String| self.refuse(reply.clone(), kind, msg);
        let env: RequestEnvelope = match wire::decode(&m.payload) {
            Ok(e) => e,
            Err(e) => {
                bad_input(
                    &self.shared,
                    "envelope",
                    &format!("malformed request envelope: {e}"),
                );
                return refuse(
                    RemoteErrorKind::BadRequest,
                    format!("malformed request envelope: {e}"),
                )
                .await;
            }
        };
        if env.v != PROTOCOL_VERSION {
            bad_input(
                &self.shared,
                "version",
                &format!("protocol version {}", env.v),
            );
            return refuse(
                RemoteErrorKind::BadRequest,
                format!("protocol version {} is not supported (this responder speaks {PROTOCOL_VERSION})", env.v),
            )
            .await;
        }
        let body: Req = match wire::decode(&env.body) {
            Ok(b) => b,
            Err(e) => {
                let what = format!(
                    "request body is not a {} for endpoint {}: {e}",
                    std::any::type_name::<Req>(),
                    self.shared.endpoint
                );
                bad_input(&self.shared, "body", &what);
                return refuse(RemoteErrorKind::BadRequest, what).await;
            }
        };
        if !self.accepting.load(Ordering::Relaxed) {
            return refuse(
                RemoteErrorKind::Unavailable,
                "instance is shutting down".into(),
            )
            .await;
        }
        if self.shared.open.len() >= self.settings.max_inflight {
            self.shared.overloaded_total.increment(1);
            return refuse(
                RemoteErrorKind::Overloaded,
                format!(
                    "{} requests in flight at this instance",
                    self.settings.max_inflight
                ),
            )
            .await;
        }
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.shared.requests_total.increment(1);
        let flow = Arc::new(Flow {
            cancel: CancellationToken::new(),
            consumed: AtomicU64::new(0),
            credit: Notify::new(),
            handoff: AtomicBool::new(false),
        });
        self.shared.open.insert(env.id, flow.clone());
        let open = Arc::new(reply::Open {
            id: env.id,
            reply,
            endpoint: self.shared.clone(),
            cancel: flow.cancel.clone(),
            flow,
            window: env.window,
            started: Instant::now(),
            last_sent_ms: AtomicU64::new(0),
        });
        let deadline = Instant::now() + Duration::from_millis(env.timeout_ms);
        let heartbeat = Duration::from_millis(env.heartbeat_ms.max(10));
        let trace_id = m
            .headers
            .get(crate::rpc::TRACE_HEADER)
            .map_or_else(|| env.id.to_string(), str::to_string);
        let (reply, ctx) = ReplySender::<Resp>::open(open, deadline, heartbeat, trace_id);
        if let Err(e) = self.actor.cast(M::from(Request { body, ctx, reply })) {
            // The message (and its ReplySender) came back in the error and was dropped, which
            // already told the caller; stop taking requests for a dead actor.
            tracing::warn!(endpoint = %self.shared.endpoint, error = %e, "actor gone; endpoint stops serving");
            self.accepting.store(false, Ordering::Relaxed);
        }
    }

    async fn refuse(&self, reply: crate::subject::Subject, kind: RemoteErrorKind, message: String) {
        let err = RemoteError::new(kind, message);
        self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.record_error(&err);
        let frame = Frame {
            seq: 0,
            from: self.shared.instance,
            kind: FrameKind::Error(err),
        };
        if let Ok(payload) = wire::encode(&frame) {
            if let Err(e) = self.shared.bus.publish(Outgoing::new(reply, payload)).await {
                tracing::debug!(error = %e, "could not send a refusal");
            }
        }
    }
}

fn bad_input(shared: &EndpointShared, reason: &'static str, detail: &str) {
    metrics::counter!("dynamo_runtime_bad_requests_total", "reason" => reason).increment(1);
    let kind = if reason == "control" {
        "control"
    } else {
        "request"
    };
    crate::telemetry::malformed(kind, &format_args!("{}: {detail}", shared.endpoint));
}

/// A served endpoint. Call [`ServedEndpoint::shutdown`] to stop it gracefully; dropping it
/// stops it at once (open requests are cancelled, the instance deregistered in the background).
pub struct ServedEndpoint {
    shared: Arc<EndpointShared>,
    stop: CancellationToken,
    stop_requests: CancellationToken,
    accepting: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    discovery: Arc<dyn Discovery>,
    service: Arc<ServiceResponder>,
}

/// Counts a served endpoint's open requests (see [`ServedEndpoint::probe`]).
#[derive(Clone)]
pub struct EndpointProbe(Arc<EndpointShared>);

impl EndpointProbe {
    pub fn open_requests(&self) -> usize {
        self.0.open.len()
    }
}

/// What a graceful shutdown achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Requests still open when the shutdown began.
    pub open_at_start: usize,
    /// Of those, how many had to be cancelled when the grace period ran out.
    pub cancelled: usize,
}

impl ServedEndpoint {
    pub fn endpoint(&self) -> &EndpointId {
        &self.shared.endpoint
    }

    pub fn instance(&self) -> InstanceId {
        self.shared.instance
    }

    /// Requests open right now.
    pub fn open_requests(&self) -> usize {
        self.shared.open.len()
    }

    /// A cheap view of this endpoint's open requests that outlives a move of the endpoint.
    pub fn probe(&self) -> EndpointProbe {
        EndpointProbe(self.shared.clone())
    }

    /// Deregisters, stops taking requests, waits up to `grace` for open ones, cancels the rest.
    pub async fn shutdown(mut self, grace: Duration) -> DrainReport {
        let ep = self.shared.endpoint.clone();
        // The grace counts from here: a deregistration that waits for a store that is gone
        // (it gives up after a moment) shortens the drain, never lengthens the shutdown.
        let until = Instant::now() + grace;
        if let Err(e) = self.discovery.deregister(&ep, self.shared.instance).await {
            tracing::warn!(endpoint = %ep, error = %e, "could not deregister");
        }
        self.accepting.store(false, Ordering::Relaxed);
        self.stop_requests.cancel();
        self.service.remove_endpoint(&ep);
        let open_at_start = self.shared.open.len();
        let cancelled = match tokio::time::timeout_at(until, self.shared.all_closed()).await {
            Ok(()) => 0,
            Err(_) => {
                let n = self.shared.open.len();
                for entry in self.shared.open.iter() {
                    entry.value().handoff.store(true, Ordering::Relaxed);
                    entry.value().cancel.cancel();
                }
                // Each handler stops and its caller is told to go elsewhere: wait (briefly)
                // until those frames are out.
                if tokio::time::timeout(HANDOFF_WAIT, self.shared.all_closed())
                    .await
                    .is_err()
                {
                    tracing::warn!(endpoint = %ep, left = self.shared.open.len(), "some handlers did not stop after their cancellation");
                }
                n
            }
        };
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        tracing::info!(endpoint = %ep, open_at_start, cancelled, "endpoint shut down");
        DrainReport {
            open_at_start,
            cancelled,
        }
    }
}

impl Drop for ServedEndpoint {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.cancel();
            for entry in self.shared.open.iter() {
                entry.value().cancel.cancel();
            }
            self.service.remove_endpoint(&self.shared.endpoint);
            // Deregister too, so nobody keeps routing to an endpoint that is gone (the lease
            // would only catch it later, and the in-process discovery never).
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let discovery = self.discovery.clone();
                let endpoint = self.shared.endpoint.clone();
                let instance = self.shared.instance;
                handle.spawn(async move {
                    if let Err(e) = discovery.deregister(&endpoint, instance).await {
                        tracing::warn!(%endpoint, error = %e, "could not deregister a dropped endpoint");
                    }
                });
            }
        }
    }
}
