//! The KV router's binding to the bus; the routing core is the `dynamo-router` crate.
//!
//! - `ingest`: the actor that keeps a [`KvRouter`]'s index and loads current from the workers'
//!   KV events and load reports (resync on gaps, purge on leave);
//! - `sync`: routers share their decisions over the bus, so replicas agree on load;
//! - `service`: [`RouterComponent`] runs a router as its own component (`{ns}.router.route`).

mod ingest;
mod service;
mod sync;

pub use dynamo_router::{
    Decision, DecisionSink, KvRouter, KvRouterSettings, RouteError, RouteLease,
};
pub use ingest::{start_ingest, RouterIngest};
pub use service::RouterComponent;
pub use sync::{spawn_publisher, Publisher};
