//! The router's ingest actor: keeps the [`KvRouter`]'s index and loads current from the bus.
//!
//! It follows the process's membership of the namespace ([`crate::membership`]); each
//! component with model workers gets two
//! wildcard subscriptions (`kv_events.*`, `load.*`), forwarded into the mailbox. Per worker it
//! tracks the next expected event id:
//! - a worker that joins is resynced from its dump at once (a router that starts late rebuilds
//!   the index without waiting for traffic); batches arriving meanwhile wait for the dump;
//! - a gap (events lost) → resync: the worker's entries are dropped and rebuilt from its
//!   `kv_dump`; batches arriving meanwhile wait, and those past the dump's last id are applied;
//! - events at or below the expected id (duplicates, reordering) are dropped and counted;
//! - a worker leaving discovery is purged from the index and the loads.
//!
//! Bounded: at most [`MAX_QUEUED`] event and load messages wait in the mailbox. Under an event
//! storm the forwarders drop what comes beyond that (counted in
//! `dynamo_router_ingest_dropped_total`); a dropped event batch is a gap in that worker's event
//! ids, so its next batch triggers the resync above, and a dropped load report is replaced by
//! the next one.
//!
//! No worker speaks for another: a batch or load report is applied only when the instance id
//! in its payload is the one in its subject and that instance is registered in the subject's
//! component.
//!
//! The index is changed off the actor, in parallel across workers ([`Appliers`]): the actor
//! decodes, checks and orders each worker's batches (cheap), and hands what to apply to one of
//! a few apply threads, always the same one for a worker (its instance id modulo their number),
//! through a bounded queue. A worker's changes are thus applied in the order the actor decided
//! them (events, a resync's replacement, a departure's removal), and different workers' on
//! different cores at once: the index's shards take concurrent writers, which one actor
//! applying everything serially left unused. A full queue makes the actor wait, so the
//! mailbox bound above still limits what waits in memory.
//!
//! Malformed payloads, forged ones and events for unknown workers are counted
//! (`dynamo_router_bad_events_total{reason}`, and malformed ones also in
//! `dynamo_bus_malformed_messages_total`), never applied, and leave no per-worker state behind.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dynamo_protocols::kv::{
    KvDump, KvDumpRequest, KvEvent, KvEventBatch, KvEventData, LoadReport, StorageTier, WorkerId,
    KV_DUMP_ENDPOINT, KV_EVENTS_TOPIC, LOAD_TOPIC,
};
use dynamo_protocols::llm::WorkerKind;
use dynamo_runtime::serve::decode_event;
use dynamo_runtime::subject::{ComponentId, Namespace, Topic};
use dynamo_runtime::telemetry::malformed;
use dynamo_runtime::{CallOptions, InstanceId, Runtime, Target};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::KvRouter;
use crate::membership::{MemberEvent, MembershipHandle};

/// Event and load messages that may wait in the ingest actor's mailbox.
pub const MAX_QUEUED: usize = 8192;

/// Counts messages in a mailbox and refuses one past the bound (the caller drops it).
struct Admission {
    queued: AtomicUsize,
    max: usize,
}

impl Admission {
    fn new(max: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a place, or `false` when all are taken.
    fn admit(&self) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back (the message was handled).
    fn done(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// A change of one worker's part of the index, for its apply thread.
enum Apply {
    Events(WorkerId, Vec<KvEvent>),
    /// Drops the worker's entries, then applies these (a resync's dump).
    Replace(WorkerId, Vec<KvEvent>),
    /// The worker left: its entries go, after whatever was queued for it before.
    Remove(WorkerId),
    /// Answers once everything queued before it on this thread is applied.
    #[cfg(test)]
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Ops one apply thread may have queued before the actor waits.
const APPLY_QUEUE: usize = 256;

/// The apply threads (see the module header).
struct Appliers {
    shards: Vec<tokio::sync::mpsc::Sender<Apply>>,
}

impl Appliers {
    /// One thread per core (at most 8), applying to `router`'s index.
    fn start(router: &Arc<KvRouter>) -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 8));
        Self::with_threads(router, n)
    }

    fn with_threads(router: &Arc<KvRouter>, n: usize) -> Self {
        let shards = (0..n.max(1))
            .map(|i| {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Apply>(APPLY_QUEUE);
                let router = router.clone();
                std::thread::Builder::new()
                    .name(format!("kv-apply-{i}"))
                    .spawn(move || {
                        while let Some(op) = rx.blocking_recv() {
                            let index = router.index();
                            let stats = match op {
                                Apply::Events(w, events) => index.apply(w, &events),
                                Apply::Replace(w, events) => {
                                    index.remove_worker(w);
                                    index.apply(w, &events)
                                }
                                Apply::Remove(w) => {
                                    index.remove_worker(w);
                                    continue;
                                }
                                #[cfg(test)]
                                Apply::Flush(done) => {
                                    let _ = done.send(());
                                    continue;
                                }
                            };
                            if stats.unknown_removals > 0 {
                                metrics::counter!("dynamo_router_bad_events_total", "reason" => "unknown_removal")
                                    .increment(stats.unknown_removals as u64);
                            }
                        }
                    })
                    .expect("spawn a KV apply thread");
                tx
            })
            .collect();
        Self { shards }
    }

    /// Queues `op` on its worker's thread (waits while that queue is full).
    async fn send(&self, op: Apply) {
        let w = match &op {
            Apply::Events(_, e) if e.is_empty() => return,
            Apply::Events(w, _) | Apply::Replace(w, _) | Apply::Remove(w) => *w,
            // One thread's flush ([`Appliers::flush`] asks each).
            #[cfg(test)]
            Apply::Flush(_) => WorkerId(0),
        };
        let shard = &self.shards[(w.0 % self.shards.len() as u64) as usize];
        let _ = shard.send(op).await;
    }

    /// Waits until everything queued so far is applied.
    #[cfg(test)]
    async fn flush(&self) {
        for shard in &self.shards {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if shard.send(Apply::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
    }
}

enum IngestMsg {
    Member(MemberEvent),
    /// `component` is the subscription's: the subject's component.
    Events {
        component: Arc<ComponentId>,
        worker: String,
        payload: bytes::Bytes,
        received: std::time::Instant,
    },
    Load {
        component: Arc<ComponentId>,
        worker: String,
        payload: bytes::Bytes,
    },
    Resynced {
        worker: WorkerId,
        dump: Result<KvDump, String>,
    },
}

#[derive(Default)]
struct WorkerTrack {
    component: Option<ComponentId>,
    next_id: Option<u64>,
    resyncing: bool,
    pending: Vec<KvEvent>,
}

pub struct IngestState {
    workers: HashMap<WorkerId, WorkerTrack>,
    /// Workers of `workers` listed in discovery (those with a component).
    listed: usize,
    subscribed: HashSet<ComponentId>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Ingest {
    runtime: Runtime,
    membership: MembershipHandle,
    router: Arc<KvRouter>,
    /// Event and load messages in the mailbox (see [`MAX_QUEUED`]).
    queued: Arc<Admission>,
    appliers: Appliers,
}

/// The running ingest actor.
pub struct RouterIngest {
    actor: ActorRef<IngestMsg>,
    /// Applies the other routers' decisions (holds no request: stopped outright).
    subscriber: tokio::task::JoinHandle<()>,
    publisher: super::sync::Publisher,
}

impl RouterIngest {
    /// The ingest actor, for a supervisor to link.
    pub(crate) fn cell(&self) -> ractor::ActorCell {
        self.actor.get_cell()
    }

    /// Stops the ingest, then publishes this router's queued decisions and stops.
    pub async fn shutdown(self) {
        self.actor.stop(None);
        self.subscriber.abort();
        self.publisher.close().await;
    }
}

/// Starts the ingest actor for `router` in `namespace`, and the sharing of routing decisions
/// with the other routers there.
pub async fn start_ingest(
    runtime: &Runtime,
    namespace: Namespace,
    router: Arc<KvRouter>,
) -> Result<RouterIngest, String> {
    let subscriber = super::sync::spawn_subscriber(runtime, &namespace, router.clone()).await?;
    let (sink, publisher) = super::sync::spawn_publisher(runtime, &namespace, router.id());
    router.share_decisions(sink);
    let membership = MembershipHandle::shared(runtime, &namespace)
        .await
        .map_err(|e| e.to_string())?;
    let ingest = Ingest {
        appliers: Appliers::start(&router),
        runtime: runtime.clone(),
        router,
        queued: Arc::new(Admission::new(MAX_QUEUED)),
        membership: membership.clone(),
    };
    let (actor, _) = match Actor::spawn(None, ingest, ()).await {
        Ok(a) => a,
        Err(e) => {
            subscriber.abort();
            publisher.close().await;
            return Err(e.to_string());
        }
    };
    Ok(RouterIngest {
        actor,
        subscriber,
        publisher,
    })
}

fn bad(reason: &'static str) {
    metrics::counter!("dynamo_router_bad_events_total", "reason" => reason).increment(1);
}

fn worker_of(token: &str) -> Option<WorkerId> {
    InstanceId::parse_hex(token)
        .ok()
        .map(|i| WorkerId(i.as_u64()))
}

impl Ingest {
    /// A batch or report one instance published for another: dropped and counted.
    fn forged(&self, reason: &'static str) {
        bad(reason);
        self.router.count_forged();
    }

    fn subscribe(
        &self,
        myself: &ActorRef<IngestMsg>,
        state: &mut IngestState,
        component: &ComponentId,
    ) {
        if !state.subscribed.insert(component.clone()) {
            return;
        }
        for (topic, is_events) in [(KV_EVENTS_TOPIC, true), (LOAD_TOPIC, false)] {
            let pattern = component.event_pattern(&Topic::new(topic).expect("valid topic"));
            let (bus, me) = (self.runtime.bus().clone(), myself.clone());
            let queued = self.queued.clone();
            let from = Arc::new(component.clone());
            let dropped = metrics::counter!("dynamo_router_ingest_dropped_total",
                "what" => if is_events { "events" } else { "load" });
            state.tasks.push(tokio::spawn(async move {
                let mut sub = match bus.subscribe(pattern, None).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "router cannot subscribe to worker events");
                        return;
                    }
                };
                while let Some(m) = sub.next().await {
                    if !queued.admit() {
                        dropped.increment(1);
                        continue;
                    }
                    let worker = m.subject.last_token().to_string();
                    let msg = if is_events {
                        IngestMsg::Events {
                            component: from.clone(),
                            worker,
                            payload: m.payload,
                            received: std::time::Instant::now(),
                        }
                    } else {
                        IngestMsg::Load {
                            component: from.clone(),
                            worker,
                            payload: m.payload,
                        }
                    };
                    if me.cast(msg).is_err() {
                        return;
                    }
                }
            }));
        }
    }

    fn resync(&self, myself: &ActorRef<IngestMsg>, w: WorkerId, track: &mut WorkerTrack) {
        if track.resyncing {
            return;
        }
        let Some(component) = track.component.clone() else {
            return;
        };
        track.resyncing = true;
        metrics::counter!("dynamo_router_resyncs_total").increment(1);
        let (runtime, me) = (self.runtime.clone(), myself.clone());
        tokio::spawn(async move {
            let dump = async {
                let ep = component
                    .endpoint(KV_DUMP_ENDPOINT)
                    .map_err(|e| e.to_string())?;
                let pieces: Vec<KvDump> = runtime
                    .client()
                    .call(
                        Target::Instance(ep, InstanceId::new(w.0)),
                        &KvDumpRequest {},
                        CallOptions::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                let mut all = KvDump::default();
                for p in pieces {
                    all.last_event_id = p.last_event_id;
                    all.block_size = p.block_size;
                    all.blocks.extend(p.blocks);
                    all.lower.extend(p.lower);
                }
                Ok::<_, String>(all)
            }
            .await;
            let _ = me.cast(IngestMsg::Resynced { worker: w, dump });
        });
    }

    /// What of `events` to apply, in id order (those before a gap); starts a resync on a gap.
    fn on_events(
        &self,
        myself: &ActorRef<IngestMsg>,
        w: WorkerId,
        track: &mut WorkerTrack,
        events: Vec<KvEvent>,
    ) -> Vec<KvEvent> {
        if track.resyncing {
            track.pending.extend(events);
            return Vec::new();
        }
        let mut apply = Vec::with_capacity(events.len());
        for e in events {
            let expected = track.next_id.unwrap_or(0);
            if track.next_id.is_some() && e.event_id < expected {
                bad("duplicate_or_reordered");
                continue;
            }
            if e.event_id != expected {
                // A gap, or a router that started late: rebuild this worker from a dump
                // (what came before the gap is still applied, first).
                track.pending.push(e);
                self.resync(myself, w, track);
                continue;
            }
            if track.resyncing {
                track.pending.push(e);
                continue;
            }
            track.next_id = Some(e.event_id + 1);
            apply.push(e);
        }
        apply
    }
}

impl Actor for Ingest {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<IngestMsg>,
        _: (),
    ) -> Result<IngestState, ActorProcessingErr> {
        let mut watch = self.membership.subscribe().await?;
        let me = myself.clone();
        let forward = tokio::spawn(async move {
            while let Some(ev) = watch.next().await {
                if me.cast(IngestMsg::Member(ev)).is_err() {
                    return;
                }
            }
        });
        Ok(IngestState {
            workers: HashMap::new(),
            listed: 0,
            subscribed: HashSet::new(),
            tasks: vec![forward],
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<IngestMsg>,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.tasks.drain(..) {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<IngestMsg>,
        msg: IngestMsg,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        if matches!(msg, IngestMsg::Events { .. } | IngestMsg::Load { .. }) {
            self.queued.done();
        }
        match msg {
            IngestMsg::Member(MemberEvent::Joined(m)) => {
                let component = m.endpoint.component.clone();
                self.subscribe(&myself, state, &component);
                let w = WorkerId(m.instance.as_u64());
                // Prefill workers are indexed (their events say what they hold) but never a
                // candidate for a whole request.
                let bs = m.card.kv_block_size.max(1) as usize;
                if m.kind != WorkerKind::Prefill {
                    self.router.add_worker(w, m.card.name.clone(), bs);
                    if m.kind == WorkerKind::Decode {
                        self.router.add_decode_worker(w);
                    }
                } else {
                    // A candidate for the prefill of a decode worker's request.
                    self.router.add_prefill_worker(
                        w,
                        m.card.name.clone(),
                        bs,
                        m.endpoint.to_string(),
                    );
                }
                let track = state.workers.entry(w).or_default();
                if track.component.replace(component).is_none() {
                    state.listed += 1;
                    metrics::gauge!("dynamo_router_workers").set(state.listed as f64);
                }
                // A worker we have no events from yet may hold blocks already (this router
                // started late): rebuild its part of the index from its dump now.
                if track.next_id.is_none() {
                    self.resync(&myself, w, track);
                }
            }
            IngestMsg::Member(MemberEvent::Left {
                endpoint, instance, ..
            }) => {
                let w = WorkerId(instance.as_u64());
                if state
                    .workers
                    .get(&w)
                    .is_some_and(|t| t.component.as_ref() == Some(&endpoint.component))
                {
                    state.workers.remove(&w);
                    state.listed -= 1;
                    metrics::gauge!("dynamo_router_workers").set(state.listed as f64);
                    self.router.forget(w);
                    // After anything still queued for it.
                    self.appliers.send(Apply::Remove(w)).await;
                }
            }
            IngestMsg::Events {
                component,
                worker,
                payload,
                received,
            } => {
                // How far behind the bus the index is: time from receipt to application.
                metrics::histogram!("dynamo_router_event_lag_seconds")
                    .record(received.elapsed().as_secs_f64());
                let Some(w) = worker_of(&worker) else {
                    bad("bad_subject");
                    malformed(
                        "kv_events",
                        &format_args!("{worker:?} is not an instance id"),
                    );
                    return Ok(());
                };
                let batch: KvEventBatch = match decode_event(&payload) {
                    Ok(b) => b,
                    Err(e) => {
                        bad("malformed");
                        malformed(
                            "kv_events",
                            &format_args!("KV event batch of worker {worker}: {e}"),
                        );
                        return Ok(());
                    }
                };
                if batch.worker != w {
                    // Published for another instance than the one in its subject.
                    self.forged("instance_mismatch");
                    return Ok(());
                }
                let Some(track) = state.workers.get_mut(&w).filter(|t| t.component.is_some())
                else {
                    // Not (yet) in discovery: nothing to resync from, so not indexed.
                    bad("unknown_worker");
                    return Ok(());
                };
                if track.component.as_ref() != Some(&*component) {
                    // Registered in another component: someone speaking for it.
                    self.forged("wrong_component");
                    return Ok(());
                }
                self.router.note_events();
                let apply = self.on_events(&myself, w, track, batch.events);
                self.appliers.send(Apply::Events(w, apply)).await;
            }
            IngestMsg::Load {
                component,
                worker,
                payload,
            } => {
                let (Some(w), Ok(report)) =
                    (worker_of(&worker), decode_event::<LoadReport>(&payload))
                else {
                    bad("malformed_load");
                    malformed("load", &format_args!("load report on worker {worker:?}"));
                    return Ok(());
                };
                match state.workers.get(&w) {
                    _ if report.worker != Some(w) => self.forged("load_instance_mismatch"),
                    Some(t) if t.component.as_ref() == Some(&*component) => {
                        self.router.record_load(w, report)
                    }
                    Some(_) => self.forged("load_wrong_component"),
                    // Not (yet) in discovery.
                    None => {}
                }
            }
            IngestMsg::Resynced { worker: w, dump } => {
                let Some(track) = state.workers.get_mut(&w) else {
                    return Ok(());
                };
                track.resyncing = false;
                match dump {
                    Ok(dump) => {
                        let blocks = dump.blocks.iter().map(|(_, b)| *b).collect();
                        let mut events = vec![KvEvent {
                            event_id: 0,
                            tier: StorageTier::Device,
                            data: KvEventData::Stored {
                                parent_hash: None,
                                blocks,
                            },
                        }];
                        // The lower tiers' blocks, each under its tier.
                        events.extend(dump.lower.iter().map(|(tier, parent, b)| KvEvent {
                            event_id: 0,
                            tier: *tier,
                            data: KvEventData::Stored {
                                parent_hash: *parent,
                                blocks: vec![*b],
                            },
                        }));
                        let next = dump.last_event_id.map_or(0, |l| l + 1);
                        track.next_id = Some(next);
                        // Events the dump already reflects are dropped; those continuing
                        // from it are applied; anything after a further gap is dropped too
                        // (the worker's next real batch continues from the dump).
                        let mut expected = next;
                        let mut apply = Vec::new();
                        for e in std::mem::take(&mut track.pending) {
                            if e.event_id == expected {
                                expected += 1;
                                apply.push(e);
                            } else if e.event_id > expected {
                                bad("gap_after_resync");
                            }
                        }
                        track.next_id = Some(expected);
                        events.extend(apply);
                        self.appliers.send(Apply::Replace(w, events)).await;
                        self.router.count_resync();
                    }
                    Err(e) => {
                        tracing::warn!(worker = ?w, error = %e, "KV resync failed; retrying on the next batch");
                        track.next_id = None;
                        track.pending.clear();
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_kv::{IndexSettings, KvIndex};
    use dynamo_protocols::kv::{LocalBlockHash, SequenceHash, StoredBlock};

    fn stored(chain: &[SequenceHash]) -> KvEvent {
        KvEvent {
            event_id: 0,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent_hash: None,
                blocks: chain
                    .iter()
                    .map(|&h| StoredBlock {
                        block_hash: h,
                        tokens_hash: LocalBlockHash(h.0),
                    })
                    .collect(),
            },
        }
    }

    /// Changes of many workers through three apply threads leave the index as applying them
    /// one by one does: each worker's order is kept (a store then its removal, a resync's
    /// replacement after earlier events, a departure after everything queued before it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parallel_apply_keeps_each_worker_s_order() {
        let router = KvRouter::new(super::super::KvRouterSettings::default());
        let appliers = Appliers::with_threads(&router, 3);
        let serial = KvIndex::new(IndexSettings::default());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let chains: Vec<Vec<SequenceHash>> = (0..40u64)
            .map(|c| {
                let locals: Vec<LocalBlockHash> = (0..1 + c % 6)
                    .map(|i| LocalBlockHash(c * 100 + i))
                    .collect();
                let mut parent = None;
                locals
                    .iter()
                    .map(|&l| {
                        let h = dynamo_kv::sequence_hash(parent, l);
                        parent = Some(h);
                        h
                    })
                    .collect()
            })
            .collect();
        for _ in 0..4000 {
            let w = WorkerId(rand(24) * 0x1_0000_0001);
            let chain = &chains[rand(chains.len() as u64) as usize];
            let op = match rand(20) {
                0 => Apply::Remove(w),
                1 => Apply::Replace(w, vec![stored(chain)]),
                2..=7 => Apply::Events(
                    w,
                    vec![KvEvent {
                        event_id: 0,
                        tier: StorageTier::Device,
                        data: KvEventData::Removed {
                            block_hashes: vec![*chain.last().unwrap()],
                        },
                    }],
                ),
                _ => Apply::Events(w, vec![stored(chain)]),
            };
            match &op {
                Apply::Events(w, e) => {
                    serial.apply(*w, e);
                }
                Apply::Replace(w, e) => {
                    serial.remove_worker(*w);
                    serial.apply(*w, e);
                }
                Apply::Remove(w) => serial.remove_worker(*w),
                Apply::Flush(_) => unreachable!(),
            }
            appliers.send(op).await;
        }
        appliers.flush().await;
        assert_eq!(router.index().pairs(), serial.pairs());
        for chain in &chains {
            let (mut got, mut want): (Vec<_>, Vec<_>) = (
                router
                    .index()
                    .find_matches(chain)
                    .iter()
                    .map(|(w, o)| (*w, o.blocks()))
                    .collect(),
                serial
                    .find_matches(chain)
                    .iter()
                    .map(|(w, o)| (*w, o.blocks()))
                    .collect(),
            );
            got.sort();
            want.sort();
            assert_eq!(got, want);
        }
        assert!(serial.pairs() > 0, "the workload leaves blocks indexed");
    }

    #[test]
    fn the_mailbox_bound_refuses_past_it_and_frees_places_as_messages_are_handled() {
        let a = Admission::new(3);
        assert!((0..3).all(|_| a.admit()));
        assert!(!a.admit(), "the fourth waits nowhere: dropped");
        a.done();
        assert!(a.admit(), "a handled message frees its place");
        assert!(!a.admit());
        for _ in 0..10 {
            a.done();
        }
        assert!((0..3).all(|_| a.admit()), "never below zero");
        assert!(!a.admit());
    }
}
