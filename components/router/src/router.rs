//! [`KvRouter`]: the routing core (index, load accounting, predictions, shared decisions).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dynamo_kv::index::IdBuild;
use dynamo_kv::{block_hashes, IndexSettings, KvIndex, Overlap};
use dynamo_protocols::kv::{LoadReport, SequenceHash, WorkerId};
use dynamo_protocols::llm::TokenId;
use dynamo_protocols::router::{LeaseId, RouterEvent, RouterEventKind};

use crate::idle::IdleSet;
use crate::lease::{LeaseInner, RouteLease};
use crate::sink::DecisionSink;

#[derive(Debug, Clone, PartialEq)]
pub struct KvRouterSettings {
    /// Weight of prefill work against decode load.
    pub overlap_weight: f64,
    /// 0: lowest cost wins; above 0: softmax sampling over costs.
    pub temperature: f64,
    /// Workers whose KV usage fraction is above this are skipped; when all are, requests get
    /// 503 (no queueing in the router: the engines queue). `None`: never skipped.
    pub busy_threshold: Option<f64>,
    /// Credit for a cached block in host memory / on disk (device blocks count 1).
    pub host_credit: f64,
    pub disk_credit: f64,
    /// Credit for a block a peer holds (device or host) that the chosen worker would fetch
    /// from it (cluster-wide KV sharing); 0, the default: never suggested (the workers must
    /// share: `--kv-share`).
    pub peer_credit: f64,
    /// Ignore overlap: route by load alone (`least-loaded`).
    pub load_only: bool,
    /// How long a prefix the router sent to a worker counts as cached there before the
    /// worker's own events confirm it, while events flow (0, the default: no prediction; on the
    /// scarce-KV bench predictions lowered the hit rate).
    pub prediction_ttl: Duration,
    /// Fallback: once requests were routed this long ago and no KV event has arrived from any
    /// worker, the router predicts cached prefixes from its own decisions (`fallback_ttl` each),
    /// logs it once and sets `dynamo_router_approximate` to 1; the first event ends it.
    pub fallback_after: Duration,
    pub fallback_ttl: Duration,
    /// A request another router (or a frontend with a remote router) routed counts here
    /// until its finish event arrives, or for this long should that event be lost.
    pub shared_lease_ttl: Duration,
    pub index: IndexSettings,
    /// Conditional disaggregation (when prefill workers serve the model): prefill runs on
    /// the decode worker when less than this many prompt tokens are uncached there...
    pub disagg_min_remote_tokens: usize,
    /// ...or when every prefill worker has more than this many prompt tokens queued.
    pub disagg_max_prefill_queue: u64,
    /// Seeds the random choices (ties, softmax sampling) for a reproducible run (the
    /// simulator); `None`, the default: the thread's generator.
    pub seed: Option<u64>,
}

impl Default for KvRouterSettings {
    fn default() -> Self {
        Self {
            overlap_weight: 1.0,
            temperature: 0.0,
            busy_threshold: None,
            host_credit: 0.5,
            disk_credit: 0.25,
            peer_credit: 0.0,
            load_only: false,
            prediction_ttl: Duration::ZERO,
            fallback_after: Duration::from_secs(2),
            fallback_ttl: Duration::from_secs(120),
            shared_lease_ttl: Duration::from_secs(600),
            index: IndexSettings::default(),
            disagg_min_remote_tokens: 512,
            disagg_max_prefill_queue: 32768,
            seed: None,
        }
    }
}

/// Every worker's [`Accounting`] behind one lock: a route reads all its candidates' under
/// one read lock (a thousand map lookups under a thousand shard locks were a fifth of a
/// simulated cluster's time), and each update is a short write.
#[derive(Debug)]
pub(crate) struct Loads(std::sync::RwLock<LoadTable>);

/// The accounting of every worker, and the workers ordered by their load bound.
#[derive(Debug)]
pub(crate) struct LoadTable {
    map: HashMap<WorkerId, LoadEntry, IdBuild>,
    /// Workers by [`LoadTable::bound`] (as f64 bits: non-negative floats order as their bits),
    /// so a route can visit the workers without a prefix hit least loaded first and stop at
    /// the first whose bound is above the best cost found (see `KvRouter::route_as`).
    order: std::collections::BTreeSet<(u64, WorkerId)>,
    /// The workers whose bound is 0 (nothing pending, nothing decoding: idle), in id order,
    /// so a route draws among them without visiting them (`KvRouter::least_cost`).
    idle: IdleSet,
    /// How many idle workers report each pool size (0, unknown, is not counted): an idle
    /// worker whose pool is smaller than the request costs more than the others.
    idle_totals: std::collections::BTreeMap<u64, u32>,
    /// The router's `overlap_weight`.
    weight: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct LoadEntry {
    acc: Accounting,
    /// Its KV block size (1 until the worker is added with its model).
    block_size: usize,
    /// Its key in `order`.
    key: u64,
}

/// The key of a bound of 0 (an idle worker).
const IDLE: u64 = 0;

/// The part of a worker's cost that is its own load: `overlap_weight x pending prompt blocks
/// plus decode blocks`. Any request's cost there is at least its cost on an idle worker
/// without a prefix hit plus this.
fn bound(weight: f64, e: &LoadEntry) -> f64 {
    // Non-negative terms: never -0.0, so idle is exactly `IDLE`.
    let pending = e.acc.pending_prefill_tokens() as f64 / e.block_size.max(1) as f64;
    weight * pending + e.acc.decode_blocks() as f64
}

impl LoadTable {
    pub(crate) fn get(&self, w: &WorkerId) -> Option<&Accounting> {
        self.map.get(w).map(|e| &e.acc)
    }

    /// Workers with an accounting.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Changes `w`'s entry (starting one when `create`) and its place in the order.
    fn change(&mut self, w: WorkerId, create: bool, f: impl FnOnce(&mut LoadEntry)) {
        let weight = self.weight;
        let entry = match (self.map.get_mut(&w), create) {
            (Some(e), _) => e,
            (None, true) => self.map.entry(w).or_insert(LoadEntry {
                block_size: 1,
                key: u64::MAX,
                ..Default::default()
            }),
            (None, false) => return,
        };
        let (old, old_total) = (entry.key, entry.acc.report.total_blocks);
        f(entry);
        let key = bound(weight, entry).max(0.0).to_bits();
        let total = entry.acc.report.total_blocks;
        if key != old {
            entry.key = key;
            self.order.remove(&(old, w));
            self.order.insert((key, w));
        }
        if key != old || total != old_total {
            if old == IDLE {
                self.leave_idle(w, old_total);
            }
            if key == IDLE {
                self.idle.insert(w);
                if total > 0 {
                    *self.idle_totals.entry(total).or_default() += 1;
                }
            }
        }
    }

    fn leave_idle(&mut self, w: WorkerId, total: u64) {
        self.idle.remove(w);
        if let Some(n) = self.idle_totals.get_mut(&total) {
            *n -= 1;
            if *n == 0 {
                self.idle_totals.remove(&total);
            }
        }
    }

    /// Whether a request of `needed` blocks fits in every idle worker's pool.
    fn fits_every_idle(&self, needed: f64) -> bool {
        self.idle_totals
            .first_key_value()
            .is_none_or(|(t, _)| *t as f64 >= needed)
    }

    /// Workers with their bounds, least first; with `busy_only`, only those with a bound
    /// above 0 (not idle).
    pub(crate) fn by_bound(&self, busy_only: bool) -> impl Iterator<Item = (f64, WorkerId)> + '_ {
        let from = if busy_only { IDLE + 1 } else { IDLE };
        self.order
            .range((from, WorkerId(0))..)
            .map(|&(k, w)| (f64::from_bits(k), w))
    }
}

impl Loads {
    pub(crate) fn new(weight: f64) -> Self {
        Self(std::sync::RwLock::new(LoadTable {
            map: HashMap::default(),
            order: Default::default(),
            idle: IdleSet::default(),
            idle_totals: Default::default(),
            weight,
        }))
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, LoadTable> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, LoadTable> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, w: &WorkerId) -> Option<Accounting> {
        self.read().get(w).copied()
    }

    /// Changes `w`'s accounting if it has one.
    pub(crate) fn update(&self, w: &WorkerId, f: impl FnOnce(&mut Accounting)) {
        self.write().change(*w, false, |e| f(&mut e.acc));
    }

    /// Changes `w`'s accounting, starting one if it has none.
    fn upsert(&self, w: WorkerId, f: impl FnOnce(&mut Accounting)) {
        self.write().change(w, true, |e| f(&mut e.acc));
    }

    /// Starts `w`'s accounting (idle) if it has none, with its block size.
    fn add(&self, w: WorkerId, block_size: usize) {
        self.write()
            .change(w, true, |e| e.block_size = block_size.max(1));
    }

    fn remove(&self, w: &WorkerId) {
        let mut t = self.write();
        if let Some(e) = t.map.remove(w) {
            t.order.remove(&(e.key, *w));
            if e.key == IDLE {
                t.leave_idle(*w, e.acc.report.total_blocks);
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Accounting {
    report: LoadReport,
    /// Prompt tokens routed here whose first token has not come back yet.
    pub(crate) prefill_tokens: u64,
    /// New (uncached) blocks of requests routed here and not finished: the load we add.
    pub(crate) blocks: u64,
    /// All blocks those requests occupy, shared prefix blocks included.
    pub(crate) occupied: u64,
    /// Our own counts when the report was taken (at most: see [`Accounting::settle`]): the
    /// rest of a report is other load.
    occupied_at_report: u64,
    prefill_at_report: u64,
    /// The highest our counts were since the last report arrived (before a settle lowered
    /// them).
    occupied_peak: u64,
    prefill_peak: u64,
}

impl Accounting {
    /// Our requests gave back `prefill_tokens` of prompt work (first token), or their `blocks`
    /// and `occupied` blocks (finished). A report is taken before it arrives: one taken just
    /// before this but received after still shows them, and read against our lowered counts
    /// they would look like someone else's load for a whole report period (under load that
    /// steered requests away from the workers that had just freed room, onto workers busy
    /// with a prefill: `scripts/validate-simulator`). So the next report is read against the
    /// highest our counts were since the previous one: whenever it was taken, our requests
    /// then were at most that many.
    pub(crate) fn settle(&mut self, prefill_tokens: u64, blocks: u64, occupied: u64) {
        self.prefill_peak = self.prefill_peak.max(self.prefill_tokens);
        self.occupied_peak = self.occupied_peak.max(self.occupied);
        self.prefill_tokens = self.prefill_tokens.saturating_sub(prefill_tokens);
        self.blocks = self.blocks.saturating_sub(blocks);
        self.occupied = self.occupied.saturating_sub(occupied);
    }

    fn record(&mut self, report: LoadReport) {
        self.report = report;
        self.occupied_at_report = std::mem::take(&mut self.occupied_peak).max(self.occupied);
        self.prefill_at_report = std::mem::take(&mut self.prefill_peak).max(self.prefill_tokens);
    }

    /// Active blocks: ours now, plus what the last report showed beyond ours then (other
    /// routers' requests), so a report taken before our requests finished does not linger.
    pub(crate) fn decode_blocks(&self) -> u64 {
        // Saturating: a report is bus input, and no figure in it may overflow the sum.
        self.blocks.saturating_add(
            self.report
                .active_blocks
                .saturating_sub(self.occupied_at_report),
        )
    }

    pub(crate) fn pending_prefill_tokens(&self) -> u64 {
        self.prefill_tokens.saturating_add(
            self.report
                .queued_prefill_tokens
                .saturating_sub(self.prefill_at_report),
        )
    }
}

/// The cost of sending a request of `needed` blocks to a worker where `overlap` of them are
/// cached, `pending_blocks` of prompt work wait, `decode_blocks` are active and the pool has
/// `total_blocks` (0: unknown): `overlap_weight x (uncached blocks + pending + wait) +
/// decode_blocks + overflow`, where device hits count 1 and host and disk hits `host_credit`
/// and `disk_credit` (they still cost a copy), and `overflow` is the request's blocks that would
/// not fit beside the active ones (`decode_blocks + needed - device hits - total_blocks`): the
/// request waits for memory there (for a running request to finish, far longer than a
/// prefill), whether its prefix is onboarded or computed, so it also costs `wait = needed`. A
/// worker holding the prefix on host keeps its credit against an equally full worker, and loses
/// to one with room. With `peer_credit` on, a worker may instead be credited `peer_credit` for
/// each block after its own device hits of the longest run another worker (`peer` blocks, in
/// its device pool or host tier) could send it, when that is worth more than its own tiers: a
/// worker with room then wins the request and fetches the prefix, instead of computing it.
/// Lower is better. Monotone: never lower with more load or fewer cached blocks.
pub fn cost(
    s: &KvRouterSettings,
    needed: f64,
    overlap: Overlap,
    peer: u32,
    pending_blocks: f64,
    decode_blocks: f64,
    total_blocks: f64,
) -> f64 {
    let overflow = if total_blocks > 0.0 {
        (decode_blocks + needed - overlap.device as f64 - total_blocks).max(0.0)
    } else {
        0.0
    };
    let credited = credited(s, overlap, peer).0;
    // A request that does not fit waits for a running one to finish: far longer than its
    // prefill, so it costs as much again.
    let wait = if overflow > 0.0 { needed } else { 0.0 };
    s.overlap_weight * ((needed - credited).max(0.0) + pending_blocks + wait)
        + decode_blocks
        + overflow
}

/// The cached blocks a worker is credited with, and whether fetching the run a peer holds
/// (`peer` leading blocks, after the worker's own device blocks) beats its own lower tiers.
fn credited(s: &KvRouterSettings, o: Overlap, peer: u32) -> (f64, bool) {
    let own = o.device as f64 + s.host_credit * o.host as f64 + s.disk_credit * o.disk as f64;
    let fetched = o.device as f64 + s.peer_credit * peer.saturating_sub(o.device) as f64;
    match s.peer_credit > 0.0 && fetched > own {
        true => (fetched, true),
        false => (own, false),
    }
}

/// Why no worker was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no worker to route to")]
    NoWorkers,
    #[error("all {0} workers are over the busy threshold")]
    AllBusy(usize),
}

/// A request routed by another router, as this one accounts it.
#[derive(Debug, Clone, Copy)]
struct SharedLease {
    worker: WorkerId,
    prefill_tokens: u64,
    blocks: u64,
    occupied: u64,
    at: Instant,
}

/// Most peer decisions (and early first-token or finish events) a router keeps at once:
/// far more requests than a fleet has in flight, so only a flood of forged decisions reaches
/// it.
const MAX_SHARED_LEASES: usize = 1 << 20;

#[derive(Default)]
struct Shared {
    leases: HashMap<LeaseId, SharedLease>,
    /// First tokens and finishes that arrived before their decision (bus order holds per
    /// publisher only): (when, finished).
    early: HashMap<LeaseId, (Instant, bool)>,
    swept: Option<Instant>,
}

/// A routing decision.
pub struct Decision {
    pub worker: WorkerId,
    pub overlap: Overlap,
    pub lease: RouteLease,
    /// A peer holding a longer leading run of the prompt (device or host) than the worker,
    /// and how many blocks: the worker fetches them (with `peer_credit` on).
    pub peer: Option<(WorkerId, u32)>,
}

/// What a route asks of each worker's cost: the prefix hits, the request's blocks, the block
/// size, and each worker's best peer (with `peer_credit`).
struct Query<'a> {
    overlaps: &'a HashMap<WorkerId, Overlap, IdBuild>,
    needed: f64,
    bs: usize,
    best_peer: &'a dyn Fn(WorkerId) -> (u32, Option<WorkerId>),
    /// The longest run a peer can send (what `best_peer` gives at most).
    top_run: u32,
}

/// The workers serving a model (sorted) and their block size.
type Candidates = (Arc<Vec<WorkerId>>, usize);

pub struct KvRouter {
    settings: KvRouterSettings,
    /// Per model, the workers serving it and their block size (see `candidates`).
    by_model: Mutex<HashMap<String, Candidates>>,
    /// The seeded generator, when the settings give a seed.
    rng: Option<Mutex<rand::rngs::StdRng>>,
    index: KvIndex,
    pub(crate) loads: Loads,
    /// Completed resyncs from worker dumps.
    resyncs: std::sync::atomic::AtomicU64,
    /// Event batches and load reports refused as forged (one instance speaking for another).
    forged: std::sync::atomic::AtomicU64,
    /// Whether any KV event has arrived; when the first request was routed.
    events_seen: std::sync::atomic::AtomicBool,
    first_route: std::sync::OnceLock<Instant>,
    approximate_logged: std::sync::atomic::AtomicBool,
    /// Prefixes predicted from routing decisions, oldest first, until their events arrive.
    predictions: Mutex<VecDeque<(Instant, WorkerId, Vec<SequenceHash>)>>,
    /// This router's id in shared decisions, and where its decisions are published.
    id: u64,
    sink: std::sync::OnceLock<DecisionSink>,
    next_lease: AtomicU64,
    shared: Mutex<Shared>,
    /// Workers in discovery: the model each serves and its KV block size.
    models: DashMap<WorkerId, (String, usize)>,
    /// Prefill workers in discovery: their model, block size and prefill endpoint.
    pub(crate) prefill: DashMap<WorkerId, crate::disagg::PrefillWorker>,
    /// Decode workers in discovery (the others prefill their own requests).
    pub(crate) decode: DashMap<WorkerId, ()>,
}

impl KvRouter {
    pub fn new(settings: KvRouterSettings) -> Arc<Self> {
        let rng = settings
            .seed
            .map(|s| Mutex::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(s)));
        Arc::new(Self {
            rng,
            by_model: Mutex::new(HashMap::new()),
            index: KvIndex::new(settings.index.clone()),
            loads: Loads::new(settings.overlap_weight),
            settings,
            resyncs: Default::default(),
            forged: Default::default(),
            events_seen: Default::default(),
            first_route: std::sync::OnceLock::new(),
            approximate_logged: Default::default(),
            predictions: Mutex::new(VecDeque::new()),
            id: rand::random(),
            sink: std::sync::OnceLock::new(),
            next_lease: AtomicU64::new(1),
            shared: Mutex::new(Shared::default()),
            models: DashMap::new(),
            prefill: DashMap::new(),
            decode: DashMap::new(),
        })
    }

    /// `f` of the seeded generator, or of the thread's.
    fn random<T>(&self, f: impl FnOnce(&mut dyn rand::RngCore) -> T) -> T {
        match &self.rng {
            Some(m) => f(&mut *m.lock().unwrap_or_else(|p| p.into_inner())),
            None => f(&mut rand::rng()),
        }
    }

    /// This router's id in shared decisions.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Publishes this router's decisions from now on.
    pub fn share_decisions(&self, sink: DecisionSink) {
        let _ = self.sink.set(sink);
    }

    pub(crate) fn publish(&self, lease: u64, kind: RouterEventKind) {
        if let Some(sink) = self.sink.get() {
            sink.send(RouterEvent {
                lease: LeaseId {
                    router: self.id,
                    id: lease,
                },
                kind,
            });
        }
    }

    /// What this router accounts to `worker` from the requests it and the other routers
    /// routed there (prompt tokens before their first token, new blocks until they end); load
    /// reports are not included.
    pub fn accounted(&self, worker: WorkerId) -> (u64, u64) {
        self.loads
            .get(&worker)
            .map(|a| (a.prefill_tokens, a.blocks))
            .unwrap_or_default()
    }

    /// Requests routed by other routers that this one accounts for.
    pub fn shared_leases(&self) -> usize {
        self.shared.lock().map(|s| s.leases.len()).unwrap_or(0)
    }

    /// Applies another router's decision event (or a remote-router frontend's) to the load
    /// accounting. Unknown leases, duplicates and late events are harmless.
    pub fn apply_decision(&self, event: RouterEvent) {
        let Ok(mut shared) = self.shared.lock() else {
            return;
        };
        let now = Instant::now();
        match event.kind {
            RouterEventKind::Routed {
                worker,
                prefill_tokens,
                blocks,
                occupied,
            } => {
                // A decision for a worker this router does not know (not, or no longer, in
                // discovery), or beyond what a fleet could have in flight, is dropped: decisions
                // are bus input and must not grow this router's state without bound.
                if shared.leases.contains_key(&event.lease)
                    || !self.models.contains_key(&worker)
                    || shared.leases.len() >= MAX_SHARED_LEASES
                {
                    return;
                }
                let mut lease = SharedLease {
                    worker,
                    prefill_tokens,
                    blocks,
                    occupied,
                    at: now,
                };
                // Kept until it ages out: a duplicate of the decision is dropped too.
                match shared.early.get(&event.lease) {
                    Some((_, true)) => return,
                    Some((_, false)) => lease.prefill_tokens = 0,
                    None => {}
                }
                self.loads.upsert(worker, |acc| {
                    acc.prefill_tokens = acc.prefill_tokens.saturating_add(lease.prefill_tokens);
                    acc.blocks = acc.blocks.saturating_add(lease.blocks);
                    acc.occupied = acc.occupied.saturating_add(lease.occupied);
                });
                shared.leases.insert(event.lease, lease);
            }
            RouterEventKind::PrefillDone => {
                let early = shared.early.len();
                match shared.leases.get_mut(&event.lease) {
                    Some(lease) => {
                        let tokens = std::mem::take(&mut lease.prefill_tokens);
                        self.loads
                            .update(&lease.worker, |acc| acc.settle(tokens, 0, 0));
                    }
                    None if early < MAX_SHARED_LEASES => {
                        shared.early.entry(event.lease).or_insert((now, false));
                    }
                    None => {}
                }
            }
            RouterEventKind::Finished => match shared.leases.remove(&event.lease) {
                Some(lease) => self.release(&lease),
                None if shared.early.len() < MAX_SHARED_LEASES => {
                    shared.early.insert(event.lease, (now, true));
                }
                None => {}
            },
        }
        metrics::gauge!("dynamo_router_shared_leases").set(shared.leases.len() as f64);
    }

    fn release(&self, lease: &SharedLease) {
        self.loads.update(&lease.worker, |acc| {
            acc.settle(lease.prefill_tokens, lease.blocks, lease.occupied)
        });
    }

    /// Releases shared leases whose finish never came, and forgets old early events.
    fn sweep_shared(&self) {
        let Ok(mut shared) = self.shared.lock() else {
            return;
        };
        if shared
            .swept
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        shared.swept = Some(Instant::now());
        let ttl = self.settings.shared_lease_ttl;
        let expired: Vec<LeaseId> = shared
            .leases
            .iter()
            .filter(|(_, l)| l.at.elapsed() > ttl)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(lease) = shared.leases.remove(&id) {
                self.release(&lease);
                metrics::counter!("dynamo_router_expired_leases_total").increment(1);
            }
        }
        let keep = ttl.min(Duration::from_secs(60));
        shared.early.retain(|_, (at, _)| at.elapsed() <= keep);
    }

    /// Records that `worker` (in discovery) serves `model` with blocks of `block_size`.
    pub fn add_worker(&self, worker: WorkerId, model: String, block_size: usize) {
        // Every candidate of a model has an accounting (idle until routed to or reported):
        // routes visit only the workers in the load order.
        self.loads.add(worker, block_size);
        self.models.insert(worker, (model, block_size));
        self.invalidate_candidates();
    }

    /// Picks a worker among those serving `model` (as discovery shows them), but not in
    /// `exclude`, for `tokens`.
    pub fn route_model(
        self: &Arc<Self>,
        model: &str,
        exclude: &[WorkerId],
        tokens: &[TokenId],
    ) -> Result<Decision, RouteError> {
        self.route_model_as(model, exclude, tokens, self.settings.load_only)
    }

    /// [`KvRouter::route_model`], by load alone when `load_only` (whatever the settings say).
    pub fn route_model_as(
        self: &Arc<Self>,
        model: &str,
        exclude: &[WorkerId],
        tokens: &[TokenId],
        load_only: bool,
    ) -> Result<Decision, RouteError> {
        let (all, block_size) = self.candidates(model);
        if exclude.is_empty() {
            return self.route_as(&all, tokens, block_size, load_only, true);
        }
        let candidates: Vec<WorkerId> = all
            .iter()
            .filter(|w| !exclude.contains(w))
            .copied()
            .collect();
        self.route_as(&candidates, tokens, block_size, load_only, true)
    }

    /// The workers serving `model` (sorted) and their block size: kept until a worker joins
    /// or leaves, not rebuilt for every request (a thousand workers made that a third of a
    /// route's time).
    fn candidates(&self, model: &str) -> Candidates {
        let mut cache = self.by_model.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(model) {
            return c.clone();
        }
        let mut block_size = 0;
        let mut workers: Vec<WorkerId> = Vec::new();
        for e in self.models.iter() {
            if e.value().0 == model {
                workers.push(*e.key());
                block_size = e.value().1;
            }
        }
        workers.sort_unstable();
        let entry = (Arc::new(workers), block_size);
        cache.insert(model.to_string(), entry.clone());
        entry
    }

    fn invalidate_candidates(&self) {
        self.by_model
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Hands `lease` over to the shared accounting, under its id: for a router component,
    /// whose caller reports the request's first token and end as decision events.
    pub fn detach(&self, mut lease: RouteLease) -> LeaseId {
        let LeaseInner::Local {
            id,
            worker,
            prefill_tokens,
            blocks,
            occupied,
            ..
        } = std::mem::replace(&mut lease.inner, LeaseInner::Detached)
        else {
            unreachable!("detach takes a lease this router made")
        };
        let lease_id = LeaseId {
            router: self.id,
            id,
        };
        if let Ok(mut shared) = self.shared.lock() {
            shared.leases.insert(
                lease_id,
                SharedLease {
                    worker,
                    prefill_tokens,
                    blocks,
                    occupied,
                    at: Instant::now(),
                },
            );
        }
        lease_id
    }

    pub fn index(&self) -> &KvIndex {
        &self.index
    }

    /// Workers rebuilt from their dumps so far (after a gap in events, or a late start).
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Event batches and load reports refused because their instance id was not the
    /// subject's, or the instance is registered in another component.
    pub fn forged(&self) -> u64 {
        self.forged.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn count_forged(&self) {
        self.forged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A KV event arrived: the index is fed by events, not predictions.
    pub fn note_events(&self) {
        if !self
            .events_seen
            .swap(true, std::sync::atomic::Ordering::Relaxed)
            && self
                .approximate_logged
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!("KV events are arriving: routing on the event-fed index again");
            metrics::gauge!("dynamo_router_approximate").set(0.0);
        }
    }

    /// Whether routing runs on predictions because no worker publishes KV events.
    pub fn approximate(&self) -> bool {
        !self.events_seen.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .first_route
                .get()
                .is_some_and(|t| t.elapsed() >= self.settings.fallback_after)
    }

    fn prediction_ttl(&self) -> Duration {
        if self.approximate() {
            if !self
                .approximate_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    after = ?self.settings.fallback_after,
                    "no KV events from any worker: routing on prefixes predicted from routing decisions"
                );
            }
            metrics::gauge!("dynamo_router_approximate").set(1.0);
            self.settings.fallback_ttl
        } else {
            self.settings.prediction_ttl
        }
    }

    pub fn count_resync(&self) {
        self.resyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn expire_predictions(&self) {
        let ttl = self.settings.prediction_ttl.max(self.settings.fallback_ttl);
        let Ok(mut p) = self.predictions.lock() else {
            return;
        };
        while p.front().is_some_and(|(at, _, _)| at.elapsed() > ttl) {
            if let Some((_, w, hashes)) = p.pop_front() {
                self.index.unpredict(w, &hashes);
            }
        }
    }

    /// The last load report recorded for `w`.
    pub fn reported(&self, w: WorkerId) -> Option<LoadReport> {
        self.loads.get(&w).map(|a| a.report)
    }

    pub fn record_load(&self, w: WorkerId, report: LoadReport) {
        self.loads.upsert(w, |acc| acc.record(report));
    }

    pub fn forget(&self, w: WorkerId) {
        self.index.remove_worker(w);
        self.loads.remove(&w);
        self.models.remove(&w);
        self.invalidate_candidates();
        self.prefill.remove(&w);
        self.decode.remove(&w);
        if let Ok(mut shared) = self.shared.lock() {
            shared.leases.retain(|_, l| l.worker != w);
        }
    }

    /// Picks a worker among `candidates` for `tokens`.
    pub fn route(
        self: &Arc<Self>,
        candidates: &[WorkerId],
        tokens: &[TokenId],
        block_size: usize,
    ) -> Result<Decision, RouteError> {
        self.route_as(
            candidates,
            tokens,
            block_size,
            self.settings.load_only,
            false,
        )
    }

    /// What `q` costs on worker `w` with `o` cached (`None`: the worker is over the busy
    /// threshold). A worker without an accounting is idle.
    fn worker_cost(&self, loads: &LoadTable, q: &Query, w: WorkerId, o: Overlap) -> Option<f64> {
        let s = &self.settings;
        // Read in place (a route reads hundreds: the holders of a popular prefix); a worker
        // without an accounting is idle.
        let (decode, total, pending) = loads.get(&w).map_or((0.0, 0.0, 0), |a| {
            let total = a.report.total_blocks as f64;
            (a.decode_blocks() as f64, total, a.pending_prefill_tokens())
        });
        if s.busy_threshold
            .is_some_and(|t| total > 0.0 && decode / total > t)
        {
            return None;
        }
        let pending = pending as f64 / q.bs as f64;
        Some(cost(
            s,
            q.needed,
            o,
            (q.best_peer)(w).0,
            pending,
            decode,
            total,
        ))
    }

    /// Scores every candidate: the lowest cost wins (ties drawn at random), or with a
    /// temperature, a softmax draw over all costs.
    fn sample(
        &self,
        candidates: &[WorkerId],
        q: &Query,
    ) -> Result<(WorkerId, Overlap), RouteError> {
        let s = &self.settings;
        let mut scored: Vec<(WorkerId, f64, Overlap)> = Vec::with_capacity(candidates.len());
        let loads = self.loads.read();
        for &w in candidates {
            let o = q.overlaps.get(&w).copied().unwrap_or_default();
            if let Some(c) = self.worker_cost(&loads, q, w, o) {
                scored.push((w, c, o));
            }
        }
        drop(loads);
        if scored.is_empty() {
            return Err(RouteError::AllBusy(candidates.len()));
        }
        let pick = if s.temperature > 0.0 {
            let min = scored.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
            let weights: Vec<f64> = scored
                .iter()
                .map(|x| (-(x.1 - min) / s.temperature).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut r = self.random(|r| rand::Rng::random::<f64>(r)) * total;
            let mut chosen = scored.len() - 1;
            for (i, wgt) in weights.iter().enumerate() {
                if r < *wgt {
                    chosen = i;
                    break;
                }
                r -= wgt;
            }
            chosen
        } else {
            let min = scored.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
            let ties: Vec<usize> = (0..scored.len())
                .filter(|&i| scored[i].1 <= min + 1e-9)
                .collect();
            ties[self.random(|r| rand::Rng::random_range(r, 0..ties.len()))]
        };
        let (worker, _, overlap) = scored[pick];
        Ok((worker, overlap))
    }

    /// The lowest cost among `candidates` (sorted, all in the load order; the overlap weight
    /// at least 0), ties drawn at
    /// random, without scoring them all: the workers are visited least loaded first (the
    /// load order), stopping at the first whose load bound plus the least any worker's
    /// prefix hit can take off puts it above the best cost so far. Every worker with the
    /// lowest cost is found, so the choice is the one scoring all would make (the same ties,
    /// drawn the same way). A popular prefix has hundreds of holders; the walk visits the few
    /// least loaded of them (scoring every holder was a fifth of a busy simulated fleet's
    /// time).
    ///
    /// Idle workers without a hit all cost the same (the idle floor) when the request fits
    /// every idle pool: when the candidates are every worker, they are counted, not visited,
    /// and the draw selects among them by rank (at 10k idle workers, all tied, visiting them
    /// was 350 µs a route).
    fn least_cost(
        &self,
        candidates: &[WorkerId],
        q: &Query,
    ) -> Result<(WorkerId, Overlap), RouteError> {
        let s = &self.settings;
        let loads = self.loads.read();
        let cost_of = |w: WorkerId, o: Overlap| self.worker_cost(&loads, q, w, o);
        let mut best = f64::INFINITY;
        let mut ties: Vec<(WorkerId, Overlap)> = Vec::new();
        // Whether cost `c` ties the best so far (after lowering it, and dropping the ties it
        // beats, when it is lower).
        let ties_best = |best: &mut f64, ties: &mut Vec<(WorkerId, Overlap)>, c: f64| {
            if c < *best - 1e-9 {
                *best = c;
                ties.clear();
            }
            c <= *best + 1e-9
        };
        let consider = |best: &mut f64, ties: &mut Vec<_>, w: WorkerId, o: Overlap| {
            if let Some(c) = cost_of(w, o) {
                if ties_best(best, ties, c) {
                    ties.push((w, o));
                }
            }
        };
        // What a worker costs idle, with `o` cached.
        let floor =
            |w: WorkerId, o: Overlap| cost(s, q.needed, o, (q.best_peer)(w).0, 0.0, 0.0, 0.0);
        // Candidates are sorted, distinct and all in the load order: as many as it holds, they
        // are all of it (one model, nothing excluded: the usual case), and the walk below
        // need not look each worker up among them.
        let every = candidates.len() == loads.len();
        let candidate = |w: WorkerId| every || candidates.binary_search(&w).is_ok();
        // A worker's cost is at least its load bound plus its idle cost (`cost` is
        // `overlap_weight`, never negative here, times the prompt's uncached blocks and its
        // pending ones, plus its decode blocks, plus terms that are never negative), so the
        // walk can stop at the first worker whose bound plus the least idle cost of any worker
        // is above the best: the holders need not be scored one by one. The least idle cost:
        // of a holder, or of any other worker (whose best peer holds at most the longest run).
        let least_floor = q.overlaps.iter().fold(
            cost(s, q.needed, Overlap::default(), q.top_run, 0.0, 0.0, 0.0),
            |least, (&w, &o)| least.min(floor(w, o)),
        );
        let mut idle_floor: Option<f64> = None;
        // The idle workers with a hit, sorted: the rest of the idle set, when counted, is the
        // workers without one.
        let mut idle_holders: Vec<WorkerId> = Vec::new();
        // The idle workers without a hit, and what each costs (counted, not visited).
        let mut idle_rest: Option<(usize, f64)> = None;
        let counted =
            every && s.busy_threshold.is_none_or(|t| t >= 0.0) && loads.fits_every_idle(q.needed);
        if counted {
            idle_holders = match loads.idle.len() < q.overlaps.len() {
                true => loads
                    .idle
                    .iter()
                    .filter(|w| q.overlaps.contains_key(w))
                    .collect(),
                false => q
                    .overlaps
                    .keys()
                    .filter(|w| loads.idle.contains(**w))
                    .copied()
                    .collect(),
            };
            idle_holders.sort_unstable();
            // The walk skips idle workers: those with a hit are scored here.
            for &w in &idle_holders {
                consider(&mut best, &mut ties, w, q.overlaps[&w]);
            }
            if let Some(w) = loads.idle.first_not_in(&idle_holders) {
                // Idle and without a hit: nothing pending, nothing decoding, and the request
                // fits, so each costs exactly the floor.
                let f = *idle_floor.get_or_insert_with(|| floor(w, Overlap::default()));
                if ties_best(&mut best, &mut ties, f) {
                    idle_rest = Some((loads.idle.len() - idle_holders.len(), f));
                }
            }
        }
        for (bound, w) in loads.by_bound(counted) {
            if least_floor + bound > best + 1e-6 {
                break;
            }
            if !candidate(w) {
                continue;
            }
            match q.overlaps.get(&w) {
                Some(&o) => consider(&mut best, &mut ties, w, o),
                None => {
                    // Workers without a hit share one floor (the peer credit of the leading
                    // holder): one already above the best is not scored (only a holder,
                    // further on, may still tie or beat it).
                    let f = *idle_floor.get_or_insert_with(|| floor(w, Overlap::default()));
                    if f + bound <= best + 1e-6 {
                        consider(&mut best, &mut ties, w, Overlap::default());
                    }
                }
            }
        }
        // They tie the best unless a worker visited after them cost less.
        let idle_tied = match idle_rest {
            Some((n, f)) if f <= best + 1e-9 => n,
            _ => 0,
        };
        if ties.is_empty() && idle_tied == 0 {
            return Err(RouteError::AllBusy(candidates.len()));
        }
        // The pick-th in candidate order, as scoring them all would list them (a selection,
        // not a sort: at 10k idle workers every one of them ties).
        let pick = self.random(|r| rand::Rng::random_range(r, 0..ties.len() + idle_tied));
        if idle_tied > 0 {
            ties.sort_unstable_by_key(|t| t.0);
            return Ok(loads
                .idle
                .select_merged(&idle_holders, &ties, pick, Overlap::default())
                .expect("the pick is below the count of ties"));
        }
        drop(loads);
        let (_, chosen, _) = ties.select_nth_unstable_by_key(pick, |t| t.0);
        Ok(*chosen)
    }

    pub(crate) fn settings(&self) -> &KvRouterSettings {
        &self.settings
    }

    /// `known`: every candidate was added with [`KvRouter::add_worker`] (so it has an
    /// accounting in the load order) and `candidates` is sorted.
    pub(crate) fn route_as(
        self: &Arc<Self>,
        candidates: &[WorkerId],
        tokens: &[TokenId],
        block_size: usize,
        load_only: bool,
        known: bool,
    ) -> Result<Decision, RouteError> {
        let started = Instant::now();
        if candidates.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let bs = block_size.max(1);
        let needed = tokens.len().div_ceil(bs) as f64;
        let hashes: Vec<SequenceHash> = if load_only {
            Vec::new()
        } else {
            block_hashes(tokens, bs).into_iter().map(|h| h.1).collect()
        };
        self.expire_predictions();
        self.sweep_shared();
        let overlaps: std::collections::HashMap<WorkerId, Overlap, IdBuild> =
            self.index.find_matches(&hashes).into_iter().collect();
        let s = &self.settings;
        // The two candidates holding the longest runs a peer can send (device and host),
        // so each worker's best peer is one of them.
        let mut peers: [(u32, Option<WorkerId>); 2] = [(0, None); 2];
        if s.peer_credit > 0.0 {
            // Only holders have a run; taken in candidate order, as a full scan would.
            let mut holders: Vec<(WorkerId, Overlap)> = overlaps
                .iter()
                .filter(|(w, _)| candidates.contains(w))
                .map(|(&w, &o)| (w, o))
                .collect();
            holders.sort_unstable_by_key(|h| candidates.iter().position(|c| *c == h.0));
            for (w, o) in holders {
                let run = o.device + o.host;
                if run > peers[0].0 {
                    peers = [(run, Some(w)), peers[0]];
                } else if run > peers[1].0 {
                    peers[1] = (run, Some(w));
                }
            }
        }
        let best_peer = |w: WorkerId| match peers {
            [(n, Some(p)), _] if p != w => (n, Some(p)),
            [_, (n, p)] => (n, p),
        };
        let q = Query {
            overlaps: &overlaps,
            needed,
            bs,
            best_peer: &best_peer,
            top_run: peers[0].0,
        };
        // The load order's walk needs costs that grow with load: a negative overlap weight
        // (refused by the CLI, possible in a library's settings) scores every worker.
        let (worker, overlap) = if s.temperature == 0.0 && known && s.overlap_weight >= 0.0 {
            self.least_cost(candidates, &q)?
        } else {
            self.sample(candidates, &q)?
        };

        let peer = match best_peer(worker) {
            (n, Some(p)) if credited(s, overlap, n).1 => Some((p, n)),
            _ => None,
        };
        self.first_route.get_or_init(Instant::now);
        if !self.prediction_ttl().is_zero() && !hashes.is_empty() {
            self.index.predict(worker, &hashes);
            if let Ok(mut p) = self.predictions.lock() {
                p.push_back((Instant::now(), worker, hashes));
            }
        }
        // The request adds the blocks it does not find in the device pool (shared prefix
        // blocks are already counted in the worker's active blocks while in use; a prefix
        // held in a lower tier is onboarded into new device blocks). Its prefill is what no
        // tier holds: onboarding is a copy, not compute.
        let id = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let cached = peer.map_or(overlap.blocks(), |(_, n)| n.max(overlap.blocks()));
        let prefill_tokens = tokens.len().saturating_sub(cached as usize * bs) as u64;
        let blocks = (needed as u64).saturating_sub(overlap.device as u64);
        let occupied = needed as u64;
        self.loads.upsert(worker, |acc| {
            acc.prefill_tokens += prefill_tokens;
            acc.blocks += blocks;
            acc.occupied += occupied;
        });
        self.publish(
            id,
            RouterEventKind::Routed {
                worker,
                prefill_tokens,
                blocks,
                occupied,
            },
        );
        let lease = RouteLease {
            inner: LeaseInner::Local {
                router: self.clone(),
                id,
                worker,
                prefill_tokens,
                blocks,
                occupied,
            },
        };
        metrics::histogram!("dynamo_router_overlap_blocks").record(overlap.blocks() as f64);
        if needed > 0.0 {
            metrics::histogram!("dynamo_router_hit_ratio").record(overlap.blocks() as f64 / needed);
        }
        metrics::histogram!("dynamo_router_routing_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("dynamo_router_index_blocks").set(self.index.pairs() as f64);
        if peer.is_some() {
            metrics::counter!("dynamo_router_peer_fetches_total").increment(1);
        }
        Ok(Decision {
            worker,
            overlap,
            lease,
            peer,
        })
    }
}
