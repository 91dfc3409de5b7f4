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
pub mod mocker;
pub mod native;
pub mod scheduler;

use std::pin::Pin;

use dynamo_protocols::kv::{KvDump, KvEvent, LoadReport};
use dynamo_protocols::llm::{EngineOutput, PreprocessedRequest};
use futures::Stream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use echo::{EchoEngine, EchoSettings};
pub use mocker::{MockerEngine, MockerFaults, MockerSettings};
pub use native::{NativeEngine, NativeError, NativeSettings};

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

    /// The engine's state, for engines that run a scheduler of their own (echo has none):
    /// it turns [`EngineState::Failed`] when that scheduler panics or exits, which is when
    /// the worker deregisters and restarts the engine.
    fn health(&self) -> Option<watch::Receiver<EngineState>> {
        None
    }
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
