//! The serving roles as `ractor` actors bound to the bus.
//!
//! - [`frontend`]: the OpenAI HTTP API, model discovery, simple routing;
//! - [`router`]: the KV-aware router (prefix index, load, accounting) and its event ingest;
//! - [`worker`]: hosts an engine on `generate` and publishes its model card;
//! - [`echo`]: the runtime's smoke-test role;
//! - [`supervisor`]: the root supervisor that starts, restarts and stops a process's roles.
#![forbid(unsafe_code)]

pub mod echo;
pub mod frontend;
pub mod router;
pub mod supervisor;
pub mod worker;
