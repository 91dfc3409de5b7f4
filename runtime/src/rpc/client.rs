//! The caller side.
//!
//! The client subscribes once to `_INBOX.{nuid}.*` with a handler (inline in the responder's
//! publish on the in-process bus, a task of its own on NATS); each call gets a token, the reply
//! subject `_INBOX.{nuid}.{token}` and a bounded channel the handler routes to by token. (A
//! subscription per call measured no faster on NATS and churns the server's interest graph.)
//!
//! A call's channel holds its flow-control window plus a little slack, so a responder that
//! honours the window never overflows it; one that does not loses frames for that call only,
//! and the caller gets `RpcError::Protocol("frames lost")` at the gap. Replies for finished
//! calls are ignored.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::wire::{self, Control, Frame, FrameKind, RequestEnvelope, RequestId};
use super::{RpcError, RpcSettings};
use crate::bus::{Bus, HandlerSubscription, Headers, Message, MessageHandler, Outgoing, Status};
use crate::subject::{gone_pattern, EndpointId, InstanceId, MuxInbox, Subject};

/// Frames buffered per call beyond the flow-control window (heartbeats, the final frame).
const FRAME_SLACK: usize = 64;

/// Header carrying the trace id of the request across the bus.
pub const TRACE_HEADER: &str = "Dyn-Trace-Id";

type Pending = DashMap<u64, mpsc::Sender<Message>>;

/// Where a call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Any one instance of the endpoint (the bus load-balances over its queue group).
    Any(EndpointId),
    /// One given instance.
    Instance(EndpointId, InstanceId),
}

impl Target {
    fn subject(&self) -> Subject {
        match self {
            Target::Any(ep) => ep.subject(),
            Target::Instance(ep, i) => ep.instance_subject(*i),
        }
    }

    fn endpoint(&self) -> &EndpointId {
        match self {
            Target::Any(ep) | Target::Instance(ep, _) => ep,
        }
    }
}

/// A probe follows a silence of this many of the stream's gaps between frames.
const PROBE_GAPS: u32 = 3;

/// Per-call options; unset fields take the client's [`RpcSettings`].
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    pub timeout: Option<Duration>,
    pub request_id: Option<RequestId>,
    pub trace_id: Option<String>,
}

/// Makes streaming calls. Cheap to clone; clones share one inbox.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    bus: Arc<dyn Bus>,
    settings: RpcSettings,
    shared: SharedInbox,
}

/// One reply inbox for all calls, routed by token: `_INBOX.{nuid}.{token}`.
struct SharedInbox {
    inbox: MuxInbox,
    pending: Arc<Pending>,
    next_token: AtomicU64,
    /// Instances whose process a supervisor saw die ([`crate::subject::gone_subject`]): each open call
    /// listens, and one whose responder died ends at once.
    gone: tokio::sync::broadcast::Sender<InstanceId>,
    _subscription: HandlerSubscription,
    _gone_subscription: HandlerSubscription,
}

impl SharedInbox {
    async fn subscribe(bus: &Arc<dyn Bus>) -> Result<Self, RpcError> {
        let inbox = MuxInbox::new(bus.inbox_prefix());
        let pending: Arc<Pending> = Arc::new(DashMap::new());
        let routes = pending.clone();
        let route: MessageHandler = Arc::new(move |msg: Message| {
            match MuxInbox::token(&msg.subject).and_then(|t| routes.get(&t)) {
                // Full: the responder ignored the window; the gap is reported at the stream.
                Some(tx) => {
                    let _ = tx.try_send(msg);
                }
                // A frame of a call that ended (a late heartbeat, an answer to a probe) is
                // expected; what is no frame at all was never ours to get.
                None => {
                    if msg.status.is_none() && wire::decode::<Frame>(&msg.payload).is_err() {
                        crate::telemetry::malformed(
                            "reply",
                            &format_args!("a message on {} that is no frame", msg.subject),
                        );
                    }
                }
            }
        });
        let subscription = bus.subscribe_handler(inbox.pattern(), None, route).await?;
        let (gone, _) = tokio::sync::broadcast::channel(64);
        let tell = gone.clone();
        let on_gone: MessageHandler =
            Arc::new(
                move |msg: Message| match InstanceId::parse_hex(msg.subject.last_token()) {
                    Ok(instance) => {
                        let _ = tell.send(instance);
                    }
                    Err(e) => crate::telemetry::malformed(
                        "gone",
                        &format_args!("{} names no instance: {e}", msg.subject),
                    ),
                },
            );
        let gone_subscription = bus.subscribe_handler(gone_pattern(), None, on_gone).await?;
        Ok(Self {
            inbox,
            pending,
            next_token: AtomicU64::new(1),
            gone,
            _subscription: subscription,
            _gone_subscription: gone_subscription,
        })
    }
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("transport", &self.inner.bus.transport())
            .finish()
    }
}

impl RpcClient {
    /// A client on `bus`, with its reply inbox subscribed.
    pub async fn new(bus: Arc<dyn Bus>, settings: RpcSettings) -> Result<Self, RpcError> {
        let shared = SharedInbox::subscribe(&bus).await?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                bus,
                settings,
                shared,
            }),
        })
    }

    pub fn settings(&self) -> &RpcSettings {
        &self.inner.settings
    }

    /// Sends `request` to `target` and returns the stream of its responses.
    pub async fn call<Req, Resp>(
        &self,
        target: Target,
        request: &Req,
        options: CallOptions,
    ) -> Result<ResponseStream<Resp>, RpcError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = wire::encode(request).map_err(|e| RpcError::Encode(e.to_string()))?;
        self.call_raw(target, body, options)
            .await
            .map(|raw| ResponseStream {
                raw,
                _resp: PhantomData,
            })
    }

    /// As [`RpcClient::call`] with an already encoded body; responses stay bytes.
    pub async fn call_raw(
        &self,
        target: Target,
        body: Bytes,
        options: CallOptions,
    ) -> Result<RawResponseStream, RpcError> {
        let s = &self.inner.settings;
        let timeout = options.timeout.unwrap_or(s.default_timeout);
        let id = options.request_id.unwrap_or_default();
        let envelope = RequestEnvelope {
            v: wire::PROTOCOL_VERSION,
            id,
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
            heartbeat_ms: s.heartbeat_interval.as_millis().max(1) as u64,
            window: s.stream_window,
            body,
        };
        let payload = wire::encode(&envelope).map_err(|e| RpcError::Encode(e.to_string()))?;
        let shared = &self.inner.shared;
        let token = shared.next_token.fetch_add(1, Ordering::Relaxed);
        let reply = shared.inbox.reply(token);
        let (tx, rx) = mpsc::channel(s.stream_window as usize + FRAME_SLACK);
        shared.pending.insert(token, tx);
        let guard = PendingGuard {
            pending: shared.pending.clone(),
            token,
        };
        // Without a trace id of its own, the responder traces a request by its id (no header
        // to build and send on the hot path).
        let mut headers = Headers::new();
        if let Some(trace) = options.trace_id {
            headers.insert(TRACE_HEADER, trace);
        }
        let subject = target.subject();
        let started = Instant::now();
        self.inner
            .bus
            .publish(Outgoing {
                subject: subject.clone(),
                reply: Some(reply.clone()),
                headers,
                payload,
            })
            .await?;
        Ok(RawResponseStream {
            rx,
            gone: GoneNotices::new(shared.gone.subscribe()),
            _guard: guard,
            bus: self.inner.bus.clone(),
            id,
            target,
            subject,
            started,
            deadline: started + timeout,
            last_heard: started,
            heartbeat_timeout: s.heartbeat_timeout,
            reply,
            probe_after: s.probe_after,
            gap: None,
            last_data: started,
            probes: 0,
            next_seq: 0,
            window: s.stream_window,
            acked: 0,
            responder: None,
            done: false,
        })
    }
}

type GoneReceiver = tokio::sync::broadcast::Receiver<InstanceId>;
type GoneRecv = (
    Result<InstanceId, tokio::sync::broadcast::error::RecvError>,
    GoneReceiver,
);

async fn recv_gone(mut rx: GoneReceiver) -> GoneRecv {
    let result = rx.recv().await;
    (result, rx)
}

/// The instances announced gone, as one receive that stays registered between polls (a
/// fresh receive per poll joined and left the channel's waiter list on every streamed
/// frame). Missed notices (a lagging receiver) are skipped: probes still find a dead
/// responder. Never ready once the notices' sender is gone.
struct GoneNotices {
    next: Option<tokio_util::sync::ReusableBoxFuture<'static, GoneRecv>>,
}

impl GoneNotices {
    fn new(rx: GoneReceiver) -> Self {
        Self {
            next: Some(tokio_util::sync::ReusableBoxFuture::new(recv_gone(rx))),
        }
    }

    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<InstanceId> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let Some(next) = &mut self.next else {
                return std::task::Poll::Pending;
            };
            let (result, rx) = std::task::ready!(next.poll(cx));
            match result {
                Ok(instance) => {
                    next.set(recv_gone(rx));
                    return std::task::Poll::Ready(instance);
                }
                Err(RecvError::Lagged(_)) => next.set(recv_gone(rx)),
                Err(RecvError::Closed) => self.next = None,
            }
        }
    }
}

struct PendingGuard {
    pending: Arc<Pending>,
    token: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.remove(&self.token);
    }
}

/// The responses of one call, as raw bytes. Dropping it before the end cancels the request.
pub struct RawResponseStream {
    rx: mpsc::Receiver<Message>,
    /// Gone notices.
    gone: GoneNotices,
    _guard: PendingGuard,
    bus: Arc<dyn Bus>,
    id: RequestId,
    target: Target,
    subject: Subject,
    started: Instant,
    deadline: Instant,
    last_heard: Instant,
    heartbeat_timeout: Duration,
    /// This call's reply subject (probes carry it, so the bus's "no responders" comes here).
    reply: Subject,
    probe_after: Duration,
    /// The stream's recent gap between data frames (a moving average).
    gap: Option<Duration>,
    /// When the last data frame (or the request) went, and probes sent since.
    last_data: Instant,
    probes: u32,
    next_seq: u64,
    window: u64,
    /// Data frames consumed as last acknowledged to the responder.
    acked: u64,
    responder: Option<InstanceId>,
    done: bool,
}

impl RawResponseStream {
    /// The instance answering, once its first frame arrived.
    pub fn responder(&self) -> Option<InstanceId> {
        self.responder
    }

    /// The next response, `None` after the last, or the error that ended the call.
    pub async fn next(&mut self) -> Option<Result<Bytes, RpcError>> {
        if self.done {
            return None;
        }
        let result = self.next_inner().await;
        if !matches!(result, Some(Ok(_))) {
            self.done = true;
        }
        if let Some(Err(e)) = &result {
            metrics::counter!("dynamo_rpc_client_errors_total", "kind" => e.label()).increment(1);
        }
        result
    }

    /// The instance a probe asks, when known.
    fn probe_target(&self) -> Option<InstanceId> {
        match (self.responder, &self.target) {
            (Some(i), _) | (None, &Target::Instance(_, i)) => Some(i),
            (None, Target::Any(_)) => None,
        }
    }

    /// When to probe next (see [`RpcSettings::probe_after`]).
    fn probe_at(&self) -> Option<Instant> {
        if self.probe_after.is_zero() {
            return None;
        }
        self.probe_target()?;
        let base = self
            .probe_after
            .max(self.gap.map_or(Duration::ZERO, |g| g * PROBE_GAPS));
        let cap = base.max(Duration::from_millis(250));
        // Probe k waits base x (1 + 2 + ... + 2^k), each interval at most `cap`.
        let mut wait = Duration::ZERO;
        for k in 0..=self.probes.min(16) {
            wait += (base * 2u32.pow(k)).min(cap);
        }
        Some(self.last_data + wait)
    }

    /// Asks the responder whether it still has the request (its answer, a heartbeat, or the
    /// bus's "no responders", comes on this call's reply subject).
    async fn probe(&mut self) {
        self.probes += 1;
        let Some(instance) = self.probe_target() else {
            return;
        };
        let subject = self.target.endpoint().control_subject(instance);
        let Ok(payload) = wire::encode(&Control::Ping { id: self.id }) else {
            return;
        };
        let ping = Outgoing {
            subject,
            reply: Some(self.reply.clone()),
            headers: Headers::new(),
            payload,
        };
        if let Err(e) = self.bus.publish(ping).await {
            tracing::debug!(error = %e, "could not probe the responder");
        }
    }

    async fn next_inner(&mut self) -> Option<Result<Bytes, RpcError>> {
        loop {
            let silent_until = self.last_heard + self.heartbeat_timeout;
            let probe_at = self.probe_at();
            let wake = silent_until
                .min(self.deadline)
                .min(probe_at.unwrap_or(silent_until));
            let received = tokio::select! {
                biased;
                m = self.rx.recv() => Ok(m),
                instance = std::future::poll_fn(|cx| self.gone.poll_next(cx)) => {
                    if self.probe_target() == Some(instance) {
                        let now = Instant::now();
                        self.done = true;
                        return Some(Err(RpcError::Disconnected {
                            silent_for: now - self.last_heard,
                        }));
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(wake) => Err(()),
            };
            let msg = match received {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Some(Err(RpcError::Protocol("reply inbox closed".into())));
                }
                Err(()) => {
                    let now = Instant::now();
                    if now < silent_until && now < self.deadline {
                        // A probe is due, not the end.
                        self.probe().await;
                        continue;
                    }
                    self.send_cancel();
                    return Some(Err(if now >= self.deadline {
                        RpcError::DeadlineExceeded {
                            elapsed: now - self.started,
                        }
                    } else {
                        RpcError::Disconnected {
                            silent_for: now - self.last_heard,
                        }
                    }));
                }
            };
            let now = Instant::now();
            if msg.status == Some(Status::NoResponders) {
                if self.responder.is_some() || self.probes > 0 {
                    // A probe found nobody: the responder's subscriptions are gone with it.
                    self.send_cancel();
                    return Some(Err(RpcError::Disconnected {
                        silent_for: now - self.last_heard,
                    }));
                }
                return Some(Err(RpcError::NoResponders {
                    subject: self.subject.to_string(),
                }));
            }
            // Anyone on the bus can publish to this inbox: what does not decode, or comes from
            // another instance than the one answering, is dropped (and counted), and does not
            // count as hearing from the responder.
            let frame: Frame = match wire::decode(&msg.payload) {
                Ok(f) => f,
                Err(e) => {
                    crate::telemetry::malformed("reply", &format_args!("undecodable frame: {e}"));
                    continue;
                }
            };
            // The responder is the instance addressed, or the first to answer.
            match self.probe_target() {
                Some(expected) if expected != frame.from => {
                    crate::telemetry::malformed(
                        "reply",
                        &format_args!("a frame from instance {}, not the responder", frame.from),
                    );
                    continue;
                }
                _ => self.responder = Some(frame.from),
            }
            self.last_heard = now;
            if !matches!(frame.kind, FrameKind::Heartbeat) {
                if frame.seq != self.next_seq {
                    self.send_cancel();
                    return Some(Err(RpcError::Protocol(format!(
                        "frames lost: expected frame {}, got {}",
                        self.next_seq, frame.seq
                    ))));
                }
                self.next_seq += 1;
            }
            match frame.kind {
                FrameKind::Heartbeat => continue,
                FrameKind::Data(b) => {
                    // The pace between frames (the first frame's wait is the prefill).
                    if self.next_seq > 1 {
                        let gap = now - self.last_data;
                        self.gap = Some(match self.gap {
                            // One long gap (a step that carried another request's
                            // prefill) moves the pace by at most a quarter: the pace is
                            // what a probe waits for, and a spike must not stretch it.
                            Some(g) => (g * 3 + gap.min(g * 2)) / 4,
                            None => gap,
                        });
                    }
                    self.last_data = now;
                    self.probes = 0;
                    if self.next_seq - self.acked >= self.window / 2 {
                        self.ack(frame.from).await;
                    }
                    return Some(Ok(b));
                }
                FrameKind::Last(b) => {
                    // The stream ends with this item: the next call returns `None`.
                    self.done = true;
                    return Some(Ok(b));
                }
                FrameKind::End => return None,
                FrameKind::Error(e) => return Some(Err(RpcError::Remote(e))),
            }
        }
    }

    /// Grants the responder another window of frames.
    async fn ack(&mut self, from: InstanceId) {
        self.acked = self.next_seq;
        let msg = Control::Ack {
            id: self.id,
            consumed: self.next_seq,
        };
        let subject = self.target.endpoint().control_subject(from);
        if let Ok(payload) = wire::encode(&msg) {
            if let Err(e) = self.bus.publish(Outgoing::new(subject, payload)).await {
                tracing::debug!(error = %e, "could not acknowledge frames");
            }
        }
    }

    /// Tells the responder to stop. Sent to the answering instance when known, else to every
    /// instance of the endpoint (a cancel that overtook the first frame).
    fn send_cancel(&mut self) {
        self.done = true;
        let ep = self.target.endpoint();
        let subject = match (self.responder, &self.target) {
            (Some(i), _) | (None, &Target::Instance(_, i)) => ep.control_subject(i),
            (None, Target::Any(_)) => ep.control_broadcast_subject(),
        };
        let Ok(payload) = wire::encode(&Control::Cancel { id: self.id }) else {
            return;
        };
        let bus = self.bus.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = bus.publish(Outgoing::new(subject, payload)).await {
                    tracing::debug!(error = %e, "could not send cancellation");
                }
            });
        }
    }
}

impl Drop for RawResponseStream {
    fn drop(&mut self) {
        if !self.done {
            self.send_cancel();
        }
    }
}

/// The typed responses of one call. Dropping it before the end cancels the request.
pub struct ResponseStream<Resp> {
    raw: RawResponseStream,
    _resp: PhantomData<fn() -> Resp>,
}

impl<Resp: DeserializeOwned> ResponseStream<Resp> {
    pub fn responder(&self) -> Option<InstanceId> {
        self.raw.responder()
    }

    /// The next response, `None` after the last, or the error that ended the call.
    pub async fn next(&mut self) -> Option<Result<Resp, RpcError>> {
        match self.raw.next().await? {
            Ok(bytes) => match wire::decode(&bytes) {
                Ok(v) => Some(Ok(v)),
                Err(e) => {
                    self.raw.send_cancel();
                    Some(Err(RpcError::Protocol(format!(
                        "response does not decode as {}: {e}",
                        std::any::type_name::<Resp>()
                    ))))
                }
            },
            Err(e) => Some(Err(e)),
        }
    }

    /// Reads every response until the end; the first error ends it.
    pub async fn collect(mut self) -> Result<Vec<Resp>, RpcError> {
        let mut out = Vec::new();
        while let Some(item) = self.next().await {
            out.push(item?);
        }
        Ok(out)
    }
}
