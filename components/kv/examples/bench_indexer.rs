//! Prefix-index benchmark (`scripts/bench-indexer`): a synthetic Mooncake-style workload with
//! realistic prefix reuse (Zipf-popular shared prefixes of 4-16 blocks plus 1-8 unique blocks
//! per request, each request's blocks stored on one random worker whose pool holds 2048
//! blocks, evicting its oldest blocks) over 1k and 10k workers. Reports:
//! - ingest alone: block events applied per second, on one thread and on two threads with
//!   the workers split between them (as parallel apply threads in the router would split them: per-worker
//!   order kept, different workers in parallel);
//! - `find_matches` p50/p99/max for 64-block queries on one thread while another ingests at
//!   100k block events/s;
//! - memory per indexed (worker, block) pair (RSS growth while building the index).
//!
//! Targets on 2 cores: ingest >= 1M block events/s; find_matches p99 <= 100 us at 10k workers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_kv::{IndexSettings, KvIndex};
use dynamo_protocols::kv::{
    KvEvent, KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock, WorkerId,
};
use hdrhistogram::Histogram;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Zipf-ish index in 0..n: squaring a uniform draw favours small indices.
    fn popular(&mut self, n: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u * u) * n as f64) as u64
    }
}

fn chain(prefix: &[u64]) -> Vec<SequenceHash> {
    let mut out = Vec::with_capacity(prefix.len());
    let mut parent: Option<SequenceHash> = None;
    for &local in prefix {
        let h = dynamo_kv::sequence_hash(parent, LocalBlockHash(local));
        out.push(h);
        parent = Some(h);
    }
    out
}

/// Generates (worker, events) batches: a request's stored blocks, plus the removals its
/// worker's pool needs to stay within capacity.
struct Workload {
    rng: Rng,
    workers: u64,
    prefixes: Vec<Vec<u64>>,
    pools: Vec<VecDeque<SequenceHash>>,
    next_unique: u64,
    capacity: usize,
}

impl Workload {
    fn new(workers: u64, seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let prefixes = (0..2000u64)
            .map(|p| (0..4 + rng.below(13)).map(|i| p * 1000 + i).collect())
            .collect();
        Self {
            rng,
            workers,
            prefixes,
            pools: (0..workers).map(|_| VecDeque::new()).collect(),
            next_unique: 1 << 40,
            capacity: 2048,
        }
    }

    /// A request's full chain of hashes (prefix + unique blocks).
    fn request(&mut self) -> Vec<SequenceHash> {
        let p = self.rng.popular(self.prefixes.len() as u64) as usize;
        let mut locals = self.prefixes[p].clone();
        for _ in 0..1 + self.rng.below(8) {
            locals.push(self.next_unique);
            self.next_unique += 1;
        }
        chain(&locals)
    }

    fn batch(&mut self) -> (WorkerId, Vec<KvEvent>, usize) {
        let w = self.rng.below(self.workers);
        let hashes = self.request();
        let pool = &mut self.pools[w as usize];
        let mut events = vec![KvEvent {
            event_id: 0,
            tier: StorageTier::Device,
            data: KvEventData::Stored {
                parent_hash: None,
                blocks: hashes
                    .iter()
                    .map(|&h| StoredBlock {
                        block_hash: h,
                        tokens_hash: LocalBlockHash(h.0),
                    })
                    .collect(),
            },
        }];
        pool.extend(&hashes);
        let mut n = hashes.len();
        if pool.len() > self.capacity {
            let evict: Vec<SequenceHash> = pool.drain(..pool.len() - self.capacity).collect();
            n += evict.len();
            events.push(KvEvent {
                event_id: 0,
                tier: StorageTier::Device,
                data: KvEventData::Removed {
                    block_hashes: evict,
                },
            });
        }
        (WorkerId(w), events, n)
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!(
        "# bench-indexer on {cpu}, {} cores\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| workers | indexed pairs | ingest block events/s (target 1M) | 2 threads, workers split | find_matches p50 us | p99 us (target 100) | max us | queries/s | bytes per indexed pair |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for workers in [1_000u64, 10_000] {
        let index = Arc::new(KvIndex::new(IndexSettings::default()));
        let mut wl = Workload::new(workers, 7);
        // Warm the index to a steady state, measuring memory growth.
        let rss0 = rss_bytes();
        let warm: Vec<_> = (0..(workers as usize * 120).min(600_000))
            .map(|_| wl.batch())
            .collect();
        for (w, e, _) in &warm {
            index.apply(*w, e);
        }
        let bytes_per_pair = rss_bytes().saturating_sub(rss0) as f64 / index.pairs().max(1) as f64;
        drop(warm);
        // Ingest alone.
        let batches: Vec<_> = (0..200_000).map(|_| wl.batch()).collect();
        let events: usize = batches.iter().map(|b| b.2).sum();
        let t = Instant::now();
        for (w, e, _) in &batches {
            index.apply(*w, e);
        }
        let ingest_rate = events as f64 / t.elapsed().as_secs_f64();
        // Lookups while another thread ingests at 100k block events/s.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (index, stop) = (index.clone(), stop.clone());
            let batches: Vec<_> = (0..60_000).map(|_| wl.batch()).collect();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut sent = 0usize;
                for (w, e, n) in batches.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    index.apply(*w, e);
                    sent += n;
                    let due = Duration::from_secs_f64(sent as f64 / 100_000.0);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                sent as f64 / start.elapsed().as_secs_f64()
            })
        };
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let t = Instant::now();
        let mut queries = 0u64;
        while t.elapsed() < Duration::from_secs(3) {
            let mut q = wl.request();
            while q.len() < 64 {
                q.extend(wl.request());
            }
            q.truncate(64);
            let t0 = Instant::now();
            std::hint::black_box(index.find_matches(&q));
            hist.record(t0.elapsed().as_nanos().max(1) as u64).unwrap();
            queries += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let write_rate = writer.join().unwrap();
        let pairs = index.pairs();
        // Ingest on two threads, each taking the workers of its parity (last, so the lookups
        // above ran on the same index as before this column existed).
        let batches: Vec<_> = (0..200_000).map(|_| wl.batch()).collect();
        let events: usize = batches.iter().map(|b| b.2).sum();
        let (even, odd): (Vec<_>, Vec<_>) = batches.into_iter().partition(|b| b.0 .0 % 2 == 0);
        let t = Instant::now();
        std::thread::scope(|scope| {
            for part in [&even, &odd] {
                let index = &index;
                scope.spawn(move || {
                    for (w, e, _) in part {
                        index.apply(*w, e);
                    }
                });
            }
        });
        let parallel_rate = events as f64 / t.elapsed().as_secs_f64();
        println!(
            "| {workers} | {} | {:.2}M | {:.2}M | {:.1} | {:.1} | {:.0} | {:.0} (writer at {:.0}k/s) | {:.0} |",
            pairs,
            ingest_rate / 1e6,
            parallel_rate / 1e6,
            hist.value_at_quantile(0.5) as f64 / 1e3,
            hist.value_at_quantile(0.99) as f64 / 1e3,
            hist.max() as f64 / 1e3,
            queries as f64 / 3.0,
            write_rate / 1e3,
            bytes_per_pair
        );
    }
}
