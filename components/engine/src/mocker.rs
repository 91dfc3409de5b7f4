//! The mocker engine: the real [`Scheduler`] and block pool with the model's execution
//! simulated, so that what it publishes (KV events, load) is what a real engine would publish.
//!
//! Step time comes from a perf model, by default the polynomials widely used for this purpose:
//! `prefill_ms = 4.209989e-7 t² + 0.01518344 t + 16.50142` with `t` the uncached prompt tokens
//! in the batch, and `decode_ms = -25.74 p² + 54.01 p + 5.74` (floor 1 ms) with `p` the KV usage
//! fraction; a step with both pays both. `speedup_ratio` divides the time. Sampled tokens are
//! drawn (deterministically per engine) from the ordinary part of the vocabulary, so output
//! detokenizes and never ends early on an EOS.
//!
//! The scheduler runs in its own task, fed through a bounded command channel (a full channel is
//! `Overloaded`). Each step's KV events go out on a broadcast channel (a subscriber that falls
//! behind sees a gap in event ids, which is what triggers a router's resync), load on a watch.
//! Should that task panic, [`Engine::health`] turns `Failed` and every open stream ends
//! without a finish reason (the worker reports both as a typed worker failure).
//!
//! Fault injection ([`MockerFaults`], off by default), for tests and chaos runs; step numbers
//! count from 1 for each engine start (a restarted engine counts anew):
//! - `panic_at_step`: the scheduler panics while computing that step;
//! - `panic_on_token`: the scheduler panics at the first step that computes a prompt holding
//!   this token id (a "marked" request), failing every request in flight on the engine;
//! - `stall_at_step` + `stall_for`: that step takes `stall_for` longer (a hung engine: no
//!   tokens, no events; the worker's heartbeats go on).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use dynamo_protocols::kv::{KvDump, LoadReport};
use dynamo_protocols::llm::{PreprocessedRequest, TokenId};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::scheduler::{
    check_disk, copy_time, fingerprint, forward_dumps, submit, BulkDecode, Executor, KvCommand,
    OutputSender, Scheduler, SchedulerKv, SchedulerSettings, StepBatch, StepResult, COMMAND_QUEUE,
};
use crate::{
    panic_message, Engine, EngineError, EngineState, EngineStream, KvCapability, KvHandle,
};

#[derive(Debug, Clone, PartialEq)]
pub struct MockerSettings {
    pub num_gpu_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Simulated time is divided by this.
    pub speedup_ratio: f64,
    /// Token ids to sample from (the vocabulary without special tokens).
    pub vocab: Range<TokenId>,
    pub seed: u64,
    pub faults: MockerFaults,
    /// Simulated KV transfers (disaggregation): bytes of KV per token of the simulated model
    /// (Llama-3-8B in bf16: 32 layers x 8 kv heads x 128 x 2 x 2 bytes = 128 KiB), the link's
    /// bandwidth in bytes per second, and its latency per transfer. A transfer of `b` blocks
    /// takes `latency + b x block_size x kv_bytes_per_token / bandwidth`, divided by
    /// `speedup_ratio` like every simulated time.
    pub kv_bytes_per_token: u64,
    pub transfer_bandwidth: f64,
    pub transfer_latency: Duration,
    /// Host KV tier below the simulated device pool, in bytes (0: none); blocks count
    /// `block_size x kv_bytes_per_token` bytes each. Onboarding moves them at
    /// `host_bandwidth` bytes per second (PCIe-like), charged to the next step, when that
    /// beats the perf model's prefill time for the same tokens.
    pub host_kv_cache: usize,
    pub host_bandwidth: f64,
    /// Disk KV tier below the host tier: capacity in bytes (0: none) and directory (real
    /// files, header only: a simulated block has no contents). Onboarding from it costs
    /// `disk_latency` plus the bytes over `disk_bandwidth` (NVMe-like).
    pub disk_kv_cache: usize,
    pub disk_kv_dir: Option<std::path::PathBuf>,
    pub disk_bandwidth: f64,
    pub disk_latency: Duration,
    /// Requests that must have used a block for it to go to disk (the frequency filter).
    pub disk_min_uses: u32,
}

/// Faults to inject (see the module header); all off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockerFaults {
    pub panic_at_step: Option<u64>,
    pub panic_on_token: Option<TokenId>,
    pub stall_at_step: Option<u64>,
    pub stall_for: Duration,
}

impl Default for MockerSettings {
    fn default() -> Self {
        Self {
            num_gpu_blocks: 16384,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            speedup_ratio: 1.0,
            vocab: 0..32000,
            seed: 0,
            faults: MockerFaults::default(),
            kv_bytes_per_token: 128 << 10,
            transfer_bandwidth: 25e9,
            transfer_latency: Duration::from_millis(1),
            host_kv_cache: 0,
            host_bandwidth: 25e9,
            disk_kv_cache: 0,
            disk_kv_dir: None,
            disk_bandwidth: 3e9,
            disk_latency: Duration::from_micros(200),
            disk_min_uses: crate::scheduler::DISK_MIN_USES,
        }
    }
}

impl MockerSettings {
    /// The simulated time of moving `blocks` blocks (see the fields).
    pub fn transfer_time(&self) -> impl Fn(usize) -> Duration + Send + Sync + 'static {
        let per_block = (self.block_size as u64 * self.kv_bytes_per_token) as f64;
        let (bw, latency, speedup) = (
            self.transfer_bandwidth.max(1.0),
            self.transfer_latency,
            self.speedup_ratio.max(1e-9),
        );
        move |blocks| {
            (latency + Duration::from_secs_f64(blocks as f64 * per_block / bw)).div_f64(speedup)
        }
    }

    /// Fetching blocks from a peer is worth it when the simulated transfer beats the perf
    /// model's prefill of the same tokens.
    fn fetch_cost(&self) -> impl Fn(usize) -> bool + Send + Sync + 'static {
        let transfer = self.transfer_time();
        let (bs, speedup) = (self.block_size as f64, self.speedup_ratio.max(1e-9));
        move |blocks| {
            let compute = Duration::from_secs_f64(prefill_ms(blocks as f64 * bs) / 1e3 / speedup);
            transfer(blocks) < compute
        }
    }

    /// The disk tier's settings, when one is configured. Files are marked with the simulated
    /// layout (block size, bytes per token), so a directory is reused only by a mocker of the
    /// same shape.
    fn disk_tier(&self) -> Option<dynamo_kv::DiskSettings> {
        let dir = self.disk_kv_dir.clone()?;
        (self.disk_kv_cache > 0).then(|| dynamo_kv::DiskSettings {
            dir,
            capacity: self.disk_kv_cache,
            fingerprint: fingerprint(&[
                b"mocker",
                &(self.block_size as u64).to_le_bytes(),
                &self.kv_bytes_per_token.to_le_bytes(),
            ]),
            nominal: self.block_size * self.kv_bytes_per_token as usize,
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.num_gpu_blocks == 0 || self.block_size == 0 || self.max_num_seqs == 0 {
            return Err("num_gpu_blocks, block_size and max_num_seqs must be positive".into());
        }
        if self.max_num_batched_tokens == 0 {
            return Err("max_num_batched_tokens must be positive".into());
        }
        if !(self.speedup_ratio.is_finite() && self.speedup_ratio > 0.0) {
            return Err(format!(
                "speedup_ratio {} must be a positive number",
                self.speedup_ratio
            ));
        }
        if self.vocab.is_empty() {
            return Err("the vocabulary range is empty".into());
        }
        if self.kv_bytes_per_token == 0 {
            // A block's simulated size: host-tier capacity and transfer times count it.
            return Err("kv_bytes_per_token must be positive".into());
        }
        check_disk(self.disk_kv_cache, self.disk_kv_dir.as_deref())?;
        if !(self.disk_bandwidth.is_finite() && self.disk_bandwidth > 0.0) {
            return Err(format!(
                "disk_bandwidth {} must be a positive number",
                self.disk_bandwidth
            ));
        }
        if matches!(self.faults.panic_at_step, Some(0))
            || matches!(self.faults.stall_at_step, Some(0))
        {
            return Err("fault steps count from 1".into());
        }
        if self.faults.stall_at_step.is_some() && self.faults.stall_for.is_zero() {
            return Err("a stall fault needs a duration (stall_for)".into());
        }
        Ok(())
    }
}

/// Prefill time for `t` uncached tokens.
pub fn prefill_ms(t: f64) -> f64 {
    4.209989e-7 * t * t + 0.01518344 * t + 16.50142
}

/// Decode time at KV usage fraction `p`.
pub fn decode_ms(p: f64) -> f64 {
    (-25.74 * p * p + 54.01 * p + 5.74).max(1.0)
}

/// The mocker's model of execution: step times from the perf model, tokens from the
/// vocabulary (see the module).
pub struct Simulated {
    speedup: f64,
    vocab: Range<TokenId>,
    state: u64,
    faults: MockerFaults,
    steps: u64,
    /// Simulated bytes of one block, and the lower tiers' links (onboarding).
    block_bytes: usize,
    host_bandwidth: f64,
    disk_bandwidth: f64,
    disk_latency: Duration,
    /// Onboarding time charged to the next step.
    charge: Duration,
}

impl Simulated {
    fn next_token(&mut self) -> TokenId {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let span = (self.vocab.end - self.vocab.start) as u64;
        self.vocab.start + (self.state % span) as TokenId
    }
}

impl Simulated {
    /// A step's simulated duration.
    fn step_time(&self, prefill_tokens: usize, decodes: usize, kv_usage: f64) -> Duration {
        let mut ms = 0.0;
        if prefill_tokens > 0 {
            ms += prefill_ms(prefill_tokens as f64);
        }
        if decodes > 0 {
            ms += decode_ms(kv_usage);
        }
        Duration::from_secs_f64(ms / 1e3 / self.speedup)
    }
}

impl BulkDecode for Simulated {
    fn decode_time(&self, batch: usize, kv_usage: f64) -> Duration {
        self.step_time(0, batch, kv_usage)
    }

    fn count_step(&mut self) {
        self.steps += 1;
    }

    fn sample(&mut self) -> TokenId {
        self.next_token()
    }
}

impl Executor for Simulated {
    fn nominal_block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Predictable while no step fault is set and no copy is charged to the next step.
    fn bulk_decode(&mut self) -> Option<&mut dyn BulkDecode> {
        let faults = self.faults.panic_at_step.is_some() || self.faults.stall_at_step.is_some();
        (!faults && self.charge.is_zero()).then_some(self as &mut dyn BulkDecode)
    }

    /// Onboard when moving the blocks over the host link (and the disk's) is faster than
    /// the perf model's prefill of the same tokens; the copy's time is charged to the next
    /// step.
    fn onboard(&mut self, host: usize, disk: usize, tokens: usize) -> Option<Duration> {
        let mut copy = copy_time(host * self.block_bytes, self.host_bandwidth);
        if disk > 0 {
            copy += self.disk_latency + copy_time(disk * self.block_bytes, self.disk_bandwidth);
        }
        let compute = Duration::from_secs_f64(prefill_ms(tokens as f64) / 1e3);
        if copy >= compute {
            return None;
        }
        let copy = copy.div_f64(self.speedup);
        self.charge += copy;
        Some(copy)
    }

    fn execute(&mut self, batch: &StepBatch<'_>) -> StepResult {
        self.steps += 1;
        if self.faults.panic_at_step == Some(self.steps) {
            panic!("injected fault: panic at step {}", self.steps);
        }
        if let Some(t) = self.faults.panic_on_token {
            if batch
                .items
                .iter()
                .any(|i| i.start < i.prompt_len && i.tokens[..i.prompt_len].contains(&t))
            {
                panic!("injected fault: a prompt holds the marked token {t}");
            }
        }
        let mut prefill_tokens = 0usize;
        let mut decodes = 0usize;
        let mut sampled = Vec::new();
        for item in &batch.items {
            if item.is_prefill() {
                prefill_tokens += item.len;
            } else {
                decodes += 1;
            }
            if item.samples {
                sampled.push(Ok(self.next_token()));
            }
        }
        let mut duration = self.step_time(prefill_tokens, decodes, batch.kv_usage)
            + std::mem::take(&mut self.charge);
        if self.faults.stall_at_step == Some(self.steps) {
            duration += self.faults.stall_for;
        }
        StepResult {
            sampled,
            duration,
            ..Default::default()
        }
    }
}

enum Command {
    Add {
        req: PreprocessedRequest,
        out: OutputSender,
        cancel: CancellationToken,
    },
    Dump(oneshot::Sender<KvDump>),
    Kv(KvCommand),
    /// The disk offloader has events to publish.
    Wake,
}

/// A running mocker: its scheduler task and the channels to it.
pub struct MockerEngine {
    commands: mpsc::Sender<Command>,
    kv: KvHandle,
    capability: Arc<SchedulerKv>,
    health: watch::Receiver<EngineState>,
    stop: CancellationToken,
}

impl MockerEngine {
    /// Starts the scheduler task (needs a tokio runtime).
    pub fn start(settings: MockerSettings) -> Result<Self, EngineError> {
        let scheduler = simulated_scheduler(&settings)?;
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let weak = commands.downgrade();
        scheduler.set_waker(Arc::new(move || {
            if let Some(tx) = weak.upgrade() {
                let _ = tx.try_send(Command::Wake);
            }
        }));
        let (events, _) = broadcast::channel(1024);
        let (load_tx, load) = watch::channel(scheduler.load());
        let (dumps, dump_rx) = mpsc::channel::<oneshot::Sender<KvDump>>(16);
        let stop = CancellationToken::new();
        forward_dumps(dump_rx, commands.clone(), Command::Dump, stop.clone());
        let task = tokio::spawn(run(scheduler, rx, events.clone(), load_tx, stop.clone()));
        let (health_tx, health) = watch::channel(EngineState::Running);
        // Watches the scheduler task: a panic (or an exit nobody asked for) fails the engine.
        let watched = stop.clone();
        tokio::spawn(async move {
            let why = match task.await {
                Err(e) if e.is_panic() => {
                    format!(
                        "the mocker scheduler panicked: {}",
                        panic_message(&*e.into_panic())
                    )
                }
                _ if watched.is_cancelled() => return,
                Ok(()) => return,
                Err(_) => "the mocker scheduler task was cancelled".to_string(),
            };
            health_tx.send_replace(EngineState::Failed(why));
        });
        Ok(Self {
            capability: Arc::new(
                SchedulerKv::new(commands.clone(), Command::Kv, settings.block_size, 0)
                    .with_simulated_transfer(settings.transfer_time())
                    .with_fetch_cost(settings.fetch_cost()),
            ),
            commands,
            kv: KvHandle::new(events, load, dumps, settings.block_size as u32),
            health,
            stop,
        })
    }
}

/// The mocker's scheduler and block pool with its timing model, without a task or channels:
/// for a discrete-event simulator, which calls [`Scheduler::step`] for each step's simulated
/// time and [`Scheduler::deliver`] once that time has passed (what [`MockerEngine`] does in
/// real time).
pub fn simulated_scheduler(settings: &MockerSettings) -> Result<Scheduler<Simulated>, EngineError> {
    settings.validate().map_err(EngineError::BadRequest)?;
    Ok(Scheduler::new(
        SchedulerSettings {
            host_tier_bytes: settings.host_kv_cache,
            disk: settings.disk_tier(),
            disk_min_uses: settings.disk_min_uses,
            ..SchedulerSettings::new(
                settings.num_gpu_blocks,
                settings.block_size,
                settings.max_num_seqs,
                settings.max_num_batched_tokens,
            )
        },
        Simulated {
            speedup: settings.speedup_ratio,
            vocab: settings.vocab.clone(),
            state: settings.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            faults: settings.faults.clone(),
            steps: 0,
            block_bytes: settings.block_size * settings.kv_bytes_per_token as usize,
            host_bandwidth: settings.host_bandwidth,
            disk_bandwidth: settings.disk_bandwidth,
            disk_latency: settings.disk_latency,
            charge: Duration::ZERO,
        },
    ))
}

impl Drop for MockerEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run(
    mut sched: Scheduler<Simulated>,
    mut rx: mpsc::Receiver<Command>,
    events: broadcast::Sender<Vec<dynamo_protocols::kv::KvEvent>>,
    load: watch::Sender<LoadReport>,
    stop: CancellationToken,
) {
    let handle = |sched: &mut Scheduler<Simulated>, cmd: Command| match cmd {
        Command::Add { req, out, cancel } => {
            if let Err(e) = sched.add(req, out.clone(), cancel) {
                let _ = out.send(Err(e));
            }
        }
        Command::Dump(reply) => {
            let _ = reply.send(sched.dump());
        }
        Command::Kv(cmd) => sched.kv(cmd),
        Command::Wake => {}
    };
    // When the running step ends, on an absolute schedule: tokio's timer wakes up to a
    // millisecond late, and timing each step from its late wake-up would add that to every
    // step (a 6 ms decode step took 7). A step that starts more than `SLACK` behind the
    // schedule (the engine was idle, or the machine is overloaded) starts a new one.
    const SLACK: Duration = Duration::from_millis(2);
    let mut schedule: Option<tokio::time::Instant> = None;
    loop {
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut sched, cmd);
        }
        let duration = sched.step();
        if let Some(d) = duration {
            let now = tokio::time::Instant::now();
            let start = schedule.filter(|s| *s + SLACK >= now).unwrap_or(now);
            let end = start + d;
            schedule = Some(end);
            // The step's outputs and events appear when its simulated time has passed.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(end) => {}
            }
        } else {
            schedule = None;
        }
        sched.deliver();
        let batch = sched.take_events();
        if !batch.is_empty() {
            // No subscriber is fine: nobody is indexing this worker.
            let _ = events.send(batch);
        }
        load.send_if_modified(|l| {
            let now = sched.load();
            std::mem::replace(l, now) != now
        });
        if duration.is_none() {
            tokio::select! {
                _ = stop.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => handle(&mut sched, cmd),
                    None => return,
                },
            }
        }
    }
}

impl Engine for MockerEngine {
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        crate::refuse_without_logits(&request, "mocker")?;
        submit(&self.commands, |out| Command::Add {
            req: request,
            out,
            cancel,
        })
    }

    fn kv(&self) -> Option<KvHandle> {
        Some(self.kv.clone())
    }

    fn health(&self) -> Option<watch::Receiver<EngineState>> {
        Some(self.health.clone())
    }

    fn kv_capability(&self) -> Option<Arc<dyn KvCapability>> {
        Some(self.capability.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request for `token_ids`, generating `max_tokens` with no stop tokens.
    fn request(token_ids: Vec<TokenId>, max_tokens: u32) -> PreprocessedRequest {
        PreprocessedRequest {
            token_ids,
            sampling: SamplingOptions::default(),
            stop: StopConditions {
                max_tokens,
                min_tokens: 0,
                stop_token_ids: vec![],
            },
            remote_prefill: None,
            peer_prefix: None,
            resumed_tokens: 0,
        }
    }
    use dynamo_protocols::llm::{SamplingOptions, StopConditions};
    use futures::StreamExt;

    /// A resumed request (moved from a failed worker, its client mid-answer) is admitted
    /// before requests that waited longer but have not started.
    #[test]
    fn a_resumed_request_goes_ahead_of_waiting_ones() {
        let settings = MockerSettings {
            num_gpu_blocks: 64,
            block_size: 4,
            max_num_seqs: 1,
            ..Default::default()
        };
        let mut s = simulated_scheduler(&settings).unwrap();
        let mut rxs = Vec::new();
        for (i, resumed) in [0u32, 0, 0, 3].into_iter().enumerate() {
            let mut r = request((10 * i as u32..10 * i as u32 + 6).collect(), 2);
            r.resumed_tokens = resumed;
            let (tx, rx) = mpsc::unbounded_channel();
            s.add_tagged(r, tx, CancellationToken::new(), i as u64)
                .unwrap();
            rxs.push(rx);
            if i == 0 {
                // The first one runs (the one sequence the batch holds); the others wait.
                assert!(s.step().is_some());
            }
        }
        let mut order = vec![0];
        while s.step().is_some() {
            s.deliver();
            for (i, rx) in rxs.iter_mut().enumerate() {
                if rx.try_recv().is_ok() && !order.contains(&i) {
                    order.push(i);
                }
            }
        }
        assert_eq!(
            order,
            [0, 3, 1, 2],
            "the resumed request (3) right after the running one"
        );
    }

    /// A decode stretch planned and applied at once gives what the same steps one by one
    /// give: the tokens, the KV events (stores, and evictions of cached blocks), the load
    /// and counters, the time; and a plan never runs into a preemption or a finish.
    #[test]
    fn a_bulk_decode_stretch_equals_its_steps() {
        let settings = MockerSettings {
            num_gpu_blocks: 40,
            block_size: 4,
            ..Default::default()
        };
        let mut bulk = simulated_scheduler(&settings).unwrap();
        let mut each = simulated_scheduler(&settings).unwrap();
        type Rx = mpsc::UnboundedReceiver<Result<dynamo_protocols::llm::EngineOutput, EngineError>>;
        let mut streams: Vec<(Rx, Rx)> = Vec::new();
        let add = |bulk: &mut Scheduler<Simulated>,
                   each: &mut Scheduler<Simulated>,
                   streams: &mut Vec<(Rx, Rx)>,
                   i: u32| {
            // Requests share a prefix, so released blocks stay cached and later ones evict them.
            let prompt: Vec<TokenId> = (0..6).chain(100 * i..100 * i + 3 + i).collect();
            let max = 9 + 7 * i;
            let (ta, ra) = mpsc::unbounded_channel();
            let (tb, rb) = mpsc::unbounded_channel();
            let t = CancellationToken::new();
            bulk.add_tagged(request(prompt.clone(), max), ta, t.clone(), i as u64)
                .unwrap();
            each.add_tagged(request(prompt, max), tb, t, i as u64)
                .unwrap();
            streams.push((ra, rb));
        };
        let tokens = |rx: &mut Rx| {
            let mut out = Vec::new();
            while let Ok(o) = rx.try_recv() {
                out.extend(o.unwrap().token_ids);
            }
            out
        };
        let (mut stretches, mut bulk_steps, mut evicted_in_stretches) = (0, 0, 0);
        for round in 0..200u32 {
            if round % 9 == 0 && round < 90 {
                add(&mut bulk, &mut each, &mut streams, round / 9);
            }
            let evict = round % 2 == 0;
            let planned = bulk.decode_plan(usize::MAX, evict).len();
            let (a, b) = if planned >= 2 {
                // Apply part of a long plan: the rest stays valid but is planned again.
                let n = if planned > 5 { planned - 2 } else { planned };
                stretches += 1;
                bulk_steps += n;
                let a = bulk.decode_apply(n);
                let b: Duration = (0..n).map(|_| each.step().unwrap()).sum();
                (Some(a), Some(b))
            } else {
                (bulk.step(), each.step())
            };
            assert_eq!(a, b, "round {round}");
            bulk.deliver();
            each.deliver();
            let events = bulk.take_events();
            if a.is_some() && planned >= 2 {
                evicted_in_stretches += events
                    .iter()
                    .filter(|e| matches!(e.data, dynamo_protocols::kv::KvEventData::Removed { .. }))
                    .count();
            }
            assert_eq!(events, each.take_events(), "round {round}");
            assert_eq!(bulk.load(), each.load(), "round {round}");
            for (i, (ra, rb)) in streams.iter_mut().enumerate() {
                assert_eq!(tokens(ra), tokens(rb), "request {i}, round {round}");
            }
            if a.is_none() && round > 90 {
                break;
            }
        }
        assert!(!bulk.has_work() && !each.has_work());
        assert!(
            stretches >= 5 && bulk_steps >= 40,
            "{stretches} stretches, {bulk_steps} steps"
        );
        assert!(evicted_in_stretches > 0, "stretches evicted cached blocks");
        assert!(
            each.load().steps.unwrap().decode_tokens > bulk_steps as u64,
            "some steps were single"
        );
    }

    #[test]
    fn perf_model_is_the_published_polynomial() {
        assert!((prefill_ms(0.0) - 16.50142).abs() < 1e-9);
        assert!((prefill_ms(1000.0) - (0.4209989 + 15.18344 + 16.50142)).abs() < 1e-6);
        assert!((decode_ms(0.0) - 5.74).abs() < 1e-9);
        assert!((decode_ms(0.5) - (-6.435 + 27.005 + 5.74)).abs() < 1e-9);
        assert_eq!(decode_ms(2.5), 1.0, "floor of 1 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_time_follows_the_model_and_tokens_come_from_the_vocabulary() {
        let engine = MockerEngine::start(MockerSettings {
            num_gpu_blocks: 64,
            block_size: 16,
            speedup_ratio: 2.0,
            vocab: 10..20,
            ..Default::default()
        })
        .unwrap();
        let started = tokio::time::Instant::now();
        let req = request((0..100).collect(), 3);
        let outs: Vec<_> = engine
            .generate(req, CancellationToken::new())
            .unwrap()
            .map(|o| o.unwrap())
            .collect()
            .await;
        let tokens: Vec<TokenId> = outs.iter().flat_map(|o| o.token_ids.clone()).collect();
        assert_eq!(tokens.len(), 3);
        assert!(tokens.iter().all(|t| (10..20).contains(t)));
        // One prefill step of 100 tokens, then two decode steps; each token appears when its
        // step's time has passed.
        let usage = 7.0 / 64.0;
        let expected = (prefill_ms(100.0) + 2.0 * decode_ms(usage)) / 2.0;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        assert!(
            (elapsed - expected).abs() < 3.0,
            "elapsed {elapsed} ms, expected ~{expected} ms"
        );
        let load = *engine.kv().unwrap().load().borrow();
        assert_eq!(load.total_blocks, 64);
    }

    /// At low load a stream's inter-token gaps are the timing model's decode time exactly
    /// (within 2%, the KV usage growing by a block every 16 tokens): steps keep an absolute
    /// schedule, so the timer's millisecond granularity never accumulates; and
    /// `speedup_ratio` divides them exactly.
    #[tokio::test(start_paused = true)]
    async fn inter_token_gaps_are_the_model_s_decode_time_and_speedup_divides_them() {
        let (blocks, bs, prompt, tokens) = (1024usize, 16usize, 100usize, 200u32);
        let mut means = Vec::new();
        for speedup in [1.0, 2.0, 7.5] {
            let engine = MockerEngine::start(MockerSettings {
                num_gpu_blocks: blocks,
                block_size: bs,
                speedup_ratio: speedup,
                ..Default::default()
            })
            .unwrap();
            let mut stream = engine
                .generate(
                    request((0..prompt as TokenId).collect(), tokens),
                    CancellationToken::new(),
                )
                .unwrap();
            let mut at = Vec::new();
            while let Some(o) = stream.next().await {
                let o = o.unwrap();
                for _ in &o.token_ids {
                    at.push(tokio::time::Instant::now());
                }
            }
            assert_eq!(at.len(), tokens as usize);
            let gaps: Vec<f64> = at
                .windows(2)
                .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
                .collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            // Step k decodes with the prompt and k tokens in blocks.
            let model = (1..tokens as usize)
                .map(|k| decode_ms((prompt + k).div_ceil(bs) as f64 / blocks as f64))
                .sum::<f64>()
                / (tokens - 1) as f64
                / speedup;
            assert!(
                (mean / model - 1.0).abs() < 0.02,
                "speedup {speedup}: mean gap {mean:.4} ms, the model {model:.4} ms"
            );
            means.push(mean * speedup);
        }
        for m in &means[1..] {
            assert!(
                (m / means[0] - 1.0).abs() < 0.02,
                "speedup scales the gaps: {means:?}"
            );
        }
    }

    /// Simulated bytes: a mocker's blocks move to another mocker through the KV capability
    /// (no contents, real hashes), and a request there finds its prefix cached.
    #[tokio::test(start_paused = true)]
    async fn blocks_move_between_mockers_through_the_kv_capability() {
        let settings = MockerSettings {
            num_gpu_blocks: 64,
            block_size: 16,
            ..Default::default()
        };
        let (a, b) = (
            MockerEngine::start(settings.clone()).unwrap(),
            MockerEngine::start(settings).unwrap(),
        );
        let req = || request((0..70).collect(), 2);
        let run = |e: &MockerEngine| {
            let s = e.generate(req(), CancellationToken::new()).unwrap();
            async move {
                let outs: Vec<_> = s.map(|o| o.unwrap()).collect().await;
                outs[0].cached_tokens.unwrap_or(0)
            }
        };
        assert_eq!(run(&a).await, 0);
        let (ka, kb) = (a.kv_capability().unwrap(), b.kv_capability().unwrap());
        assert_eq!(kb.block_bytes(), 0);
        let hashes = crate::scheduler::prompt_hashes(&(0..70).collect::<Vec<_>>(), 16);
        let blocks = ka.export(hashes).await.unwrap();
        assert_eq!(blocks.len(), 4);
        let r = kb.reserve(blocks.len()).await.unwrap();
        assert_eq!(kb.import(r, blocks).await.unwrap(), 4);
        assert_eq!(run(&b).await, 64, "the imported prefix is cached on b");
    }

    /// The hand-off of a disaggregated request between two mockers: the prefill side returns
    /// the first token and every prompt block (the partial last one too); the decode side
    /// pins its cached prefix, takes the rest, and continues from the first token, with its
    /// blocks cached afterwards. A hand-off with the wrong number of blocks fails on its
    /// stream and gives its blocks back.
    #[tokio::test(start_paused = true)]
    async fn a_prompt_prefilled_on_one_mocker_decodes_on_another() {
        let settings = MockerSettings {
            num_gpu_blocks: 64,
            block_size: 16,
            ..Default::default()
        };
        let (p, d) = (
            MockerEngine::start(settings.clone()).unwrap(),
            MockerEngine::start(settings).unwrap(),
        );
        let prompt: Vec<TokenId> = (0..70).collect();
        let req = request(prompt.clone(), 5);
        let (kp, kd) = (p.kv_capability().unwrap(), d.kv_capability().unwrap());
        let (first, data) = kp
            .prefill_export(req.clone(), CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(first.token_ids.len(), 1);
        assert_eq!(data.len(), 5, "4 full blocks and the partial fifth");
        let hashes = crate::scheduler::prompt_hashes(&prompt, 16);
        let load = d.kv().unwrap().load();
        // Wrong: 3 blocks of data for 5 uncached blocks.
        let (r, cached) = kd.reserve_prompt(hashes.clone(), 5).await.unwrap();
        assert_eq!(cached, 0);
        let bad = kd
            .generate_prefilled(
                r,
                0,
                req.clone(),
                first.token_ids[0],
                vec![Vec::new(); 3],
                CancellationToken::new(),
            )
            .unwrap();
        let outs: Vec<_> = bad.collect().await;
        assert!(
            matches!(outs[..], [Err(EngineError::BadRequest(_))]),
            "{outs:?}"
        );
        // Right: the request decodes the 4 tokens after the first.
        let (r, _) = kd.reserve_prompt(hashes.clone(), 5).await.unwrap();
        let outs: Vec<_> = kd
            .generate_prefilled(
                r,
                0,
                req.clone(),
                first.token_ids[0],
                data,
                CancellationToken::new(),
            )
            .unwrap()
            .map(|o| o.unwrap())
            .collect()
            .await;
        assert_eq!(outs.iter().map(|o| o.token_ids.len()).sum::<usize>(), 4);
        assert_eq!(
            outs.last().unwrap().finish_reason,
            Some(dynamo_protocols::llm::FinishReason::Length)
        );
        // The prompt's full blocks are cached here now, and nothing is held.
        let (r, cached) = kd.reserve_prompt(hashes, 5).await.unwrap();
        assert_eq!(cached, 4);
        drop(r);
        let mut load = load;
        load.wait_for(|l| l.active_blocks == 0).await.unwrap();
    }

    /// A host tier on the mocker: evictions become host `stored` events and an onboard a
    /// device `stored` event, all in one consecutive event-id sequence; the onboarded prefix
    /// counts as cached.
    #[tokio::test(start_paused = true)]
    async fn host_tier_changes_are_events_in_the_one_sequence() {
        use dynamo_protocols::kv::{KvEventData, StorageTier};
        let e = MockerEngine::start(MockerSettings {
            num_gpu_blocks: 6,
            block_size: 16,
            kv_bytes_per_token: 1024,
            host_kv_cache: 64 * 16 * 1024,
            ..Default::default()
        })
        .unwrap();
        let mut events = e.kv().unwrap().subscribe();
        let req = |seed: u32| request((0..64).map(|i| i + seed * 1000).collect(), 2);
        let run = |r: PreprocessedRequest| {
            let s = e.generate(r, CancellationToken::new()).unwrap();
            async move {
                let outs: Vec<_> = s.map(|o| o.unwrap()).collect().await;
                outs[0].cached_tokens.unwrap_or(0)
            }
        };
        assert_eq!(run(req(1)).await, 0);
        assert_eq!(run(req(2)).await, 0); // evicts req(1)'s blocks to the host tier
        assert_eq!(
            run(req(1)).await,
            48,
            "three full blocks back from the host tier"
        );
        let mut all = Vec::new();
        while let Ok(batch) = events.try_recv() {
            all.extend(batch);
        }
        for (i, ev) in all.iter().enumerate() {
            assert_eq!(
                ev.event_id,
                all[0].event_id + i as u64,
                "one sequence: {all:?}"
            );
        }
        let host_stored = all
            .iter()
            .filter(|ev| {
                ev.tier == StorageTier::Host && matches!(ev.data, KvEventData::Stored { .. })
            })
            .count();
        assert!(host_stored >= 3, "{all:?}");
    }

    /// A disk tier on the mocker: a prefix three requests used goes device -> host -> disk
    /// (real files, header only), with disk events in the one sequence; a new engine on the
    /// same directory announces it and onboards it; with a disk too slow to beat the perf
    /// model's prefill, the cost model computes the prefix instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disk_tier_survives_a_restart_and_the_cost_model_can_decline_it() {
        use dynamo_protocols::kv::{KvEventData, StorageTier};
        let dir = tempfile::tempdir().unwrap();
        let settings = MockerSettings {
            num_gpu_blocks: 6,
            block_size: 16,
            kv_bytes_per_token: 1024,
            host_kv_cache: 3 * 16 * 1024,
            disk_kv_cache: 1 << 20,
            disk_kv_dir: Some(dir.path().to_path_buf()),
            speedup_ratio: 100.0,
            ..Default::default()
        };
        let req = |seed: u32| request((0..64).map(|i| i + seed * 1000).collect(), 2);
        async fn run(e: &MockerEngine, r: PreprocessedRequest) -> u32 {
            let s = e.generate(r, CancellationToken::new()).unwrap();
            let outs: Vec<_> = s.map(|o| o.unwrap()).collect().await;
            outs[0].cached_tokens.unwrap_or(0)
        }
        async fn stopped(e: MockerEngine) {
            let mut health = e.health().unwrap();
            drop(e);
            while health.changed().await.is_ok() {}
        }
        let e = MockerEngine::start(settings.clone()).unwrap();
        let mut events = e.kv().unwrap().subscribe();
        for _ in 0..3 {
            run(&e, req(1)).await;
        }
        for seed in 2..6 {
            run(&e, req(seed)).await;
        }
        let mut load = e.kv().unwrap().load();
        load.wait_for(|l| l.tiers.is_some_and(|t| t.disk_offloaded_blocks >= 3))
            .await
            .unwrap();
        let mut all = Vec::new();
        while let Ok(batch) = events.try_recv() {
            all.extend(batch);
        }
        for (i, ev) in all.iter().enumerate() {
            assert_eq!(ev.event_id, all[0].event_id + i as u64, "one sequence");
        }
        let disk_stored = all
            .iter()
            .filter(|ev| {
                ev.tier == StorageTier::Disk && matches!(ev.data, KvEventData::Stored { .. })
            })
            .count();
        assert!(disk_stored >= 3, "{all:?}");
        stopped(e).await;

        let e = MockerEngine::start(settings.clone()).unwrap();
        let dump = e.kv().unwrap().dump().await.unwrap();
        assert!(
            dump.lower
                .iter()
                .filter(|(t, _, _)| *t == StorageTier::Disk)
                .count()
                >= 3,
            "{dump:?}"
        );
        assert_eq!(
            run(&e, req(1)).await,
            48,
            "three full blocks back from disk"
        );
        let t = e.kv().unwrap().load().borrow().tiers.unwrap();
        assert_eq!((t.disk_onboarded_blocks, t.disk_hit_tokens), (3, 48));
        assert!(t.disk_recovered >= 3);
        stopped(e).await;

        // One byte per second: reading the blocks back would take longer than computing them.
        let e = MockerEngine::start(MockerSettings {
            disk_bandwidth: 1.0,
            ..settings
        })
        .unwrap();
        assert_eq!(run(&e, req(1)).await, 0);
        let t = e.kv().unwrap().load().borrow().tiers.unwrap();
        assert_eq!((t.disk_onboarded_blocks, t.onboard_declined), (0, 1));
    }
}
