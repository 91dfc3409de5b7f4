//! The engine scheduler: continuous batching over a [`BlockPool`], one step at a time.
//!
//! Each step builds a batch under a token budget (`max_num_batched_tokens`) and a sequence cap
//! (`max_num_seqs`): first the running sequences (one decode token each, or the next chunk of
//! a prompt still being prefilled), then waiting ones, admitted while blocks and budget last.
//! An admitted sequence reuses its longest cached prefix (those tokens are not computed again,
//! and are reported as `cached_tokens`). When a running sequence needs a block and none is
//! free, the most recently admitted sequence is preempted: its blocks are released and it
//! goes back to the front of the queue to be recomputed later (its prefix may still be
//! cached). The batch goes to an [`Executor`], which computes it (or simulates doing so) and
//! samples one token for each sequence whose known tokens are all computed.
//!
//! Blocks are cached as soon as they are full and computed, so the pool's KV events describe
//! what the engine really holds. A request is checked at [`Scheduler::add`]: one that could
//! never fit in the pool is refused instead of waiting forever. A cancelled request (token
//! fired or receiver dropped) is dropped at the start of the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use dynamo_kv::{
    block_hashes, hash_block, sequence_hash, BlockId, BlockPool, PoolError, TierBlock,
};
use dynamo_protocols::kv::{KvDump, KvEvent, LoadReport, LocalBlockHash, SequenceHash};
use dynamo_protocols::llm::{
    EngineOutput, FinishReason, PreprocessedRequest, SamplingOptions, StopConditions, TokenId,
    TokenLogprob,
};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{EngineError, EngineStream, EvictionHook, KvBlockData, KvCapability, Reservation};

mod handoff;
mod offloader;
mod tiers;

pub use handoff::Prefilled;
pub use offloader::Waker;
pub use tiers::{check_disk, copy_time, fingerprint, DISK_MIN_USES};

use dynamo_kv::tier as kv_tiers;
use dynamo_protocols::kv::{StorageTier, TierReport};
use futures::future::BoxFuture;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerSettings {
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Host tier below the pool (bytes; 0: none), see [`tiers`].
    pub host_tier_bytes: usize,
    /// Evicted blocks copied to the host tier per step at most (the offload queue's bound:
    /// the rest are dropped, counted).
    pub offload_per_step: usize,
    /// Disk tier below the host tier (none: no disk), see [`tiers`].
    pub disk: Option<dynamo_kv::DiskSettings>,
    /// Blocks waiting for the offloader thread at most (more are dropped, counted).
    pub disk_queue: usize,
    /// Requests that must have used a block for it to go to disk (the frequency filter).
    pub disk_min_uses: u32,
}

impl SchedulerSettings {
    /// `num_blocks` of `block_size`, no lower tier.
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
    ) -> Self {
        Self {
            num_blocks,
            block_size,
            max_num_seqs,
            max_num_batched_tokens,
            host_tier_bytes: 0,
            offload_per_step: 256,
            disk: None,
            disk_queue: 1024,
            disk_min_uses: DISK_MIN_USES,
        }
    }
}

/// One sequence's share of a step.
#[derive(Debug)]
pub struct Scheduled<'a> {
    /// Every known token of the sequence (prompt, then generated).
    pub tokens: &'a [TokenId],
    pub prompt_len: usize,
    /// Where the request's output starts in `tokens` (penalties count what follows): the
    /// prompt's length, less the tokens a migrated request generated before it moved here.
    pub output_start: usize,
    /// Tokens computed before this step (their KV is in `blocks`).
    pub start: usize,
    /// Tokens computed in this step: `tokens[start..start + len]`.
    pub len: usize,
    pub blocks: &'a [BlockId],
    pub sampling: &'a SamplingOptions,
    /// This step reaches the end of the known tokens: sample the next one.
    pub samples: bool,
    /// The sequence's guided-decoding state, for executors that sample under a grammar
    /// (`sampling.guided`): they create it on the first draw and keep it here.
    pub guide: &'a Guide,
}

/// A sequence's guided-decoding state ([`Scheduled::guide`]); dropped with the sequence.
/// Boxed: a grammar's state is large and most sequences have none (a sequence is moved
/// between queues).
pub type Guide = std::sync::Mutex<Option<Box<dynamo_guided::Constraint>>>;

impl Scheduled<'_> {
    /// Prompt tokens (or a recomputation's) are prefill; one generated token is decode.
    pub fn is_prefill(&self) -> bool {
        self.start + self.len <= self.prompt_len || self.len > 1
    }
}

/// What one step computes.
#[derive(Debug)]
pub struct StepBatch<'a> {
    pub items: Vec<Scheduled<'a>>,
    /// Fraction of the pool's blocks in use.
    pub kv_usage: f64,
    pub block_size: usize,
}

/// The result of a step: a token for each item that samples (in item order), and how long
/// the step took or, for a simulation, should take.
#[derive(Debug, Default)]
pub struct StepResult {
    /// Per sampling item: its token, or why it failed (that request ends with the error).
    pub sampled: Vec<Result<TokenId, EngineError>>,
    /// Per sampling item, with `sampled`: its token's logprobs when the request asked for
    /// them (may be empty when none did).
    pub logprobs: Vec<Option<TokenLogprob>>,
    /// Per sampling item, with `sampled`: the token ends the sequence whatever its stop
    /// conditions (a grammar that is complete; may be empty when none does).
    pub ends: Vec<bool>,
    pub duration: Duration,
}

/// Computes steps: the model (or its simulation).
pub trait Executor: Send + 'static {
    fn execute(&mut self, batch: &StepBatch<'_>) -> StepResult;

    /// Bytes of one block's KV contents (0: the executor keeps none, e.g. a simulation).
    fn block_bytes(&self) -> usize {
        0
    }

    /// A block's contents ([`Executor::block_bytes`] bytes).
    fn read_block(&self, _block: BlockId) -> Vec<u8> {
        Vec::new()
    }

    /// Overwrites a block's contents (`data` is [`Executor::block_bytes`] bytes, checked).
    fn write_block(&mut self, _block: BlockId, _data: &[u8]) {}

    /// Bytes a block without contents counts in a lower tier (a simulation's model size).
    fn nominal_block_bytes(&self) -> usize {
        self.block_bytes()
    }

    /// The onboarding cost model: whether bringing `host` blocks up from the host tier and
    /// then `disk` blocks from disk (`tokens` tokens in all) beats computing them. `None`:
    /// compute them. A simulation that says yes returns the copy's simulated time and charges
    /// it to its next step. A real engine's copy (a memcpy, a file read of a few hundred KiB
    /// a block) is far cheaper than a forward pass over the same tokens: yes, measured.
    fn onboard(&mut self, _host: usize, _disk: usize, _tokens: usize) -> Option<Duration> {
        Some(Duration::ZERO)
    }

    /// A simulation whose decode steps can be predicted and applied in bulk (see
    /// [`Scheduler::decode_plan`]); `None` (the default) for an engine that computes, or
    /// while something besides the timing model shapes the next steps (faults, a charged
    /// copy).
    fn bulk_decode(&mut self) -> Option<&mut dyn BulkDecode> {
        None
    }
}

/// Decode-only steps of a simulated executor, without building batches: what
/// [`Executor::execute`] would give for them, in the same order.
pub trait BulkDecode {
    /// The duration of a decode-only step of `batch` sequences at `kv_usage`.
    fn decode_time(&self, batch: usize, kv_usage: f64) -> Duration;
    /// Counts one step (as `execute` does, e.g. for faults at a given step).
    fn count_step(&mut self);
    /// The next sampled token.
    fn sample(&mut self) -> TokenId;
}

/// The KV capability's requests, handled on the scheduler ([`Scheduler::kv`]).
pub enum KvCommand {
    Export {
        hashes: Vec<SequenceHash>,
        reply: oneshot::Sender<Vec<KvBlockData>>,
    },
    Reserve {
        blocks: usize,
        reply: oneshot::Sender<Result<u64, EngineError>>,
    },
    Import {
        reservation: u64,
        blocks: Vec<KvBlockData>,
        reply: oneshot::Sender<Result<usize, EngineError>>,
    },
    Release(u64),
    Hook(Option<EvictionHook>, oneshot::Sender<()>),
    /// See [`KvCapability::prefill_export`].
    PrefillExport {
        request: Box<PreprocessedRequest>,
        out: OutputSender,
        cancel: CancellationToken,
        blocks: oneshot::Sender<Vec<Vec<u8>>>,
    },
    /// See [`KvCapability::reserve_prompt`].
    ReservePrompt {
        hashes: Vec<SequenceHash>,
        total: usize,
        reply: oneshot::Sender<Result<(u64, usize), EngineError>>,
    },
    /// See [`KvCapability::generate_prefilled`].
    GeneratePrefilled(Box<handoff::Prefilled>),
    /// See [`KvCapability::share`].
    Share {
        hashes: Vec<SequenceHash>,
        from: usize,
        reply: oneshot::Sender<Vec<KvBlockData>>,
    },
    /// See [`KvCapability::import_continuation`].
    ImportAfter {
        reservation: u64,
        cached: usize,
        blocks: Vec<KvBlockData>,
        reply: oneshot::Sender<Result<usize, EngineError>>,
    },
}

/// Sends a [`KvCommand`] to an engine's scheduler.
type KvSend = Arc<dyn Fn(KvCommand) -> Result<(), EngineError> + Send + Sync>;

/// [`KvCapability`] of a scheduler-driven engine: each call is a [`KvCommand`] on the
/// engine's bounded command channel (`wrap` makes it the engine's command). A full channel is
/// `Overloaded`, except for a reservation's release, which waits for room in a task.
pub(crate) struct SchedulerKv {
    send: KvSend,
    block_size: usize,
    block_bytes: usize,
    layout: Option<crate::native::KvLayout>,
    simulated: Option<Arc<dyn Fn(usize) -> Duration + Send + Sync>>,
    worth_fetching: Option<Arc<dyn Fn(usize) -> bool + Send + Sync>>,
}

impl SchedulerKv {
    pub fn new<C: Send + 'static>(
        commands: mpsc::Sender<C>,
        wrap: fn(KvCommand) -> C,
        block_size: usize,
        block_bytes: usize,
    ) -> Self {
        let send: KvSend = Arc::new(move |cmd| match commands.try_send(wrap(cmd)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let commands = commands.clone();
                    rt.spawn(async move {
                        let _ = commands.send(cmd).await;
                    });
                    Ok(())
                } else {
                    Err(EngineError::Overloaded(format!(
                        "{COMMAND_QUEUE} commands are queued"
                    )))
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(stopped()),
        });
        Self {
            send,
            block_size,
            block_bytes,
            layout: None,
            simulated: None,
            worth_fetching: None,
        }
    }

    pub fn with_layout(mut self, layout: crate::native::KvLayout) -> Self {
        self.layout = Some(layout);
        self
    }

    /// Transfers of this engine's blocks are simulated: `time(blocks)` long.
    pub fn with_simulated_transfer(
        mut self,
        time: impl Fn(usize) -> Duration + Send + Sync + 'static,
    ) -> Self {
        self.simulated = Some(Arc::new(time));
        self
    }

    /// The engine's cost model for fetching blocks from a peer (see
    /// [`KvCapability::worth_fetching`]).
    pub fn with_fetch_cost(
        mut self,
        worth: impl Fn(usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.worth_fetching = Some(Arc::new(worth));
        self
    }
}

fn stopped() -> EngineError {
    EngineError::Stopped("the engine has stopped".into())
}

impl SchedulerKv {
    /// What gives a reservation's blocks back when it is dropped unused.
    fn releaser(&self) -> Box<dyn FnOnce(u64) + Send + Sync> {
        let send = self.send.clone();
        Box::new(move |id| {
            let _ = send(KvCommand::Release(id));
        })
    }

    fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> KvCommand,
    ) -> BoxFuture<'static, Result<T, EngineError>> {
        let (tx, rx) = oneshot::channel();
        let sent = (self.send)(make(tx));
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| stopped())
        })
    }
}

impl KvCapability for SchedulerKv {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    fn layout(&self) -> Option<crate::native::KvLayout> {
        self.layout
    }

    fn simulated_transfer(&self, blocks: usize) -> Option<Duration> {
        self.simulated.as_ref().map(|f| f(blocks))
    }

    fn export(
        &self,
        hashes: Vec<SequenceHash>,
    ) -> BoxFuture<'static, Result<Vec<KvBlockData>, EngineError>> {
        self.ask(|reply| KvCommand::Export { hashes, reply })
    }

    fn share(
        &self,
        hashes: Vec<SequenceHash>,
        from: usize,
    ) -> BoxFuture<'static, Result<Vec<KvBlockData>, EngineError>> {
        self.ask(|reply| KvCommand::Share {
            hashes,
            from,
            reply,
        })
    }

    fn worth_fetching(&self, blocks: usize) -> bool {
        self.worth_fetching.as_ref().is_none_or(|f| f(blocks))
    }

    fn import_continuation(
        &self,
        reservation: Reservation,
        cached: usize,
        blocks: Vec<KvBlockData>,
    ) -> BoxFuture<'static, Result<usize, EngineError>> {
        let reservation = reservation.take();
        let asked = self.ask(|reply| KvCommand::ImportAfter {
            reservation,
            cached,
            blocks,
            reply,
        });
        Box::pin(async move { asked.await? })
    }

    fn reserve(&self, blocks: usize) -> BoxFuture<'static, Result<Reservation, EngineError>> {
        let asked = self.ask(|reply| KvCommand::Reserve { blocks, reply });
        let release = self.releaser();
        Box::pin(async move {
            let id = asked.await??;
            Ok(Reservation::new(id, blocks, release))
        })
    }

    fn import(
        &self,
        reservation: Reservation,
        blocks: Vec<KvBlockData>,
    ) -> BoxFuture<'static, Result<usize, EngineError>> {
        let reservation = reservation.take();
        let asked = self.ask(|reply| KvCommand::Import {
            reservation,
            blocks,
            reply,
        });
        Box::pin(async move { asked.await? })
    }

    fn set_eviction_hook(
        &self,
        hook: Option<EvictionHook>,
    ) -> BoxFuture<'static, Result<(), EngineError>> {
        self.ask(|reply| KvCommand::Hook(hook, reply))
    }

    fn prefill_export(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<crate::Exported, EngineError>> {
        let (out, mut rx) = mpsc::unbounded_channel();
        let (blocks, data) = oneshot::channel();
        let sent = (self.send)(KvCommand::PrefillExport {
            request: Box::new(request),
            out,
            cancel,
            blocks,
        });
        Box::pin(async move {
            sent?;
            let first = loop {
                match rx.recv().await {
                    Some(Ok(o)) if o.finish_reason.is_some() => break o,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e),
                    None => return Err(stopped()),
                }
            };
            let data = data.await.map_err(|_| stopped())?;
            Ok((first, data))
        })
    }

    fn reserve_prompt(
        &self,
        hashes: Vec<SequenceHash>,
        total: usize,
    ) -> BoxFuture<'static, Result<(Reservation, usize), EngineError>> {
        let asked = self.ask(|reply| KvCommand::ReservePrompt {
            hashes,
            total,
            reply,
        });
        let release = self.releaser();
        Box::pin(async move {
            let (id, cached) = asked.await??;
            Ok((Reservation::new(id, total, release), cached))
        })
    }

    fn generate_prefilled(
        &self,
        reservation: Reservation,
        cached: usize,
        request: PreprocessedRequest,
        first: TokenId,
        data: Vec<Vec<u8>>,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        let (out, rx) = mpsc::unbounded_channel();
        (self.send)(KvCommand::GeneratePrefilled(Box::new(handoff::Prefilled {
            reservation: reservation.take(),
            cached,
            request,
            first,
            data,
            out,
            cancel,
        })))?;
        Ok(UnboundedReceiverStream::new(rx).boxed())
    }
}

/// Where a sequence's outputs go. Unbounded: one output per step, at most `max_tokens` per
/// request, so the request itself bounds it.
pub type OutputSender = mpsc::UnboundedSender<Result<EngineOutput, EngineError>>;

/// Requests queued for an engine's scheduler beyond which `generate` answers `Overloaded`.
pub(crate) const COMMAND_QUEUE: usize = 4096;

/// Hands a request to an engine's scheduler through its bounded command channel (`make`
/// wraps the request's output sender in the engine's command); the outputs stream back. A
/// full channel is `Overloaded`, a closed one `Internal`.
pub(crate) fn submit<C>(
    commands: &mpsc::Sender<C>,
    make: impl FnOnce(OutputSender) -> C,
) -> Result<EngineStream, EngineError> {
    let (out, rx) = mpsc::unbounded_channel();
    commands.try_send(make(out)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => {
            EngineError::Overloaded(format!("{COMMAND_QUEUE} requests are queued"))
        }
        mpsc::error::TrySendError::Closed(_) => {
            EngineError::Internal("the engine has stopped".into())
        }
    })?;
    Ok(UnboundedReceiverStream::new(rx).boxed())
}

/// Forwards a `KvHandle`'s dump requests into the scheduler's command channel (`wrap` makes
/// the command) until `stop` fires or either side closes. Needs a tokio runtime.
pub(crate) fn forward_dumps<C: Send + 'static>(
    mut dumps: mpsc::Receiver<oneshot::Sender<KvDump>>,
    commands: mpsc::Sender<C>,
    wrap: fn(oneshot::Sender<KvDump>) -> C,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let reply = tokio::select! {
                _ = stop.cancelled() => break,
                reply = dumps.recv() => match reply {
                    Some(reply) => reply,
                    None => break,
                },
            };
            if commands.send(wrap(reply)).await.is_err() {
                break;
            }
        }
    });
}

struct Seq {
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// See [`Scheduled::output_start`].
    output_start: usize,
    computed: usize,
    blocks: Vec<BlockId>,
    /// Full blocks whose hashes are known: (local, sequence).
    hashes: Vec<(LocalBlockHash, SequenceHash)>,
    /// Blocks registered with the pool.
    registered: usize,
    stop: StopConditions,
    sampling: SamplingOptions,
    generated: u32,
    /// Prompt tokens found cached at first admission; reported with the first output.
    cached_tokens: Option<u32>,
    cached_reported: bool,
    out: OutputSender,
    cancel: CancellationToken,
    /// A prefill for another worker: at its finish, the prompt's blocks' contents go here
    /// (see [`KvCommand::PrefillExport`]).
    export: Option<oneshot::Sender<Vec<Vec<u8>>>>,
    /// The caller's name for the request ([`Scheduler::add_tagged`]).
    tag: u64,
    /// See [`Scheduled::guide`].
    guide: Guide,
}

impl Seq {
    fn gone(&self) -> bool {
        self.cancel.is_cancelled() || self.out.is_closed()
    }

    /// Whether its client has seen output already: a resumed request, or a preempted one.
    fn mid_stream(&self) -> bool {
        self.output_start < self.tokens.len()
    }

    /// Caches the blocks its computed tokens have filled since the last call (their KV
    /// events follow).
    fn register_computed(&mut self, pool: &mut BlockPool, block_size: usize) {
        self.extend_hashes(block_size);
        let full = (self.computed / block_size).min(self.hashes.len());
        for b in self.registered..full {
            let parent = b.checked_sub(1).map(|p| self.hashes[p].1);
            let (local, hash) = self.hashes[b];
            pool.register(self.blocks[b], parent, local, hash, b as u32);
        }
        self.registered = self.registered.max(full);
    }

    fn extend_hashes(&mut self, block_size: usize) {
        let full = self.tokens.len() / block_size;
        self.hashes.reserve(full.saturating_sub(self.hashes.len()));
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let local = hash_block(&self.tokens[i * block_size..(i + 1) * block_size]);
            let parent = self.hashes.last().map(|h| h.1);
            self.hashes.push((local, sequence_hash(parent, local)));
        }
    }
}

/// Steps between sweeps of the waiting queue for requests whose client is gone.
pub const SWEEP_WAITING_EVERY: u64 = 64;

pub struct Scheduler<E> {
    settings: SchedulerSettings,
    /// What the steps did so far (load reports carry them).
    counters: dynamo_protocols::kv::StepCounters,
    pool: BlockPool,
    /// Blocks held for imports, by reservation id.
    reservations: HashMap<u64, Vec<BlockId>>,
    next_reservation: u64,
    eviction_hook: Option<EvictionHook>,
    /// The host tier below the pool, the disk tier below it, and what went through them.
    host: Option<kv_tiers::HostTier>,
    disk: Option<tiers::Disk>,
    /// Requests per recent block, for the disk's frequency filter.
    freq: kv_tiers::Frequency,
    tiers: TierReport,
    /// Evicted blocks copied to the host tier in the current step.
    offloaded_this_step: usize,
    waiting: VecDeque<Seq>,
    /// Prompt tokens of the waiting requests (none of them computed).
    waiting_tokens: u64,
    /// Prompts computed elsewhere, their KV in their blocks: admitted to `running` first.
    prefilled: VecDeque<Seq>,
    running: Vec<Seq>,
    executor: E,
    preemptions: u64,
    /// Outputs of the last step, sent by [`Scheduler::deliver`].
    outbox: Vec<(OutputSender, Result<EngineOutput, EngineError>, u64)>,
    /// The durations of the last [`Scheduler::decode_plan`].
    planned: Vec<Duration>,
}

impl<E: Executor> Scheduler<E> {
    pub fn new(settings: SchedulerSettings, executor: E) -> Self {
        let host = (settings.host_tier_bytes > 0).then(|| {
            kv_tiers::HostTier::new(settings.host_tier_bytes, executor.nominal_block_bytes())
        });
        let mut pool = BlockPool::new(settings.num_blocks, settings.block_size);
        pool.track_evictions(host.is_some() || settings.disk.is_some());
        let mut s = Self {
            counters: Default::default(),
            pool,
            host,
            disk: None,
            freq: kv_tiers::Frequency::new(1 << 18),
            tiers: TierReport::default(),
            offloaded_this_step: 0,
            reservations: HashMap::new(),
            next_reservation: 1,
            eviction_hook: None,
            settings,
            waiting: VecDeque::new(),
            waiting_tokens: 0,
            prefilled: VecDeque::new(),
            running: Vec::new(),
            executor,
            preemptions: 0,
            outbox: Vec::new(),
            planned: Vec::new(),
        };
        s.open_disk();
        s
    }

    /// Lets the offloader wake the engine loop when it has disk events to publish.
    pub fn set_waker(&self, waker: Waker) {
        if let Some(d) = &self.disk {
            d.offloader.set_waker(waker);
        }
    }

    /// Queues a request, or refuses one that could never fit in the pool.
    pub fn add(
        &mut self,
        req: PreprocessedRequest,
        out: OutputSender,
        cancel: CancellationToken,
    ) -> Result<(), EngineError> {
        self.add_tagged(req, out, cancel, 0)
    }

    /// [`Scheduler::add`], naming the request `tag` for [`Scheduler::deliver_tagged`].
    pub fn add_tagged(
        &mut self,
        req: PreprocessedRequest,
        out: OutputSender,
        cancel: CancellationToken,
        tag: u64,
    ) -> Result<(), EngineError> {
        let bs = self.settings.block_size;
        let need = req.token_ids.len() + req.stop.max_tokens as usize;
        let capacity = self.settings.num_blocks * bs;
        if need > capacity {
            return Err(EngineError::BadRequest(format!(
                "the request needs up to {need} tokens of KV cache (prompt {} + max_tokens {}) but this worker holds {capacity} ({} blocks of {bs}); shorten the prompt or max_tokens",
                req.token_ids.len(),
                req.stop.max_tokens,
                self.settings.num_blocks
            )));
        }
        if req.token_ids.is_empty() {
            return Err(EngineError::BadRequest("the prompt has no tokens".into()));
        }
        self.waiting_tokens += req.token_ids.len() as u64;
        let seq = Seq {
            prompt_len: req.token_ids.len(),
            output_start: req
                .token_ids
                .len()
                .saturating_sub(req.resumed_tokens as usize),
            tokens: req.token_ids,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            registered: 0,
            stop: req.stop,
            sampling: req.sampling,
            generated: 0,
            cached_tokens: None,
            cached_reported: false,
            out,
            cancel,
            export: None,
            tag,
            guide: Guide::default(),
        };
        // A resumed stream (moved here from a failed worker) has a client waiting mid-answer:
        // it goes ahead of the requests that have not started, after those that have.
        let at = match seq.mid_stream() {
            true => self
                .waiting
                .iter()
                .position(|s| !s.mid_stream())
                .unwrap_or(self.waiting.len()),
            false => self.waiting.len(),
        };
        self.waiting.insert(at, seq);
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.prefilled.is_empty()
    }

    pub fn load(&self) -> LoadReport {
        let pending = |s: &Seq| s.prompt_len.saturating_sub(s.computed) as u64;
        LoadReport {
            worker: None,
            active_blocks: self.pool.active_blocks() as u64,
            total_blocks: self.pool.num_blocks() as u64,
            waiting_requests: (self.waiting.len() + self.prefilled.len()) as u64,
            queued_prefill_tokens: self.waiting_tokens
                + self.running.iter().map(pending).sum::<u64>(),
            running_requests: self.running.len() as u64,
            tiers: self.tier_report(),
            steps: Some(self.counters),
        }
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    pub fn dump(&self) -> KvDump {
        let mut dump = self.pool.dump();
        let host = self
            .host
            .as_ref()
            .map(|h| h.identities())
            .unwrap_or_default();
        let lower = host.into_iter().map(|b| (StorageTier::Host, b)).chain(
            self.disk_identities()
                .into_iter()
                .map(|b| (StorageTier::Disk, b)),
        );
        dump.lower = lower
            .map(|(tier, (parent, hash, local))| {
                (
                    tier,
                    parent,
                    dynamo_protocols::kv::StoredBlock {
                        block_hash: hash,
                        tokens_hash: local,
                    },
                )
            })
            .collect();
        dump
    }

    /// Drops requests whose client is gone. The waiting queue, which may be deep under
    /// overload, is swept only every [`SWEEP_WAITING_EVERY`] steps (a gone request reaching
    /// its front is dropped there anyway), so a step stays cheap however long the queue.
    fn drop_gone(&mut self) {
        let pool = &mut self.pool;
        self.running.retain(|s| {
            if s.gone() {
                pool.release(&s.blocks);
            }
            !s.gone()
        });
        if self.waiting.len() <= SWEEP_WAITING_EVERY as usize
            || self.counters.steps.is_multiple_of(SWEEP_WAITING_EVERY)
        {
            let mut dropped = 0u64;
            self.waiting.retain(|s| {
                if s.gone() {
                    pool.release(&s.blocks);
                    dropped += s.prompt_len as u64;
                }
                !s.gone()
            });
            self.waiting_tokens -= dropped;
        }
        self.prefilled.retain(|s| {
            if s.gone() {
                pool.release(&s.blocks);
            }
            !s.gone()
        });
    }

    /// Gives `seq` blocks for its first `upto` tokens.
    fn grow(pool: &mut BlockPool, seq: &mut Seq, upto: usize, bs: usize) -> Result<(), PoolError> {
        let needed = upto.div_ceil(bs);
        if seq.blocks.len() < needed {
            let new = pool.allocate(needed - seq.blocks.len())?;
            seq.blocks.extend(new);
        }
        Ok(())
    }

    fn preempt(&mut self, seq: Seq) {
        let mut seq = seq;
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.registered = 0;
        seq.computed = 0;
        self.preemptions += 1;
        self.waiting_tokens += seq.prompt_len as u64;
        self.waiting.push_front(seq);
    }

    /// Sends the last step's outputs. A real engine calls it right after [`Scheduler::step`];
    /// a simulation once the step's simulated time has passed. A receiver that is gone is
    /// dropped at the next step.
    pub fn deliver(&mut self) {
        self.deliver_tagged(|_| {});
    }

    /// [`Scheduler::deliver`], telling `sent` the tag of each request that got an output (a
    /// simulator then reads only those requests' streams).
    pub fn deliver_tagged(&mut self, mut sent: impl FnMut(u64)) {
        for (out, item, tag) in self.outbox.drain(..) {
            let _ = out.send(item);
            sent(tag);
        }
    }

    /// Hands the blocks evicted since the last call, with contents, to the eviction hook and
    /// the host tier (at most `offload_per_step` a step; the rest are dropped, counted).
    fn offer_evicted(&mut self) {
        let lower = self.host.is_some() || self.disk.is_some();
        if self.eviction_hook.is_none() && !lower {
            return;
        }
        for e in self.pool.take_evicted() {
            let to_tier = lower && self.offloaded_this_step < self.settings.offload_per_step;
            if to_tier {
                self.offloaded_this_step += 1;
            } else if lower {
                self.tiers.offload_dropped += 1;
            }
            if !to_tier && self.eviction_hook.is_none() {
                continue;
            }
            let mut block = TierBlock {
                hash: e.hash,
                parent: e.parent,
                local: e.local,
                position: e.position,
                data: self.executor.read_block(e.block),
                uses: self.freq.get(&e.hash),
            };
            if let Some(hook) = &self.eviction_hook {
                // The contents are copied only when the tiers keep them too.
                let data = if to_tier {
                    block.data.clone()
                } else {
                    std::mem::take(&mut block.data)
                };
                hook(KvBlockData {
                    hash: e.hash,
                    parent: e.parent,
                    local: e.local,
                    position: e.position,
                    data,
                });
            }
            if to_tier {
                if self.host.is_some() {
                    self.offload(block);
                } else {
                    // No host tier: the block goes straight on to the disk's filter.
                    self.spill_to_disk(block);
                }
            }
        }
    }

    /// Holds `blocks` under a new reservation id.
    fn hold(&mut self, blocks: Vec<BlockId>) -> u64 {
        let id = self.next_reservation;
        self.next_reservation += 1;
        self.reservations.insert(id, blocks);
        id
    }

    /// Handles a KV capability request (see [`KvCapability`]).
    pub fn kv(&mut self, cmd: KvCommand) {
        match cmd {
            KvCommand::Export { hashes, reply } => {
                let mut out = Vec::new();
                let blocks = self.pool.acquire_prefix(&hashes);
                for (i, &b) in blocks.iter().enumerate() {
                    out.push(KvBlockData {
                        hash: hashes[i],
                        parent: i.checked_sub(1).map(|p| hashes[p]),
                        local: self
                            .pool
                            .cached_local(b)
                            .expect("acquired blocks are cached"),
                        position: i as u32,
                        data: self.executor.read_block(b),
                    });
                }
                self.pool.release(&blocks);
                let _ = reply.send(out);
            }
            KvCommand::Reserve { blocks, reply } => {
                let result = self
                    .pool
                    .allocate(blocks)
                    .map(|got| self.hold(got))
                    .map_err(|e| {
                        EngineError::Overloaded(format!("cannot reserve {blocks} blocks: {e}"))
                    });
                self.offer_evicted();
                let _ = reply.send(result);
            }
            KvCommand::Import {
                reservation,
                blocks,
                reply,
            } => {
                let result = self.import_reserved(reservation, 0, blocks);
                let _ = reply.send(result);
            }
            KvCommand::ImportAfter {
                reservation,
                cached,
                blocks,
                reply,
            } => {
                let result = self.import_reserved(reservation, cached, blocks);
                let _ = reply.send(result);
            }
            KvCommand::Share {
                hashes,
                from,
                reply,
            } => {
                let _ = reply.send(self.share(&hashes, from));
            }
            KvCommand::Release(id) => self.release_reservation(id),
            KvCommand::PrefillExport {
                request,
                out,
                cancel,
                blocks,
            } => self.add_export(*request, out, cancel, blocks),
            KvCommand::ReservePrompt {
                hashes,
                total,
                reply,
            } => {
                let _ = reply.send(self.reserve_prompt(&hashes, total));
            }
            KvCommand::GeneratePrefilled(p) => self.add_prefilled(*p),
            KvCommand::Hook(hook, reply) => {
                self.pool
                    .track_evictions(hook.is_some() || self.host.is_some());
                self.eviction_hook = hook;
                let _ = reply.send(());
            }
        }
    }

    /// Writes a chain into a reservation's blocks after its first `skip` (cached blocks it
    /// pins: see [`Scheduler::reserve_prompt`]) and caches it; checked whole first (an
    /// invalid import writes and caches nothing). The reservation is used up either way.
    fn import_reserved(
        &mut self,
        reservation: u64,
        skip: usize,
        chain: Vec<KvBlockData>,
    ) -> Result<usize, EngineError> {
        let Some(reserved) = self.reservations.remove(&reservation) else {
            return Err(EngineError::BadRequest(format!(
                "no reservation {reservation} (released, used, or from another engine)"
            )));
        };
        let bytes = self.executor.block_bytes();
        let check = || -> Result<(), String> {
            if skip + chain.len() > reserved.len() {
                return Err(format!(
                    "{} blocks after {skip} for a reservation of {}",
                    chain.len(),
                    reserved.len()
                ));
            }
            for (i, b) in chain.iter().enumerate() {
                if b.data.len() != bytes {
                    return Err(format!(
                        "block {i} has {} bytes; this engine's blocks have {bytes}",
                        b.data.len()
                    ));
                }
                let linked = match i {
                    0 => b.parent.is_none_or(|p| self.pool.match_prefix(&[p]) == 1),
                    _ => b.parent == Some(chain[i - 1].hash),
                };
                if !linked {
                    return Err(format!(
                        "block {i} does not continue the chain (its parent is neither the block before it nor cached here)"
                    ));
                }
            }
            Ok(())
        };
        if let Err(why) = check() {
            self.pool.release(&reserved);
            return Err(EngineError::BadRequest(format!("cannot import: {why}")));
        }
        let before = self.pool.cached_blocks();
        for (b, block) in chain.iter().zip(&reserved[skip..]) {
            self.executor.write_block(*block, &b.data);
        }
        for (b, block) in chain.iter().zip(&reserved[skip..]) {
            self.pool
                .register(*block, b.parent, b.local, b.hash, b.position);
        }
        self.pool.release(&reserved);
        Ok(self.pool.cached_blocks() - before)
    }

    /// Runs one step (outputs wait in an outbox for [`Scheduler::deliver`]). Returns the
    /// executor's duration, or `None` when there was nothing to do.
    pub fn step(&mut self) -> Option<Duration> {
        self.drop_gone();
        self.poll_disk();
        self.offloaded_this_step = 0;
        // Prompts computed elsewhere hold their blocks already: they only decode.
        while self.running.len() < self.settings.max_num_seqs {
            match self.prefilled.pop_front() {
                Some(seq) => self.running.push(seq),
                None => break,
            }
        }
        let bs = self.settings.block_size;
        let mut budget = self.settings.max_num_batched_tokens;
        // (index into running, tokens this step)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let take = (seq.tokens.len() - seq.computed).min(budget);
            let upto = seq.computed + take;
            loop {
                let (pool, seq) = (&mut self.pool, &mut self.running[i]);
                match Self::grow(pool, seq, upto, bs) {
                    Ok(()) => break,
                    Err(_) => {
                        // Preempt the newest sequence; if that is this one, stop here.
                        let victim = self.running.pop().expect("running is not empty");
                        preempted = true;
                        let is_self = self.running.len() == i;
                        self.preempt(victim);
                        if is_self {
                            break;
                        }
                    }
                }
            }
            if i >= self.running.len() {
                break;
            }
            plan.push((i, take));
            budget -= take;
            i += 1;
        }
        while !preempted && budget > 0 && self.running.len() < self.settings.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_tokens -= seq.prompt_len as u64;
            if seq.gone() {
                self.pool.release(&seq.blocks);
                continue;
            }
            seq.extend_hashes(bs);
            // Always compute at least the last known token, so never reuse its block whole.
            let reusable = (seq.tokens.len() - 1) / bs;
            let hashes: Vec<SequenceHash> = seq.hashes[..reusable.min(seq.hashes.len())]
                .iter()
                .map(|h| h.1)
                .collect();
            let mut acquired = self.pool.acquire_prefix(&hashes);
            let on_device = acquired.len();
            // The prefix may continue in the lower tiers: bring those blocks up (when the cost
            // model says it beats recomputing) instead of computing them.
            let (from_host, from_disk) = self.onboard(&hashes, &mut acquired);
            let matched = acquired.len();
            seq.blocks = acquired;
            seq.registered = matched;
            seq.computed = matched * bs;
            let take = (seq.tokens.len() - seq.computed).min(budget);
            let upto = seq.computed + take;
            if Self::grow(&mut self.pool, &mut seq, upto, bs).is_err() {
                self.pool.release(&seq.blocks);
                seq.blocks.clear();
                seq.registered = 0;
                seq.computed = 0;
                self.waiting_tokens += seq.prompt_len as u64;
                self.waiting.push_front(seq);
                break;
            }
            if seq.cached_tokens.is_none() {
                seq.cached_tokens = Some(seq.computed as u32);
                if self.disk.is_some() {
                    self.freq.add(seq.hashes.iter().map(|h| h.1));
                }
                self.tiers.prompt_tokens += seq.prompt_len as u64;
                self.tiers.device_hit_tokens += (on_device * bs) as u64;
                self.tiers.host_hit_tokens += from_host as u64;
                self.tiers.disk_hit_tokens += from_disk as u64;
            }
            budget -= take;
            self.running.push(seq);
            plan.push((self.running.len() - 1, take));
        }
        // Blocks just evicted still hold their contents until this step computes.
        self.offer_evicted();
        if plan.is_empty() {
            return None;
        }
        let kv_usage = self.pool.active_blocks() as f64 / self.pool.num_blocks().max(1) as f64;
        let batch = StepBatch {
            items: plan
                .iter()
                .map(|&(i, take)| {
                    let s = &self.running[i];
                    Scheduled {
                        tokens: &s.tokens,
                        prompt_len: s.prompt_len,
                        output_start: s.output_start,
                        start: s.computed,
                        len: take,
                        blocks: &s.blocks,
                        sampling: &s.sampling,
                        samples: s.computed + take == s.tokens.len(),
                        guide: &s.guide,
                    }
                })
                .collect(),
            kv_usage,
            block_size: bs,
        };
        let result = self.executor.execute(&batch);
        let c = &mut self.counters;
        c.steps += 1;
        c.busy_micros += result.duration.as_micros() as u64;
        c.batched += batch.items.len() as u64;
        for item in &batch.items {
            match item.is_prefill() {
                true => c.prefill_tokens += item.len as u64,
                false => c.decode_tokens += 1,
            }
        }
        drop(batch);
        let mut sampled = result.sampled.into_iter();
        let mut logprobs = result.logprobs.into_iter();
        let mut ends = result.ends.into_iter();
        let mut finished = Vec::new();
        for &(i, take) in &plan {
            let seq = &mut self.running[i];
            seq.computed += take;
            seq.register_computed(&mut self.pool, bs);
            if seq.computed < seq.tokens.len() {
                continue;
            }
            let logprob = logprobs.next().flatten();
            let ends_here = ends.next().unwrap_or(false);
            let token = match sampled.next() {
                Some(Ok(t)) => t,
                failed => {
                    let e = match failed {
                        Some(Err(e)) => e,
                        _ => EngineError::Internal("the executor sampled no token".into()),
                    };
                    self.outbox.push((seq.out.clone(), Err(e), seq.tag));
                    finished.push(i);
                    continue;
                }
            };
            seq.tokens.push(token);
            seq.generated += 1;
            let finish = if ends_here
                || (seq.generated > seq.stop.min_tokens && seq.stop.stop_token_ids.contains(&token))
            {
                Some(FinishReason::Stop)
            } else if seq.generated >= seq.stop.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let out = EngineOutput {
                token_ids: vec![token],
                finish_reason: finish,
                cached_tokens: (!std::mem::replace(&mut seq.cached_reported, true))
                    .then(|| seq.cached_tokens.unwrap_or(0)),
                logprobs: logprob.into_iter().collect(),
                ..Default::default()
            };
            self.outbox.push((seq.out.clone(), Ok(out), seq.tag));
            if finish.is_some() {
                finished.push(i);
            }
        }
        for &i in finished.iter().rev() {
            let mut seq = self.running.remove(i);
            if let Some(export) = seq.export.take() {
                // A prefill for another worker: the prompt's blocks, the last partial one
                // included, while they are still this sequence's.
                let blocks = seq.prompt_len.div_ceil(bs);
                let data = seq.blocks[..blocks]
                    .iter()
                    .map(|&b| self.executor.read_block(b))
                    .collect();
                let _ = export.send(data);
            }
            self.pool.release(&seq.blocks);
        }
        Some(result.duration)
    }
}

impl<E: Executor> Scheduler<E> {
    /// The next steps when they are all decode-only and predictable: every running sequence
    /// decodes (nothing waits, nothing prefills, no lower tier, no stop tokens), and the
    /// executor's timing is a model ([`Executor::bulk_decode`]). Returns the durations of up
    /// to `max_steps` steps: they stop at the step where a sequence finishes, or before one
    /// that could not get its blocks (a preemption) or would evict a cached block while
    /// `evict` is false. Empty when the next step is not such a step. Nothing changes until
    /// [`Scheduler::decode_apply`].
    ///
    /// A simulator runs a long decode stretch as one event this way instead of one a step.
    pub fn decode_plan(&mut self, max_steps: usize, evict: bool) -> &[Duration] {
        self.planned.clear();
        let pure = !self.running.is_empty()
            && self.waiting.is_empty()
            && self.prefilled.is_empty()
            && self.host.is_none()
            && self.disk.is_none()
            && self.eviction_hook.is_none()
            && self.running.len() <= self.settings.max_num_batched_tokens
            && self.running.iter().all(|s| {
                s.computed + 1 == s.tokens.len()
                    && s.generated > 0
                    && s.stop.stop_token_ids.is_empty()
                    && s.export.is_none()
                    && !s.gone()
            });
        if !pure {
            return &self.planned;
        }
        let Some(exec) = self.executor.bulk_decode() else {
            return &self.planned;
        };
        let bs = self.settings.block_size;
        let left = self
            .running
            .iter()
            .map(|s| s.stop.max_tokens.saturating_sub(s.generated) as usize)
            .min()
            .unwrap_or(0);
        let steps = max_steps.min(left);
        let mut room = if evict {
            self.pool.available()
        } else {
            self.pool.unused()
        };
        let total = self.pool.num_blocks().max(1) as f64;
        let mut active = self.pool.active_blocks();
        let batch = self.running.len();
        // Per sequence: its next token's position, and the tokens its blocks hold.
        let mut at: Vec<(usize, usize)> = self
            .running
            .iter()
            .map(|s| (s.computed, s.blocks.len() * bs))
            .collect();
        for _ in 0..steps {
            // The blocks this step's grows allocate.
            let mut new = 0;
            for (next, cap) in at.iter_mut() {
                *next += 1;
                if *next > *cap {
                    *cap += bs;
                    new += 1;
                }
            }
            if new > room {
                break;
            }
            room -= new;
            active += new;
            // The time changes with KV usage only: the same as the last step's until a block
            // is allocated (a block of 64 tokens is 64 steps of one sequence).
            let d = match self.planned.last() {
                Some(&d) if new == 0 => d,
                _ => exec.decode_time(batch, active as f64 / total),
            };
            self.planned.push(d);
        }
        &self.planned
    }

    /// Runs the first `n` steps of the last [`Scheduler::decode_plan`] (`n` at most its
    /// length): the same tokens, blocks, KV events and counters as `n` [`Scheduler::step`]s,
    /// with one output per sequence carrying its `n` tokens (waiting for
    /// [`Scheduler::deliver`]). Returns the steps' total duration.
    pub fn decode_apply(&mut self, n: usize) -> Duration {
        assert!(
            n <= self.planned.len(),
            "{n} steps of a plan of {}",
            self.planned.len()
        );
        let bs = self.settings.block_size;
        let mut tokens: Vec<Vec<TokenId>> = (0..self.running.len())
            .map(|_| Vec::with_capacity(n))
            .collect();
        let mut total = Duration::ZERO;
        let exec = self
            .executor
            .bulk_decode()
            .expect("a plan is made only with bulk decode");
        // Where each sequence next completes a block (a registration) and needs a new one (an
        // allocation): between those, a step only counts and samples.
        let mut full: Vec<usize> = self
            .running
            .iter()
            .map(|s| (s.computed / bs + 1) * bs)
            .collect();
        for j in 0..n {
            for seq in self.running.iter_mut() {
                if seq.computed + 1 > seq.blocks.len() * bs {
                    let got = self.pool.allocate(1).expect("the plan counted the blocks");
                    seq.blocks.extend(got);
                }
            }
            let d = self.planned[j];
            total += d;
            let c = &mut self.counters;
            c.steps += 1;
            c.busy_micros += d.as_micros() as u64;
            c.batched += self.running.len() as u64;
            c.decode_tokens += self.running.len() as u64;
            exec.count_step();
            for ((seq, out), full) in self
                .running
                .iter_mut()
                .zip(tokens.iter_mut())
                .zip(full.iter_mut())
            {
                seq.computed += 1;
                // The first step catches up whatever the sequence had left to register.
                if j == 0 || seq.computed >= *full {
                    seq.register_computed(&mut self.pool, bs);
                    *full = (seq.computed / bs + 1) * bs;
                }
                let token = exec.sample();
                seq.tokens.push(token);
                seq.generated += 1;
                out.push(token);
            }
        }
        self.planned.drain(..n);
        let mut finished = Vec::new();
        for (i, (seq, token_ids)) in self.running.iter().zip(tokens).enumerate() {
            let finish = (seq.generated >= seq.stop.max_tokens).then_some(FinishReason::Length);
            if finish.is_some() {
                finished.push(i);
            }
            let out = EngineOutput {
                token_ids,
                finish_reason: finish,
                ..Default::default()
            };
            self.outbox.push((seq.out.clone(), Ok(out), seq.tag));
        }
        for &i in finished.iter().rev() {
            let seq = self.running.remove(i);
            self.pool.release(&seq.blocks);
        }
        total
    }
}

/// Block hashes of a token sequence as this scheduler computes them (for tests and routers).
pub fn prompt_hashes(tokens: &[TokenId], block_size: usize) -> Vec<SequenceHash> {
    block_hashes(tokens, block_size)
        .into_iter()
        .map(|h| h.1)
        .collect()
}
