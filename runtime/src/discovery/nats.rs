//! Discovery in a JetStream key-value bucket (see the parent module for the lease scheme).
//!
//! Values are JSON [`InstanceInfo`], so `nats kv get dynamo-discovery KEY` shows them readably.
//! The bucket's `max_age` is the lease. If the bucket already exists with another `max_age`,
//! that one wins (all processes must agree) and refreshes follow it, with a warning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, RwLock};

use super::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySettings, DiscoveryWatch, InstanceInfo,
    WatchDedup,
};
use crate::bus::NatsBus;
use crate::subject::{DiscoveryFilter, EndpointId, InstanceId};

/// How long deregistration waits for the store before it leaves the entries to their leases
/// (a shutdown must not wait for a bus that is gone).
const GIVE_UP: Duration = Duration::from_secs(1);

/// Discovery over NATS JetStream KV. Cheap to clone.
#[derive(Clone)]
pub struct NatsDiscovery {
    inner: Arc<Inner>,
}

struct Inner {
    /// The bus's client: whether it is connected now.
    client: async_nats::Client,
    js: jetstream::Context,
    settings: DiscoverySettings,
    store: RwLock<kv::Store>,
    lease: Duration,
    /// What this process registered: refreshed every third of the lease.
    registered: Mutex<HashMap<String, Bytes>>,
    refresher: Mutex<Option<tokio::task::AbortHandle>>,
    reconnections: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for NatsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsDiscovery")
            .field("bucket", &self.inner.settings.bucket)
            .field("lease", &self.inner.lease)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Unavailable(e.to_string())
}

async fn open_bucket(
    js: &jetstream::Context,
    settings: &DiscoverySettings,
) -> Result<kv::Store, DiscoveryError> {
    if let Ok(store) = js.get_key_value(&settings.bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: settings.bucket.clone(),
        description: "dynamo instance registrations; max_age is the lease".to_string(),
        history: 1,
        max_age: settings.lease,
        // Expiry leaves a marker so watchers learn that a lease lapsed.
        limit_markers: Some(settings.lease.max(Duration::from_secs(1))),
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another process created it between our two calls.
        Err(create_err) => js.get_key_value(&settings.bucket).await.map_err(|_| {
            unavailable(format!(
                "cannot create bucket {}: {create_err}",
                settings.bucket
            ))
        }),
    }
}

impl NatsDiscovery {
    /// Opens (or creates) the bucket and starts refreshing this process's registrations.
    pub async fn connect(
        bus: &NatsBus,
        settings: DiscoverySettings,
    ) -> Result<Self, DiscoveryError> {
        let js = jetstream::new(bus.client().clone());
        let store = open_bucket(&js, &settings).await?;
        let lease = match store.status().await {
            Ok(status) if !status.max_age().is_zero() => status.max_age(),
            _ => settings.lease,
        };
        if lease != settings.lease {
            tracing::warn!(
                bucket = %settings.bucket,
                configured = ?settings.lease,
                actual = ?lease,
                "discovery bucket exists with another lease; using the bucket's"
            );
        }
        let inner = Arc::new(Inner {
            client: bus.client().clone(),
            js,
            settings,
            store: RwLock::new(store),
            lease,
            registered: Mutex::new(HashMap::new()),
            refresher: Mutex::new(None),
            reconnections: bus.reconnections(),
        });
        let weak = Arc::downgrade(&inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                inner.refresh().await;
            }
        });
        *inner.refresher.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        Ok(Self { inner })
    }
}

impl Inner {
    /// Whether the bus is connected now (without it, deregistration does not wait at all).
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn snapshot(&self) -> Vec<(String, Bytes)> {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Re-puts every registration; reopens the bucket once if a put fails (e.g. a server
    /// restarted without its store lost the bucket).
    async fn refresh(&self) {
        let entries = self.snapshot();
        if entries.is_empty() {
            return;
        }
        let mut failed = false;
        {
            let store = self.store.read().await;
            for (k, v) in &entries {
                if let Err(e) = store.put(k, v.clone()).await {
                    tracing::warn!(key = %k, error = %e, "discovery refresh failed");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            match open_bucket(&self.js, &self.settings).await {
                Ok(store) => {
                    for (k, v) in &entries {
                        if let Err(e) = store.put(k, v.clone()).await {
                            tracing::warn!(key = %k, error = %e, "discovery re-register failed");
                        }
                    }
                    *self.store.write().await = store;
                }
                Err(e) => tracing::warn!(error = %e, "discovery bucket unavailable"),
            }
        }
    }
}

impl Inner {
    async fn list(&self, filter: &DiscoveryFilter) -> Result<Vec<InstanceInfo>, DiscoveryError> {
        Ok(self.list_keys(filter).await?.0)
    }

    /// The valid entries under `filter`, and every key there (those with unusable values too).
    async fn list_keys(
        &self,
        filter: &DiscoveryFilter,
    ) -> Result<(Vec<InstanceInfo>, std::collections::HashSet<String>), DiscoveryError> {
        let store = self.store.read().await.clone();
        let keys: Vec<String> = store
            .keys()
            .await
            .map_err(unavailable)?
            .try_filter(|k| futures::future::ready(filter.matches(k)))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let values = futures::stream::iter(keys)
            .map(|k| {
                let store = store.clone();
                async move { (k.clone(), store.get(k).await) }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        let mut out = Vec::with_capacity(values.len());
        let mut present = std::collections::HashSet::with_capacity(values.len());
        for (key, value) in values {
            match value {
                Ok(Some(bytes)) => {
                    match entry_info(&key, &bytes) {
                        Ok(info) => out.push(info),
                        Err(e) => crate::telemetry::malformed("discovery", &e),
                    }
                    present.insert(key);
                }
                Ok(None) => {} // expired or deleted between the two calls
                Err(e) => return Err(unavailable(e)),
            }
        }
        out.sort_by_key(|i| i.key());
        Ok((out, present))
    }
}

#[async_trait]
impl Discovery for NatsDiscovery {
    async fn register(&self, info: InstanceInfo) -> Result<(), DiscoveryError> {
        let key = info.key();
        let value = Bytes::from(serde_json::to_vec(&info).map_err(unavailable)?);
        self.inner
            .store
            .read()
            .await
            .put(&key, value.clone())
            .await
            .map_err(unavailable)?;
        self.inner
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, value);
        Ok(())
    }

    async fn deregister(
        &self,
        endpoint: &EndpointId,
        instance: InstanceId,
    ) -> Result<(), DiscoveryError> {
        let key = endpoint.discovery_key(instance);
        self.inner
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if !self.inner.connected() {
            return Err(DiscoveryError::Unavailable(
                "the bus is disconnected; the entry's lease expires it".into(),
            ));
        }
        let store = self.inner.store.read().await.clone();
        match tokio::time::timeout(GIVE_UP, store.delete(&key)).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(DiscoveryError::Unavailable(format!(
                "no answer from the store within {GIVE_UP:?}; the entry's lease expires it"
            ))),
        }
    }

    async fn list(&self, filter: &DiscoveryFilter) -> Result<Vec<InstanceInfo>, DiscoveryError> {
        self.inner.list(filter).await
    }

    async fn watch(&self, filter: DiscoveryFilter) -> Result<DiscoveryWatch, DiscoveryError> {
        // Fail early if the bucket cannot be watched at all; later failures are retried.
        let first = self
            .inner
            .store
            .read()
            .await
            .watch(filter.as_str())
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_watch(Arc::downgrade(&self.inner), filter, first, tx));
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        Ok(DiscoveryWatch::new(stream))
    }

    fn lease(&self) -> Duration {
        self.inner.lease
    }

    async fn close(&self) {
        if let Some(task) = self
            .inner
            .refresher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        let keys: Vec<String> = std::mem::take(
            &mut *self
                .inner
                .registered
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
        .into_keys()
        .collect();
        if !self.inner.connected() {
            tracing::warn!(
                "the bus is disconnected; leaving this process's discovery entries to their leases"
            );
            return;
        }
        let store = self.inner.store.read().await.clone();
        // Without the bus (nats-server gone) this must not hold the process: the leases
        // expire the entries anyway.
        let deleted = tokio::time::timeout(GIVE_UP, async {
            for key in keys {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(%key, error = %e, "could not deregister on close");
                }
            }
        })
        .await;
        if deleted.is_err() {
            tracing::warn!("the discovery store did not answer within {GIVE_UP:?}; leaving the entries to their leases");
        }
    }
}

/// Feeds one watcher: follows the bucket's changes and, whenever the watch breaks or the
/// client reconnects (a restarted server may have lost the watch, or the whole bucket),
/// reconciles against a fresh listing (missed leaves and joins are reported) and watches anew.
async fn run_watch(
    inner: Weak<Inner>,
    filter: DiscoveryFilter,
    mut watch: kv::Watch,
    tx: mpsc::UnboundedSender<DiscoveryEvent>,
) {
    let mut dedup = WatchDedup::default();
    let mut reconnections = match inner.upgrade() {
        Some(i) => i.reconnections.clone(),
        None => return,
    };
    reconnections.mark_unchanged();
    let send = |event: Option<DiscoveryEvent>| match event {
        Some(e) => tx.send(e).is_ok(),
        None => true,
    };
    loop {
        // Follow the watch until it breaks or the connection is re-established.
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                changed = reconnections.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => {
                        if !send(apply(&mut dedup, entry)) {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "discovery watch broke; re-watching");
                        break;
                    }
                    None => break,
                },
            }
        }
        // Re-watch, then reconcile what was missed in between.
        let mut backoff = Duration::from_millis(100);
        loop {
            if tx.is_closed() {
                return;
            }
            let Some(i) = inner.upgrade() else { return };
            let reopened = async {
                // A server that lost its store lost the bucket too: whoever comes first makes it.
                let store = open_bucket(&i.js, &i.settings).await?;
                *i.store.write().await = store.clone();
                let w = store.watch(filter.as_str()).await.map_err(unavailable)?;
                let now = i.list_keys(&filter).await?;
                Ok::<_, DiscoveryError>((w, now))
            }
            .await;
            drop(i);
            match reopened {
                Ok((w, (now, present))) => {
                    watch = w;
                    // A key whose value is junk (overwritten by someone on the bus) is still
                    // there: what was known of it stands until its owner's next refresh
                    // puts it back, as a watcher that saw the junk put keeps it too.
                    for key in dedup.keys() {
                        if !present.contains(&key) && !send(dedup.remove(&key, false)) {
                            return;
                        }
                    }
                    for info in now {
                        if !send(dedup.put(info)) {
                            return;
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "discovery re-watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The instance a bucket entry announces. An entry must describe the key it is stored under:
/// one that names another instance would never be removed (its key's lease marker or delete
/// names the key), so it is refused like one that does not parse.
fn entry_info(key: &str, value: &[u8]) -> Result<InstanceInfo, String> {
    let info = serde_json::from_slice::<InstanceInfo>(value)
        .map_err(|e| format!("discovery entry {key}: {e}"))?;
    if info.key() != key {
        return Err(format!(
            "discovery entry {key} describes {} instead",
            info.key()
        ));
    }
    Ok(info)
}

/// Turns one bucket entry into the event it means, if any.
fn apply(dedup: &mut WatchDedup, entry: kv::Entry) -> Option<DiscoveryEvent> {
    match entry.operation {
        kv::Operation::Put => match entry_info(&entry.key, &entry.value) {
            Ok(info) => dedup.put(info),
            Err(e) => {
                crate::telemetry::malformed("discovery", &e);
                None
            }
        },
        // A delete is a deregistration; a purge, the lease's expiry marker (or an operator).
        kv::Operation::Delete => dedup.remove(&entry.key, true),
        kv::Operation::Purge => dedup.remove(&entry.key, false),
    }
}
