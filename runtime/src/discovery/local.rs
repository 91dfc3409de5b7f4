//! In-memory discovery for the embedded bus. Registrations live until deregistered or until
//! [`Discovery::close`]. Watch channels are unbounded on purpose: each registration change makes
//! one event per watcher, so their number is bounded by the instances that come and go, and a
//! dropped discovery event would leave a router with a wrong view of the fleet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Discovery, DiscoveryError, DiscoveryWatch, InstanceInfo, WatchDedup};
use crate::subject::{DiscoveryFilter, EndpointId, InstanceId};

enum Change {
    Put(InstanceInfo),
    Remove(String),
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, InstanceInfo>,
    watchers: Vec<(DiscoveryFilter, mpsc::UnboundedSender<Change>)>,
}

impl State {
    fn notify(&mut self, key: &str, change: impl Fn() -> Change) {
        self.watchers
            .retain(|(filter, tx)| !filter.matches(key) || tx.send(change()).is_ok());
    }
}

/// In-memory discovery. Clones share entries and registrations; [`LocalDiscovery::handle`]
/// makes a view on the same entries whose [`Discovery::close`] removes only its own.
#[derive(Clone, Default)]
pub struct LocalDiscovery {
    state: Arc<Mutex<State>>,
    owned: Arc<Mutex<BTreeSet<String>>>,
}

impl std::fmt::Debug for LocalDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalDiscovery")
    }
}

impl LocalDiscovery {
    pub fn new() -> Self {
        Self::default()
    }

    /// Another participant on the same in-memory store (e.g. a second process's worth of roles).
    pub fn handle(&self) -> Self {
        Self {
            state: self.state.clone(),
            owned: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Discovery for LocalDiscovery {
    async fn register(&self, info: InstanceInfo) -> Result<(), DiscoveryError> {
        let key = info.key();
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        let mut state = self.lock();
        state.entries.insert(key.clone(), info.clone());
        state.notify(&key, || Change::Put(info.clone()));
        Ok(())
    }

    async fn deregister(
        &self,
        endpoint: &EndpointId,
        instance: InstanceId,
    ) -> Result<(), DiscoveryError> {
        let key = endpoint.discovery_key(instance);
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let mut state = self.lock();
        if state.entries.remove(&key).is_some() {
            state.notify(&key, || Change::Remove(key.clone()));
        }
        Ok(())
    }

    async fn list(&self, filter: &DiscoveryFilter) -> Result<Vec<InstanceInfo>, DiscoveryError> {
        Ok(self
            .lock()
            .entries
            .iter()
            .filter(|(k, _)| filter.matches(k))
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn watch(&self, filter: DiscoveryFilter) -> Result<DiscoveryWatch, DiscoveryError> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut state = self.lock();
            for (k, v) in &state.entries {
                if filter.matches(k) {
                    let _ = tx.send(Change::Put(v.clone()));
                }
            }
            state.watchers.push((filter, tx));
        }
        let stream = futures::stream::unfold(
            (rx, WatchDedup::default()),
            |(mut rx, mut dedup)| async move {
                loop {
                    let event = match rx.recv().await? {
                        Change::Put(info) => dedup.put(info),
                        Change::Remove(key) => dedup.remove(&key, true),
                    };
                    if let Some(e) = event {
                        return Some((e, (rx, dedup)));
                    }
                }
            },
        );
        Ok(DiscoveryWatch::new(stream))
    }

    fn lease(&self) -> Duration {
        Duration::ZERO
    }

    async fn close(&self) {
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|p| p.into_inner()));
        let mut state = self.lock();
        for key in owned {
            if state.entries.remove(&key).is_some() {
                state.notify(&key, || Change::Remove(key.clone()));
            }
        }
    }
}
