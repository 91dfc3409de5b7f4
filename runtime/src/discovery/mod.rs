//! Discovery: which instances serve which endpoints, with leases.
//!
//! An instance registers an [`InstanceInfo`] under the key `{ns}.{component}.{endpoint}.{instance}`;
//! watchers see it join, and see it leave when it deregisters or when its lease lapses.
//! - [`LocalDiscovery`]: in memory; entries live until deregistered (the process is the lease).
//! - [`NatsDiscovery`]: two JetStream key-value buckets. Entries sit in `{bucket}` without an
//!   expiry, each naming its process's lease; the leases sit in `{bucket}-leases`, whose
//!   `max_age` is the lease. A process refreshes its one lease every third of the lease, however
//!   many instances it hosts (a fleet's idle discovery traffic grows with its processes, not its
//!   workers), and recreates the buckets if a server restart lost them, so reconnects never
//!   drop registrations. A process killed with `kill -9` stops refreshing; the server expires
//!   its lease and, with limit markers on, tells watchers, who see its instances leave (and
//!   remove the entries it left behind). An entry is listed only while its lease is.
//!
//! Watch streams start with a `Joined` for each instance present, then report changes; a
//! lease refresh of an unchanged entry is not reported. On NATS a watch outlives server
//! restarts: when its stream breaks or the client reconnects it watches anew and reconciles
//! against a fresh listing, reporting the joins and leaves it missed meanwhile.

mod local;
mod nats;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use serde::{Deserialize, Serialize};

pub use local::LocalDiscovery;
pub use nats::NatsDiscovery;

use crate::subject::{DiscoveryFilter, EndpointId, InstanceId};

/// Discovery settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoverySettings {
    /// How long an instance stays listed after its process stops refreshing it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// The JetStream key-value bucket that holds registrations (NATS only); the processes'
    /// leases are in `{bucket}-leases`.
    pub bucket: String,
}

impl Default for DiscoverySettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(5),
            bucket: "dynamo-discovery".to_string(),
        }
    }
}

impl DiscoverySettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.lease < Duration::from_secs(1) {
            return Err(format!(
                "discovery.lease is {:?}; it must be at least 1s (NATS limit markers need whole seconds)",
                self.lease
            ));
        }
        if self.bucket.is_empty()
            || !self
                .bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "discovery.bucket {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                self.bucket
            ));
        }
        Ok(())
    }
}

/// One registered instance of an endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub endpoint: EndpointId,
    pub instance: InstanceId,
    /// Free-form data the instance publishes about itself (a model card, capacity, ...).
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// The process serving it: a supervisor that sees the process die can say so at once
    /// (absent in entries written by older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessId>,
    /// On NATS, the key of the process's lease (in the `{bucket}-leases` bucket) that keeps
    /// this entry listed; set by discovery when it registers the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// A process: its host name and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessId {
    pub host: String,
    pub pid: u32,
}

impl ProcessId {
    /// This process.
    pub fn this() -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
        }
    }

    /// A process of this host.
    pub fn local(pid: u32) -> Self {
        Self {
            host: host_name(),
            pid,
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl InstanceInfo {
    pub fn key(&self) -> String {
        self.endpoint.discovery_key(self.instance)
    }
}

/// A change seen by a watcher.
#[derive(Debug, Clone, PartialEq)]
pub enum DiscoveryEvent {
    /// A new instance, or one whose metadata changed.
    Joined(InstanceInfo),
    /// An instance deregistered or its lease lapsed.
    Left {
        endpoint: EndpointId,
        instance: InstanceId,
        /// It deregistered itself (it meant to leave); `false`: its lease lapsed, or it was
        /// gone when the watch resynchronized (a crash, a lost host, a restart under way).
        deregistered: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The discovery store could not be reached or refused the operation; retry later.
    #[error("discovery store unavailable: {0}")]
    Unavailable(String),
    /// A stored entry does not parse.
    #[error("malformed discovery entry {key}: {reason}")]
    Malformed { key: String, reason: String },
}

/// A stream of discovery events. Ends when discovery shuts down.
pub struct DiscoveryWatch {
    inner: Pin<Box<dyn Stream<Item = DiscoveryEvent> + Send>>,
}

impl DiscoveryWatch {
    pub(crate) fn new(inner: impl Stream<Item = DiscoveryEvent> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(inner),
        }
    }

    pub async fn next(&mut self) -> Option<DiscoveryEvent> {
        futures::StreamExt::next(&mut self.inner).await
    }
}

impl fmt::Debug for DiscoveryWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DiscoveryWatch")
    }
}

/// Where instances register and are found.
#[async_trait]
pub trait Discovery: Send + Sync + fmt::Debug + 'static {
    /// Registers (or updates) an instance; it stays until [`Discovery::deregister`] or, on NATS,
    /// until this process stops refreshing it for a lease.
    async fn register(&self, info: InstanceInfo) -> Result<(), DiscoveryError>;

    async fn deregister(
        &self,
        endpoint: &EndpointId,
        instance: InstanceId,
    ) -> Result<(), DiscoveryError>;

    /// The instances registered now whose keys match `filter`.
    async fn list(&self, filter: &DiscoveryFilter) -> Result<Vec<InstanceInfo>, DiscoveryError>;

    /// Present instances as `Joined`, then every change, for keys matching `filter`.
    async fn watch(&self, filter: DiscoveryFilter) -> Result<DiscoveryWatch, DiscoveryError>;

    /// The lease: how long a dead process's instances stay listed at most.
    fn lease(&self) -> Duration;

    /// Stops refreshing and removes every registration of this process.
    async fn close(&self);
}

/// Turns raw puts/removals into `Joined`/`Left`, dropping repeats.
#[derive(Default)]
pub(crate) struct WatchDedup {
    known: HashMap<String, InstanceInfo>,
}

impl WatchDedup {
    pub fn put(&mut self, info: InstanceInfo) -> Option<DiscoveryEvent> {
        let key = info.key();
        if self.known.get(&key) == Some(&info) {
            return None;
        }
        self.known.insert(key, info.clone());
        Some(DiscoveryEvent::Joined(info))
    }

    /// The keys currently known.
    pub fn keys(&self) -> Vec<String> {
        self.known.keys().cloned().collect()
    }

    pub fn remove(&mut self, key: &str, deregistered: bool) -> Option<DiscoveryEvent> {
        let info = self.known.remove(key)?;
        Some(DiscoveryEvent::Left {
            endpoint: info.endpoint,
            instance: info.instance,
            deregistered,
        })
    }
}
