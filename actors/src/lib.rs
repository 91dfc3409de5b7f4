//! The serving roles as `ractor` actors bound to the bus.
//!
//! - [`frontend`]: the OpenAI HTTP API, model discovery, simple routing;
//! - [`worker`]: hosts an engine on `generate` and publishes its model card;
//! - [`echo`]: the runtime's smoke-test role.
#![forbid(unsafe_code)]

pub mod echo;
pub mod frontend;
pub mod worker;
