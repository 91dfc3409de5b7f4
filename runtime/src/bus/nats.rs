//! The NATS transport: a thin mapping of [`Bus`] onto `async-nats`.
//!
//! The client reconnects forever with backoff and re-creates its subscriptions itself, so a
//! nats-server restart costs in-flight messages but no subscription. Status messages from the
//! server (503, no responders) become [`Status::NoResponders`].

use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    check_size, Bus, BusError, Headers, Message, Outgoing, Status, Subscription, Transport,
};
use crate::subject::{QueueGroup, Subject, SubjectPattern};

/// How to reach a nats-server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSettings {
    /// e.g. `nats://127.0.0.1:4222`
    pub url: String,
    /// The name this connection shows in the server's monitoring (`/connz`).
    #[serde(default = "default_client_name")]
    pub client_name: String,
    /// How long the first connection may take before startup fails.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

fn default_client_name() -> String {
    "dynamo".to_string()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl NatsSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_name: default_client_name(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

/// How long a flush waits for its round trip through the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A bus over a NATS connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    /// Counts (re)connections; watchers resynchronize state the server may have lost.
    connections: watch::Receiver<u64>,
}

impl NatsBus {
    /// Connects, failing with [`BusError::Connection`] if the server cannot be reached within
    /// `connect_timeout` (the message names the URL and says to start nats-server).
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        let (connected, connections) = watch::channel(0u64);
        let connected = Arc::new(connected);
        let options = async_nats::ConnectOptions::new()
            .name(&settings.client_name)
            .connection_timeout(settings.connect_timeout)
            .event_callback(move |event| on_event(event, connected.clone()));
        let connect = async_nats::connect_with_options(settings.url.as_str(), options);
        let client = match tokio::time::timeout(settings.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(BusError::Connection(format!(
                    "cannot connect to {}: {e}; is nats-server running? (scripts/install-nats.sh installs it)",
                    settings.url
                )))
            }
            Err(_) => {
                return Err(BusError::Connection(format!(
                    "no nats-server answered at {} within {:?}; start one (scripts/install-nats.sh installs it) or drop --bus to use the embedded bus",
                    settings.url, settings.connect_timeout
                )))
            }
        };
        Ok(Self {
            client,
            connections,
        })
    }

    /// Changes each time the client reconnects to a server.
    pub fn reconnections(&self) -> watch::Receiver<u64> {
        self.connections.clone()
    }

    /// The underlying client, for JetStream (discovery) and benchmarks against raw async-nats.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

async fn on_event(event: async_nats::Event, connected: Arc<watch::Sender<u64>>) {
    match event {
        async_nats::Event::Disconnected => tracing::warn!("nats: disconnected"),
        async_nats::Event::Connected => {
            tracing::info!("nats: connected");
            connected.send_modify(|n| *n += 1);
        }
        async_nats::Event::SlowConsumer(sid) => {
            metrics::counter!("dynamo_bus_dropped_messages_total", "transport" => "nats")
                .increment(1);
            tracing::warn!(sid, "nats: slow consumer, messages dropped")
        }
        other => tracing::debug!(%other, "nats event"),
    }
}

fn to_header_map(h: &Headers) -> Option<HeaderMap> {
    if h.is_empty() {
        return None;
    }
    let mut map = HeaderMap::new();
    for (n, v) in h.iter() {
        map.insert(n, v);
    }
    Some(map)
}

fn from_nats(m: async_nats::Message) -> Message {
    let mut headers = Headers::new();
    if let Some(map) = &m.headers {
        for (name, values) in map.iter() {
            if let Some(v) = values.first() {
                headers.insert(name.to_string(), v.as_str());
            }
        }
    }
    let status = match m.status {
        Some(StatusCode::NO_RESPONDERS) => Some(Status::NoResponders),
        _ => None,
    };
    Message {
        subject: Subject::from_bus(m.subject.to_string()),
        reply: m.reply.map(|r| Subject::from_bus(r.to_string())),
        headers,
        payload: m.payload,
        status,
    }
}

fn op_err(e: impl std::fmt::Display) -> BusError {
    BusError::Operation(e.to_string())
}

#[async_trait]
impl Bus for NatsBus {
    fn transport(&self) -> Transport {
        Transport::Nats
    }

    fn max_payload(&self) -> usize {
        // Cached by the client; `server_info()` would clone the whole INFO on every publish.
        self.client.max_payload()
    }

    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        check_size(&msg, self.max_payload())?;
        let subject = msg.subject.as_str().to_string();
        let headers = to_header_map(&msg.headers);
        let result = match (msg.reply, headers) {
            (None, None) => self.client.publish(subject, msg.payload).await,
            (None, Some(h)) => {
                self.client
                    .publish_with_headers(subject, h, msg.payload)
                    .await
            }
            (Some(r), None) => {
                self.client
                    .publish_with_reply(subject, r.as_str().to_string(), msg.payload)
                    .await
            }
            (Some(r), Some(h)) => {
                self.client
                    .publish_with_reply_and_headers(subject, r.as_str().to_string(), h, msg.payload)
                    .await
            }
        };
        result.map_err(|e| match e.kind() {
            async_nats::client::PublishErrorKind::MaxPayloadExceeded => BusError::PayloadTooLarge {
                size: 0,
                max: self.max_payload(),
            },
            _ => BusError::Connection(e.to_string()),
        })
    }

    async fn subscribe(
        &self,
        pattern: SubjectPattern,
        queue: Option<QueueGroup>,
    ) -> Result<Subscription, BusError> {
        let subject = pattern.as_str().to_string();
        let sub = match queue {
            None => self.client.subscribe(subject).await,
            Some(q) => {
                self.client
                    .queue_subscribe(subject, q.as_str().to_string())
                    .await
            }
        }
        .map_err(op_err)?;
        Ok(Subscription::new(sub.map(from_nats)))
    }

    /// Waits until the server has processed everything sent so far. `async_nats::Client::flush`
    /// only empties the socket; a subscription is not yet visible to other connections then.
    /// So this ends with a round trip through the server on this connection: a message to a
    /// fresh inbox this connection subscribes, which comes back only after everything before it
    /// was processed (whoever else listens, e.g. on `>`).
    async fn sever(&self) -> Result<(), BusError> {
        // Unsubscribes everything and closes the connection; no deregistration happens.
        self.client
            .drain()
            .await
            .map_err(|e| BusError::Connection(e.to_string()))
    }

    async fn flush(&self) -> Result<(), BusError> {
        let err = |e: String| BusError::Connection(format!("flush failed: {e}"));
        let barrier = crate::subject::new_inbox().as_str().to_string();
        let mut echo = self
            .client
            .subscribe(barrier.clone())
            .await
            .map_err(|e| err(e.to_string()))?;
        self.client
            .publish(barrier, Bytes::new())
            .await
            .map_err(|e| err(e.to_string()))?;
        self.client.flush().await.map_err(|e| err(e.to_string()))?;
        match tokio::time::timeout(FLUSH_TIMEOUT, echo.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(err("connection closed".into())),
            Err(_) => Err(err(format!("no round trip within {FLUSH_TIMEOUT:?}"))),
        }
    }
}
