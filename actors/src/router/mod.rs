//! The KV-aware router: sends each request where the least prefill work remains, weighed
//! against load.
//!
//! - [`KvRouter`] is the shared core every routing decision reads: the global prefix index
//!   ([`KvIndex`]), each worker's last load report, and the router's own accounting of what it
//!   routed (prefill tokens until the first token, blocks until completion), held by a
//!   [`RouteLease`] whose `Drop` releases it, so the accounting cannot leak.
//! - The ingest actor (`ingest`) keeps the index current from the workers' KV events on the
//!   bus (gap → resync from a dump; worker gone → purge) and records load reports.
//!
//! Cost of worker `w` for a request of `n` blocks: `overlap_weight x (n - credited(w) +
//! pending_prefill(w) / block_size) + decode_blocks(w)`, where `credited` counts cached
//! leading blocks (device 1, host `host_credit`, disk `disk_credit`), and `decode_blocks` is the
//! router's own count plus whatever the worker's last report showed beyond the router's count
//! at that time (load from elsewhere), so a stale report does not outlive the requests in it. Workers whose KV
//! usage is over `busy_threshold` are skipped; the lowest cost wins (ties broken at random), or
//! with `temperature > 0` a softmax over `-cost / temperature` picks.

mod ingest;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dynamo_kv::index::IdBuild;
use dynamo_kv::{block_hashes, IndexSettings, KvIndex, Overlap};
use dynamo_protocols::kv::{LoadReport, SequenceHash, WorkerId};
use dynamo_protocols::llm::TokenId;

pub use ingest::{start_ingest, RouterIngest};

#[derive(Debug, Clone)]
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
    pub index: IndexSettings,
}

impl Default for KvRouterSettings {
    fn default() -> Self {
        Self {
            overlap_weight: 1.0,
            temperature: 0.0,
            busy_threshold: None,
            host_credit: 0.5,
            disk_credit: 0.25,
            load_only: false,
            prediction_ttl: Duration::ZERO,
            fallback_after: Duration::from_secs(2),
            fallback_ttl: Duration::from_secs(120),
            index: IndexSettings::default(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Accounting {
    report: LoadReport,
    /// Prompt tokens routed here whose first token has not come back yet.
    prefill_tokens: u64,
    /// New (uncached) blocks of requests routed here and not finished: the load we add.
    blocks: u64,
    /// All blocks those requests occupy, shared prefix blocks included.
    occupied: u64,
    /// Our own counts when the report was taken: the rest of a report is other load.
    occupied_at_report: u64,
    prefill_at_report: u64,
}

impl Accounting {
    /// Active blocks: ours now, plus what the last report showed beyond ours then (other
    /// routers' requests), so a report taken before our requests finished does not linger.
    fn decode_blocks(&self) -> u64 {
        self.blocks
            + self
                .report
                .active_blocks
                .saturating_sub(self.occupied_at_report)
    }

    fn pending_prefill_tokens(&self) -> u64 {
        self.prefill_tokens
            + self
                .report
                .queued_prefill_tokens
                .saturating_sub(self.prefill_at_report)
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

/// A routing decision.
pub struct Decision {
    pub worker: WorkerId,
    pub overlap: Overlap,
    pub lease: RouteLease,
}

pub struct KvRouter {
    settings: KvRouterSettings,
    index: KvIndex,
    loads: DashMap<WorkerId, Accounting>,
    /// Completed resyncs from worker dumps.
    resyncs: std::sync::atomic::AtomicU64,
    /// Whether any KV event has arrived; when the first request was routed.
    events_seen: std::sync::atomic::AtomicBool,
    first_route: std::sync::OnceLock<Instant>,
    approximate_logged: std::sync::atomic::AtomicBool,
    /// Prefixes predicted from routing decisions, oldest first, until their events arrive.
    predictions: Mutex<VecDeque<(Instant, WorkerId, Vec<SequenceHash>)>>,
}

impl KvRouter {
    pub fn new(settings: KvRouterSettings) -> Arc<Self> {
        Arc::new(Self {
            index: KvIndex::new(settings.index.clone()),
            settings,
            loads: DashMap::new(),
            resyncs: Default::default(),
            events_seen: Default::default(),
            first_route: std::sync::OnceLock::new(),
            approximate_logged: Default::default(),
            predictions: Mutex::new(VecDeque::new()),
        })
    }

    pub fn index(&self) -> &KvIndex {
        &self.index
    }

    /// Workers rebuilt from their dumps so far (after a gap in events, or a late start).
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A KV event arrived: the index is fed by events, not predictions.
    pub(crate) fn note_events(&self) {
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

    pub(crate) fn count_resync(&self) {
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

    pub(crate) fn record_load(&self, w: WorkerId, report: LoadReport) {
        let mut acc = self.loads.entry(w).or_default();
        acc.report = report;
        acc.occupied_at_report = acc.occupied;
        acc.prefill_at_report = acc.prefill_tokens;
    }

    pub(crate) fn forget(&self, w: WorkerId) {
        self.index.remove_worker(w);
        self.loads.remove(&w);
    }

    /// Picks a worker among `candidates` for `tokens`.
    pub fn route(
        self: &Arc<Self>,
        candidates: &[WorkerId],
        tokens: &[TokenId],
        block_size: usize,
    ) -> Result<Decision, RouteError> {
        let started = Instant::now();
        if candidates.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let bs = block_size.max(1);
        let needed = tokens.len().div_ceil(bs) as f64;
        let hashes: Vec<SequenceHash> = if self.settings.load_only {
            Vec::new()
        } else {
            block_hashes(tokens, bs).into_iter().map(|h| h.1).collect()
        };
        self.expire_predictions();
        let overlaps: std::collections::HashMap<WorkerId, Overlap, IdBuild> =
            self.index.find_matches(&hashes).into_iter().collect();
        let s = &self.settings;
        let mut scored: Vec<(WorkerId, f64, Overlap)> = Vec::with_capacity(candidates.len());
        for &w in candidates {
            let acc = self.loads.get(&w).map(|a| *a).unwrap_or_default();
            let decode = acc.decode_blocks() as f64;
            let busy = s.busy_threshold.is_some_and(|t| {
                acc.report.total_blocks > 0 && decode / acc.report.total_blocks as f64 > t
            });
            if busy {
                continue;
            }
            let o = overlaps.get(&w).copied().unwrap_or_default();
            let credited =
                o.device as f64 + s.host_credit * o.host as f64 + s.disk_credit * o.disk as f64;
            let pending = acc.pending_prefill_tokens() as f64 / bs as f64;
            let cost = s.overlap_weight * ((needed - credited).max(0.0) + pending) + decode;
            scored.push((w, cost, o));
        }
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
            let mut r = rand::random::<f64>() * total;
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
            ties[rand::random_range(0..ties.len())]
        };
        let (worker, _, overlap) = scored[pick];
        self.first_route.get_or_init(Instant::now);
        if !self.prediction_ttl().is_zero() && !hashes.is_empty() {
            self.index.predict(worker, &hashes);
            if let Ok(mut p) = self.predictions.lock() {
                p.push_back((Instant::now(), worker, hashes));
            }
        }
        // The request adds the blocks it does not find cached (shared prefix blocks are
        // already counted in the worker's active blocks while in use).
        let lease = RouteLease {
            router: self.clone(),
            worker,
            prefill_tokens: tokens.len().saturating_sub(overlap.blocks() as usize * bs) as u64,
            blocks: (needed as u64).saturating_sub(overlap.blocks() as u64),
            occupied: needed as u64,
        };
        {
            let mut acc = self.loads.entry(worker).or_default();
            acc.prefill_tokens += lease.prefill_tokens;
            acc.blocks += lease.blocks;
            acc.occupied += lease.occupied;
        }
        metrics::histogram!("dynamo_router_overlap_blocks").record(overlap.blocks() as f64);
        if needed > 0.0 {
            metrics::histogram!("dynamo_router_hit_ratio").record(overlap.blocks() as f64 / needed);
        }
        metrics::histogram!("dynamo_router_routing_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("dynamo_router_index_blocks").set(self.index.pairs() as f64);
        Ok(Decision {
            worker,
            overlap,
            lease,
        })
    }
}

/// The router's accounting for one routed request; released when dropped.
pub struct RouteLease {
    router: Arc<KvRouter>,
    worker: WorkerId,
    prefill_tokens: u64,
    blocks: u64,
    occupied: u64,
}

impl RouteLease {
    /// The first token came back: the prompt's prefill is done.
    pub fn prefill_done(&mut self) {
        let tokens = std::mem::take(&mut self.prefill_tokens);
        if tokens > 0 {
            if let Some(mut acc) = self.router.loads.get_mut(&self.worker) {
                acc.prefill_tokens = acc.prefill_tokens.saturating_sub(tokens);
            }
        }
    }
}

impl Drop for RouteLease {
    fn drop(&mut self) {
        self.prefill_done();
        if let Some(mut acc) = self.router.loads.get_mut(&self.worker) {
            acc.blocks = acc.blocks.saturating_sub(self.blocks);
            acc.occupied = acc.occupied.saturating_sub(self.occupied);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_protocols::kv::{KvEvent, KvEventData, LocalBlockHash, StorageTier, StoredBlock};

    fn store(router: &KvRouter, w: u64, tokens: &[u32], bs: usize) {
        let blocks = block_hashes(tokens, bs)
            .into_iter()
            .map(|(l, s)| StoredBlock {
                block_hash: s,
                tokens_hash: LocalBlockHash(l.0),
            })
            .collect();
        router.index().apply(
            WorkerId(w),
            &[KvEvent {
                event_id: 0,
                tier: StorageTier::Device,
                data: KvEventData::Stored {
                    parent_hash: None,
                    blocks,
                },
            }],
        );
    }

    #[test]
    fn the_worker_holding_the_prefix_wins_until_load_outweighs_it() {
        let router = KvRouter::new(KvRouterSettings::default());
        let prompt: Vec<u32> = (0..64).collect();
        store(&router, 2, &prompt[..48], 16);
        let workers = [WorkerId(1), WorkerId(2), WorkerId(3)];
        let d = router.route(&workers, &prompt, 16).unwrap();
        assert_eq!(d.worker, WorkerId(2));
        assert_eq!(d.overlap.device, 3);
        drop(d);
        // Heavy decode load on worker 2 outweighs its 3 cached blocks.
        router.record_load(
            WorkerId(2),
            LoadReport {
                active_blocks: 50,
                total_blocks: 1000,
                ..Default::default()
            },
        );
        assert_ne!(
            router.route(&workers, &prompt, 16).unwrap().worker,
            WorkerId(2)
        );
    }

    #[test]
    fn leases_account_until_dropped_and_busy_workers_are_skipped() {
        let router = KvRouter::new(KvRouterSettings {
            busy_threshold: Some(0.98),
            ..Default::default()
        });
        let workers = [WorkerId(1), WorkerId(2)];
        let prompt: Vec<u32> = (0..160).collect();
        let a = router.route(&workers, &prompt, 16).unwrap();
        // The first request's 10 blocks make its worker costlier: the next goes elsewhere.
        let b = router.route(&workers, &prompt, 16).unwrap();
        assert_ne!(a.worker, b.worker);
        drop((a, b));
        for w in workers {
            let acc = *router.loads.get(&w).unwrap();
            assert_eq!(
                (acc.blocks, acc.prefill_tokens),
                (0, 0),
                "leases released everything"
            );
        }
        router.record_load(
            WorkerId(1),
            LoadReport {
                active_blocks: 99,
                total_blocks: 100,
                ..Default::default()
            },
        );
        router.record_load(
            WorkerId(2),
            LoadReport {
                active_blocks: 99,
                total_blocks: 100,
                ..Default::default()
            },
        );
        assert_eq!(
            router.route(&workers, &prompt, 16).err(),
            Some(RouteError::AllBusy(2))
        );
    }
}
