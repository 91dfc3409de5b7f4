//! Engines: token ids and sampling/stop parameters in, a stream of token ids out.
//!
//! An [`Engine`] knows nothing about the bus or HTTP; the worker actor hosts one and serves it.
//! Every engine honours the request's [`StopConditions`](dynamo_protocols::llm::StopConditions)
//! (stop tokens after `min_tokens`, `max_tokens`) and stops within one step once the request's
//! cancellation token fires or its stream is dropped.
// Unsafe code is denied except where a module needs it and says why at each block: the
// native engine's SIMD kernels (intrinsics, and writes into disjoint strips of one output)
// and its memory map of the weights.
#![deny(unsafe_code)]

pub mod echo;
pub mod external_events;
pub mod mocker;
pub mod native;
pub mod openai;
pub mod scheduler;

use std::pin::Pin;

use std::sync::Arc;

use dynamo_protocols::kv::{KvDump, KvEvent, LoadReport, LocalBlockHash, SequenceHash};
use dynamo_protocols::llm::{EngineOutput, PreprocessedRequest, TokenId};
use futures::future::BoxFuture;
use futures::Stream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use echo::{EchoEngine, EchoSettings};
pub use mocker::{MockerEngine, MockerFaults, MockerSettings};
pub use native::{NativeEngine, NativeError, NativeSettings};
pub use openai::{OpenAiEngine, OpenAiSettings, ServerKind};

/// Why an engine refused or failed a request; each variant is a decision for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as asked (do not retry).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The engine is full; retry later or elsewhere.
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    /// A fault in the engine while serving this request.
    #[error("engine failure: {0}")]
    Internal(String),
    /// The engine itself stopped (its scheduler panicked or exited) with this request in
    /// flight: the worker restarts the engine; the caller may retry or migrate elsewhere.
    #[error("the engine stopped: {0}")]
    Stopped(String),
}

/// Whether an engine is serving. A failed engine never recovers: its worker starts a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineState {
    Running,
    /// The scheduler panicked or exited on its own; why, for logs.
    Failed(String),
}

/// The text of a panic payload (`panic!` with a message or a format string).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// The outputs of one request. The last item carries a finish reason; the stream ends after it.
pub type EngineStream = Pin<Box<dyn Stream<Item = Result<EngineOutput, EngineError>> + Send>>;

/// Refuses a request that asks for what only a model's logits can give (`logit_bias`,
/// `logprobs`, guided decoding), for engines that have none: a silently ignored bias, or made-up
/// probabilities, would be worse than a 400.
pub fn refuse_without_logits(
    request: &PreprocessedRequest,
    engine: &str,
) -> Result<(), EngineError> {
    let wants = if !request.sampling.logit_bias.is_empty() {
        "logit_bias"
    } else if request.sampling.logprobs.is_some() {
        "logprobs"
    } else if request.sampling.guided.is_some() {
        "guided decoding (response_format)"
    } else {
        return Ok(());
    };
    Err(EngineError::BadRequest(format!(
        "{wants} needs a model's logits; the {engine} engine has none (use the native engine)"
    )))
}

pub trait Engine: Send + Sync + 'static {
    /// Starts generating. Work stops when `cancel` fires or the stream is dropped.
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError>;

    /// The engine's KV cache, for engines that have one (echo has none).
    fn kv(&self) -> Option<KvHandle> {
        None
    }

    /// The engine's block pool as a KV capability (export, reserve, import, eviction hook),
    /// for engines with one: what disaggregation and the KV offloader build on.
    fn kv_capability(&self) -> Option<Arc<dyn KvCapability>> {
        None
    }

    /// The engine's state, for engines that run a scheduler of their own (echo has none):
    /// it turns [`EngineState::Failed`] when that scheduler panics or exits, which is when
    /// the worker deregisters and restarts the engine.
    fn health(&self) -> Option<watch::Receiver<EngineState>> {
        None
    }
}

/// One cached block's identity and contents, as it leaves or enters an engine's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBlockData {
    pub hash: SequenceHash,
    pub parent: Option<SequenceHash>,
    pub local: LocalBlockHash,
    /// The block's index in its sequence.
    pub position: u32,
    /// [`KvCapability::block_bytes`] bytes (none for a simulated engine).
    pub data: Vec<u8>,
}

/// Called with each cached block the pool evicts, before the block is reused (on the
/// engine's scheduler: it must not block; hand the block to a bounded queue).
pub type EvictionHook = Arc<dyn Fn(KvBlockData) + Send + Sync>;

/// Blocks held empty for an import (see [`KvCapability::reserve`]); dropping it unused gives
/// them back.
pub struct Reservation {
    id: u64,
    blocks: usize,
    release: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl Reservation {
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub(crate) fn new(id: u64, blocks: usize, release: Box<dyn FnOnce(u64) + Send + Sync>) -> Self {
        Self {
            id,
            blocks,
            release: Some(release),
        }
    }

    /// The id, without giving the blocks back (an import takes them over).
    pub(crate) fn take(mut self) -> u64 {
        self.release = None;
        self.id
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(self.id);
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("id", &self.id)
            .field("blocks", &self.blocks)
            .finish()
    }
}

/// A prefill's result for another worker: the first token's output and the contents of the
/// prompt's blocks, in order.
pub type Exported = (EngineOutput, Vec<Vec<u8>>);

/// An engine's block pool, as the transfer library and the offloader use it.
///
/// - `export`: the cached blocks of the leading `hashes` (in order, while cached), with
///   their contents;
/// - `reserve`: takes `blocks` empty blocks now (an error if the pool cannot spare them), so a
///   transfer can land without racing the scheduler;
/// - `import`: writes `blocks` (a chain: each block's parent is the one before it, the first's
///   is cached here or none) into a reservation and caches them; checked whole before
///   anything is written, so a bad or partial transfer is never registered as cached;
///   returns how many were newly cached;
/// - `set_eviction_hook`: the hook the pool calls before it evicts a cached block.
pub trait KvCapability: Send + Sync {
    fn block_size(&self) -> usize;
    /// Bytes of one block's contents (0: a simulation that keeps none).
    fn block_bytes(&self) -> usize;
    /// What one block's bytes are (none for a simulated engine).
    fn layout(&self) -> Option<native::KvLayout> {
        None
    }
    /// How long moving `blocks` blocks to another worker takes, for a simulated engine whose
    /// transfers are simulated too (`None`: real bytes move, the transfer library times them).
    fn simulated_transfer(&self, _blocks: usize) -> Option<std::time::Duration> {
        None
    }
    fn export(
        &self,
        hashes: Vec<SequenceHash>,
    ) -> BoxFuture<'static, Result<Vec<KvBlockData>, EngineError>>;
    /// For a peer: the blocks of the chain `hashes` this engine holds from index `from` on (a
    /// leading run), each from its device pool or else its host tier. Empty when it has none.
    fn share(
        &self,
        _hashes: Vec<SequenceHash>,
        _from: usize,
    ) -> BoxFuture<'static, Result<Vec<KvBlockData>, EngineError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Whether fetching `blocks` blocks from a peer beats computing them here (the engine's
    /// cost model; an engine without one says yes: a copy is cheaper than a prefill).
    fn worth_fetching(&self, _blocks: usize) -> bool {
        true
    }
    /// Writes `blocks` (a chain continuing the reservation's first `cached` blocks, which
    /// [`KvCapability::reserve_prompt`] pinned) into the reservation's next blocks and caches
    /// them; the rest of the reservation is given back. Returns the blocks newly cached.
    fn import_continuation(
        &self,
        _reservation: Reservation,
        _cached: usize,
        _blocks: Vec<KvBlockData>,
    ) -> BoxFuture<'static, Result<usize, EngineError>> {
        Box::pin(async {
            Err(EngineError::BadRequest(
                "this engine cannot import KV blocks".into(),
            ))
        })
    }
    fn reserve(&self, blocks: usize) -> BoxFuture<'static, Result<Reservation, EngineError>>;
    fn import(
        &self,
        reservation: Reservation,
        blocks: Vec<KvBlockData>,
    ) -> BoxFuture<'static, Result<usize, EngineError>>;
    fn set_eviction_hook(
        &self,
        hook: Option<EvictionHook>,
    ) -> BoxFuture<'static, Result<(), EngineError>>;

    /// Prefill side of a hand-off: computes `request`'s prompt and first token and returns
    /// them with the contents of the prompt's blocks (the last, partial one included), read
    /// at the request's finish.
    fn prefill_export(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Exported, EngineError>>;

    /// Decode side of a hand-off: for a prompt of `total` blocks whose full blocks are
    /// `hashes`, pins the leading cached ones and allocates the rest; returns the reservation
    /// and how many were cached.
    fn reserve_prompt(
        &self,
        hashes: Vec<SequenceHash>,
        total: usize,
    ) -> BoxFuture<'static, Result<(Reservation, usize), EngineError>>;

    /// Decode side: continues `request` (its prompt computed elsewhere, `first` its first
    /// token) from the reservation, whose blocks after `cached` get `data`; the stream
    /// carries the tokens after `first`.
    fn generate_prefilled(
        &self,
        reservation: Reservation,
        cached: usize,
        request: PreprocessedRequest,
        first: TokenId,
        data: Vec<Vec<u8>>,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError>;
}

/// An engine's KV cache as the worker publishes it: event batches (consecutive event ids; a
/// subscriber that lags sees a gap), load, and a dump of the cached set on request.
#[derive(Clone)]
pub struct KvHandle {
    events: broadcast::Sender<Vec<KvEvent>>,
    load: watch::Receiver<LoadReport>,
    dumps: mpsc::Sender<oneshot::Sender<KvDump>>,
    block_size: u32,
}

impl KvHandle {
    pub fn new(
        events: broadcast::Sender<Vec<KvEvent>>,
        load: watch::Receiver<LoadReport>,
        dumps: mpsc::Sender<oneshot::Sender<KvDump>>,
        block_size: u32,
    ) -> Self {
        Self {
            events,
            load,
            dumps,
            block_size,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Vec<KvEvent>> {
        self.events.subscribe()
    }

    pub fn load(&self) -> watch::Receiver<LoadReport> {
        self.load.clone()
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The cached set and the last event id it reflects; `None` if the engine has stopped.
    pub async fn dump(&self) -> Option<KvDump> {
        let (tx, rx) = oneshot::channel();
        self.dumps.send(tx).await.ok()?;
        rx.await.ok()
    }
}
