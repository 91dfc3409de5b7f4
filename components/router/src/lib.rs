//! The KV-aware router: sends each request where the least prefill work remains, weighed
//! against load.
//!
//! - [`KvRouter`] is the shared core every routing decision reads: the global prefix index
//!   ([`KvIndex`]), each worker's last load report, and the router's own accounting of what it
//!   routed (prefill tokens until the first token, blocks until completion), held by a
//!   [`RouteLease`] whose `Drop` releases it, so the accounting cannot leak.
//! - The binding to the bus lives in `dynamo-actors` (`actors/src/router`): the ingest actor
//!   feeds the index from the workers' KV events (gap → resync from a dump; worker gone →
//!   purge) and records load reports; the router component serves `{ns}.router.route`.
//! - Routers share their decisions over the bus (`sync`): each applies the others' routed,
//!   first-token and finished events to its accounting (held until finished, or at most
//!   `shared_lease_ttl` should the finish be lost), so replicas agree on load.
//! - [`RouterComponent`] (`service`) runs a router as its own component, answering
//!   `{ns}.router.route`; frontends with a remote router call it and report their requests'
//!   first token and end as decision events.
//!
//! Cost of worker `w` for a request of `n` blocks: `overlap_weight x (n - credited(w) +
//! pending_prefill(w) / block_size + wait(w)) + decode_blocks(w) + overflow(w)`, where
//! `credited` counts cached leading blocks (device 1, host `host_credit`, disk `disk_credit`),
//! `overflow` is the request's blocks that would not fit beside the active ones and `wait` is
//! `n` when there is any overflow (the request waits there for a running one to finish;
//! [`cost`]), and `decode_blocks` is the
//! router's own count plus whatever the worker's last report showed beyond the router's count
//! (load from elsewhere; read against the highest the router's count was since the report
//! before, so a report taken before one of its requests ended, but received after, does not
//! show that request as someone else's), so a stale report does not outlive the requests in
//! it. Workers whose KV
//! usage is over `busy_threshold` are skipped; the lowest cost wins (ties broken at random), or
//! with `temperature > 0` a softmax over `-cost / temperature` picks.
//!
//! Conditional disaggregation (`disagg`): with prefill workers serving the model, after the
//! decode worker is chosen, [`KvRouter::plan_prefill`] decides whether its prompt is
//! prefilled there (little uncached, or every prefill worker's queue over the bound) or on a
//! prefill worker, chosen by the same cost (prefill workers publish KV events too).
//!
//! No bus here: this crate is the pure core, tested on its own (`src/tests.rs`, including
//! property tests of the lease accounting and the cost function).
#![forbid(unsafe_code)]

mod disagg;
mod idle;
mod lease;
mod router;
mod sink;

pub use disagg::{LocalReason, PrefillPlan};
pub use lease::RouteLease;
pub use router::{cost, Decision, KvRouter, KvRouterSettings, RouteError};
pub use sink::DecisionSink;

#[cfg(test)]
mod tests;
