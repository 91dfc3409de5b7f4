//! Wire types exchanged between roles and with clients: serde only, no runtime, no I/O.
//!
//! - [`openai`]: the OpenAI HTTP API (chat, completions, models, errors) as clients send it.
//! - [`llm`]: what the frontend sends a worker (token ids and sampling/stop parameters) and
//!   what comes back (token ids and a finish reason), plus the model card workers publish.
//! - [`kv`]: KV-cache events, dumps and load reports workers publish for routers.
//! - [`router`]: routing requests to a router component and the decisions routers share.
//! - [`planner`]: the planner's decisions and the scale requests its connector sends.
//! - [`echo`]: the runtime's smoke-test endpoint.
//!
//! Versioning rule: fields are added with `#[serde(default)]`; nothing is renamed or removed
//! without a new type.
#![forbid(unsafe_code)]

pub mod echo;
pub mod kv;
pub mod llm;
pub mod openai;
pub mod planner;
pub mod router;
pub mod stats;
