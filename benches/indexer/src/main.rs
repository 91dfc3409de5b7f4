//! The prefix index against the incumbent (`scripts/bench-indexer`): our `dynamo_kv::KvIndex`
//! and NVIDIA Dynamo's default indexer (`ThreadPoolIndexer<ConcurrentRadixTreeCompressed>` from
//! `dynamo-kv-router` 1.6.1, one event thread), fed the same event stream, each in its own
//! process (so its memory is its own), alternating.
//!
//! Workload (Mooncake-style): a request is one of 2,000 shared prefixes of 4-16 blocks
//! (Zipf-popular) plus 1-8 unique blocks, on a random worker. Each worker's pool holds
//! `CAPACITY` blocks, least recently used evicted first (children before their parents, as
//! engines do): a request stores the blocks after the worker's cached leading run (one stored
//! event, its parent the last cached block) and the pool's evictions (one removed event). The
//! indexes are warmed until every pool is full, so the measured stream stores and evicts.
//!
//! Per index and worker count:
//! - ingest: block events (stored + removed blocks) applied per CPU-second of the whole
//!   process (the incumbent's caller enqueues, its event thread applies), and per wall second;
//! - `find_matches` p50/p99/max for 64-block queries (a recent request's chain, then blocks
//!   nobody holds) on one thread while another ingests 100k block events/s;
//! - bytes per indexed (worker, block) pair: RSS growth while the warm stream is applied.
//!
//! `agree` builds both from one stream in one process and compares their answers on sampled
//! queries (every worker's matched blocks): they must be equal.

use std::collections::{HashMap, VecDeque};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_kv::{IndexSettings, KvIndex};
use dynamo_kv_router::indexer::concurrent_radix_tree_compressed::ConcurrentRadixTreeCompressed;
use dynamo_kv_router::indexer::{SyncIndexer, ThreadPoolIndexer};
use dynamo_kv_router::protocols as inc;
use dynamo_protocols::kv::{
    KvEvent, KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock, WorkerId,
};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Blocks each worker's pool holds (the index's default cap of 20M pairs holds 10k full pools).
const CAPACITY: usize = 1536;
const BLOCK_SIZE: u32 = 64;
const QUERY_BLOCKS: usize = 64;
/// Requests in the measured ingest stream.
const INGEST_REQUESTS: usize = 200_000;
/// Block events per second the writer applies while lookups are measured.
const WRITE_RATE: f64 = 100_000.0;
const LOOKUP_SECS: u64 = 3;

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

    /// Zipf-ish index in 0..n: cubing a uniform draw favours small indices.
    fn popular(&mut self, n: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u * u) * n as f64) as u64
    }
}

/// Sequence hashes of a chain of local block hashes (as engines compute them).
fn chain(locals: &[u64]) -> Vec<u64> {
    let mut parent: Option<SequenceHash> = None;
    locals
        .iter()
        .map(|&l| {
            let h = dynamo_kv::sequence_hash(parent, LocalBlockHash(l));
            parent = Some(h);
            h.0
        })
        .collect()
}

/// One request's effect on its worker.
struct Batch {
    worker: u64,
    event_id: u64,
    /// The block before the stored run (the last of the worker's cached leading run).
    parent: Option<u64>,
    /// (sequence hash, local hash) of the blocks stored.
    stored: Vec<(u64, u64)>,
    removed: Vec<u64>,
}

impl Batch {
    fn block_events(&self) -> usize {
        self.stored.len() + self.removed.len()
    }

    fn ours(&self) -> (WorkerId, Vec<KvEvent>) {
        let mut events = Vec::with_capacity(2);
        if !self.stored.is_empty() {
            events.push(KvEvent {
                event_id: self.event_id,
                tier: StorageTier::Device,
                data: KvEventData::Stored {
                    parent_hash: self.parent.map(SequenceHash),
                    blocks: self
                        .stored
                        .iter()
                        .map(|&(h, l)| StoredBlock {
                            block_hash: SequenceHash(h),
                            tokens_hash: LocalBlockHash(l),
                        })
                        .collect(),
                },
            });
        }
        if !self.removed.is_empty() {
            events.push(KvEvent {
                event_id: self.event_id + 1,
                tier: StorageTier::Device,
                data: KvEventData::Removed {
                    block_hashes: self.removed.iter().map(|&h| SequenceHash(h)).collect(),
                },
            });
        }
        (WorkerId(self.worker), events)
    }

    fn incumbent(&self) -> Vec<inc::RouterEvent> {
        let mut events = Vec::with_capacity(2);
        let event = |event_id, data| {
            inc::RouterEvent::new(
                self.worker,
                inc::KvCacheEvent {
                    event_id,
                    data,
                    dp_rank: 0,
                },
            )
        };
        if !self.stored.is_empty() {
            events.push(event(
                self.event_id,
                inc::KvCacheEventData::Stored(inc::KvCacheStoreData {
                    parent_hash: self.parent.map(inc::ExternalSequenceBlockHash),
                    start_position: None,
                    blocks: self
                        .stored
                        .iter()
                        .map(|&(h, l)| inc::KvCacheStoredBlockData {
                            block_hash: inc::ExternalSequenceBlockHash(h),
                            tokens_hash: inc::LocalBlockHash(l),
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
            ));
        }
        if !self.removed.is_empty() {
            events.push(event(
                self.event_id + 1,
                inc::KvCacheEventData::Removed(inc::KvCacheRemoveData {
                    block_hashes: self
                        .removed
                        .iter()
                        .map(|&h| inc::ExternalSequenceBlockHash(h))
                        .collect(),
                }),
            ));
        }
        events
    }
}

/// A worker's pool: block -> last touch, and the touches in order (stale ones skipped).
#[derive(Default)]
struct Pool {
    touched: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    next_event: u64,
    evicted: bool,
}

struct Workload {
    rng: Rng,
    workers: u64,
    prefixes: Vec<Vec<u64>>,
    pools: Vec<Pool>,
    next_unique: u64,
    clock: u64,
    /// Pools' blocks in all: the (worker, block) pairs an index should hold.
    pairs: usize,
    full: usize,
    /// Local hashes of recent requests, for queries.
    recent: VecDeque<Vec<u64>>,
}

impl Workload {
    fn new(workers: u64) -> Self {
        let mut rng = Rng(7);
        let prefixes = (0..2000u64)
            .map(|p| (0..4 + rng.below(13)).map(|i| p * 1000 + i).collect())
            .collect();
        Self {
            rng,
            workers,
            prefixes,
            pools: (0..workers).map(|_| Pool::default()).collect(),
            next_unique: 1 << 40,
            clock: 0,
            pairs: 0,
            full: 0,
            recent: VecDeque::new(),
        }
    }

    fn batch(&mut self) -> Batch {
        let worker = self.rng.below(self.workers);
        let p = self.rng.popular(self.prefixes.len() as u64) as usize;
        let mut locals = self.prefixes[p].clone();
        for _ in 0..1 + self.rng.below(8) {
            locals.push(self.next_unique);
            self.next_unique += 1;
        }
        let hashes = chain(&locals);
        let pool = &mut self.pools[worker as usize];
        let cached = hashes
            .iter()
            .take_while(|h| pool.touched.contains_key(h))
            .count();
        // Children first, so a parent is always touched more recently than its children and
        // eviction takes a chain from its end.
        for &h in hashes.iter().rev() {
            self.clock += 1;
            if pool.touched.insert(h, self.clock).is_none() {
                self.pairs += 1;
            }
            pool.order.push_back((h, self.clock));
        }
        let mut removed = Vec::new();
        while pool.touched.len() > CAPACITY {
            let (h, t) = pool.order.pop_front().expect("a touch per block held");
            if pool.touched.get(&h) == Some(&t) {
                pool.touched.remove(&h);
                removed.push(h);
                self.pairs -= 1;
            }
        }
        if !removed.is_empty() && !pool.evicted {
            pool.evicted = true;
            self.full += 1;
        }
        if pool.order.len() > 4 * CAPACITY {
            let touched = &pool.touched;
            pool.order.retain(|(h, t)| touched.get(h) == Some(t));
        }
        let event_id = pool.next_event;
        pool.next_event += 2;
        if self.recent.len() >= 4096 {
            self.recent.pop_front();
        }
        self.recent.push_back(locals.clone());
        Batch {
            worker,
            event_id,
            parent: cached.checked_sub(1).map(|i| hashes[i]),
            stored: (cached..hashes.len())
                .map(|i| (hashes[i], locals[i]))
                .collect(),
            removed,
        }
    }

    /// Requests until every worker's pool has evicted.
    fn warm(&mut self) -> Vec<Batch> {
        let mut out = Vec::new();
        while self.full < self.workers as usize {
            out.push(self.batch());
        }
        out
    }

    /// A 64-block query: a recent request's chain, then blocks nobody holds.
    fn query(&mut self) -> Query {
        let i = self.rng.below(self.recent.len() as u64) as usize;
        let mut locals = self.recent[i].clone();
        while locals.len() < QUERY_BLOCKS {
            locals.push(self.next_unique);
            self.next_unique += 1;
        }
        Query {
            hashes: chain(&locals).into_iter().map(SequenceHash).collect(),
            locals: locals.into_iter().map(inc::LocalBlockHash).collect(),
        }
    }
}

/// A query in both indexes' forms (the incumbent walks local hashes, ours sequence hashes),
/// made before anything is timed.
struct Query {
    locals: Vec<inc::LocalBlockHash>,
    hashes: Vec<SequenceHash>,
}

/// An index's answer to a query, in its own form.
enum Answer {
    Ours(dynamo_kv::OverlapMap),
    Incumbent(inc::OverlapScores),
}

impl Answer {
    /// Every worker's matched blocks, sorted.
    fn matches(self) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = match self {
            Answer::Ours(m) => m.into_iter().map(|(w, o)| (w.0, o.blocks())).collect(),
            Answer::Incumbent(m) => m
                .scores
                .into_iter()
                .map(|(w, s)| (w.worker_id, s))
                .collect(),
        };
        out.retain(|&(_, s)| s > 0);
        out.sort_unstable();
        out
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

/// CPU time of the whole process (every thread).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

type Incumbent = ThreadPoolIndexer<ConcurrentRadixTreeCompressed>;

/// One index under test.
enum Index {
    Ours(Arc<KvIndex>),
    Incumbent(Arc<Incumbent>, tokio::runtime::Runtime),
}

impl Index {
    fn new(name: &str) -> Self {
        match name {
            "ours" => Index::Ours(Arc::new(KvIndex::new(IndexSettings::default()))),
            "incumbent" => Index::Incumbent(
                Arc::new(ThreadPoolIndexer::new(
                    ConcurrentRadixTreeCompressed::new(),
                    1,
                    BLOCK_SIZE,
                )),
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a tokio runtime"),
            ),
            other => panic!("unknown index {other:?}: ours or incumbent"),
        }
    }

    /// Events in the index's own form, made before anything is timed.
    fn prepare(&self, batches: &[Batch]) -> Prepared {
        match self {
            Index::Ours(_) => Prepared::Ours(batches.iter().map(Batch::ours).collect()),
            Index::Incumbent(..) => {
                Prepared::Incumbent(batches.iter().flat_map(Batch::incumbent).collect())
            }
        }
    }

    /// Hands the events over: ours applies them on this thread, the incumbent enqueues them
    /// for its event thread.
    fn submit(&self, events: Prepared) {
        match (self, events) {
            (Index::Ours(index), Prepared::Ours(batches)) => {
                for (w, e) in &batches {
                    index.apply(*w, e);
                }
            }
            (Index::Incumbent(index, _), Prepared::Incumbent(events)) => {
                for e in events {
                    index
                        .enqueue_event(e)
                        .expect("the incumbent's event thread runs");
                }
            }
            _ => unreachable!("events prepared for this index"),
        }
    }

    /// Applies everything (the incumbent: enqueued, then waited for).
    fn apply(&self, events: Prepared) {
        self.submit(events);
        if let Index::Incumbent(index, rt) = self {
            rt.block_on(index.flush_and_wait())
                .expect("the incumbent flushes");
        }
    }

    /// The lookup the router makes (the incumbent's `ThreadPoolIndexer::find_matches` runs
    /// its backend's on the caller's thread, as here).
    fn find(&self, q: &Query) -> Answer {
        match self {
            Index::Ours(index) => Answer::Ours(index.find_matches(&q.hashes)),
            Index::Incumbent(index, _) => {
                Answer::Incumbent(index.backend().find_matches(&q.locals, false))
            }
        }
    }
}

enum Prepared {
    Ours(Vec<(WorkerId, Vec<KvEvent>)>),
    Incumbent(Vec<inc::RouterEvent>),
}

#[derive(Debug, Serialize, Deserialize)]
struct Run {
    index: String,
    workers: u64,
    pairs: usize,
    ingest_per_cpu_s: f64,
    ingest_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    queries_per_s: f64,
    bytes_per_pair: f64,
}

fn run(name: &str, workers: u64) -> Run {
    let mut wl = Workload::new(workers);
    eprintln!("[{name}, {workers} workers] generating the warm stream");
    let warm = wl.warm();
    let index = Index::new(name);
    eprintln!(
        "[{name}, {workers} workers] warming on {} requests ({} pairs)",
        warm.len(),
        wl.pairs
    );
    let rss0 = rss_bytes();
    for chunk in warm.chunks(10_000) {
        index.apply(index.prepare(chunk));
    }
    let bytes_per_pair = rss_bytes().saturating_sub(rss0) as f64 / wl.pairs.max(1) as f64;
    drop(warm);

    let batches: Vec<Batch> = (0..INGEST_REQUESTS).map(|_| wl.batch()).collect();
    let events: usize = batches.iter().map(Batch::block_events).sum();
    let prepared = index.prepare(&batches);
    drop(batches);
    eprintln!("[{name}, {workers} workers] ingest: {events} block events");
    let (t, cpu) = (Instant::now(), cpu_time());
    index.apply(prepared);
    let (wall, cpu) = (t.elapsed(), cpu_time() - cpu);

    eprintln!("[{name}, {workers} workers] lookups under ingest");
    let queries: Vec<Query> = (0..20_000).map(|_| wl.query()).collect();
    let writes: Vec<Batch> = (0..60_000).map(|_| wl.batch()).collect();
    let write_events: Vec<usize> = writes.iter().map(Batch::block_events).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut done = 0u64;
    std::thread::scope(|scope| {
        let stop = &stop;
        let (index, writes, write_events) = (&index, &writes, &write_events);
        scope.spawn(move || {
            let start = Instant::now();
            let mut sent = 0usize;
            for (b, n) in writes.iter().zip(write_events).cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                index.submit(index.prepare(std::slice::from_ref(b)));
                sent += n;
                let due = Duration::from_secs_f64(sent as f64 / WRITE_RATE);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        });
        let t = Instant::now();
        for q in queries.iter().cycle() {
            if t.elapsed() >= Duration::from_secs(LOOKUP_SECS) {
                break;
            }
            let t0 = Instant::now();
            std::hint::black_box(index.find(q));
            hist.record(t0.elapsed().as_nanos().max(1) as u64)
                .expect("in range");
            done += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Run {
        index: name.to_string(),
        workers,
        pairs: wl.pairs,
        ingest_per_cpu_s: events as f64 / cpu.as_secs_f64(),
        ingest_per_s: events as f64 / wall.as_secs_f64(),
        p50_us: us(0.5),
        p99_us: us(0.99),
        max_us: hist.max() as f64 / 1e3,
        queries_per_s: done as f64 / LOOKUP_SECS as f64,
        bytes_per_pair,
    }
}

/// Both indexes from one stream; their answers on sampled queries. Returns the disagreements.
fn agree(workers: u64, requests: usize, samples: usize) -> usize {
    let mut wl = Workload::new(workers);
    let (ours, theirs) = (Index::new("ours"), Index::new("incumbent"));
    let mut left = requests;
    while left > 0 {
        let n = left.min(10_000);
        let chunk: Vec<Batch> = (0..n).map(|_| wl.batch()).collect();
        ours.apply(ours.prepare(&chunk));
        theirs.apply(theirs.prepare(&chunk));
        left -= n;
    }
    let (mut differ, mut hits) = (0, 0);
    for i in 0..samples {
        let q = wl.query();
        let (a, b) = (ours.find(&q).matches(), theirs.find(&q).matches());
        hits += a.len();
        if a != b {
            if differ < 3 {
                eprintln!("query {i} differs:\n  ours      {a:?}\n  incumbent {b:?}");
            }
            differ += 1;
        }
    }
    println!(
        "agreement at {workers} workers ({requests} requests, {} pairs): {} of {samples} queries equal, {hits} (worker, match) answers",
        wl.pairs,
        samples - differ
    );
    differ
}

fn child(args: &[&str]) -> String {
    let exe = std::env::current_exe().expect("this binary's path");
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the bench in a child process");
    assert!(out.status.success(), "bench {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["run", name, workers] => {
            let r = run(name, workers.parse().expect("a worker count"));
            println!("{}", serde_json::to_string(&r).expect("json"));
        }
        ["agree", workers, requests, samples] => {
            let differ = agree(
                workers.parse().expect("a worker count"),
                requests.parse().expect("a request count"),
                samples.parse().expect("a sample count"),
            );
            std::process::exit(if differ == 0 { 0 } else { 1 });
        }
        [] => table(),
        _ => {
            eprintln!("usage: bench-indexer [run ours|incumbent WORKERS | agree WORKERS REQUESTS SAMPLES]");
            std::process::exit(2);
        }
    }
}

/// Every worker count, both indexes alternating in child processes (`ROUNDS` times), then the
/// agreement checks; prints markdown.
fn table() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!(
        "# bench-indexer on {cpu}, {} cores: ours against dynamo-kv-router 1.6.1 (ThreadPoolIndexer<ConcurrentRadixTreeCompressed>, one event thread)\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!("| workers | index | pairs | ingest block events per CPU-s | per s | find_matches p50 us | p99 us | max us | queries/s | bytes per pair |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for workers in [1_000u64, 10_000] {
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                ["ours", "incumbent"]
            } else {
                ["incumbent", "ours"]
            };
            let mut got: HashMap<&str, Run> = HashMap::new();
            for name in order {
                let line = child(&["run", name, &workers.to_string()]);
                let r: Run = serde_json::from_str(line.trim()).expect("a run's JSON line");
                println!(
                    "| {} | {} | {} | {:.2}M | {:.2}M | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
                    r.workers,
                    r.index,
                    r.pairs,
                    r.ingest_per_cpu_s / 1e6,
                    r.ingest_per_s / 1e6,
                    r.p50_us,
                    r.p99_us,
                    r.max_us,
                    r.queries_per_s,
                    r.bytes_per_pair
                );
                got.insert(name, r);
            }
            let (a, b) = (&got["ours"], &got["incumbent"]);
            ratios.push((
                workers,
                a.ingest_per_cpu_s / b.ingest_per_cpu_s,
                a.p50_us / b.p50_us,
                a.p99_us / b.p99_us,
                a.max_us,
                a.bytes_per_pair / b.bytes_per_pair,
            ));
        }
    }
    println!("\n| workers | ingest per CPU-s (target >= 1.5x) | lookup p50 (<= 1.0x) | p99 (<= 0.5x) | our max (< 1 ms) | bytes per pair (<= 0.8x) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (w, ingest, p50, p99, max, bytes) in ratios {
        println!("| {w} | {ingest:.2}x | {p50:.2}x | {p99:.2}x | {max:.0} us | {bytes:.2}x |");
    }
    println!();
    let mut differ = 0;
    for (workers, requests) in [(1_000, 400_000), (10_000, 400_000)] {
        let out = Command::new(std::env::current_exe().expect("this binary's path"))
            .args(["agree", &workers.to_string(), &requests.to_string(), "2000"])
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run the agreement check");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        differ += (!out.status.success()) as usize;
    }
    if differ > 0 {
        eprintln!("the indexes disagree");
        std::process::exit(1);
    }
}
