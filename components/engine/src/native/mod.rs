//! The native engine: Llama-family checkpoints on the CPU, through the same [`Scheduler`] and
//! block pool as the mocker, so batching, chunked prefill, prefix caching, preemption and KV
//! events behave identically; here the executor runs the model ([`model`]) over a paged KV
//! cache ([`kv`]) whose blocks are the pool's blocks.
//!
//! The scheduler and model run on one OS thread per engine (the forward pass is CPU-bound and
//! must not stall the async runtime), fanning work out to the engine's own rayon pool (both
//! cores by default). Requests, dumps, and KV export/import reach it through one bounded
//! command channel (full: `Overloaded`).
//!
//! Layers: [`config`] (the HF `config.json`), [`weights`] (safetensors, memory-mapped),
//! [`ops`] (matmul and friends), [`model`] (the forward pass), [`kv`] (paged cache and
//! export layout), [`sampling`], [`random`] (deterministic random checkpoints for tests and
//! benchmarks).

pub mod config;
pub mod kv;
pub mod model;
pub mod ops;
pub mod random;
pub mod sampling;
pub mod weights;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use dynamo_protocols::kv::{KvDump, LoadReport, SequenceHash};
use dynamo_protocols::llm::{PreprocessedRequest, TokenId};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::scheduler::{
    forward_dumps, submit, Executor, KvCommand, OutputSender, Scheduled, Scheduler, SchedulerKv,
    SchedulerSettings, StepBatch, StepResult, COMMAND_QUEUE,
};
use crate::{
    panic_message, Engine, EngineError, EngineState, EngineStream, KvBlockData, KvCapability,
    KvHandle,
};
pub use kv::{KvBlock, KvBlocks, KvDtype, KvLayout};
pub use model::{Compute, Model};

/// What can go wrong loading or driving the native engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NativeError {
    #[error("model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("weights: tensor {0} is missing")]
    MissingTensor(String),
    #[error("engine settings: {0}")]
    Settings(String),
    #[error("KV import: {0}")]
    Import(String),
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NativeSettings {
    pub model_path: PathBuf,
    /// The type the weights are held in; unset: the checkpoint's (f32, bf16 or f16).
    pub compute: Option<Compute>,
    /// The KV cache's element type; unset: the weights' type (f32, bf16 or f16).
    pub kv_cache_dtype: Option<KvDtype>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks; unset: as many as `kv_cache_memory` holds.
    pub num_gpu_blocks: Option<usize>,
    /// Bytes of KV cache when `num_gpu_blocks` is unset.
    pub kv_cache_memory: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Compute threads (default: every core).
    pub threads: Option<usize>,
    /// Seed of the draws of requests without a seed.
    pub seed: u64,
    /// Host KV tier below the KV cache, in bytes (0: none): evicted blocks are kept there
    /// and copied back on a prefix hit instead of being recomputed.
    pub host_kv_cache: usize,
    /// Disk KV tier below the host tier: capacity in bytes (0: none) and directory. Files
    /// are marked with the model's fingerprint (configuration, KV layout, and the logits of
    /// a probe prompt, so other weights never read them).
    pub disk_kv_cache: usize,
    pub disk_kv_dir: Option<PathBuf>,
    /// Requests that must have used a block for it to go to disk (the frequency filter).
    pub disk_min_uses: u32,
}

impl Default for NativeSettings {
    fn default() -> Self {
        Self {
            model_path: PathBuf::new(),
            compute: None,
            kv_cache_dtype: None,
            block_size: 16,
            num_gpu_blocks: None,
            kv_cache_memory: 1 << 30,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            threads: None,
            seed: 0,
            host_kv_cache: 0,
            disk_kv_cache: 0,
            disk_kv_dir: None,
            disk_min_uses: crate::scheduler::DISK_MIN_USES,
        }
    }
}

struct NativeExecutor {
    model: Arc<Model>,
    cache: kv::KvCache,
    threads: rayon::ThreadPool,
    rng: u64,
    /// The model's vocabulary for guided decoding, or why there is none.
    grammars: Arc<Result<dynamo_guided::Grammars, String>>,
}

impl NativeExecutor {
    /// Holds `logits` to the sequence's grammar, when it has one: its state is created on
    /// its first draw (a spec that does not compile is the client's error), catches up on
    /// the tokens generated since (or before a migration), and bans what may not come next.
    fn guide(&self, it: &Scheduled<'_>, logits: &mut [f32]) -> Result<(), EngineError> {
        let Some(spec) = &it.sampling.guided else {
            return Ok(());
        };
        let mut slot = it.guide.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let grammars = self.grammars.as_ref().as_ref().map_err(|why| {
                EngineError::BadRequest(format!("guided decoding is unavailable: {why}"))
            })?;
            *slot = Some(Box::new(grammars.compile(spec).map_err(guided_error)?));
        }
        let c = slot.as_mut().expect("set above");
        c.advance(&it.tokens[it.output_start..])
            .map_err(guided_error)?;
        c.apply(logits).map_err(guided_error)
    }
}

fn guided_error(e: dynamo_guided::GuidedError) -> EngineError {
    match e {
        dynamo_guided::GuidedError::Grammar(m) => EngineError::BadRequest(m),
        other => EngineError::Internal(other.to_string()),
    }
}

/// The model folder's vocabulary for guided decoding: its `tokenizer.json`, and its
/// end-of-sequence ids from `generation_config.json` or `config.json`.
fn grammars(dir: &std::path::Path, vocab_size: usize) -> Result<dynamo_guided::Grammars, String> {
    let tokenizer = std::fs::read(dir.join("tokenizer.json"))
        .map_err(|e| format!("the model folder has no readable tokenizer.json ({e})"))?;
    let mut eos = Vec::new();
    for file in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64()),
            Some(serde_json::Value::Array(a)) => eos.extend(a.iter().filter_map(|x| x.as_u64())),
            _ => {}
        }
    }
    let mut eos: Vec<TokenId> = eos.into_iter().map(|t| t as TokenId).collect();
    eos.sort_unstable();
    eos.dedup();
    dynamo_guided::Grammars::new(&tokenizer, vocab_size, &eos).map_err(|e| e.to_string())
}

impl Executor for NativeExecutor {
    fn block_bytes(&self) -> usize {
        self.cache.layout().block_bytes()
    }

    fn read_block(&self, block: dynamo_kv::BlockId) -> Vec<u8> {
        self.cache.read_block(block)
    }

    fn write_block(&mut self, block: dynamo_kv::BlockId, data: &[u8]) {
        self.cache.write_block(block, data)
    }

    fn execute(&mut self, batch: &StepBatch<'_>) -> StepResult {
        let started = Instant::now();
        let steps: Vec<model::SeqStep<'_>> = batch
            .items
            .iter()
            .map(|it| model::SeqStep {
                tokens: &it.tokens[it.start..it.start + it.len],
                start: it.start,
                blocks: it.blocks,
                logits: it.samples,
            })
            .collect();
        let (model, cache) = (&self.model, &mut self.cache);
        let logits = self.threads.install(|| model.forward(cache, &steps));
        let mut logits = logits.into_iter();
        let (mut sampled, mut logprobs, mut ends) = (Vec::new(), Vec::new(), Vec::new());
        for it in batch.items.iter().filter(|i| i.samples) {
            let Some(mut l) = logits.next() else {
                sampled.push(Err(EngineError::Internal(
                    "no logits for a sampling row".into(),
                )));
                continue;
            };
            if l.iter().any(|x| !x.is_finite()) {
                sampled.push(Err(EngineError::Internal(
                    "the model produced non-finite logits (NaN or infinity) for this request"
                        .into(),
                )));
                logprobs.push(None);
                ends.push(false);
                continue;
            }
            sampling::penalize(&mut l, &it.tokens[it.output_start..], it.sampling);
            if let Err(e) = self.guide(it, &mut l) {
                sampled.push(Err(e));
                logprobs.push(None);
                ends.push(false);
                continue;
            }
            let position = it.tokens.len();
            let draw = match it.sampling.seed {
                Some(seed) => sampling::uniform(seed, position),
                None => {
                    self.rng = self.rng.wrapping_add(1);
                    sampling::uniform(self.rng, position)
                }
            };
            let token = sampling::sample(&l, it.sampling, draw).ok_or_else(|| {
                EngineError::Internal("guided decoding left no token to choose from".into())
            });
            logprobs.push(match (&token, it.sampling.logprobs) {
                (Ok(t), Some(top)) => Some(sampling::logprobs(&l, *t, top)),
                _ => None,
            });
            // Only a grammar ends a sequence here (no lock for unguided ones).
            ends.push(match &token {
                Ok(t) if it.sampling.guided.is_some() => it
                    .guide
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .is_some_and(|c| c.ends_with(*t)),
                _ => false,
            });
            sampled.push(token);
        }
        StepResult {
            sampled,
            logprobs,
            ends,
            duration: started.elapsed(),
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

/// A loaded model served by its scheduler thread.
pub struct NativeEngine {
    commands: mpsc::Sender<Command>,
    kv: KvHandle,
    capability: Arc<SchedulerKv>,
    model: Arc<Model>,
    layout: KvLayout,
    num_blocks: usize,
    preemptions: Arc<std::sync::atomic::AtomicU64>,
    health: watch::Receiver<EngineState>,
    stop: CancellationToken,
}

impl NativeEngine {
    /// Loads the model (blocking: call it off the async threads, e.g. in `spawn_blocking`)
    /// and starts the engine thread. `progress(layers loaded, layers)` reports loading.
    pub fn start(
        settings: NativeSettings,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, NativeError> {
        if settings.block_size == 0
            || settings.max_num_seqs == 0
            || settings.max_num_batched_tokens == 0
        {
            return Err(NativeError::Settings(
                "block_size, max_num_seqs and max_num_batched_tokens must be positive".into(),
            ));
        }
        let compute = match settings.compute {
            Some(c) => c,
            None => match weights::Weights::open(&settings.model_path)?.dtype() {
                Some(weights::Dtype::Bf16) => Compute::Bf16,
                Some(weights::Dtype::F16) => Compute::F16,
                _ => Compute::F32,
            },
        };
        let kv_dtype = settings.kv_cache_dtype.unwrap_or(match compute {
            Compute::F32 => KvDtype::F32,
            Compute::Bf16 => KvDtype::Bf16,
            Compute::F16 => KvDtype::F16,
        });
        let model =
            Arc::new(Model::load(&settings.model_path, compute, progress)?.with_kv_dtype(kv_dtype));
        tracing::info!(
            weights = compute.name(),
            kv_cache = kv_dtype.name(),
            "native engine: weights held as {}, KV cache in {}",
            compute.name(),
            kv_dtype.name()
        );
        crate::scheduler::check_disk(settings.disk_kv_cache, settings.disk_kv_dir.as_deref())
            .map_err(NativeError::Settings)?;
        let layout = model.kv_layout(settings.block_size);
        let num_blocks = match settings.num_gpu_blocks {
            Some(n) => n,
            None => settings.kv_cache_memory / layout.block_bytes(),
        };
        if num_blocks == 0 {
            return Err(NativeError::Settings(format!(
                "the KV cache holds no block: one block takes {} bytes; raise --kv-cache-memory or set --num-gpu-blocks",
                layout.block_bytes()
            )));
        }
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(settings.threads.unwrap_or(0))
            .thread_name(|i| format!("native-{i}"))
            .build()
            .map_err(|e| NativeError::Settings(format!("cannot start compute threads: {e}")))?;
        let grammars = grammars(&settings.model_path, model.config().vocab_size);
        if let Err(why) = &grammars {
            tracing::warn!("guided decoding (response_format) will be refused: {why}");
        }
        let executor = NativeExecutor {
            model: model.clone(),
            cache: kv::KvCache::new(layout, num_blocks),
            threads,
            rng: settings.seed,
            grammars: Arc::new(grammars),
        };
        let scheduler = Scheduler::new(
            SchedulerSettings {
                host_tier_bytes: settings.host_kv_cache,
                disk: disk_tier(&settings, &model, layout),
                disk_min_uses: settings.disk_min_uses,
                ..SchedulerSettings::new(
                    num_blocks,
                    settings.block_size,
                    settings.max_num_seqs,
                    settings.max_num_batched_tokens,
                )
            },
            executor,
        );
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
        let (ev, st) = (events.clone(), stop.clone());
        let preemptions = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = preemptions.clone();
        let (health_tx, health) = watch::channel(EngineState::Running);
        std::thread::Builder::new()
            .name("native-engine".into())
            .spawn(move || {
                // A panic in a step fails the engine: the scheduler (and every open stream's
                // sender) is dropped while unwinding, and the health watch says why.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(scheduler, rx, ev, load_tx, counter, st)
                }));
                if let Err(p) = ran {
                    let why = format!("the native engine thread panicked: {}", panic_message(&*p));
                    health_tx.send_replace(EngineState::Failed(why));
                }
            })
            .map_err(|e| NativeError::Settings(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            capability: Arc::new(
                SchedulerKv::new(
                    commands.clone(),
                    Command::Kv,
                    settings.block_size,
                    layout.block_bytes(),
                )
                .with_layout(layout),
            ),
            commands,
            kv: KvHandle::new(events, load, dumps, settings.block_size as u32),
            model,
            layout,
            num_blocks,
            preemptions,
            health,
            stop,
        })
    }

    /// Sequences preempted (their blocks taken, to be recomputed) so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Copies out the cached blocks of the leading `hashes` (as many as are cached, in order).
    pub async fn export(&self, hashes: Vec<SequenceHash>) -> Result<KvBlocks, NativeError> {
        let blocks = self
            .capability
            .export(hashes)
            .await
            .map_err(|_| NativeError::Stopped)?;
        Ok(KvBlocks {
            layout: self.layout,
            blocks: blocks
                .into_iter()
                .map(|b| KvBlock {
                    local: b.local,
                    hash: b.hash,
                    data: b.data,
                })
                .collect(),
        })
    }

    /// Caches `blocks` (a prefix's leading blocks, as [`NativeEngine::export`] gives them) in
    /// this engine's pool, so requests with that prefix reuse them; returns how many were
    /// newly cached (blocks already cached are skipped). Goes through the KV capability:
    /// reserve, then import checked whole.
    pub async fn import(&self, blocks: KvBlocks) -> Result<usize, NativeError> {
        if blocks.layout != self.layout {
            return Err(NativeError::Import(format!(
                "layout {:?} does not match this engine's {:?}",
                blocks.layout, self.layout
            )));
        }
        let reservation = self
            .capability
            .reserve(blocks.blocks.len())
            .await
            .map_err(|e| NativeError::Import(e.to_string()))?;
        let chain: Vec<KvBlockData> = blocks
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| KvBlockData {
                hash: b.hash,
                parent: i.checked_sub(1).map(|p| blocks.blocks[p].hash),
                local: b.local,
                position: i as u32,
                data: b.data.clone(),
            })
            .collect();
        self.capability
            .import(reservation, chain)
            .await
            .map_err(|e| NativeError::Import(e.to_string()))
    }
}

impl Drop for NativeEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn handle(sched: &mut Scheduler<NativeExecutor>, cmd: Command) {
    match cmd {
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
    }
}

/// The disk tier's settings, when one is configured (see [`NativeSettings::disk_kv_dir`]).
fn disk_tier(
    settings: &NativeSettings,
    model: &Model,
    layout: KvLayout,
) -> Option<dynamo_kv::DiskSettings> {
    let dir = settings.disk_kv_dir.clone()?;
    if settings.disk_kv_cache == 0 {
        return None;
    }
    let probe: Vec<u8> = model
        .last_logits(&[1, 2, 3])
        .iter()
        .take(64)
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let shape = format!("{:?} {layout:?} {:?}", model.config(), model.compute());
    Some(dynamo_kv::DiskSettings {
        dir,
        capacity: settings.disk_kv_cache,
        fingerprint: crate::scheduler::fingerprint(&[b"native", shape.as_bytes(), &probe]),
        nominal: layout.block_bytes(),
    })
}

fn run(
    mut sched: Scheduler<NativeExecutor>,
    mut rx: mpsc::Receiver<Command>,
    events: broadcast::Sender<Vec<dynamo_protocols::kv::KvEvent>>,
    load: watch::Sender<LoadReport>,
    preemptions: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        while let Ok(cmd) = rx.try_recv() {
            handle(&mut sched, cmd);
        }
        if stop.is_cancelled() {
            return;
        }
        let worked = sched.step().is_some();
        preemptions.store(sched.preemptions(), std::sync::atomic::Ordering::Relaxed);
        sched.deliver();
        let batch = sched.take_events();
        if !batch.is_empty() {
            let _ = events.send(batch);
        }
        load.send_if_modified(|l| {
            let now = sched.load();
            std::mem::replace(l, now) != now
        });
        if !worked {
            match rx.blocking_recv() {
                Some(cmd) => handle(&mut sched, cmd),
                None => return,
            }
        }
    }
}

impl Engine for NativeEngine {
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        let context = self.model.config().max_position_embeddings;
        let need = request.token_ids.len() + request.stop.max_tokens as usize;
        if need > context {
            return Err(EngineError::BadRequest(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {context} tokens",
                request.token_ids.len(),
                request.stop.max_tokens
            )));
        }
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
mod tests;
