//! The discrete-event simulation: requests of a trace arrive in virtual time, the real
//! [`KvRouter`] (prefix index fed by the workers' KV events, load accounting, leases) picks a
//! worker, each worker is the mocker's real [`Scheduler`] and block pool with its timing model
//! (`step()` gives a step's time; its outputs are delivered when that time has passed, as the
//! real-time mocker does), and the planner ([`Planner`], the same core the planner role runs)
//! decides every interval from the frontends' statistics it would have seen, its decisions
//! carried out by a virtual connector: new workers serve after `startup_s`, removed ones
//! drain (no new requests, finish what they hold).
//!
//! Disaggregated (`prefill_workers`, or a planner with a prefill pool): the workers decode,
//! and the router's conditional disaggregation ([`KvRouter::plan_prefill`]) sends a prompt to
//! a prefill worker as the real frontend does. The decode worker then reserves the prompt's
//! blocks (its cached prefix pinned), the prefill worker computes the prompt to its first
//! token (its own prefix cache counts), the uncached blocks cross in the mocker's simulated
//! transfer time, and the first token reaches the client as the decode worker takes the
//! request over, computed ([`Scheduler::add_prefilled_tagged`]); the request to the prefill
//! worker and its answer each cross the bus in [`SimConfig::hop_ms`]. A reservation or a prefill
//! that fails falls back to prefilling on the decode worker, as the real one does.
//!
//! Time is integer nanoseconds; events at the same time run in the order they were
//! scheduled, so a run is deterministic (with [`SimConfig::index_thread`] too: the router
//! reads its index only once every KV event sent before has been applied).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dynamo_engine::mocker::{simulated_scheduler, Simulated};
use dynamo_engine::scheduler::{Prefilled, Scheduler};
use dynamo_engine::{EngineError, MockerSettings};
use dynamo_planner::{Planner, PlannerConfig, PoolRole, Pools, Profile, Replicas, Targets};
use dynamo_protocols::kv::{KvEvent, WorkerId, LOAD_MIN_INTERVAL};
use dynamo_protocols::llm::{
    EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions, TokenId,
};
use dynamo_protocols::stats::{FrontendStats, ModelStats, Percentiles};
use dynamo_router::{KvRouter, KvRouterSettings, PrefillPlan, RouteLease};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::trace::{prompt, TraceRequest};

const NS: f64 = 1e9;
/// How far behind its schedule the real-time mocker may start a step and still keep it.
const SLACK: u64 = 2_000_000;
/// Tags a prefill worker's job for request `i` as `i | JOB` (a client's stream is tagged `i`).
const JOB: usize = 1 << 63;

/// How late past its tick tokio's timer wakes a worker whose step ended at `end`, in
/// `[0, tick)`. The timer fires at the first tick at or after the deadline, but its driver
/// sleeps a whole number of ticks counted from the tick it parked in, so it wakes as far
/// past that tick as it parked past its own: with a runtime busy with other workers and
/// streams, anywhere in the tick. Measured on a real-time mocker cluster (8 workers, 40
/// req/s), the frontend saw 5.74 ms steps as gaps of 4.92 / 5.85 / 6.73 ms (p10 / p50 /
/// p90): the tick's 5-or-6 ms spread by about +-1 ms. A pure function of the worker and
/// the step's end (a hash), so every stepping mode draws the same.
fn wake_lateness(slot: usize, end: u64, tick: u64) -> u64 {
    let mut x = end ^ (slot as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64's finalizer.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    ((x as u128 * tick as u128) >> 64) as u64
}

/// When a step of `d` starting now on worker `slot` ends (on the mocker's absolute
/// schedule), and when its outputs are seen: with a timer `tick` (ns; 0: none), when tokio's
/// timer wakes the worker ([`wake_lateness`]).
fn step_end(
    tick: u64,
    slot: usize,
    schedule: Option<u64>,
    now: u64,
    d: std::time::Duration,
) -> (u64, u64) {
    let start = schedule.filter(|s| s + SLACK >= now).unwrap_or(now);
    let end = start + d.as_nanos() as u64;
    let seen = if tick > 0 {
        end.div_ceil(tick) * tick + wake_lateness(slot, end, tick)
    } else {
        end
    };
    (end, seen.max(now))
}

fn ns(s: f64) -> u64 {
    (s.max(0.0) * NS).round() as u64
}

/// The planner in a simulation.
#[derive(Debug, Clone)]
pub struct PlannerSim {
    pub config: PlannerConfig,
    pub profile: Profile,
    /// Seconds from a scale-up decision to the new worker serving (a real worker loads its
    /// model, a pod is scheduled...).
    pub startup_s: f64,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub model: String,
    pub mocker: MockerSettings,
    pub router: KvRouterSettings,
    /// Workers serving at the start (all the run without a planner): aggregated, or the
    /// decode pool of a disaggregated deployment.
    pub workers: u32,
    /// Prefill workers serving at the start; more than 0 (or a planner with a prefill pool)
    /// makes the deployment disaggregated.
    pub prefill_workers: u32,
    pub planner: Option<PlannerSim>,
    /// What a request must meet to count towards SLA attainment: its TTFT, and its mean ITL.
    pub targets: Targets,
    /// Seconds per point of the timeline.
    pub window_s: f64,
    /// Time from a request's arrival to its engine (HTTP, the frontend, the bus): it can join
    /// an engine step only after that, so it may wait a whole step more.
    pub overhead_ms: f64,
    /// Time of one message between two workers over the bus (disaggregated): a remote
    /// prefill's request crosses from the decode worker to the prefill worker, and its answer
    /// (the first token, once the KV is written) crosses back, each taking this. Half a
    /// request/reply round trip: about 0.1 ms over NATS, a few microseconds in process.
    pub hop_ms: f64,
    /// Seed of the prompts' filler tokens (as `dynamo-run bench --seed`).
    pub seed: u64,
    /// Granularity of the real-time mocker's timer, milliseconds (0: exact). The mocker in
    /// real time (tokio) sees a step end somewhere within the tick after it (see
    /// `wake_lateness`), and keeps its steps on an absolute schedule (a step starts when
    /// the last one should have ended, unless that is over 2 ms ago); 1 reproduces it.
    /// Engines on GPUs have no such tick.
    pub timer_ms: f64,
    /// How engine steps become events.
    pub stepping: Stepping,
    /// Apply the workers' KV events to the router's index on a second thread while this one
    /// goes on (a route, or a worker leaving the index, first waits for every event sent
    /// before it, so the results are the same either way). Worth it with a second core.
    pub index_thread: bool,
    /// Keep a record of each request ([`SimReport::request_records`]), to compare a run
    /// with another request by request (`dynamo-run simulate --requests-jsonl`).
    pub record_requests: bool,
    /// The worker (index from 0) each request goes to, by trace index, instead of the
    /// router's choice (`None`, past the end, or a worker the run does not have: the router
    /// chooses): to replay the routing
    /// of another run (`dynamo-run simulate --route-from`). The router still accounts the
    /// request there and finds its cached prefix. Static workers only.
    pub routes: Option<Vec<Option<usize>>>,
}

/// One request as a run served it (with [`SimConfig::record_requests`]); `dynamo-run bench
/// --requests-jsonl` writes the same fields for a real cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Its place in the trace (from 0).
    pub index: usize,
    /// Seconds from the start of the run to its arrival.
    pub start_s: f64,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub output_tokens: u32,
    /// The worker it ran on (the simulator's numbering, from 1).
    pub worker: u64,
    pub ok: bool,
}

/// How engine steps become events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Stepping {
    /// Every step is an event: the reference (slowest).
    Each,
    /// A worker's decode-only stretch is one event (see `Cruise`), ending at the latest
    /// where its next load report is due: the same results as `each` but for the KV events
    /// of a stretch reaching the router at its end (evictions, up to one report period late).
    Report,
    /// Stretches end only where the batch changes (a request joins or finishes): the router
    /// gets a busy worker's load report then, not every report period. The fastest, and the
    /// default: its results are checked against `each` (see the tests).
    #[default]
    Batch,
}

/// Microsecond histograms up to an hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// A histogram's summary, milliseconds.
fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1e3;
    Percentiles {
        count: h.len(),
        mean: h.mean() / 1e3,
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// One point of the timeline (the window ending at `t_s`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub t_s: f64,
    /// Requests that arrived in the window, a second.
    pub rate: f64,
    /// Workers of every pool.
    pub serving: u32,
    pub starting: u32,
    pub draining: u32,
    /// Of `serving`, the prefill pool's.
    #[serde(default)]
    pub prefill_serving: u32,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    /// Share of the requests that ended in the window meeting both targets.
    pub attainment: f64,
}

/// One planner decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionPoint {
    pub t_s: f64,
    /// Aggregated workers, or the decode pool.
    pub from: u32,
    pub to: u32,
    /// The prefill pool (disaggregated).
    #[serde(default)]
    pub prefill_from: u32,
    #[serde(default)]
    pub prefill_to: u32,
    pub predicted_rate: f64,
    pub reason: String,
}

/// What a run gives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub requests: u64,
    pub completed: u64,
    pub failed: u64,
    /// Simulated seconds from the first arrival to the last request's end.
    pub simulated_s: f64,
    pub wall_s: f64,
    /// Simulated seconds per wall-clock second.
    pub speed: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub cached_ratio: f64,
    pub ttft_target_ms: f64,
    pub itl_target_ms: f64,
    /// Share of the requests that completed within both targets (TTFT, mean ITL).
    pub attainment: f64,
    /// Sum over workers of the seconds each was up (starting, serving or draining).
    pub worker_seconds: f64,
    pub peak_workers: u32,
    pub steps: u64,
    /// Prompts prefilled on a prefill worker (disaggregated), their KV moved to the decode
    /// worker.
    #[serde(default)]
    pub remote_prefills: u64,
    pub timeline: Vec<Point>,
    pub decisions: Vec<DecisionPoint>,
    /// Each request that reached a worker, by trace index (with
    /// [`SimConfig::record_requests`]; not part of the JSON report).
    #[serde(skip)]
    pub request_records: Vec<RequestRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Serving,
    Draining,
    Stopped,
}

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Aggregated,
    Decode,
    Prefill,
}

struct Worker {
    sched: Scheduler<Simulated>,
    kind: Kind,
    state: State,
    busy: bool,
    /// When its last step should have ended (the real-time mocker's schedule).
    schedule: Option<u64>,
    /// When the router last got its load (workers publish at most every LOAD_MIN_INTERVAL).
    load_at: Option<u64>,
    up_at: u64,
    down_at: Option<u64>,
    /// Requests on it not yet ended.
    open: usize,
    /// The decode-only stretch it is running, if any.
    cruise: Option<Cruise>,
    /// Bumped when a stretch is cut short: an event of an older stretch is stale.
    generation: u64,
    /// What reached it during a stretch: it is taken after the step in progress (its
    /// scheduler would take it then).
    pending: Vec<Pending>,
}

/// Something that reaches a worker's scheduler.
enum Pending {
    /// A request to compute: a client's (tagged `i`) or a prefill job (`i | JOB`).
    Admit(usize, PreprocessedRequest, Sender),
    /// A client's request whose prompt goes to prefill worker `prefill` (the decode side
    /// reserves its blocks first), with the prefill worker's lease.
    Reserve(usize, PreprocessedRequest, Sender, usize, RouteLease),
    /// A request prefilled elsewhere, its KV arrived.
    Prefilled(usize, Box<Prefilled>),
    /// A reservation given back.
    Release(u64),
}

/// A prompt being prefilled on a prefill worker for a decode worker (disaggregated).
struct Job {
    decode: usize,
    prefill: usize,
    reservation: u64,
    /// Leading blocks the decode worker holds, and all the prompt's blocks.
    cached: usize,
    total: usize,
    /// The client's request and stream, for the decode worker.
    request: PreprocessedRequest,
    tx: Sender,
    /// The prefill worker's outputs.
    rx: mpsc::UnboundedReceiver<Result<EngineOutput, EngineError>>,
    /// The prefill worker's accounting of the prompt (dropped at its first token).
    lease: Option<RouteLease>,
    first: Option<TokenId>,
}

/// A decode-only stretch of steps ([`Scheduler::decode_plan`]): nothing joins or leaves
/// until its last step, so the steps' times are known in advance and the stretch is one
/// event, applied at its end ([`Scheduler::decode_apply`]). A request that reaches the
/// worker meanwhile cuts it after the step in progress, where a step-by-step run would
/// have taken it. A stretch ends at the latest where the worker's next load report is due,
/// so the router sees the same reports; the KV events of its steps reach the router at its
/// end (within that period), as a batch.
struct Cruise {
    /// When each step's outputs are seen (its end on the timer), and its exact end.
    seen: Vec<u64>,
    ends: Vec<u64>,
    /// Steps it runs (a cut makes it shorter than planned).
    len: usize,
}

/// Steps a stretch plans at most.
const CRUISE_MAX: usize = 4096;

type Sender = mpsc::UnboundedSender<Result<EngineOutput, EngineError>>;

/// A request on its way to its engine: the worker and what reaches it.
type Inbound = (usize, Pending);

struct Live {
    arrival: u64,
    rx: mpsc::UnboundedReceiver<Result<EngineOutput, EngineError>>,
    lease: Option<RouteLease>,
    first: Option<u64>,
    last: u64,
    tokens: u32,
    cached: u32,
    input: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive(usize),
    Reach(usize),
    StepDone(usize),
    /// A stretch's end: (worker, its generation).
    CruiseDone(usize, u64),
    /// Request `i`'s prompt KV reached its decode worker.
    Transferred(usize),
    Ready(usize),
    Tick,
    Window,
}

/// Figures over a span (a window of the timeline, or a planner interval).
struct Span {
    arrivals: u64,
    ended: u64,
    errors: u64,
    met: u64,
    input: u64,
    output: u64,
    cached: u64,
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
}

impl Span {
    fn new() -> Self {
        Self {
            arrivals: 0,
            ended: 0,
            errors: 0,
            met: 0,
            input: 0,
            output: 0,
            cached: 0,
            ttft: histogram(),
            itl: histogram(),
        }
    }

    fn reset(&mut self) {
        self.arrivals = 0;
        self.ended = 0;
        self.errors = 0;
        self.met = 0;
        self.input = 0;
        self.output = 0;
        self.cached = 0;
        self.ttft.reset();
        self.itl.reset();
    }
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    /// The timer's tick (`timer_ms`) in ns.
    tick: u64,
    /// Buffers of ended stretches, for the next ones.
    spare: Vec<Vec<u64>>,
    trace: &'a [TraceRequest],
    router: Arc<KvRouter>,
    workers: Vec<Worker>,
    live: Vec<Option<Live>>,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    now: u64,
    planner: Option<Planner>,
    /// Disaggregated: requests may be prefilled on the prefill pool.
    disaggregated: bool,
    /// Prompts on prefill workers or on their way to their decode worker, by request.
    jobs: std::collections::HashMap<usize, Job>,
    /// The simulated time of moving a number of blocks between workers.
    transfer: Box<dyn Fn(usize) -> std::time::Duration>,
    total: Span,
    window: Span,
    interval: Span,
    e2e: Histogram<u64>,
    report: SimReport,
    open: usize,
    arrived: usize,
    /// Requests that got an output in the step being handled (reused).
    touched: Vec<usize>,
    /// Requests on their way to their engine (`overhead_ms`).
    inbound: std::collections::HashMap<usize, Inbound>,
    /// The index thread's feed ([`SimConfig::index_thread`]).
    feed: Option<IndexFeed>,
}

/// What the index thread's count of applied batches reads once it has panicked.
const FAILED: u64 = u64::MAX;

/// Marks the index thread's count [`FAILED`] if it unwinds.
struct Failing<'a>(&'a AtomicU64);

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(FAILED, Ordering::Release);
        }
    }
}

/// KV events on their way to the index thread, and how many batches it has applied.
struct IndexFeed {
    tx: std::sync::mpsc::Sender<(WorkerId, Vec<KvEvent>)>,
    sent: u64,
    applied: Arc<AtomicU64>,
}

impl IndexFeed {
    /// Waits until the index thread has applied every batch sent (it is then idle until the
    /// next, so the index is this thread's to read).
    fn settle(&self) {
        let mut spins = 0u32;
        loop {
            match self.applied.load(Ordering::Acquire) {
                FAILED => panic!("the index thread failed (see its panic above)"),
                n if n >= self.sent => return,
                _ => {}
            }
            if spins < 1 << 12 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl<'a> Sim<'a> {
    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, ev)));
    }

    /// Before the router reads its index (or drops a worker from it): every KV event sent so
    /// far applied.
    fn settle_index(&self) {
        if let Some(f) = &self.feed {
            f.settle();
        }
    }

    fn wid(slot: usize) -> WorkerId {
        WorkerId(slot as u64 + 1)
    }

    fn add_worker(&mut self, serving: bool, kind: Kind) -> usize {
        let mut m = self.cfg.mocker.clone();
        m.seed = self.workers.len() as u64;
        let sched = simulated_scheduler(&m).expect("settings validated before the run");
        self.workers.push(Worker {
            sched,
            kind,
            state: if serving {
                State::Serving
            } else {
                State::Starting
            },
            busy: false,
            schedule: None,
            load_at: None,
            up_at: self.now,
            down_at: None,
            open: 0,
            cruise: None,
            generation: 0,
            pending: Vec::new(),
        });
        let slot = self.workers.len() - 1;
        if serving {
            self.register(slot);
        }
        slot
    }

    /// The router learns of a worker that serves now, as a frontend would from discovery.
    fn register(&mut self, slot: usize) {
        let (id, model, bs) = (
            Self::wid(slot),
            self.cfg.model.clone(),
            self.cfg.mocker.block_size,
        );
        match self.workers[slot].kind {
            Kind::Aggregated => self.router.add_worker(id, model, bs),
            Kind::Decode => {
                self.router.add_worker(id, model, bs);
                self.router.add_decode_worker(id);
            }
            Kind::Prefill => {
                self.router
                    .add_prefill_worker(id, model, bs, "sim.prefill.prefill".into())
            }
        }
    }

    fn count(&self, s: State) -> u32 {
        self.workers.iter().filter(|w| w.state == s).count() as u32
    }

    /// Replicas the virtual connector runs in the pool of `kind` (starting or serving).
    fn running(&self, kind: Kind) -> u32 {
        self.workers
            .iter()
            .filter(|w| w.kind == kind && matches!(w.state, State::Starting | State::Serving))
            .count() as u32
    }

    /// The kind of the main pool: aggregated workers, or the decode pool.
    fn main_kind(&self) -> Kind {
        match self.disaggregated {
            true => Kind::Decode,
            false => Kind::Aggregated,
        }
    }

    /// Starts a decode-only stretch on an idle worker when its next steps make one (at
    /// least two steps): true if it did.
    fn cruise(&mut self, slot: usize) -> bool {
        if self.cfg.stepping == Stepping::Each {
            return false;
        }
        let tick = self.tick;
        let w = &mut self.workers[slot];
        let report_due = (w.state != State::Draining && self.cfg.stepping == Stepping::Report)
            .then(|| w.load_at.map(|t| t + LOAD_MIN_INTERVAL.as_nanos() as u64));
        let durations = w.sched.decode_plan(CRUISE_MAX, true);
        if durations.len() < 2 {
            return false;
        }
        let mut schedule = w.schedule;
        let mut now = self.now;
        // The buffers of a stretch that ended (a stretch is an event: they are reused).
        let mut seen = self.spare.pop().unwrap_or_default();
        let mut ends = self.spare.pop().unwrap_or_default();
        for &d in durations {
            let (end, at) = step_end(tick, slot, schedule, now, d);
            seen.push(at);
            ends.push(end);
            (schedule, now) = (Some(end), at);
            // The load report is due at this step's end: the stretch ends there.
            if report_due.is_some_and(|due| due.is_none_or(|due| at >= due)) {
                break;
            }
        }
        if seen.len() < 2 {
            self.recycle(seen, ends);
            return false;
        }
        let len = seen.len();
        w.busy = true;
        let last = seen[len - 1];
        let generation = w.generation;
        w.cruise = Some(Cruise { seen, ends, len });
        self.at(last, Ev::CruiseDone(slot, generation));
        true
    }

    fn recycle(&mut self, mut seen: Vec<u64>, mut ends: Vec<u64>) {
        seen.clear();
        ends.clear();
        self.spare.extend([seen, ends]);
    }

    /// A request reached a worker in a stretch: the stretch ends with the step in progress
    /// (the request joins the next one).
    fn cut(&mut self, slot: usize) {
        let now = self.now;
        let w = &mut self.workers[slot];
        let Some(c) = w.cruise.as_mut() else { return };
        let m = c.seen[..c.len].partition_point(|&t| t < now);
        if m + 1 < c.len {
            c.len = m + 1;
            w.generation += 1;
            let (t, g) = (c.seen[m], w.generation);
            self.at(t, Ev::CruiseDone(slot, g));
        }
    }

    /// A stretch's end: its steps applied at once, each request's tokens delivered with
    /// the inter-token latencies the steps gave them.
    fn cruise_done(&mut self, slot: usize, generation: u64) {
        let w = &mut self.workers[slot];
        if w.generation != generation {
            return;
        }
        let Some(c) = w.cruise.take() else { return };
        let n = c.len;
        w.sched.decode_apply(n);
        w.schedule = Some(c.ends[n - 1]);
        self.report.steps += n as u64;
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        self.workers[slot]
            .sched
            .deliver_tagged(|tag| touched.push(tag as usize));
        // Steps after the first: every sequence of the batch waited the same gap (runs of
        // equal gaps recorded at once: steps take the same time until a block is allocated).
        let batch = touched.len() as u64;
        let mut gaps = c.seen[..n]
            .windows(2)
            .map(|p| ((p[1] - p[0]) / 1000).max(1))
            .peekable();
        while let Some(itl) = gaps.next() {
            let mut count = 1;
            while gaps.next_if_eq(&itl).is_some() {
                count += 1;
            }
            for s in [&mut self.total, &mut self.window, &mut self.interval] {
                let _ = s.itl.record_n(itl, batch * count);
            }
        }
        let last = c.seen[n - 1];
        for &i in &touched {
            if i & JOB != 0 {
                self.job_output(i & !JOB);
                continue;
            }
            let mut ended = None;
            if let Some(l) = self.live[i].as_mut() {
                while let Ok(o) = l.rx.try_recv() {
                    match o {
                        Ok(o) => {
                            let itl = ((c.seen[0] - l.last) / 1000).max(1);
                            for s in [&mut self.total, &mut self.window, &mut self.interval] {
                                let _ = s.itl.record(itl);
                            }
                            l.tokens += o.token_ids.len() as u32;
                            l.last = last;
                            if o.finish_reason.is_some() {
                                ended = Some(true);
                            }
                        }
                        Err(_) => ended = Some(false),
                    }
                }
            }
            if let Some(ok) = ended {
                self.close(slot, i, ok);
            }
        }
        self.touched = touched;
        self.recycle(c.seen, c.ends);
        // What reached it meanwhile is taken now (a step-by-step scheduler had the requests
        // queued already: its load report counts them).
        for p in std::mem::take(&mut self.workers[slot].pending) {
            self.apply(slot, p);
        }
        self.after_step(slot);
        self.kick(slot);
    }

    fn kick(&mut self, slot: usize) {
        let w = &mut self.workers[slot];
        if w.busy {
            return;
        }
        if self.cruise(slot) {
            return;
        }
        let w = &mut self.workers[slot];
        match w.sched.step() {
            Some(d) => {
                w.busy = true;
                self.report.steps += 1;
                let schedule = w.schedule;
                let (end, at) = step_end(self.tick, slot, schedule, self.now, d);
                self.workers[slot].schedule = Some(end);
                self.at(at, Ev::StepDone(slot));
            }
            None => {
                w.schedule = None;
                self.maybe_stop(slot)
            }
        }
    }

    fn maybe_stop(&mut self, slot: usize) {
        let w = &mut self.workers[slot];
        if w.state == State::Draining && !w.busy && w.open == 0 && !w.sched.has_work() {
            w.state = State::Stopped;
            w.down_at = Some(self.now);
        }
    }

    fn arrive(&mut self, i: usize) {
        self.arrived += 1;
        let r = &self.trace[i];
        let tokens = prompt(r, i, self.cfg.mocker.block_size, self.cfg.seed);
        self.total.arrivals += 1;
        self.window.arrivals += 1;
        self.interval.arrivals += 1;
        self.settle_index();
        let forced = (self.cfg.routes.as_ref())
            .and_then(|r| r.get(i).copied().flatten())
            .filter(|&slot| slot < self.workers.len());
        let routed = match forced {
            Some(slot) => {
                self.router
                    .route(&[Self::wid(slot)], &tokens, self.cfg.mocker.block_size)
            }
            None => self.router.route_model(&self.cfg.model, &[], &tokens),
        };
        let decision = match routed {
            Ok(d) => d,
            Err(_) => {
                // No worker serving (a 503 at a real frontend).
                self.fail();
                return;
            }
        };
        let slot = (decision.worker.0 - 1) as usize;
        // Where the prompt is prefilled (a decode worker may have it done on a prefill worker).
        let remote = match self.workers[slot].kind {
            Kind::Decode => match self.router.plan_prefill(
                &self.cfg.model,
                decision.worker,
                decision.overlap,
                &tokens,
            ) {
                PrefillPlan::Remote { worker, lease, .. } => Some(((worker.0 - 1) as usize, lease)),
                PrefillPlan::Local(_) => None,
            },
            _ => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let input = tokens.len() as u32;
        let req = PreprocessedRequest {
            token_ids: tokens,
            sampling: SamplingOptions::default(),
            stop: StopConditions {
                max_tokens: r.output_length,
                min_tokens: 0,
                stop_token_ids: vec![],
            },
            remote_prefill: None,
            peer_prefix: None,
            resumed_tokens: 0,
        };
        self.live[i] = Some(Live {
            arrival: self.now,
            rx,
            lease: Some(decision.lease),
            first: None,
            last: self.now,
            tokens: 0,
            cached: 0,
            input,
        });
        self.open += 1;
        self.workers[slot].open += 1;
        let pending = match remote {
            Some((prefill, lease)) => {
                // Its prefill worker holds the job from now (it does not stop meanwhile).
                self.workers[prefill].open += 1;
                Pending::Reserve(i, req, tx, prefill, lease)
            }
            None => Pending::Admit(i, req, tx),
        };
        // On its way to the engine: it can join a step only once there.
        self.send(slot, i, pending, ns(self.cfg.overhead_ms / 1e3));
    }

    /// `p` (for request or job `key`) reaches worker `slot` in `delay` ns: on its way until
    /// then ([`Ev::Reach`]).
    fn send(&mut self, slot: usize, key: usize, p: Pending, delay: u64) {
        if delay == 0 {
            self.enter(slot, p);
            return;
        }
        self.inbound.insert(key, (slot, p));
        let t = self.now + delay;
        self.at(t, Ev::Reach(key));
    }

    /// A request (or a prefill job) reaches its engine (after the time on the way).
    fn reach(&mut self, key: usize) {
        if let Some((slot, p)) = self.inbound.remove(&key) {
            self.enter(slot, p);
        }
    }

    /// `p` reaches worker `slot`: taken now, or in a stretch after the step in progress.
    fn enter(&mut self, slot: usize, p: Pending) {
        if self.workers[slot].cruise.is_some() {
            self.cut(slot);
            self.workers[slot].pending.push(p);
            return;
        }
        self.apply(slot, p);
        self.kick(slot);
    }

    /// Hands `p` to worker `slot`'s scheduler (between its steps).
    fn apply(&mut self, slot: usize, p: Pending) {
        match p {
            Pending::Admit(tag, req, tx) => self.admit(slot, tag, req, tx),
            Pending::Reserve(i, req, tx, prefill, lease) => {
                self.reserve(slot, i, req, tx, prefill, lease)
            }
            Pending::Prefilled(i, p) => {
                self.workers[slot].sched.add_prefilled_tagged(*p, i as u64);
                // A hand-off it refuses fails on the stream at once.
                let refused = self.live[i]
                    .as_mut()
                    .is_some_and(|l| matches!(l.rx.try_recv(), Ok(Err(_))));
                if refused {
                    self.close(slot, i, false);
                }
            }
            Pending::Release(reservation) => {
                self.workers[slot].sched.release_reservation(reservation)
            }
        }
    }

    /// Queues `tag` (request `i`, or `i | JOB`: its prefill job) on worker `slot`; a request
    /// it refuses ends failed, a job it refuses is prefilled on its decode worker.
    fn admit(&mut self, slot: usize, tag: usize, req: PreprocessedRequest, tx: Sender) {
        if self.workers[slot]
            .sched
            .add_tagged(req, tx, CancellationToken::new(), tag as u64)
            .is_err()
        {
            match tag & JOB {
                0 => self.close(slot, tag, false),
                _ => self.job_failed(tag & !JOB),
            }
        }
    }

    /// Decode side of a remote prefill: reserves the prompt's blocks on decode worker `slot`
    /// (its cached leading blocks pinned) and sends the prompt to `prefill`; prefills here
    /// instead when the prompt is all cached or the blocks cannot be had.
    fn reserve(
        &mut self,
        slot: usize,
        i: usize,
        req: PreprocessedRequest,
        tx: Sender,
        prefill: usize,
        lease: RouteLease,
    ) {
        let bs = self.cfg.mocker.block_size;
        let hashes: Vec<_> = dynamo_kv::block_hashes(&req.token_ids, bs)
            .into_iter()
            .map(|h| h.1)
            .collect();
        let total = req.token_ids.len().div_ceil(bs);
        match self.workers[slot].sched.reserve_prompt(&hashes, total) {
            Ok((reservation, cached)) if cached < total => {
                let (jtx, rx) = mpsc::unbounded_channel();
                // The prefill worker computes the prompt to its first token.
                let job = PreprocessedRequest {
                    stop: StopConditions {
                        max_tokens: 1,
                        min_tokens: 0,
                        stop_token_ids: vec![],
                    },
                    ..req.clone()
                };
                self.jobs.insert(
                    i,
                    Job {
                        decode: slot,
                        prefill,
                        reservation,
                        cached,
                        total,
                        request: req,
                        tx,
                        rx,
                        lease: Some(lease),
                        first: None,
                    },
                );
                // The request crosses the bus to the prefill worker.
                let hop = ns(self.cfg.hop_ms / 1e3);
                self.send(prefill, i | JOB, Pending::Admit(i | JOB, job, jtx), hop);
            }
            held => {
                if let Ok((reservation, _)) = held {
                    self.workers[slot].sched.release_reservation(reservation);
                }
                self.workers[prefill].open -= 1;
                drop(lease);
                self.admit(slot, i, req, tx);
            }
        }
    }

    /// A prefill worker's output for request `i`'s job: at the first token the prompt's
    /// uncached blocks start crossing to the decode worker; a failure prefills it there.
    fn job_output(&mut self, i: usize) {
        let Some(job) = self.jobs.get_mut(&i) else {
            return;
        };
        let mut ok = None;
        while let Ok(o) = job.rx.try_recv() {
            match o {
                Ok(o) => {
                    if let (None, Some(&t)) = (job.first, o.token_ids.first()) {
                        job.first = Some(t);
                        ok = Some(true);
                    }
                }
                Err(_) if job.first.is_none() => ok = Some(false),
                Err(_) => {}
            }
        }
        match ok {
            Some(true) => {
                job.lease = None;
                let blocks = job.total - job.cached;
                let prefill = job.prefill;
                self.workers[prefill].open -= 1;
                let t = self.written(prefill, (self.transfer)(blocks));
                // The answer crosses the bus back to the decode worker.
                let t = t + ns(self.cfg.hop_ms / 1e3);
                self.at(t, Ev::Transferred(i));
            }
            Some(false) => self.job_failed(i),
            None => {}
        }
    }

    /// When prefill worker `slot`, starting now, has written a prompt's KV that takes `d` to
    /// move: the simulated engine waits out the transfer, so with a timer tick it wakes as a
    /// step's end does ([`step_end`]).
    fn written(&self, slot: usize, d: std::time::Duration) -> u64 {
        step_end(self.tick, slot, None, self.now, d).1
    }

    /// Request `i`'s prefill job failed: its decode worker gives back the reservation and
    /// prefills the prompt itself (the real decode worker's fallback).
    fn job_failed(&mut self, i: usize) {
        let Some(job) = self.jobs.remove(&i) else {
            return;
        };
        self.workers[job.prefill].open -= 1;
        drop(job.lease);
        self.enter(job.decode, Pending::Release(job.reservation));
        self.enter(job.decode, Pending::Admit(i, job.request, job.tx));
    }

    /// Request `i`'s prompt KV reached its decode worker: the first token (sampled by the
    /// prefill worker) goes to the client, and the decode worker takes the request over.
    fn transferred(&mut self, i: usize) {
        let Some(job) = self.jobs.remove(&i) else {
            return;
        };
        let Job {
            decode,
            reservation,
            cached,
            total,
            request,
            tx,
            first,
            ..
        } = job;
        let (now, bs) = (self.now, self.cfg.mocker.block_size);
        let (Some(token), Some(l)) = (first, self.live[i].as_mut()) else {
            self.enter(decode, Pending::Release(reservation));
            return;
        };
        self.report.remote_prefills += 1;
        l.first = Some(now);
        l.cached = (cached * bs) as u32;
        l.tokens += 1;
        l.last = now;
        if let Some(lease) = l.lease.as_mut() {
            lease.prefill_done();
        }
        let ttft = ((now - l.arrival) / 1000).max(1);
        for s in [&mut self.total, &mut self.window, &mut self.interval] {
            let _ = s.ttft.record(ttft);
        }
        if request.stop.max_tokens <= 1 {
            self.close(decode, i, true);
            self.enter(decode, Pending::Release(reservation));
            return;
        }
        let p = Prefilled {
            reservation,
            cached,
            request,
            first: token,
            data: vec![Vec::new(); total - cached],
            out: tx,
            cancel: CancellationToken::new(),
        };
        self.enter(decode, Pending::Prefilled(i, Box::new(p)));
    }

    fn fail(&mut self) {
        self.report.failed += 1;
        for s in [&mut self.total, &mut self.window, &mut self.interval] {
            s.ended += 1;
            s.errors += 1;
        }
    }

    fn step_done(&mut self, slot: usize) {
        let now = self.now;
        self.workers[slot].busy = false;
        // Only the requests that got an output in this step are read.
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        self.workers[slot]
            .sched
            .deliver_tagged(|tag| touched.push(tag as usize));
        for &i in &touched {
            if i & JOB != 0 {
                self.job_output(i & !JOB);
                continue;
            }
            let mut ended = None;
            if let Some(l) = self.live[i].as_mut() {
                while let Ok(o) = l.rx.try_recv() {
                    match o {
                        Ok(o) => {
                            let n = o.token_ids.len() as u32;
                            if l.first.is_none() {
                                l.first = Some(now);
                                l.cached = o.cached_tokens.unwrap_or(0);
                                if let Some(lease) = l.lease.as_mut() {
                                    lease.prefill_done();
                                }
                                let ttft = (now - l.arrival) / 1000;
                                for s in [&mut self.total, &mut self.window, &mut self.interval] {
                                    let _ = s.ttft.record(ttft.max(1));
                                }
                            } else if n > 0 {
                                let itl = ((now - l.last) / 1000 / n as u64).max(1);
                                for s in [&mut self.total, &mut self.window, &mut self.interval] {
                                    let _ = s.itl.record_n(itl, n as u64);
                                }
                            }
                            l.tokens += n;
                            l.last = now;
                            if o.finish_reason.is_some() {
                                ended = Some(true);
                            }
                        }
                        Err(_) => ended = Some(false),
                    }
                }
            }
            if let Some(ok) = ended {
                self.close(slot, i, ok);
            }
        }
        self.touched = touched;
        self.after_step(slot);
        self.kick(slot);
    }

    /// After a step (or a stretch): its KV events to the router's index, and the worker's
    /// load when a report is due.
    fn after_step(&mut self, slot: usize) {
        let now = self.now;
        self.workers[slot].busy = false;
        let events = self.workers[slot].sched.take_events();
        if !events.is_empty() {
            self.router.note_events();
            match self.feed.as_mut() {
                Some(f) => {
                    f.tx.send((Self::wid(slot), events))
                        .expect("the index thread runs until the simulation ends");
                    f.sent += 1;
                }
                None => {
                    self.router.index().apply(Self::wid(slot), &events);
                }
            }
        }
        let w = &mut self.workers[slot];
        let due = w
            .load_at
            .is_none_or(|t| now >= t + LOAD_MIN_INTERVAL.as_nanos() as u64);
        if w.state != State::Draining && due {
            w.load_at = Some(now);
            let load = w.sched.load();
            self.router.record_load(Self::wid(slot), load);
        }
    }

    /// Request `i` on `slot` ended (`ok`: with its finish).
    fn close(&mut self, slot: usize, i: usize, ok: bool) {
        if let Some(l) = self.live[i].take() {
            self.workers[slot].open -= 1;
            if self.cfg.record_requests {
                let ms = |t: u64| t.saturating_sub(l.arrival) as f64 / 1e6;
                self.report.request_records.push(RequestRecord {
                    index: i,
                    start_s: l.arrival as f64 / NS,
                    ttft_ms: l.first.map(ms),
                    e2e_ms: ms(l.last),
                    prompt_tokens: l.input,
                    cached_tokens: l.cached,
                    output_tokens: l.tokens,
                    worker: slot as u64 + 1,
                    ok,
                });
            }
            self.end(l, ok);
        }
    }

    fn end(&mut self, l: Live, ok: bool) {
        self.open -= 1;
        if !ok {
            self.fail();
            return;
        }
        self.report.completed += 1;
        let first = l.first.unwrap_or(l.last);
        let ttft_ms = (first - l.arrival) as f64 / 1e6;
        let itl_ms = if l.tokens > 1 {
            (l.last - first) as f64 / 1e6 / (l.tokens - 1) as f64
        } else {
            0.0
        };
        let met = ttft_ms <= self.cfg.targets.ttft_ms && itl_ms <= self.cfg.targets.itl_ms;
        let _ = self.e2e.record(((l.last - l.arrival) / 1000).max(1));
        for s in [&mut self.total, &mut self.window, &mut self.interval] {
            s.ended += 1;
            s.met += met as u64;
            s.input += l.input as u64;
            s.output += l.tokens as u64;
            s.cached += l.cached as u64;
        }
        drop(l.lease);
    }

    fn window(&mut self) {
        let w = &self.window;
        let (ttft, itl) = (percentiles(&w.ttft), percentiles(&w.itl));
        self.report.timeline.push(Point {
            t_s: self.now as f64 / NS,
            rate: w.arrivals as f64 / self.cfg.window_s,
            serving: self.count(State::Serving),
            starting: self.count(State::Starting),
            draining: self.count(State::Draining),
            prefill_serving: self
                .workers
                .iter()
                .filter(|w| w.kind == Kind::Prefill && w.state == State::Serving)
                .count() as u32,
            ttft_p50_ms: ttft.p50,
            ttft_p99_ms: ttft.p99,
            itl_p50_ms: itl.p50,
            itl_p99_ms: itl.p99,
            attainment: if w.ended > 0 {
                w.met as f64 / w.ended as f64
            } else {
                1.0
            },
        });
        self.window.reset();
        if !self.finished() {
            let t = self.now + ns(self.cfg.window_s);
            self.at(t, Ev::Window);
        }
    }

    fn finished(&self) -> bool {
        self.arrived == self.trace.len() && self.open == 0
    }

    fn tick(&mut self) {
        let current = Replicas {
            main: self.running(self.main_kind()),
            prefill: self.running(Kind::Prefill),
        };
        let Some(planner) = self.planner.as_mut() else {
            return;
        };
        let interval_s = planner.config().interval_s;
        let span = &self.interval;
        let mut stats = FrontendStats {
            interval_ms: (interval_s * 1e3) as u64,
            ..Default::default()
        };
        stats.models.insert(
            self.cfg.model.clone(),
            ModelStats {
                requests: span.ended,
                errors: span.errors,
                input_tokens: span.input,
                output_tokens: span.output,
                cached_tokens: span.cached,
                ttft_ms: percentiles(&span.ttft),
                itl_ms: percentiles(&span.itl),
            },
        );
        planner.observe_frontend(&stats);
        for (slot, w) in self.workers.iter().enumerate() {
            if w.state == State::Serving {
                // Requests that reached it during a stretch wait in its queue.
                let mut load = w.sched.load();
                load.waiting_requests += w.pending.len() as u64;
                let pool = match w.kind {
                    Kind::Prefill => PoolRole::Prefill,
                    _ => PoolRole::Main,
                };
                planner.observe_load(pool, slot as u64 + 1, &load);
            }
        }
        let step = planner.tick(interval_s, current);
        self.interval.reset();
        let desired = step.decided.replicas;
        if desired != current {
            self.report.decisions.push(DecisionPoint {
                t_s: self.now as f64 / NS,
                from: current.main,
                to: desired.main,
                prefill_from: current.prefill,
                prefill_to: desired.prefill,
                predicted_rate: step.predicted.rate,
                reason: step.decided.reason.clone(),
            });
            self.scale(desired);
        }
        if !self.finished() {
            let t = self.now + ns(interval_s);
            self.at(t, Ev::Tick);
        }
    }

    /// The virtual connector, each pool on its own (see [`Sim::scale_pool`]).
    fn scale(&mut self, to: Replicas) {
        self.scale_pool(self.main_kind(), to.main);
        if self.disaggregated {
            self.scale_pool(Kind::Prefill, to.prefill);
        }
        let up = self
            .workers
            .iter()
            .filter(|w| w.state != State::Stopped)
            .count() as u32;
        self.report.peak_workers = self.report.peak_workers.max(up);
    }

    /// Scales the pool of `kind` workers: up by starting workers (serving after
    /// `startup_s`), down by cancelling starting ones, then draining the newest serving ones.
    fn scale_pool(&mut self, kind: Kind, to: u32) {
        let startup = self
            .cfg
            .planner
            .as_ref()
            .map(|p| p.startup_s)
            .unwrap_or(0.0);
        let running = self.running(kind);
        for _ in running..to {
            let slot = self.add_worker(false, kind);
            let t = self.now + ns(startup);
            self.at(t, Ev::Ready(slot));
        }
        for _ in to..running {
            let pick = self
                .workers
                .iter()
                .rposition(|w| w.kind == kind && w.state == State::Starting)
                .or_else(|| {
                    self.workers
                        .iter()
                        .rposition(|w| w.kind == kind && w.state == State::Serving)
                });
            let Some(slot) = pick else { break };
            let now = self.now;
            let w = &mut self.workers[slot];
            if w.state == State::Starting {
                w.state = State::Stopped;
                w.down_at = Some(now);
            } else {
                w.state = State::Draining;
                self.settle_index();
                self.router.forget(Self::wid(slot));
                self.maybe_stop(slot);
            }
        }
    }

    fn ready(&mut self, slot: usize) {
        if self.workers[slot].state == State::Starting {
            self.workers[slot].state = State::Serving;
            self.register(slot);
        }
    }
}

/// Runs `trace` through the simulated cluster; `progress(simulated_s, trace_end_s)` is called
/// about once per simulated second of progress.
pub fn simulate(
    cfg: &SimConfig,
    trace: &[TraceRequest],
    mut progress: impl FnMut(f64, f64),
) -> Result<SimReport, String> {
    cfg.mocker.validate()?;
    if trace.is_empty() {
        return Err("the trace has no requests".into());
    }
    if !cfg.window_s.is_finite() || cfg.window_s <= 0.0 {
        return Err("the timeline window must be positive".into());
    }
    let planned_pools = cfg.planner.as_ref().map(|p| p.config.policy.pools);
    let disaggregated = match planned_pools {
        Some(Pools::Disaggregated) => true,
        Some(Pools::Aggregated) if cfg.prefill_workers > 0 => {
            return Err("the planner scales aggregated workers here: give it a prefill pool to scale the prefill workers, or run without them".into())
        }
        _ => cfg.prefill_workers > 0,
    };
    let started = Instant::now();
    let mut sim = Sim {
        cfg,
        tick: ns(cfg.timer_ms / 1e3),
        spare: Vec::new(),
        trace,
        router: KvRouter::new(cfg.router.clone()),
        workers: Vec::new(),
        live: (0..trace.len()).map(|_| None).collect(),
        queue: BinaryHeap::new(),
        seq: 0,
        now: 0,
        planner: cfg
            .planner
            .as_ref()
            .map(|p| Planner::new(p.config.clone(), p.profile.clone())),
        disaggregated,
        jobs: Default::default(),
        transfer: Box::new(cfg.mocker.transfer_time()),
        total: Span::new(),
        window: Span::new(),
        interval: Span::new(),
        e2e: histogram(),
        report: SimReport {
            requests: trace.len() as u64,
            ttft_target_ms: cfg.targets.ttft_ms,
            itl_target_ms: cfg.targets.itl_ms,
            ..Default::default()
        },
        open: 0,
        arrived: 0,
        touched: Vec::new(),
        inbound: Default::default(),
        feed: None,
    };
    let first = ns(trace[0].timestamp / 1e3);
    let end = trace.iter().map(|r| r.timestamp).fold(0.0, f64::max) / 1e3;
    sim.now = first;
    let main = sim.main_kind();
    for _ in 0..cfg.workers {
        sim.add_worker(true, main);
    }
    // A planned prefill pool starts at its minimum at least.
    let prefill_workers = match &cfg.planner {
        Some(p) if disaggregated => cfg.prefill_workers.max(p.config.policy.prefill.min),
        _ => cfg.prefill_workers,
    };
    for _ in 0..prefill_workers {
        sim.add_worker(true, Kind::Prefill);
    }
    sim.report.peak_workers = cfg.workers + prefill_workers;
    for (i, r) in trace.iter().enumerate() {
        sim.at(ns(r.timestamp / 1e3), Ev::Arrive(i));
    }
    if let Some(p) = &sim.planner {
        let t = first + ns(p.config().interval_s);
        sim.at(t, Ev::Tick);
    }
    sim.at(first + ns(cfg.window_s), Ev::Window);
    std::thread::scope(|scope| {
        if cfg.index_thread {
            let (tx, rx) = std::sync::mpsc::channel::<(WorkerId, Vec<KvEvent>)>();
            let applied = Arc::new(AtomicU64::new(0));
            let (router, done) = (sim.router.clone(), applied.clone());
            scope.spawn(move || {
                let _failing = Failing(&done);
                // Until the simulation drops its sender. A batch comes every few microseconds
                // of a busy run: waiting for the next one spins a while before it sleeps (a
                // sleeping receiver costs each send a wake-up call into the kernel).
                use std::sync::mpsc::TryRecvError;
                let mut idle = 0u32;
                loop {
                    let next = match rx.try_recv() {
                        Ok(batch) => Some(batch),
                        Err(TryRecvError::Empty) if idle < 1 << 14 => {
                            std::hint::spin_loop();
                            idle += 1;
                            continue;
                        }
                        Err(TryRecvError::Empty) => rx.recv().ok(),
                        Err(TryRecvError::Disconnected) => None,
                    };
                    let Some((w, events)) = next else { break };
                    router.index().apply(w, &events);
                    done.fetch_add(1, Ordering::Release);
                    idle = 0;
                }
            });
            sim.feed = Some(IndexFeed {
                tx,
                sent: 0,
                applied,
            });
        }
        // The index thread stops when its sender is dropped: also when a panic unwinds here
        // (the scope waits for it before passing the panic on).
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_events(&mut sim, end, &mut progress)
        }));
        sim.feed = None;
        if let Err(panic) = ran {
            std::panic::resume_unwind(panic);
        }
    });
    let end_at = sim.now;

    let mut report = std::mem::take(&mut sim.report);
    report.request_records.sort_by_key(|r| r.index);
    report.simulated_s = (end_at - first) as f64 / NS;
    report.wall_s = started.elapsed().as_secs_f64();
    report.speed = report.simulated_s / report.wall_s.max(1e-9);
    report.ttft_ms = percentiles(&sim.total.ttft);
    report.itl_ms = percentiles(&sim.total.itl);
    report.e2e_ms = percentiles(&sim.e2e);
    report.cached_ratio = if sim.total.input > 0 {
        sim.total.cached as f64 / sim.total.input as f64
    } else {
        0.0
    };
    report.attainment = if report.requests > 0 {
        sim.total.met as f64 / report.requests as f64
    } else {
        0.0
    };
    report.worker_seconds = sim
        .workers
        .iter()
        .map(|w| (w.down_at.unwrap_or(end_at).max(w.up_at) - w.up_at) as f64 / NS)
        .sum();
    Ok(report)
}

/// Runs the events in time order until every request has ended.
fn run_events(sim: &mut Sim, end: f64, progress: &mut impl FnMut(f64, f64)) {
    let mut reported = 0u64;
    while let Some(Reverse((t, _, ev))) = sim.queue.pop() {
        sim.now = t;
        match ev {
            Ev::Arrive(i) => sim.arrive(i),
            Ev::Reach(i) => sim.reach(i),
            Ev::StepDone(w) => sim.step_done(w),
            Ev::CruiseDone(w, g) => sim.cruise_done(w, g),
            Ev::Transferred(i) => sim.transferred(i),
            Ev::Ready(w) => sim.ready(w),
            Ev::Tick => sim.tick(),
            Ev::Window => sim.window(),
        }
        if t / 1_000_000_000 > reported {
            reported = t / 1_000_000_000;
            progress(t as f64 / NS, end);
        }
        if sim.finished() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{generate, LoadCurve, Shape};
    use dynamo_planner::{Limits, PolicySettings, PredictorKind};

    const T: Targets = Targets {
        ttft_ms: 100.0,
        itl_ms: 20.0,
    };

    fn shape() -> Shape {
        Shape {
            isl: 512,
            osl: 32,
            groups: 8,
            prefix_blocks: 4,
            block_size: 64,
        }
    }

    fn cfg(workers: u32, planner: Option<PlannerSim>) -> SimConfig {
        SimConfig {
            model: "tiny".into(),
            mocker: MockerSettings::default(),
            router: KvRouterSettings {
                seed: Some(1),
                ..Default::default()
            },
            workers,
            planner,
            targets: T,
            window_s: 10.0,
            overhead_ms: 0.0,
            hop_ms: 0.0,
            seed: 0,
            timer_ms: 0.0,
            stepping: Stepping::Batch,
            prefill_workers: 0,
            record_requests: false,
            index_thread: false,
            routes: None,
        }
    }

    fn profile() -> Profile {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../config/profiles/mocker.json");
        Profile::load(&path, Some("tiny")).unwrap()
    }

    /// The planner every 5 s (Holt), 1-8 workers in the main pool, 5 s startup.
    fn planner_sim(targets: Targets, pools: Pools, prefill: Limits, budget: u32) -> PlannerSim {
        PlannerSim {
            config: PlannerConfig {
                model: "tiny".into(),
                targets,
                interval_s: 5.0,
                predictor: PredictorKind::default(),
                policy: PolicySettings {
                    pools,
                    main: Limits { min: 1, max: 8 },
                    prefill,
                    budget,
                    down_after: 2,
                },
                stale_after: 3,
            },
            profile: profile(),
            startup_s: 5.0,
        }
    }

    /// 10 req/s, six times that from `at_s` until `until_s`, for `duration_s`.
    fn step_trace(at_s: f64, until_s: f64, duration_s: f64) -> Vec<TraceRequest> {
        let curve = LoadCurve::Step {
            base: 10.0,
            factor: 6.0,
            at_s,
            until_s,
        };
        generate(&curve, duration_s, &shape(), 5)
    }

    fn run(c: &SimConfig, trace: &[TraceRequest]) -> SimReport {
        let mut r = simulate(c, trace, |_, _| {}).unwrap();
        r.wall_s = 0.0;
        r.speed = 0.0;
        r
    }

    /// The same trace and settings give the same report; more load on the same workers
    /// waits longer; every request is accounted for and the mocker's timing shows through.
    #[test]
    fn runs_are_reproducible_and_follow_the_load() {
        let light = generate(&LoadCurve::Steady { rate: 10.0 }, 30.0, &shape(), 3);
        let heavy = generate(&LoadCurve::Steady { rate: 60.0 }, 30.0, &shape(), 3);
        let a = run(&cfg(2, None), &light);
        assert_eq!(a, run(&cfg(2, None), &light));
        assert_eq!(a.completed, light.len() as u64);
        assert_eq!(a.failed, 0);
        // A decode step is the perf model's 5.74 ms at low KV usage.
        assert!((5.7..6.5).contains(&a.itl_ms.p50), "{:?}", a.itl_ms);
        // Shared prefixes are found: 4 of 8 blocks are one of 8 prefixes.
        assert!(a.cached_ratio > 0.3, "{}", a.cached_ratio);
        let b = run(&cfg(2, None), &heavy);
        assert!(
            b.ttft_ms.p99 > a.ttft_ms.p99,
            "{:?} vs {:?}",
            b.ttft_ms,
            a.ttft_ms
        );
        // Two static workers over the whole run.
        assert!((b.worker_seconds - 2.0 * b.simulated_s).abs() < 1e-6);
    }

    /// With `record_requests`, every completed request has one record, under its trace
    /// index and at its trace time, and the records add up to the report (its cached ratio,
    /// its mean TTFT); without, there are none.
    #[test]
    fn request_records_add_up_to_the_report() {
        let trace = generate(&LoadCurve::Steady { rate: 20.0 }, 20.0, &shape(), 3);
        let r = run(
            &SimConfig {
                record_requests: true,
                ..cfg(2, None)
            },
            &trace,
        );
        let recs = &r.request_records;
        assert!(r.completed > 300, "{}", r.completed);
        assert_eq!(recs.len() as u64, r.completed);
        let mut seen: Vec<usize> = recs.iter().map(|x| x.index).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), recs.len(), "each request once");
        for x in recs {
            assert!(x.ok && (1..=2).contains(&x.worker), "{x:?}");
            assert!(
                (x.start_s - trace[x.index].timestamp / 1e3).abs() < 1e-6,
                "{x:?}"
            );
            assert!(x.ttft_ms.is_some_and(|t| t > 0.0 && t <= x.e2e_ms), "{x:?}");
            assert_eq!(x.output_tokens, trace[x.index].output_length);
        }
        let (cached, prompt) = recs.iter().fold((0u64, 0u64), |(c, p), x| {
            (c + x.cached_tokens as u64, p + x.prompt_tokens as u64)
        });
        assert!((cached as f64 / prompt as f64 - r.cached_ratio).abs() < 1e-9);
        assert!(cached > 0, "shared prefixes are cached");
        let mean = recs.iter().filter_map(|x| x.ttft_ms).sum::<f64>() / recs.len() as f64;
        assert!(
            (mean - r.ttft_ms.mean).abs() <= 0.01 * r.ttft_ms.mean,
            "{mean} against {}",
            r.ttft_ms.mean
        );
        assert!(run(&cfg(2, None), &trace).request_records.is_empty());
    }

    /// Replaying a run's own routing (`routes`, from its request records) gives the same run:
    /// a forced route is accounted, cached and drawn for as the router's own choice; and a
    /// different routing gives a different run.
    #[test]
    fn replaying_a_run_s_routing_gives_the_same_run() {
        let trace = generate(&LoadCurve::Steady { rate: 30.0 }, 20.0, &shape(), 5);
        let c = SimConfig {
            record_requests: true,
            ..cfg(3, None)
        };
        let first = run(&c, &trace);
        let mut routes = vec![None; trace.len()];
        for r in &first.request_records {
            routes[r.index] = Some(r.worker as usize - 1);
        }
        let again = run(
            &SimConfig {
                routes: Some(routes),
                ..c.clone()
            },
            &trace,
        );
        assert_eq!(again, first);
        // Everything on one worker of three: a different (worse) run.
        let piled = run(
            &SimConfig {
                routes: Some(vec![Some(0); trace.len()]),
                ..c
            },
            &trace,
        );
        assert!(piled.request_records.iter().all(|r| r.worker == 1));
        assert!(
            piled.ttft_ms.p90 > first.ttft_ms.p90,
            "{} against {}",
            piled.ttft_ms.p90,
            first.ttft_ms.p90
        );
    }

    /// With the real-time mocker's 1 ms timer modelled, a lone request's tokens come on
    /// average as often as without it (the steps stay on their absolute schedule), but the
    /// gaps spread as tokio's wake-ups spread them: over the next tick at p90, where exact
    /// step times give every gap the step's time. The lateness is a function of the step,
    /// so stepping one step at a time gives the same run.
    #[test]
    fn the_timer_spreads_token_gaps_around_the_step_time() {
        let trace = [TraceRequest {
            timestamp: 0.0,
            input_length: 128,
            output_length: 2000,
            hash_ids: vec![1, 2],
        }];
        let with = |timer_ms, stepping| {
            run(
                &SimConfig {
                    timer_ms,
                    stepping,
                    ..cfg(1, None)
                },
                &trace,
            )
        };
        let exact = with(0.0, Stepping::Batch).itl_ms;
        let ticked = with(1.0, Stepping::Batch);
        let itl = ticked.itl_ms;
        // Steps of 5.7-5.8 ms (the KV usage grows) at exact times, and the same on average.
        assert!(exact.p90 - exact.p50 < 0.1, "{exact:?}");
        assert!(
            (itl.mean - exact.mean).abs() < 0.01 * exact.mean,
            "{itl:?} against {exact:?}"
        );
        assert!(itl.p90 > 6.2 && itl.p50 < 6.1, "{itl:?}");
        let each = with(1.0, Stepping::Each);
        assert_eq!(with(1.0, Stepping::Report), each);
        assert_eq!(
            (ticked.itl_ms, ticked.ttft_ms, ticked.e2e_ms),
            (each.itl_ms, each.ttft_ms, each.e2e_ms)
        );
    }

    /// A worker's decode stretches as single events change nothing a user would see: cut
    /// where load reports are due, the report equals the step-by-step run's (the pool
    /// never evicts here, so even the KV events' timing cannot matter); cut only where the
    /// batch changes, its figures stay within 2% of it.
    #[test]
    fn decode_stretches_give_the_step_by_step_results() {
        for rate in [10.0, 60.0] {
            let trace = generate(&LoadCurve::Steady { rate }, 30.0, &shape(), 3);
            let with = |stepping| {
                run(
                    &SimConfig {
                        stepping,
                        ..cfg(2, None)
                    },
                    &trace,
                )
            };
            let each = with(Stepping::Each);
            assert_eq!(with(Stepping::Report), each, "at {rate} req/s");
            let batch = with(Stepping::Batch);
            assert_eq!(batch.completed, each.completed);
            let close = |a: f64, b: f64| (a - b).abs() <= 0.02 * b.abs();
            for (a, b) in [
                (batch.ttft_ms.p50, each.ttft_ms.p50),
                (batch.ttft_ms.p99, each.ttft_ms.p99),
                (batch.itl_ms.p50, each.itl_ms.p50),
                (batch.itl_ms.p99, each.itl_ms.p99),
                (batch.cached_ratio, each.cached_ratio),
                (batch.simulated_s, each.simulated_s),
            ] {
                assert!(close(a, b), "at {rate} req/s: {batch:?} against {each:?}");
            }
        }
    }

    /// Applying the KV events on a second thread changes nothing: the same reports with and
    /// without it, for a planner adding and draining workers (each drained worker leaves the
    /// index) on pools small enough to evict, and for a disaggregated deployment.
    #[test]
    fn the_index_thread_gives_the_same_runs() {
        let trace = step_trace(30.0, 60.0, 90.0);
        let mut planned = cfg(
            1,
            Some(planner_sim(
                T,
                Pools::Aggregated,
                Limits { min: 0, max: 0 },
                8,
            )),
        );
        planned.mocker.num_gpu_blocks = 64;
        let disaggregated = SimConfig {
            prefill_workers: 2,
            ..cfg(2, None)
        };
        for c in [planned, disaggregated] {
            let alone = run(&c, &trace);
            let threaded = run(
                &SimConfig {
                    index_thread: true,
                    ..c.clone()
                },
                &trace,
            );
            assert_eq!(threaded, alone);
            assert_eq!(alone.completed, trace.len() as u64);
            if c.planner.is_some() {
                assert!(
                    alone.decisions.iter().any(|d| d.to < d.from),
                    "{:?}",
                    alone.decisions
                );
            } else {
                assert!(alone.remote_prefills > 0);
            }
        }
    }

    /// A step up and back down: the planner adds workers for the step (after their startup)
    /// and drains them after it, using fewer worker-seconds than provisioning for the step
    /// all along, at a comparable attainment; without enough workers attainment collapses.
    #[test]
    fn the_planner_follows_a_step_and_saves_worker_seconds() {
        let trace = step_trace(60.0, 120.0, 180.0);
        let planner = planner_sim(T, Pools::Aggregated, Limits { min: 0, max: 0 }, 8);
        let planned = run(&cfg(1, Some(planner)), &trace);
        assert!(planned.peak_workers >= 2, "{:?}", planned.decisions);
        let ups: Vec<_> = planned.decisions.iter().filter(|d| d.to > d.from).collect();
        let downs: Vec<_> = planned.decisions.iter().filter(|d| d.to < d.from).collect();
        assert!(
            ups.first().is_some_and(|d| d.t_s >= 60.0),
            "{:?}",
            planned.decisions
        );
        assert!(
            downs.last().is_some_and(|d| d.t_s >= 120.0),
            "{:?}",
            planned.decisions
        );
        let peak = run(&cfg(planned.peak_workers, None), &trace);
        assert!(
            planned.worker_seconds < 0.8 * peak.worker_seconds,
            "{} vs {}",
            planned.worker_seconds,
            peak.worker_seconds
        );
        // The step's first interval and the startup are missed; the rest holds.
        assert!(planned.attainment > 0.85, "{}", planned.attainment);
        let starved = run(&cfg(1, None), &trace);
        assert!(
            starved.attainment < planned.attainment - 0.2,
            "{}",
            starved.attainment
        );
        // The timeline shows the workers it ran.
        assert!(planned.timeline.iter().any(|p| p.serving >= 2));
        assert!(planned.timeline.last().is_some_and(|p| p.serving == 1));
    }

    fn long_prompts() -> Shape {
        Shape {
            isl: 3000,
            osl: 200,
            groups: 64,
            prefix_blocks: 2,
            block_size: 64,
        }
    }

    /// Prefill workers take the long prompts off the decode workers: every request completes,
    /// most prompts are prefilled remotely, and decoding no longer waits behind prefills (the
    /// aggregated workers' ITL p99 is a prefill step; the decode pool's stays a decode step),
    /// while the transfer shows in TTFT. Reproducible like the aggregated runs.
    #[test]
    fn prefill_workers_spare_the_decode_workers_prefills() {
        let trace = generate(&LoadCurve::Steady { rate: 24.0 }, 30.0, &long_prompts(), 7);
        let agg = run(&cfg(4, None), &trace);
        let disagg_cfg = SimConfig {
            prefill_workers: 2,
            ..cfg(2, None)
        };
        let disagg = run(&disagg_cfg, &trace);
        assert_eq!(disagg, run(&disagg_cfg, &trace));
        assert_eq!(agg.remote_prefills, 0);
        assert_eq!(disagg.completed, trace.len() as u64, "{disagg:?}");
        assert_eq!(disagg.failed, 0);
        assert!(
            disagg.remote_prefills as f64 > 0.8 * trace.len() as f64,
            "{} of {}",
            disagg.remote_prefills,
            trace.len()
        );
        assert!(agg.itl_ms.p99 > 40.0, "{:?}", agg.itl_ms);
        assert!(disagg.itl_ms.p99 < 15.0, "{:?}", disagg.itl_ms);
        // A 3000-token prompt takes the perf model's ~66 ms to prefill on an idle worker,
        // plus the move of its blocks.
        assert!(disagg.ttft_ms.p50 > 66.0, "{:?}", disagg.ttft_ms);
        assert!((disagg.worker_seconds - 4.0 * disagg.simulated_s).abs() < 1e-6);
    }

    /// A remote prefill crosses the bus twice (its request to the prefill worker, its answer
    /// back): each crossing adds `hop_ms` to the first token of a request that has the
    /// workers to itself.
    #[test]
    fn a_remote_prefill_pays_the_hop_both_ways() {
        // One request a second, each done well before the next: 3000-token prompts, two
        // shared leading blocks, 20 output tokens.
        let mut trace = generate(&LoadCurve::Steady { rate: 4.0 }, 5.0, &long_prompts(), 3);
        for (k, r) in trace.iter_mut().enumerate() {
            r.timestamp = 1000.0 * k as f64;
            r.output_length = 20;
        }
        let with = |hop_ms| {
            let c = SimConfig {
                prefill_workers: 1,
                hop_ms,
                record_requests: true,
                ..cfg(1, None)
            };
            run(&c, &trace)
        };
        let (direct, hopped) = (with(0.0), with(0.25));
        assert_eq!(hopped.remote_prefills, trace.len() as u64, "{hopped:?}");
        assert_eq!(direct.remote_prefills, trace.len() as u64);
        for (a, b) in direct.request_records.iter().zip(&hopped.request_records) {
            assert_eq!(a.index, b.index);
            let extra = b.ttft_ms.unwrap() - a.ttft_ms.unwrap();
            assert!(
                (extra - 0.5).abs() < 0.002,
                "request {}: {extra} ms",
                a.index
            );
        }
    }

    /// With a prefill pool, the planner sizes both pools: long prompts arriving faster grow
    /// the prefill pool, which drains back after them, and no request fails.
    #[test]
    fn the_planner_scales_the_prefill_pool() {
        let curve = LoadCurve::Step {
            base: 4.0,
            factor: 5.0,
            at_s: 60.0,
            until_s: 150.0,
        };
        let trace = generate(&curve, 240.0, &long_prompts(), 9);
        let targets = Targets {
            ttft_ms: 400.0,
            itl_ms: 30.0,
        };
        let planner = planner_sim(targets, Pools::Disaggregated, Limits { min: 1, max: 8 }, 16);
        let r = run(&cfg(1, Some(planner)), &trace);
        assert_eq!(r.failed, 0, "{r:?}");
        assert_eq!(r.completed, trace.len() as u64);
        assert!(r.remote_prefills > 0);
        let grew = r
            .decisions
            .iter()
            .find(|d| d.prefill_to > d.prefill_from)
            .unwrap_or_else(|| panic!("no prefill scale-up: {:?}", r.decisions));
        assert!(grew.t_s >= 60.0, "{:?}", r.decisions);
        let shrank = r
            .decisions
            .iter()
            .rfind(|d| d.prefill_to < d.prefill_from)
            .unwrap_or_else(|| panic!("no prefill scale-down: {:?}", r.decisions));
        assert!(shrank.t_s >= 150.0, "{:?}", r.decisions);
        assert!(r.timeline.iter().any(|p| p.prefill_serving >= 2));
        assert!(r.timeline.last().is_some_and(|p| p.prefill_serving
            < r.timeline
                .iter()
                .map(|p| p.prefill_serving)
                .max()
                .unwrap_or(0)));
    }
}
