//! Engines: token ids and sampling/stop parameters in, a stream of token ids out.
//!
//! An [`Engine`] knows nothing about the bus or HTTP; the worker actor hosts one and serves it.
//! Every engine honours the request's [`StopConditions`](dynamo_protocols::llm::StopConditions)
//! (stop tokens after `min_tokens`, `max_tokens`) and stops within one step once the request's
//! cancellation token fires or its stream is dropped.
#![forbid(unsafe_code)]

pub mod echo;

use std::pin::Pin;

use dynamo_protocols::llm::{EngineOutput, PreprocessedRequest};
use futures::Stream;
use tokio_util::sync::CancellationToken;

pub use echo::{EchoEngine, EchoSettings};

/// Why an engine refused or failed a request; each variant is a decision for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as asked (do not retry).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The engine is full; retry later or elsewhere.
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    /// A fault in the engine.
    #[error("engine failure: {0}")]
    Internal(String),
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
}
