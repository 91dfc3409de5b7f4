//! The actor runtime over a message bus. Knows nothing about language models.
//!
//! - [`bus`]: the [`Bus`] trait and its transports, NATS and in-process.
//! - [`subject`]: the naming scheme; every subject is built there from validated parts.
//! - [`rpc`]: streaming request/response with deadlines, heartbeats and cancellation.
//! - [`discovery`]: instance registration with leases, and watches.
//! - [`serve`]: binds a `ractor` actor to an endpoint; answers the NATS service protocol.
//! - [`config`], [`telemetry`]: settings (figment) and logs/metrics.
#![forbid(unsafe_code)]

pub mod bus;
pub mod config;
pub mod discovery;
pub mod rpc;
mod runtime;
pub mod serve;
pub mod subject;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use bus::{Bus, BusError};
pub use config::{ConfigError, RuntimeSettings};
pub use discovery::{Discovery, DiscoveryEvent, InstanceInfo};
pub use rpc::{CallOptions, RpcClient, RpcError, Target};
pub use runtime::{shutdown_signal, Runtime, RuntimeError};
pub use serve::{ComponentInstance, ReplySender, Request, RequestContext, ServedEndpoint};
pub use subject::{ComponentId, EndpointId, InstanceId};
