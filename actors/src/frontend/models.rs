//! Which models this frontend serves: the model watcher actor and the table it maintains.
//!
//! The watcher follows the process's membership of the namespace ([`crate::membership`]): a
//! member (a worker with a [`ModelCard`]) adds itself to its model; the first time a card's content is seen, the
//! watcher fetches the card's files from that instance (over the bus, by content hash, checked
//! on arrival) and builds a [`Preprocessor`]. A model is listed once its preprocessor is built
//! and stays listed while at least one instance serves it. Its last instance deregistering
//! drops it at once; its last instance vanishing (a crash, a lost host: its lease lapsed)
//! leaves it listed with no instance for [`LINGER`], so that requests meanwhile get a 503
//! "retry shortly", which clients retry, instead of a 404, which they do not, while the worker
//! restarts.
//!
//! Prefill workers are not listed: they serve only the prefill step of a decode worker's
//! requests.
//!
//! Instances of one model name may publish different cards (a rolling upgrade): the card with
//! the most live instances (and a built preprocessor) wins, the others wait unlisted.
//!
//! The table is read by every request (a brief read lock, never held across an await) and
//! written only by the watcher, which replaces whole [`ModelEntry`] values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use dynamo_preprocessor::{ModelFiles, Preprocessor};
use dynamo_protocols::llm::{FileChunk, FileRequest, ModelCard, WorkerKind};
use dynamo_runtime::{CallOptions, EndpointId, InstanceId, Runtime, Target};

use crate::membership::{MemberEvent, MembershipHandle};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;

/// How long a model stays listed after its last instance vanished without deregistering.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(30);

/// Where one worker instance is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerAddr {
    pub endpoint: EndpointId,
    pub instance: InstanceId,
}

/// A served model: its card, preprocessor and live instances.
#[derive(Debug)]
pub struct ModelEntry {
    pub card: ModelCard,
    pub pre: Arc<Preprocessor>,
    pub instances: Vec<WorkerAddr>,
    /// Round-robin position, shared by successive entries of the model.
    pub(crate) cursor: Arc<AtomicUsize>,
    /// When the model was first listed (seconds since the epoch).
    pub created: u64,
}

/// The models a frontend serves now.
#[derive(Debug)]
pub struct ModelTable {
    models: RwLock<BTreeMap<String, Arc<ModelEntry>>>,
    version: watch::Sender<u64>,
}

impl Default for ModelTable {
    fn default() -> Self {
        Self {
            models: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

impl ModelTable {
    pub fn get(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.models.read().ok()?.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<ModelEntry>> {
        self.models
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Fires after every change of the table.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn replace(&self, name: &str, entry: Option<ModelEntry>) {
        if let Ok(mut m) = self.models.write() {
            match entry {
                Some(e) => m.insert(name.to_string(), Arc::new(e)),
                None => m.remove(name),
            };
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Waits until `name` is listed with at least `instances` instances.
    pub async fn wait_for(&self, name: &str, instances: usize) {
        let mut rx = self.changes();
        loop {
            if self
                .get(name)
                .is_some_and(|e| e.instances.len() >= instances)
            {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Builds of one card tried before giving up (until another instance with it joins).
const MAX_BUILD_ATTEMPTS: u32 = 5;

pub(crate) enum WatcherMsg {
    Member(MemberEvent),
    Built {
        key: String,
        result: Result<Arc<Preprocessor>, String>,
    },
    /// Recompute the models changed since the last refresh (`WatcherState::dirty`).
    Refresh,
    /// The linger of a model whose last instance vanished is up (its generation).
    Expire {
        name: String,
        generation: u64,
    },
}

pub(crate) struct ModelWatcher {
    pub runtime: Runtime,
    pub membership: MembershipHandle,
    pub table: Arc<ModelTable>,
    pub parsers: dynamo_preprocessor::tools::OutputParsers,
}

#[derive(Default)]
pub(crate) struct WatcherState {
    cards: HashMap<WorkerAddr, ModelCard>,
    pipelines: HashMap<String, Arc<Preprocessor>>,
    fetching: HashSet<String>,
    /// Failed builds per card since its last success, for backoff and giving up.
    failures: HashMap<String, u32>,
    cursors: HashMap<String, Arc<AtomicUsize>>,
    created: HashMap<String, u64>,
    /// Models listed with no instance since their last one vanished: their card's content key
    /// and the generation of their linger.
    lingering: HashMap<String, (String, u64)>,
    generation: u64,
    /// Models whose instances changed since the last refresh, and whether one of them may
    /// have vanished. A burst of membership events (a fleet of thousands starting) makes one
    /// refresh after it, not one per event: a refresh reads every card.
    dirty: HashMap<String, bool>,
    forward: Option<tokio::task::JoinHandle<()>>,
}

/// Marks model `name` for the next refresh, which is queued behind the events already waiting
/// (they are applied first, and the refresh covers them all).
fn mark(myself: &ActorRef<WatcherMsg>, state: &mut WatcherState, name: &str, vanished: bool) {
    if state.dirty.is_empty() {
        let _ = myself.cast(WatcherMsg::Refresh);
    }
    *state.dirty.entry(name.to_string()).or_default() |= vanished;
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Fetches a card's files from one instance and builds the preprocessor.
async fn build(
    runtime: Runtime,
    addr: WorkerAddr,
    card: ModelCard,
    parsers: dynamo_preprocessor::tools::OutputParsers,
) -> Result<Arc<Preprocessor>, String> {
    let files_ep = addr
        .endpoint
        .component
        .endpoint(ModelCard::FILES_ENDPOINT)
        .map_err(|e| e.to_string())?;
    let mut files = ModelFiles::default();
    for f in &card.files {
        let req = FileRequest {
            hash: f.hash.clone(),
        };
        let chunks: Vec<FileChunk> = runtime
            .client()
            .call(
                Target::Instance(files_ep.clone(), addr.instance),
                &req,
                CallOptions::default(),
            )
            .await
            .map_err(|e| format!("fetching {}: {e}", f.name))?
            .collect()
            .await
            .map_err(|e| format!("fetching {}: {e}", f.name))?;
        let bytes: Vec<u8> = chunks.into_iter().flat_map(|c| c.data).collect();
        let size = bytes.len() as u64;
        files.insert(&f.name, bytes);
        if size != f.size || files.hash(&f.name) != Some(f.hash.as_str()) {
            return Err(format!(
                "{} arrived corrupted (size or hash mismatch)",
                f.name
            ));
        }
    }
    let name = card.name.clone();
    tokio::task::spawn_blocking(move || {
        Preprocessor::new(&name, &files).map(|mut p| {
            p.set_parsers(parsers);
            p
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map(Arc::new)
    .map_err(|e| e.to_string())
}

impl ModelWatcher {
    /// Recomputes the entry of model `name` from the live instances and built pipelines;
    /// `vanished`: its last instance may just have vanished (not deregistered), so the model
    /// lingers (see [`LINGER`]).
    fn refresh(
        &self,
        myself: &ActorRef<WatcherMsg>,
        state: &mut WatcherState,
        name: &str,
        vanished: bool,
    ) {
        let mut by_key: BTreeMap<String, Vec<WorkerAddr>> = BTreeMap::new();
        for (addr, card) in &state.cards {
            if card.name == name {
                by_key
                    .entry(card.content_key())
                    .or_default()
                    .push(addr.clone());
            }
        }
        let best = by_key
            .iter()
            .filter(|(k, _)| state.pipelines.contains_key(*k))
            .max_by_key(|(_, v)| v.len());
        let entry = best.and_then(|(key, addrs)| {
            let card = state.cards.get(addrs.first()?)?.clone();
            let mut instances = addrs.clone();
            instances.sort_by_key(|a| a.instance);
            Some(ModelEntry {
                card,
                pre: state.pipelines.get(key)?.clone(),
                instances,
                cursor: state.cursors.entry(name.to_string()).or_default().clone(),
                created: *state
                    .created
                    .entry(name.to_string())
                    .or_insert_with(now_secs),
            })
        });
        let entry = match entry {
            Some(e) => {
                state.lingering.remove(name);
                Some(e)
            }
            None if state.lingering.contains_key(name) => return,
            None => match self.table.get(name).filter(|_| vanished) {
                Some(listed) => {
                    state.generation += 1;
                    let generation = state.generation;
                    state
                        .lingering
                        .insert(name.to_string(), (listed.card.content_key(), generation));
                    let (me, model) = (myself.clone(), name.to_string());
                    tokio::spawn(async move {
                        tokio::time::sleep(LINGER).await;
                        let _ = me.cast(WatcherMsg::Expire {
                            name: model,
                            generation,
                        });
                    });
                    tracing::warn!(
                        model = name,
                        "the model's last worker vanished; listed without workers for {LINGER:?} (requests get 503, retry shortly) while it restarts"
                    );
                    Some(ModelEntry {
                        card: listed.card.clone(),
                        pre: listed.pre.clone(),
                        instances: Vec::new(),
                        cursor: listed.cursor.clone(),
                        created: listed.created,
                    })
                }
                None => None,
            },
        };
        if entry.is_none() {
            state.created.remove(name);
        }
        match &entry {
            Some(e) => tracing::info!(model = name, instances = e.instances.len(), "model listed"),
            None if self.table.get(name).is_some() => {
                tracing::info!(model = name, "model no longer served")
            }
            None => {}
        }
        self.table.replace(name, entry);
        // Drop preprocessors no live instance (or lingering model) uses.
        let live: HashSet<String> = state
            .cards
            .values()
            .map(ModelCard::content_key)
            .chain(state.lingering.values().map(|(k, _)| k.clone()))
            .collect();
        state.pipelines.retain(|k, _| live.contains(k));
    }

    fn on_event(&self, myself: &ActorRef<WatcherMsg>, state: &mut WatcherState, ev: MemberEvent) {
        match ev {
            MemberEvent::Joined(m) => {
                // A prefill worker only prefills for a decode worker: not a generate target.
                if m.kind == WorkerKind::Prefill {
                    return;
                }
                let card = m.card.clone();
                let addr = WorkerAddr {
                    endpoint: m.endpoint.clone(),
                    instance: m.instance,
                };
                let key = card.content_key();
                let name = card.name.clone();
                let previous = state.cards.insert(addr.clone(), card.clone());
                if previous.is_none() {
                    state.failures.remove(&key);
                }
                if !state.pipelines.contains_key(&key) && state.fetching.insert(key.clone()) {
                    let (runtime, me, parsers) =
                        (self.runtime.clone(), myself.clone(), self.parsers);
                    tokio::spawn(async move {
                        let result = build(runtime, addr, card, parsers).await;
                        let _ = me.cast(WatcherMsg::Built { key, result });
                    });
                }
                if let Some(prev) = previous.filter(|p| p.name != name) {
                    mark(myself, state, &prev.name, false);
                }
                mark(myself, state, &name, false);
            }
            MemberEvent::Left {
                endpoint,
                instance,
                deregistered,
            } => {
                if let Some(card) = state.cards.remove(&WorkerAddr { endpoint, instance }) {
                    mark(myself, state, &card.name, !deregistered);
                }
            }
        }
    }
}

impl Actor for ModelWatcher {
    type Msg = WatcherMsg;
    type State = WatcherState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<WatcherMsg>,
        _: (),
    ) -> Result<WatcherState, ActorProcessingErr> {
        let mut watch = self.membership.subscribe().await?;
        let forward = tokio::spawn(async move {
            while let Some(ev) = watch.next().await {
                if myself.cast(WatcherMsg::Member(ev)).is_err() {
                    break;
                }
            }
        });
        Ok(WatcherState {
            forward: Some(forward),
            ..Default::default()
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<WatcherMsg>,
        state: &mut WatcherState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(f) = state.forward.take() {
            f.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WatcherMsg>,
        msg: WatcherMsg,
        state: &mut WatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WatcherMsg::Member(ev) => self.on_event(&myself, state, ev),
            WatcherMsg::Refresh => {
                for (name, vanished) in std::mem::take(&mut state.dirty) {
                    self.refresh(&myself, state, &name, vanished);
                }
            }
            WatcherMsg::Expire { name, generation } => {
                if state.lingering.get(&name).map(|l| l.1) == Some(generation) {
                    state.lingering.remove(&name);
                    self.refresh(&myself, state, &name, false);
                }
            }
            WatcherMsg::Built { key, result } => {
                state.fetching.remove(&key);
                match result {
                    Ok(pre) => {
                        state.failures.remove(&key);
                        let name = pre.name().to_string();
                        state.pipelines.insert(key, pre);
                        self.refresh(&myself, state, &name, false);
                    }
                    Err(e) => {
                        let failures = state.failures.entry(key.clone()).or_default();
                        *failures += 1;
                        let attempt = *failures;
                        if attempt >= MAX_BUILD_ATTEMPTS {
                            tracing::error!(error = %e, attempts = attempt, "cannot build a model's preprocessor; giving up until another instance with this card joins");
                            return Ok(());
                        }
                        tracing::warn!(error = %e, attempt, "cannot build a model's preprocessor; retrying");
                        // Try again, with backoff, from any live instance with this card.
                        if let Some((addr, card)) = state
                            .cards
                            .iter()
                            .find(|(_, c)| c.content_key() == key)
                            .map(|(a, c)| (a.clone(), c.clone()))
                        {
                            state.fetching.insert(key.clone());
                            let (runtime, me, parsers) =
                                (self.runtime.clone(), myself.clone(), self.parsers);
                            tokio::spawn(async move {
                                tokio::time::sleep(std::time::Duration::from_secs(attempt as u64))
                                    .await;
                                let result = build(runtime, addr, card, parsers).await;
                                let _ = me.cast(WatcherMsg::Built { key, result });
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
