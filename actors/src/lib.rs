//! The serving roles as `ractor` actors bound to the bus.
//!
//! - [`frontend`]: the OpenAI HTTP API, model discovery, simple routing;
//! - [`membership`]: the one view of discovery (live workers, their cards and kinds) that
//!   the frontend and the router read;
//! - [`planner`]: scales worker pools to hold latency targets (connectors carry it out);
//! - [`router`]: the KV-aware router (prefix index, load, accounting) and its event ingest;
//! - [`worker`]: hosts an engine on `generate` and publishes its model card;
//! - [`echo`]: the runtime's smoke-test role;
//! - [`supervisor`]: the root supervisor that starts, restarts and stops a process's roles.
#![forbid(unsafe_code)]

pub mod echo;
pub mod frontend;
pub mod membership;
pub mod planner;
pub mod router;
pub mod supervisor;
pub mod worker;

use dynamo_runtime::telemetry::{MetricHelp, MetricKind};

/// HELP text of every series the roles record (the runtime describes its own).
const METRICS: &[MetricHelp] = &[
    (frontend::metrics::REQUESTS, MetricKind::Counter, "Requests the frontend finished, by model, API endpoint and status."),
    (frontend::metrics::INFLIGHT, MetricKind::Gauge, "Requests in flight at the frontend, by model."),
    (frontend::metrics::TTFT, MetricKind::Histogram, "Seconds from a request's arrival to its first generated token."),
    (frontend::metrics::ITL, MetricKind::Histogram, "Seconds between consecutive generated tokens of a stream."),
    (frontend::metrics::DURATION, MetricKind::Histogram, "Seconds from a request's arrival to its end."),
    (frontend::metrics::INPUT_TOKENS, MetricKind::Histogram, "Prompt tokens per request."),
    (frontend::metrics::OUTPUT_TOKENS, MetricKind::Histogram, "Generated tokens per request."),
    ("dynamo_frontend_router_fallbacks_total", MetricKind::Counter, "Requests routed round-robin because no router component answered."),
    ("dynamo_frontend_migrations_total", MetricKind::Counter, "Streaming requests moved to another worker after their worker died or failed mid-stream, by cause."),
    ("dynamo_frontend_retries_total", MetricKind::Counter, "Requests sent to another worker before their first token because one was gone, failed, overloaded or draining, by cause."),
    ("dynamo_disagg_decisions_total", MetricKind::Counter, "Where requests to decode workers were prefilled, by decision: remote, local_short (little uncached prompt on the decode worker), local_saturated (prefill workers' queues over the bound), local_no_prefill (no prefill worker)."),
    ("dynamo_disagg_remote_prefills_total", MetricKind::Counter, "Requests a decode worker sent to a prefill worker, by outcome: ok, fallback (prefilled locally instead), failed (failed by configuration)."),
    ("dynamo_disagg_fallbacks_total", MetricKind::Counter, "Remote prefills a decode worker gave up on, by reason."),
    ("dynamo_kv_transfer_bytes_total", MetricKind::Counter, "KV bytes a prefill worker wrote into decode workers' memory, by backend."),
    ("dynamo_kv_transfer_seconds", MetricKind::Histogram, "Seconds a prefill worker's KV transfer took, by backend."),
    ("dynamo_kv_transfer_errors_total", MetricKind::Counter, "KV transfers that failed, by error."),
    ("dynamo_router_approximate", MetricKind::Gauge, "1 while the KV router predicts cached prefixes from its own decisions (no KV events seen), else 0."),
    ("dynamo_router_bad_events_total", MetricKind::Counter, "KV events the router could not apply, by reason."),
    ("dynamo_router_decision_publish_errors_total", MetricKind::Counter, "Routing decisions that could not be shared with the other routers."),
    ("dynamo_router_event_lag_seconds", MetricKind::Histogram, "Seconds from a KV event batch's arrival to its application to the index."),
    ("dynamo_router_expired_leases_total", MetricKind::Counter, "Requests routed by another router whose finish never arrived (accounting expired)."),
    ("dynamo_router_hit_ratio", MetricKind::Histogram, "Fraction of a routed prompt's blocks cached on the chosen worker."),
    ("dynamo_router_index_blocks", MetricKind::Gauge, "(worker, block) pairs in the router's prefix index."),
    ("dynamo_router_ingest_dropped_total", MetricKind::Counter, "Event or load messages the router's ingest dropped because it fell behind (each dropped event batch leads to a resync)."),
    ("dynamo_router_overlap_blocks", MetricKind::Histogram, "Cached prompt blocks on the chosen worker per routed request."),
    ("dynamo_router_peer_fetches_total", MetricKind::Counter, "Requests the router told to fetch their prefix from a peer worker (cluster-wide KV sharing)."),
    ("dynamo_router_resyncs_total", MetricKind::Counter, "Times the router rebuilt a worker's entries from its KV dump."),
    ("dynamo_router_routing_seconds", MetricKind::Histogram, "Seconds the router spent choosing a worker."),
    ("dynamo_router_shared_leases", MetricKind::Gauge, "Requests routed by other routers that this router accounts for."),
    ("dynamo_router_workers", MetricKind::Gauge, "Workers listed in discovery that the router indexes (prefill workers included)."),
    ("dynamo_planner_desired_replicas", MetricKind::Gauge, "Replicas the planner runs per pool from its last decision."),
    ("dynamo_planner_ready_replicas", MetricKind::Gauge, "Workers of the pool registered on the bus (serving) at the planner's last decision."),
    ("dynamo_planner_unmeetable", MetricKind::Gauge, "1 while no replica count meets the planner's latency targets (the pools run at max), else 0."),
    ("dynamo_planner_stale_intervals", MetricKind::Gauge, "Planner intervals in a row without frontend statistics (from 2 the last decision holds)."),
    ("dynamo_planner_predicted_rate", MetricKind::Gauge, "Requests a second the planner predicts for the next interval."),
    ("dynamo_planner_connector_errors_total", MetricKind::Counter, "Times the planner's connector failed to carry a decision out (retried with backoff)."),
    ("dynamo_planner_decisions_total", MetricKind::Counter, "Planner decisions, by direction: up, down, hold."),
    ("dynamo_supervisor_role_restarts_total", MetricKind::Counter, "Roles the process supervisor restarted after a failure, by role kind."),
    ("dynamo_worker_active_blocks", MetricKind::Gauge, "KV blocks in use on the worker's engine."),
    ("dynamo_worker_engine_restarts_total", MetricKind::Counter, "Times the worker restarted its failed engine."),
    ("dynamo_worker_kv_tier_blocks", MetricKind::Gauge, "KV blocks held in a lower tier of the worker (tier: host RAM, disk)."),
    ("dynamo_worker_kv_tier_bytes", MetricKind::Gauge, "Bytes held in a lower tier of the worker (tier: host RAM, disk)."),
    ("dynamo_worker_kv_tier_unusable", MetricKind::Gauge, "1 when the configured disk tier's directory could not be used (the worker serves without it; the log says why)."),
    ("dynamo_worker_kv_offloaded_blocks_total", MetricKind::Counter, "KV blocks copied down into a tier: evicted device blocks into host, blocks leaving host into disk."),
    ("dynamo_worker_kv_offloaded_bytes_total", MetricKind::Counter, "Bytes of KV blocks copied down into a tier."),
    ("dynamo_worker_kv_offload_dropped_total", MetricKind::Counter, "KV blocks not copied down, by tier and reason (queue_full: the offload queue was full; filtered: used by fewer than three requests; write_error: the disk write failed)."),
    ("dynamo_worker_kv_tier_evicted_total", MetricKind::Counter, "KV blocks a lower tier pushed out (least recently used) to make room."),
    ("dynamo_worker_kv_peer_fetches_total", MetricKind::Counter, "Prefix fetches from a peer worker the router suggested, by outcome: ok, or why nothing came (cached, not_worth, no_blocks, staging_full, peer_failed, timeout, gone, import, unsupported, endpoint, cancelled)."),
    ("dynamo_worker_kv_peer_fetched_blocks_total", MetricKind::Counter, "KV blocks fetched from peer workers into the device pool (they count as device hits when the request finds them)."),
    ("dynamo_worker_kv_peer_fetch_seconds", MetricKind::Histogram, "Seconds a prefix fetch from a peer took, reservation to import."),
    ("dynamo_worker_kv_peer_served_blocks_total", MetricKind::Counter, "KV blocks this worker sent to peers that fetched them."),
    ("dynamo_worker_kv_onboarded_blocks_total", MetricKind::Counter, "KV blocks brought back from a lower tier into the device pool instead of being recomputed."),
    ("dynamo_worker_kv_onboard_declined_total", MetricKind::Counter, "Prefixes found in a lower tier but recomputed, the cost model preferring it."),
    ("dynamo_worker_kv_onboard_seconds", MetricKind::Histogram, "Seconds one onboarding took (an admitted request's blocks copied up from the lower tiers; a simulation's copy time; requests onboarded between two load reports are recorded at their mean)."),
    ("dynamo_worker_kv_refused_blocks_total", MetricKind::Counter, "Disk KV block files refused and deleted, never served, by reason (corrupt: truncated, unreadable or failing the checksum; foreign: another model or layout)."),
    ("dynamo_worker_kv_recovered_blocks_total", MetricKind::Counter, "Disk KV blocks found valid when the engine started (a warm restart)."),
    ("dynamo_worker_kv_prompt_tokens_total", MetricKind::Counter, "Prompt tokens admitted by the worker's engine (the denominator of the hit ratios)."),
    ("dynamo_worker_kv_hit_tokens_total", MetricKind::Counter, "Prompt tokens served from cached KV instead of being computed, by the tier they came from (device, host, disk)."),
    ("dynamo_worker_kv_event_batches_total", MetricKind::Counter, "KV event batches the worker published."),
    ("dynamo_worker_queued_prefill_tokens", MetricKind::Gauge, "Prompt tokens waiting to be prefilled on the worker's engine."),
    ("dynamo_worker_running_requests", MetricKind::Gauge, "Requests running on the worker's engine."),
    ("dynamo_worker_total_blocks", MetricKind::Gauge, "KV blocks of the worker's engine."),
    ("dynamo_worker_waiting_requests", MetricKind::Gauge, "Requests waiting for admission on the worker's engine."),
];

/// The delay before restart number `failures` (from 1) of something that keeps failing:
/// `initial`, doubling with each failure, at most `max`.
pub(crate) fn backoff(
    initial: std::time::Duration,
    max: std::time::Duration,
    failures: u32,
) -> std::time::Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    initial.saturating_mul(factor).min(max)
}

/// Calls `f(last subject token, payload)` for each message on `pattern` (`who` names the
/// follower in a log line should the subscription fail) until `f` returns false or the
/// subscription ends; abort the task to stop it sooner.
pub(crate) fn follow(
    runtime: &dynamo_runtime::Runtime,
    pattern: dynamo_runtime::subject::SubjectPattern,
    who: &'static str,
    mut f: impl FnMut(&dynamo_runtime::subject::Subject, bytes::Bytes) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let bus = runtime.bus().clone();
    tokio::spawn(async move {
        let mut sub = match bus.subscribe(pattern, None).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "{who} cannot subscribe to the bus");
                return;
            }
        };
        while let Some(m) = sub.next().await {
            if !f(&m.subject, m.payload) {
                return;
            }
        }
    })
}

/// Gives the roles' metrics their HELP text (idempotent; called where roles start).
pub(crate) fn describe_metrics() {
    dynamo_runtime::telemetry::describe(METRICS);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn backoff_doubles_from_initial_up_to_max() {
        let (i, m) = (Duration::from_millis(200), Duration::from_secs(1));
        let delays: Vec<u128> = (1..=5)
            .map(|f| super::backoff(i, m, f).as_millis())
            .collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        assert_eq!(
            super::backoff(i, m, 0),
            i,
            "no failure yet: the initial delay"
        );
        assert_eq!(super::backoff(i, m, u32::MAX), m);
    }
}
