//! From OpenAI requests to token ids and back, for one model:
//!
//! - [`model`]: Hugging Face model folders and the files a frontend fetches to serve them;
//! - [`template`]: chat templates (`minijinja`);
//! - [`pipeline`]: request validation and tokenization ([`Preprocessor`]), and per request the
//!   [`OutputProcessor`] (incremental detokenization, stop tokens and strings, usage);
//! - [`detok`]: the incremental decoder and the stop-string jail;
//! - [`fast_bpe`]: a fast prompt encoder for byte-level BPE tokenizers;
//! - [`make_model`]: a deterministic small model folder for tests and the quickstart.
#![forbid(unsafe_code)]

pub mod detok;
pub mod fast_bpe;
pub mod fields;
pub mod make_model;
pub mod model;
pub mod pipeline;
pub mod template;
pub mod tools;

pub use model::{ModelError, ModelFiles, ModelFolder};
pub use pipeline::{
    LogprobEntry, OutputProcessor, Piece, Prepared, Preprocessor, RequestError, TokenInfo,
};
