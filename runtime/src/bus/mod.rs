//! The message bus: one trait, two transports with the same semantics.
//!
//! - [`LocalBus`]: in-process, no server. The embedded default.
//! - [`NatsBus`]: `async-nats` against a real nats-server.
//!
//! Semantics both keep (the shared test suite in `runtime/tests/suite/bus.rs` checks them):
//! - subscriptions match with NATS wildcards (`*` one token, `>` the rest);
//! - within a queue group each message goes to exactly one member; plain subscribers all get it;
//! - messages from one publisher arrive at one subscriber in publish order;
//! - a publish with a reply subject to a subject nobody listens on makes the bus send a
//!   [`Status::NoResponders`] message to the reply subject (NATS does this natively);
//! - a payload (plus headers) over [`Bus::max_payload`] is refused with
//!   [`BusError::PayloadTooLarge`] before anything is sent;
//! - a subscriber that stops reading loses messages once its buffer of
//!   [`SUBSCRIPTION_CAPACITY`] fills (NATS calls this a slow consumer); publishers never block on it.
//! - dropping a [`Subscription`] unsubscribes;
//! - after [`Bus::flush`] returns, this connection's subscriptions are visible to every other
//!   publisher.

mod local;
mod nats;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use local::LocalBus;
pub use nats::{NatsBus, NatsSecurity, NatsSettings, NatsTls, Secret};

use crate::subject::{QueueGroup, Subject, SubjectPattern};

/// Messages a subscription buffers before it drops new ones (matches async-nats' default).
pub const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// Which transport a bus uses (a closed set, fit for metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Local,
    Nats,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Local => "local",
            Transport::Nats => "nats",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the transport itself.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The message is larger than the bus accepts; nothing was sent.
    #[error("payload of {size} bytes exceeds the bus limit of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
    /// Nobody subscribes to the subject a request went to.
    #[error("no responders on {subject}")]
    NoResponders { subject: String },
    /// Nobody answered a request in time.
    #[error("no reply on {subject} within {after:?}")]
    Timeout {
        subject: String,
        after: std::time::Duration,
    },
    /// The connection to the bus is gone for good (shut down, or could not connect).
    #[error("bus connection failed: {0}")]
    Connection(String),
    /// The bus refused the operation (e.g. a subject the server rejects).
    #[error("bus operation failed: {0}")]
    Operation(String),
}

/// A status the bus itself attaches to a message (not sent by any user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The request this reply answers reached no subscriber.
    NoResponders,
}

/// Message headers: a short list of name/value pairs (trace ids and the like).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Bytes these headers take on the wire (NATS `NATS/1.0\r\n` + `k: v\r\n` lines + `\r\n`).
    pub fn wire_len(&self) -> usize {
        if self.0.is_empty() {
            return 0;
        }
        12 + self
            .0
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: Subject,
    pub reply: Option<Subject>,
    pub headers: Headers,
    pub payload: Bytes,
}

impl Outgoing {
    pub fn new(subject: Subject, payload: Bytes) -> Self {
        Self {
            subject,
            reply: None,
            headers: Headers::new(),
            payload,
        }
    }

    pub fn with_reply(mut self, reply: Subject) -> Self {
        self.reply = Some(reply);
        self
    }

    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    fn wire_len(&self) -> usize {
        self.payload.len() + self.headers.wire_len()
    }
}

/// A message received from a subscription.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: Subject,
    pub reply: Option<Subject>,
    pub headers: Headers,
    pub payload: Bytes,
    pub status: Option<Status>,
}

/// A live subscription; a stream of messages. Dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
}

impl Subscription {
    pub(crate) fn new(inner: impl Stream<Item = Message> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(inner),
        }
    }

    /// The next message, or `None` once the bus has shut down.
    pub async fn next(&mut self) -> Option<Message> {
        futures::StreamExt::next(&mut self.inner).await
    }
}

impl Stream for Subscription {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}

/// Called with each message of a handler subscription, in order. It must be quick, must not
/// block, and must not use the bus itself (spawn a task to publish): on the in-process bus it
/// runs inline in the publisher's task, under the subscription table's read lock.
pub type MessageHandler = Arc<dyn Fn(Message) + Send + Sync>;

/// A handler subscription; dropping it unsubscribes.
pub struct HandlerSubscription {
    _guard: Box<dyn Send + Sync>,
}

impl HandlerSubscription {
    pub(crate) fn new(guard: impl Send + Sync + 'static) -> Self {
        Self {
            _guard: Box::new(guard),
        }
    }
}

impl fmt::Debug for HandlerSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerSubscription")
    }
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A message bus. Object-safe: roles hold an `Arc<dyn Bus>` and never know which transport.
#[async_trait]
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    fn transport(&self) -> Transport;

    /// The largest payload plus headers one message may carry, in bytes.
    fn max_payload(&self) -> usize;

    /// The root of this connection's reply inboxes (`_INBOX` unless configured).
    fn inbox_prefix(&self) -> &str {
        crate::subject::DEFAULT_INBOX_PREFIX
    }

    /// A counter that changes each time the connection to the server comes back, for a
    /// transport that can lose it (NATS); `None` for one that cannot (in process).
    fn reconnections(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Publishes one message. Fails with [`BusError::PayloadTooLarge`] before sending anything
    /// when the message is over [`Bus::max_payload`].
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError>;

    /// Subscribes to a subject or wildcard pattern, optionally in a queue group.
    async fn subscribe(
        &self,
        pattern: SubjectPattern,
        queue: Option<QueueGroup>,
    ) -> Result<Subscription, BusError>;

    /// Subscribes a handler instead of a stream: for fan-out points (the RPC reply inbox) where
    /// a task of their own would cost every message a task hop. On the in-process bus the
    /// handler runs inline in the publisher; elsewhere in a task that reads the subscription.
    async fn subscribe_handler(
        &self,
        pattern: SubjectPattern,
        queue: Option<QueueGroup>,
        handler: MessageHandler,
    ) -> Result<HandlerSubscription, BusError> {
        let mut sub = self.subscribe(pattern, queue).await?;
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                handler(m);
            }
        });
        Ok(HandlerSubscription::new(AbortOnDrop(task.abort_handle())))
    }

    /// Waits until the bus has processed everything this connection sent so far: after it,
    /// this connection's subscriptions are visible to every other publisher.
    async fn flush(&self) -> Result<(), BusError>;

    /// Drops this process's connection to the bus without a goodbye (fault injection, chaos
    /// tests): its subscriptions vanish at once (callers of its instances get no responders),
    /// nothing is deregistered (its discovery leases run out), and nothing more is sent or
    /// received. The in-process bus has no connection to drop.
    async fn sever(&self) -> Result<(), BusError> {
        Err(BusError::Operation(
            "the in-process bus has no connection to drop; run with --bus nats://...".into(),
        ))
    }

    /// Sends a request and returns the stream of every reply to it, once the first reply came
    /// within `first_reply`; if nobody listens on `subject` the call fails with
    /// [`BusError::NoResponders`], if nobody answers in time with [`BusError::Timeout`]. The
    /// stream never ends by itself: the caller decides when a reply is the last (the streaming
    /// RPC layer in [`crate::rpc`] frames that, with heartbeats and deadlines).
    async fn request(
        &self,
        subject: Subject,
        headers: Headers,
        payload: Bytes,
        first_reply: std::time::Duration,
    ) -> Result<ReplyStream, BusError> {
        let inbox = crate::subject::new_inbox(self.inbox_prefix());
        let mut sub = self.subscribe(SubjectPattern::from(&inbox), None).await?;
        let target = subject.to_string();
        self.publish(Outgoing {
            subject,
            reply: Some(inbox),
            headers,
            payload,
        })
        .await?;
        // Peek at the first reply so "nobody is listening" is an error here, not a stream item.
        let first = tokio::time::timeout(first_reply, sub.next())
            .await
            .map_err(|_| BusError::Timeout {
                subject: target.clone(),
                after: first_reply,
            })?;
        match first {
            None => Err(BusError::Connection("bus shut down".into())),
            Some(m) if m.status == Some(Status::NoResponders) => {
                Err(BusError::NoResponders { subject: target })
            }
            Some(first) => Ok(ReplyStream {
                first: Some(first),
                sub,
            }),
        }
    }
}

/// The replies to one [`Bus::request`].
#[derive(Debug)]
pub struct ReplyStream {
    first: Option<Message>,
    sub: Subscription,
}

impl ReplyStream {
    pub async fn next(&mut self) -> Option<Message> {
        match self.first.take() {
            Some(m) => Some(m),
            None => self.sub.next().await,
        }
    }
}

pub(crate) fn check_size(msg: &Outgoing, max: usize) -> Result<(), BusError> {
    let size = msg.wire_len();
    if size > max {
        return Err(BusError::PayloadTooLarge { size, max });
    }
    Ok(())
}
