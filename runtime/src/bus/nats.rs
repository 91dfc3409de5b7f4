//! The NATS transport: a thin mapping of [`Bus`] onto `async-nats`.
//!
//! The client reconnects forever with backoff and re-creates its subscriptions itself, so a
//! nats-server restart costs in-flight messages but no subscription. Status messages from the
//! server (503, no responders) become [`Status::NoResponders`].

use std::path::PathBuf;
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
    /// e.g. `nats://127.0.0.1:4222`, or `tls://HOST:PORT` to require TLS.
    pub url: String,
    /// The name this connection shows in the server's monitoring (`/connz`).
    #[serde(default = "default_client_name")]
    pub client_name: String,
    /// How long the first connection may take before startup fails.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Credentials and TLS.
    #[serde(default)]
    pub security: NatsSecurity,
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
            security: NatsSecurity::default(),
        }
    }

    pub fn with_security(mut self, security: NatsSecurity) -> Self {
        self.security = security;
        self
    }
}

/// A secret (password, token, seed): serialized as it is, since settings layers pass it on,
/// but never shown by `Debug`, so no settings dump or log line carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How a process proves who it is to nats-server, and how the connection is encrypted
/// (`nats:` in the runtime settings, `DYN_NATS__*` in the environment). At most one way to
/// authenticate: user and password, a token, an NKey seed or a `.creds` file (JWT and seed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSecurity {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    /// An NKey user seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// A decentralized-auth credentials file (`nsc generate creds`).
    pub creds_file: Option<PathBuf>,
    /// Where this process's replies arrive (`_INBOX` when unset). Give each role its own
    /// (`_INBOX.worker`) and the server can let it subscribe to its own replies only (see
    /// config/nats/).
    pub inbox_prefix: Option<String>,
    pub tls: NatsTls,
}

/// TLS towards nats-server. A `tls://` URL, `required`, or any file here makes the client
/// refuse a plain connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTls {
    pub required: bool,
    /// PEM certificates of the authorities that signed the server's certificate (the system
    /// roots are trusted too).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients (mutual TLS).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl NatsTls {
    fn wanted(&self) -> bool {
        self.required || self.ca_file.is_some() || self.cert_file.is_some()
    }
}

impl NatsSecurity {
    /// Refuses contradictory or incomplete settings and files that cannot be read, naming the
    /// key at fault.
    pub fn validate(&self) -> Result<(), String> {
        let ways = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.creds_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return Err(
                "nats: set one of user/password, token, nkey_seed or creds_file, not several"
                    .into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(
                "nats: user and password go together (DYN_NATS__USER and DYN_NATS__PASSWORD)"
                    .into(),
            );
        }
        if self
            .user
            .as_deref()
            .is_some_and(|u| u.trim().is_empty() || u.trim() != u)
        {
            return Err("nats.user: empty or surrounded by whitespace".into());
        }
        for (key, secret) in [
            ("password", &self.password),
            ("token", &self.token),
            ("nkey_seed", &self.nkey_seed),
        ] {
            if let Some(s) = secret {
                if s.0.is_empty() || s.0.trim() != s.0 {
                    return Err(format!("nats.{key}: empty or surrounded by whitespace"));
                }
            }
        }
        if let Some(seed) = &self.nkey_seed {
            if !seed.0.starts_with("SU") {
                return Err(
                    "nats.nkey_seed: not a user seed (it starts with SU; `nk -gen user` makes one)"
                        .into(),
                );
            }
        }
        if let Some(p) = &self.inbox_prefix {
            crate::subject::validate_inbox_prefix(p)
                .map_err(|e| format!("nats.inbox_prefix {p:?}: {e}"))?;
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(
                "nats.tls: cert_file and key_file go together (mutual TLS needs both)".into(),
            );
        }
        for (key, path) in [
            ("creds_file", &self.creds_file),
            ("tls.ca_file", &self.tls.ca_file),
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
        ] {
            if let Some(p) = path {
                if let Err(e) = std::fs::File::open(p) {
                    return Err(format!("nats.{key}: cannot read {}: {e}", p.display()));
                }
            }
        }
        Ok(())
    }

    /// The `DYN_NATS__*` variables of the credentials (not TLS): what a process that connects
    /// as another user must not inherit.
    pub const CREDENTIAL_VARS: [&'static str; 6] = [
        "DYN_NATS__USER",
        "DYN_NATS__PASSWORD",
        "DYN_NATS__TOKEN",
        "DYN_NATS__NKEY_SEED",
        "DYN_NATS__CREDS_FILE",
        "DYN_NATS__INBOX_PREFIX",
    ];

    /// These settings as the `DYN_NATS__*` variables that give them to a child process (a
    /// supervisor's replicas connect as it does).
    pub fn to_env(&self) -> Vec<(String, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let secret = |s: &Option<Secret>| s.as_ref().map(|s| s.0.clone());
        [
            ("USER", self.user.clone()),
            ("PASSWORD", secret(&self.password)),
            ("TOKEN", secret(&self.token)),
            ("NKEY_SEED", secret(&self.nkey_seed)),
            ("CREDS_FILE", path(&self.creds_file)),
            ("INBOX_PREFIX", self.inbox_prefix.clone()),
            (
                "TLS__REQUIRED",
                self.tls.required.then(|| "true".to_string()),
            ),
            ("TLS__CA_FILE", path(&self.tls.ca_file)),
            ("TLS__CERT_FILE", path(&self.tls.cert_file)),
            ("TLS__KEY_FILE", path(&self.tls.key_file)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (format!("DYN_NATS__{k}"), v)))
        .collect()
    }

    /// The root of this connection's reply inboxes.
    pub fn inbox_prefix(&self) -> &str {
        self.inbox_prefix
            .as_deref()
            .unwrap_or(crate::subject::DEFAULT_INBOX_PREFIX)
    }

    /// Whether any credential is set.
    pub fn authenticates(&self) -> bool {
        self.user.is_some()
            || self.token.is_some()
            || self.nkey_seed.is_some()
            || self.creds_file.is_some()
    }

    async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, BusError> {
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.0.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.0.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.0.clone());
        }
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                BusError::Connection(format!(
                    "nats.creds_file {}: {e}; expected a .creds file as `nsc generate creds` writes it",
                    path.display()
                ))
            })?;
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        if let Some(ca) = &self.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls.cert_file, &self.tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls.wanted() {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// What to do about a failed first connection, by what failed.
fn connect_advice(error: &async_nats::ConnectError, security: &NatsSecurity) -> &'static str {
    use async_nats::ConnectErrorKind as K;
    let text = error.to_string();
    // The server's TLS alerts arrive as I/O errors.
    if text.contains("CertificateRequired") && security.tls.cert_file.is_none() {
        return "the server verifies clients (mutual TLS) and this one has no certificate; give one with --nats-cert and --nats-key (nats.tls.cert_file/key_file)";
    }
    let kind = if text.contains("alert") || text.contains("certificate") {
        K::Tls
    } else {
        error.kind()
    };
    match kind {
        K::Authentication | K::AuthorizationViolation if security.authenticates() => {
            "the server refused these credentials; check nats.user/password, token, nkey_seed or creds_file (DYN_NATS__*) against the server's configuration"
        }
        K::Authentication | K::AuthorizationViolation => {
            "the server requires credentials; set nats.user and nats.password, nats.token, nats.nkey_seed or nats.creds_file (or DYN_NATS__*, --nats-creds)"
        }
        K::Tls => {
            "the TLS handshake failed; check nats.tls.ca_file (the authority that signed the server's certificate), that the certificate is valid now and names the host in the URL, and for mutual TLS nats.tls.cert_file/key_file (--nats-ca, --nats-cert, --nats-key)"
        }
        _ => "is nats-server running? (scripts/install-nats.sh installs it)",
    }
}

/// How long a flush waits for its round trip through the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A bus over a NATS connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    inbox_prefix: Arc<str>,
    /// Counts (re)connections; watchers resynchronize state the server may have lost.
    connections: watch::Receiver<u64>,
}

impl NatsBus {
    /// Connects, failing with [`BusError::Connection`] if the server cannot be reached within
    /// `connect_timeout` (the message names the URL and says to start nats-server).
    pub async fn connect(settings: &NatsSettings) -> Result<Self, BusError> {
        let (connected, connections) = watch::channel(0u64);
        let connected = Arc::new(connected);
        settings.security.validate().map_err(BusError::Connection)?;
        let options = async_nats::ConnectOptions::new()
            .name(&settings.client_name)
            .connection_timeout(settings.connect_timeout)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| on_event(event, connected.clone()));
        let options = settings.security.apply(options).await?;
        let connect = async_nats::connect_with_options(settings.url.as_str(), options);
        let client = match tokio::time::timeout(settings.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(BusError::Connection(format!(
                    "cannot connect to {}: {e}; {}",
                    settings.url,
                    connect_advice(&e, &settings.security)
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
            inbox_prefix: settings.security.inbox_prefix().into(),
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

/// The longest wait between two reconnection attempts. async-nats doubles its wait up to 4 s,
/// so a client found a restarted server up to a second after it was back (streams paused
/// 1.2 s over a nats-server restart that took half a second); a quarter of a second bounds
/// that, at four connection attempts a second per process while the server is down.
const RECONNECT_DELAY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// Wait before reconnection attempt `attempts`: at once, then doubling from 2 ms up to
/// [`RECONNECT_DELAY_MAX`], plus up to 50 ms that differ between processes (so a fleet does
/// not reconnect in lockstep).
fn reconnect_delay(attempts: usize) -> std::time::Duration {
    if attempts <= 1 {
        return std::time::Duration::ZERO;
    }
    let exp = (attempts - 1).min(16) as u32;
    let backoff = std::time::Duration::from_millis(2u64.pow(exp)).min(RECONNECT_DELAY_MAX);
    let jitter = std::time::Duration::from_millis(u64::from(std::process::id() % 50));
    backoff + jitter
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
        async_nats::Event::ServerError(async_nats::ServerError::Other(e))
            if e.to_ascii_lowercase().contains("permissions violation") =>
        {
            // A role's credentials do not allow a subject it used: a misconfigured
            // permissions file, or a process doing what its role must not.
            metrics::counter!("dynamo_bus_permission_denied_total", "transport" => "nats")
                .increment(1);
            tracing::warn!(error = %e, "nats: the server denied a publish or subscription; check this role's permissions in the server configuration (config/nats/)")
        }
        async_nats::Event::ServerError(e) => tracing::warn!(error = %e, "nats: server error"),
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

    fn reconnections(&self) -> Option<watch::Receiver<u64>> {
        Some(self.connections.clone())
    }

    fn inbox_prefix(&self) -> &str {
        &self.inbox_prefix
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
        let barrier = crate::subject::new_inbox(self.inbox_prefix())
            .as_str()
            .to_string();
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

#[cfg(test)]
mod reconnect_tests {
    use super::*;

    /// The first attempt is at once, the waits grow, and none is longer than the cap plus the
    /// jitter: a restarted server is found within about a quarter of a second.
    #[test]
    fn reconnection_waits_are_bounded() {
        assert_eq!(reconnect_delay(0), std::time::Duration::ZERO);
        assert_eq!(reconnect_delay(1), std::time::Duration::ZERO);
        let cap = RECONNECT_DELAY_MAX + std::time::Duration::from_millis(50);
        let waits: Vec<_> = (2..200).map(reconnect_delay).collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert!(waits.iter().all(|&d| d < cap), "{waits:?}");
        assert!(waits[0] < std::time::Duration::from_millis(60));
        assert!(waits.last().unwrap() >= &RECONNECT_DELAY_MAX);
    }
}
