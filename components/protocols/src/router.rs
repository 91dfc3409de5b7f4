//! The router's wire types: routing requests to a router component, and the routing decisions
//! router replicas share so that their load accounting agrees.
//!
//! Subjects: a router component serves `{ns}.router.route`; every router (a component, or one
//! embedded in a frontend) publishes the lifecycle of its decisions on
//! `dyn.ev.{ns}.router.router_decisions.{publisher}`, and a frontend whose router is remote
//! publishes there the first token and the end of each request it was routed.

use serde::{Deserialize, Serialize};

use crate::kv::WorkerId;
use crate::llm::TokenId;

/// The router component's name in a namespace.
pub const ROUTER_COMPONENT: &str = "router";
/// Its endpoint answering [`RouteRequest`] with one [`RouteResponse`].
pub const ROUTE_ENDPOINT: &str = "route";
/// The event topic of [`RouterEvent`]s.
pub const DECISIONS_TOPIC: &str = "router_decisions";

/// Pick a worker serving `model` for a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteRequest {
    pub model: String,
    pub token_ids: Vec<TokenId>,
    /// Workers not to pick (the caller already failed to reach them).
    #[serde(default)]
    pub exclude: Vec<WorkerId>,
    /// Route by load alone, ignoring cached prefixes (a frontend in `least-loaded` mode),
    /// whatever the router component's own setting.
    #[serde(default)]
    pub load_only: bool,
}

/// A prompt's prefill worker, as a router component chose it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedPrefill {
    pub worker: WorkerId,
    /// Its prefill endpoint (`namespace.component.endpoint`).
    pub endpoint: String,
    pub lease: LeaseId,
}

/// Which router's accounting entry a routed request holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseId {
    pub router: u64,
    pub id: u64,
}

/// The router's pick. The caller must publish [`RouterEventKind::PrefillDone`] when the first
/// token arrives and [`RouterEventKind::Finished`] when the request ends, for `lease`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteResponse {
    pub worker: WorkerId,
    /// Leading prompt blocks the worker holds, by tier.
    pub overlap_device: u32,
    #[serde(default)]
    pub overlap_host: u32,
    #[serde(default)]
    pub overlap_disk: u32,
    pub lease: LeaseId,
    /// Disaggregated serving: the prefill worker chosen for the prompt (none: the decode
    /// worker prefills it). Its lease ends with the request's first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<RoutedPrefill>,
    /// Cluster-wide KV sharing: a peer holding a longer leading run of the prompt than the
    /// worker; the caller tells the worker to fetch it (the peer's `kv_fetch` endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<RoutedPeer>,
}

/// A peer that holds the leading `blocks` blocks of a routed prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedPeer {
    pub worker: WorkerId,
    pub blocks: u32,
}

/// One step in the life of a routed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterEvent {
    pub lease: LeaseId,
    pub kind: RouterEventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RouterEventKind {
    /// Sent to `worker`: `prefill_tokens` to compute before its first token, `blocks` new
    /// blocks, `occupied` blocks in all while it runs.
    Routed {
        worker: WorkerId,
        prefill_tokens: u64,
        blocks: u64,
        occupied: u64,
    },
    PrefillDone,
    Finished,
}
