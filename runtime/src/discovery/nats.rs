//! Discovery in two JetStream key-value buckets (the scheme: the parent module).
//!
//! - `{bucket}` holds one entry per instance under `{ns}.{component}.{endpoint}.{instance}`:
//!   its JSON [`InstanceInfo`] (`nats kv get dynamo-discovery KEY` shows it readably), which
//!   names its process's lease. Entries do not expire.
//! - `{bucket}-leases` holds one entry per process under a random key: its [`ProcessId`].
//!   The bucket's `max_age` is the lease, with limit markers so that watchers learn of a lapse.
//!   If the bucket already exists with another `max_age`, that one wins (all processes must
//!   agree) and refreshes follow it, with a warning.
//!
//! An entry is listed while its lease is. A process puts its lease before its first entry,
//! so an entry read before its lease is found missing has outlived its process: whoever
//! sees that (a watcher when the lease lapses, a listing) purges the entry, guarded by the
//! revision it read, so an entry put back meanwhile stays. The two buckets are two streams:
//! a watcher may see an entry before its lease, and holds it until the lease arrives.
//!
//! A refresh is a compare-and-set of the lease on its last revision. If the lease lapsed
//! meanwhile (a process stalled longer than the lease), the set fails and the process
//! registers its lease and entries again. Each registering process also watches the entries
//! and puts back any of its own that another client overwrote or removed (junk on the bus, or
//! a watcher's clean-up of a lapse the process has since recovered from).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{mpsc, RwLock};

use super::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySettings, DiscoveryWatch, InstanceInfo,
    ProcessId, WatchDedup,
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

/// The two buckets.
#[derive(Clone)]
struct Stores {
    entries: kv::Store,
    leases: kv::Store,
}

struct Inner {
    /// The bus's client: whether it is connected now.
    client: async_nats::Client,
    js: jetstream::Context,
    settings: DiscoverySettings,
    stores: RwLock<Stores>,
    lease: Duration,
    /// This process's lease: its key and value.
    lease_key: String,
    lease_value: Bytes,
    /// The lease's last revision once put (`None`: not yet put, or lost).
    lease_revision: tokio::sync::Mutex<Option<u64>>,
    /// What this process registered: kept listed by the lease, put back if someone else
    /// changes it.
    registered: Mutex<HashMap<String, Bytes>>,
    /// The refresher, and the task that puts back this process's entries.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    healing: AtomicBool,
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

/// The bucket of leases for entries in `bucket`.
fn leases_bucket(bucket: &str) -> String {
    format!("{bucket}-leases")
}

async fn open_or_create(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, DiscoveryError> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another process created it between our two calls.
        Err(create_err) => js
            .get_key_value(&bucket)
            .await
            .map_err(|_| unavailable(format!("cannot create bucket {bucket}: {create_err}"))),
    }
}

async fn open_buckets(
    js: &jetstream::Context,
    settings: &DiscoverySettings,
) -> Result<Stores, DiscoveryError> {
    let bucket = &settings.bucket;
    let entries = open_or_create(
        js,
        kv::Config {
            bucket: bucket.clone(),
            description: "dynamo instance registrations, listed while their process's lease is"
                .to_string(),
            history: 1,
            ..Default::default()
        },
    )
    .await?;
    // A bucket whose entries expire was made by a build that refreshed every entry: entries
    // of this one would vanish after the lease.
    if let Ok(status) = entries.status().await {
        if !status.max_age().is_zero() {
            return Err(unavailable(format!(
                "discovery bucket {bucket} expires its entries after {:?}: an older dynamo made it. \
                 Delete it (`nats kv del {bucket}`; running processes register again) or set \
                 another discovery.bucket",
                status.max_age()
            )));
        }
    }
    let leases = open_or_create(
        js,
        kv::Config {
            bucket: leases_bucket(bucket),
            description: format!("dynamo process leases of {bucket}; max_age is the lease"),
            history: 1,
            max_age: settings.lease,
            // Expiry leaves a marker so watchers learn that a lease lapsed.
            limit_markers: Some(settings.lease.max(Duration::from_secs(1))),
            ..Default::default()
        },
    )
    .await?;
    Ok(Stores { entries, leases })
}

impl NatsDiscovery {
    /// Opens (or creates) the buckets and starts refreshing this process's lease.
    pub async fn connect(
        bus: &NatsBus,
        settings: DiscoverySettings,
    ) -> Result<Self, DiscoveryError> {
        let js = jetstream::new(bus.client().clone());
        let stores = open_buckets(&js, &settings).await?;
        let lease = match stores.leases.status().await {
            Ok(status) if !status.max_age().is_zero() => status.max_age(),
            _ => settings.lease,
        };
        if lease != settings.lease {
            tracing::warn!(
                bucket = %leases_bucket(&settings.bucket),
                configured = ?settings.lease,
                actual = ?lease,
                "discovery lease bucket exists with another lease; using the bucket's"
            );
        }
        let lease_value = Bytes::from(serde_json::to_vec(&ProcessId::this()).map_err(unavailable)?);
        let inner = Arc::new(Inner {
            client: bus.client().clone(),
            js,
            settings,
            stores: RwLock::new(stores),
            lease,
            lease_key: format!("{:016x}", rand::random::<u64>()),
            lease_value,
            lease_revision: tokio::sync::Mutex::new(None),
            registered: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            healing: AtomicBool::new(false),
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
        inner.tasks().push(task.abort_handle());
        Ok(Self { inner })
    }
}

impl Inner {
    /// Whether the bus is connected now (without it, deregistration does not wait at all).
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn registered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bytes>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Vec<(String, Bytes)> {
        (self.registered().iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Puts the lease if it is not there yet.
    async fn ensure_lease(&self) -> Result<(), DiscoveryError> {
        let mut revision = self.lease_revision.lock().await;
        if revision.is_none() {
            let stores = self.stores.read().await.clone();
            let put = stores.leases.put(&self.lease_key, self.lease_value.clone());
            *revision = Some(put.await.map_err(unavailable)?);
        }
        Ok(())
    }

    /// Renews the lease. If it lapsed (this process stalled for a lease) or the server lost
    /// it, reopens the buckets (a restarted server may have lost them) and registers the
    /// lease and every entry again.
    async fn refresh(&self) {
        let mut revision = self.lease_revision.lock().await;
        if let Some(last) = *revision {
            let stores = self.stores.read().await.clone();
            match (stores.leases)
                .update(&self.lease_key, self.lease_value.clone(), last)
                .await
            {
                Ok(next) => {
                    *revision = Some(next);
                    return;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "discovery lease lapsed or lost; registering this process's instances again"
                ),
            }
        }
        *revision = None;
        let entries = self.snapshot();
        if entries.is_empty() {
            return;
        }
        let stores = match open_buckets(&self.js, &self.settings).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "discovery buckets unavailable");
                return;
            }
        };
        *self.stores.write().await = stores.clone();
        match stores
            .leases
            .put(&self.lease_key, self.lease_value.clone())
            .await
        {
            Ok(r) => *revision = Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "discovery lease could not be put");
                return;
            }
        }
        for (k, v) in &entries {
            if let Err(e) = stores.entries.put(k, v.clone()).await {
                tracing::warn!(key = %k, error = %e, "discovery re-register failed");
            }
        }
    }

    /// Starts (once) the task that puts back this process's entries when someone else
    /// overwrites or removes them.
    fn start_healing(self: &Arc<Self>) {
        if self.healing.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(heal(weak));
        self.tasks().push(task.abort_handle());
    }
}

/// Follows every entry and puts back those of this process that changed under it.
async fn heal(inner: Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        // From each key's last value: whatever changed while this was not watching (before
        // it started, or while a server restarted) is seen too.
        let watch = i.stores.read().await.entries.watch_with_history(">").await;
        drop(i);
        if let Ok(mut watch) = watch {
            while let Some(entry) = watch.next().await {
                // A broken watch (junk on the consumer's inbox, a server restart) is
                // followed anew, from each key's last value.
                let Ok(entry) = entry else { break };
                let Some(i) = inner.upgrade() else { return };
                let Some(want) = i.registered().get(&entry.key).cloned() else {
                    continue;
                };
                if entry.operation == kv::Operation::Put && entry.value == want {
                    continue;
                }
                tracing::warn!(key = %entry.key, "discovery entry changed by another client; putting it back");
                let stores = i.stores.read().await.clone();
                if let Err(e) = stores.entries.put(&entry.key, want).await {
                    tracing::debug!(key = %entry.key, error = %e, "could not put a discovery entry back");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether `info`'s lease is among the live `leases`.
fn leased(info: &InstanceInfo, leases: &HashSet<String>) -> bool {
    info.lease.as_ref().is_some_and(|l| leases.contains(l))
}

/// The instances and leases found by a listing.
struct Listing {
    /// The entries' bucket, as read.
    store: kv::Store,
    /// Valid entries under the filter, with their revisions.
    entries: Vec<(InstanceInfo, u64)>,
    /// Live leases.
    leases: HashSet<String>,
}

impl Listing {
    /// Purges the entries whose lease was gone when listed after them: left by a dead process.
    fn purge_orphans(&self) {
        let orphans = (self.entries.iter())
            .filter(|(i, _)| !leased(i, &self.leases))
            .map(|(i, r)| (i.key(), *r))
            .collect();
        purge_orphans(self.store.clone(), orphans);
    }

    fn live(self) -> Vec<InstanceInfo> {
        let leases = self.leases;
        let mut out: Vec<InstanceInfo> = (self.entries.into_iter())
            .map(|(i, _)| i)
            .filter(|i| leased(i, &leases))
            .collect();
        out.sort_by_key(|i| i.key());
        out
    }
}

/// Purges entries whose lease is gone, each only if still at the revision seen (an entry put
/// back meanwhile stays).
fn purge_orphans(store: kv::Store, orphans: Vec<(String, u64)>) {
    if orphans.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for (key, revision) in orphans {
            // Another watcher may have purged it first: nothing to report.
            let _ = store.purge_expect_revision(&key, Some(revision)).await;
        }
    });
}

impl Inner {
    async fn list(&self, filter: &DiscoveryFilter) -> Result<Vec<InstanceInfo>, DiscoveryError> {
        let listing = self.listing(filter).await?;
        listing.purge_orphans();
        Ok(listing.live())
    }

    /// The valid entries under `filter`, then the live leases (in that order: an entry
    /// listed before its lease was found missing has outlived its process).
    async fn listing(&self, filter: &DiscoveryFilter) -> Result<Listing, DiscoveryError> {
        let stores = self.stores.read().await.clone();
        let keys: Vec<String> = (stores.entries.keys().await.map_err(unavailable)?)
            .try_filter(|k| futures::future::ready(filter.matches(k)))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let values = futures::stream::iter(keys)
            .map(|k| {
                let store = stores.entries.clone();
                async move { (k.clone(), store.entry(k).await) }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        let mut entries = Vec::with_capacity(values.len());
        for (key, value) in values {
            match value {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    match entry_info(&key, &e.value) {
                        Ok(info) => entries.push((info, e.revision)),
                        Err(e) => crate::telemetry::malformed("discovery", &e),
                    }
                }
                Ok(_) => {} // removed between the two calls
                Err(e) => return Err(unavailable(e)),
            }
        }
        let leases = (stores.leases.keys().await.map_err(unavailable)?)
            .try_collect()
            .await
            .map_err(unavailable)?;
        Ok(Listing {
            store: stores.entries,
            entries,
            leases,
        })
    }
}

#[async_trait]
impl Discovery for NatsDiscovery {
    async fn register(&self, info: InstanceInfo) -> Result<(), DiscoveryError> {
        let info = InstanceInfo {
            lease: Some(self.inner.lease_key.clone()),
            ..info
        };
        let key = info.key();
        let value = Bytes::from(serde_json::to_vec(&info).map_err(unavailable)?);
        self.inner.ensure_lease().await?;
        // Recorded first: the healing task must not put back an older value of an update.
        let before = self.inner.registered().insert(key.clone(), value.clone());
        let stores = self.inner.stores.read().await.clone();
        if let Err(e) = stores.entries.put(&key, value).await {
            let mut registered = self.inner.registered();
            match before {
                Some(v) => registered.insert(key, v),
                None => registered.remove(&key),
            };
            return Err(unavailable(e));
        }
        self.inner.start_healing();
        Ok(())
    }

    async fn deregister(
        &self,
        endpoint: &EndpointId,
        instance: InstanceId,
    ) -> Result<(), DiscoveryError> {
        let key = endpoint.discovery_key(instance);
        self.inner.registered().remove(&key);
        if !self.inner.connected() {
            return Err(DiscoveryError::Unavailable(
                "the bus is disconnected; the entry leaves with this process's lease".into(),
            ));
        }
        let store = self.inner.stores.read().await.entries.clone();
        match tokio::time::timeout(GIVE_UP, store.delete(&key)).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(DiscoveryError::Unavailable(format!(
                "no answer from the store within {GIVE_UP:?}; the entry leaves with this process's lease"
            ))),
        }
    }

    async fn list(&self, filter: &DiscoveryFilter) -> Result<Vec<InstanceInfo>, DiscoveryError> {
        self.inner.list(filter).await
    }

    async fn watch(&self, filter: DiscoveryFilter) -> Result<DiscoveryWatch, DiscoveryError> {
        // Fail early if the buckets cannot be watched at all; later failures are retried.
        let stores = self.inner.stores.read().await.clone();
        // Both from each key's last value: the present instances and leases, then changes.
        let entries =
            (stores.entries.watch_with_history(filter.as_str()).await).map_err(unavailable)?;
        let leases = (stores.leases.watch_with_history(">").await).map_err(unavailable)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_watch(
            Arc::downgrade(&self.inner),
            filter,
            (entries, leases),
            tx,
        ));
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        Ok(DiscoveryWatch::new(stream))
    }

    fn lease(&self) -> Duration {
        self.inner.lease
    }

    async fn close(&self) {
        for task in self.inner.tasks().drain(..) {
            task.abort();
        }
        let keys: Vec<String> = std::mem::take(&mut *self.inner.registered())
            .into_keys()
            .collect();
        if !self.inner.connected() {
            tracing::warn!(
                "the bus is disconnected; leaving this process's discovery entries to its lease"
            );
            return;
        }
        let stores = self.inner.stores.read().await.clone();
        let lease = self.inner.lease_revision.lock().await.take();
        // Without the bus (nats-server gone) this must not hold the process: the lease
        // lapses anyway, and its entries leave with it.
        let deleted = tokio::time::timeout(GIVE_UP, async {
            for key in keys {
                if let Err(e) = stores.entries.delete(&key).await {
                    tracing::warn!(%key, error = %e, "could not deregister on close");
                }
            }
            if lease.is_some() {
                if let Err(e) = stores.leases.delete(&self.inner.lease_key).await {
                    tracing::warn!(error = %e, "could not remove the discovery lease on close");
                }
            }
        })
        .await;
        if deleted.is_err() {
            tracing::warn!("the discovery store did not answer within {GIVE_UP:?}; leaving the entries to the lease");
        }
    }
}

/// What a watcher knows: the entries under its filter, the live leases, and what it reported
/// (entries whose lease is live).
#[derive(Default)]
struct View {
    entries: HashMap<String, (InstanceInfo, u64)>,
    by_lease: HashMap<String, HashSet<String>>,
    leases: HashSet<String>,
    dedup: WatchDedup,
}

impl View {
    fn unlink(&mut self, key: &str) -> Option<(InstanceInfo, u64)> {
        let (info, revision) = self.entries.remove(key)?;
        if let Some(lease) = &info.lease {
            if let Some(keys) = self.by_lease.get_mut(lease) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_lease.remove(lease);
                }
            }
        }
        Some((info, revision))
    }

    fn put(&mut self, info: InstanceInfo, revision: u64) -> Option<DiscoveryEvent> {
        let key = info.key();
        self.unlink(&key);
        let lease = info.lease.clone()?;
        self.by_lease
            .entry(lease.clone())
            .or_default()
            .insert(key.clone());
        self.entries.insert(key.clone(), (info.clone(), revision));
        if self.leases.contains(&lease) {
            self.dedup.put(info)
        } else {
            // Held until its lease shows up.
            self.dedup.remove(&key, false)
        }
    }

    fn remove(&mut self, key: &str, deregistered: bool) -> Option<DiscoveryEvent> {
        self.unlink(key);
        self.dedup.remove(key, deregistered)
    }

    fn lease_up(&mut self, lease: &str) -> Vec<DiscoveryEvent> {
        if !self.leases.insert(lease.to_string()) {
            return Vec::new();
        }
        let keys = self.by_lease.get(lease).cloned().unwrap_or_default();
        (keys.iter())
            .filter_map(|k| self.entries.get(k).cloned())
            .filter_map(|(info, _)| self.dedup.put(info))
            .collect()
    }

    /// The lease is gone: its entries leave, and are returned (with their revisions) for
    /// purging.
    fn lease_down(
        &mut self,
        lease: &str,
        deregistered: bool,
    ) -> (Vec<DiscoveryEvent>, Vec<(String, u64)>) {
        self.leases.remove(lease);
        let keys = self.by_lease.get(lease).cloned().unwrap_or_default();
        let events = (keys.iter())
            .filter_map(|k| self.dedup.remove(k, deregistered))
            .collect();
        let orphans = (keys.into_iter())
            .filter_map(|k| self.entries.get(&k).map(|(_, r)| (k, *r)))
            .collect();
        (events, orphans)
    }

    /// Replaces what is known by a fresh listing; returns the changes to report.
    fn reset(&mut self, listing: Listing) -> Vec<DiscoveryEvent> {
        self.entries.clear();
        self.by_lease.clear();
        self.leases = listing.leases;
        let mut events = Vec::new();
        let mut live = HashSet::new();
        for (info, revision) in listing.entries {
            if leased(&info, &self.leases) {
                live.insert(info.key());
            }
            // Not reported yet: the leaves come first.
            let key = info.key();
            let lease = info.lease.clone().unwrap_or_default();
            self.by_lease.entry(lease).or_default().insert(key.clone());
            self.entries.insert(key, (info, revision));
        }
        for key in self.dedup.keys() {
            if !live.contains(&key) {
                events.extend(self.dedup.remove(&key, false));
            }
        }
        for key in live {
            let info = self.entries[&key].0.clone();
            events.extend(self.dedup.put(info));
        }
        events
    }
}

/// Feeds one watcher: follows both buckets' changes and, whenever a watch breaks or the client
/// reconnects (a restarted server may have lost the watches, or the buckets), reconciles
/// against a fresh listing (missed leaves and joins are reported) and watches anew.
async fn run_watch(
    inner: Weak<Inner>,
    filter: DiscoveryFilter,
    (mut entries, mut leases): (kv::Watch, kv::Watch),
    tx: mpsc::UnboundedSender<DiscoveryEvent>,
) {
    let mut view = View::default();
    let mut reconnections = match inner.upgrade() {
        Some(i) => i.reconnections.clone(),
        None => return,
    };
    reconnections.mark_unchanged();
    let send = |events: Vec<DiscoveryEvent>| events.into_iter().all(|e| tx.send(e).is_ok());
    loop {
        // Follow the watches until one breaks or the connection is re-established.
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                changed = reconnections.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => {
                        if !send(apply(&mut view, entry).into_iter().collect()) {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "discovery watch broke; re-watching");
                        break;
                    }
                    None => break,
                },
                entry = leases.next() => match entry {
                    Some(Ok(entry)) => {
                        let events = match entry.operation {
                            kv::Operation::Put => view.lease_up(&entry.key),
                            // A delete: the process closed; a purge: the lease lapsed.
                            op => {
                                let (events, orphans) =
                                    view.lease_down(&entry.key, op == kv::Operation::Delete);
                                if let Some(i) = inner.upgrade() {
                                    let store = i.stores.read().await.entries.clone();
                                    purge_orphans(store, orphans);
                                }
                                events
                            }
                        };
                        if !send(events) {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "discovery lease watch broke; re-watching");
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
                // A server that lost its store lost the buckets too: whoever comes first makes them.
                let stores = open_buckets(&i.js, &i.settings).await?;
                *i.stores.write().await = stores.clone();
                let e = stores.entries.watch_with_history(filter.as_str()).await;
                let l = stores.leases.watch_with_history(">").await;
                let now = i.listing(&filter).await?;
                Ok::<_, DiscoveryError>((e.map_err(unavailable)?, l.map_err(unavailable)?, now))
            }
            .await;
            drop(i);
            match reopened {
                Ok((e, l, now)) => {
                    entries = e;
                    leases = l;
                    now.purge_orphans();
                    // A key whose value is junk (overwritten by someone on the bus) is still
                    // there but not listed: its owner puts it back at once.
                    if !send(view.reset(now)) {
                        return;
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
    if info.lease.is_none() {
        return Err(format!("discovery entry {key} names no lease"));
    }
    Ok(info)
}

/// Turns one entry of the instances' bucket into the event it means, if any.
fn apply(view: &mut View, entry: kv::Entry) -> Option<DiscoveryEvent> {
    match entry.operation {
        kv::Operation::Put => match entry_info(&entry.key, &entry.value) {
            Ok(info) => view.put(info, entry.revision),
            Err(e) => {
                crate::telemetry::malformed("discovery", &e);
                None
            }
        },
        // A delete is a deregistration; a purge, the lease's expiry marker (or an operator).
        kv::Operation::Delete => view.remove(&entry.key, true),
        kv::Operation::Purge => view.remove(&entry.key, false),
    }
}
