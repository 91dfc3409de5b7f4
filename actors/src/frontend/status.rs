//! The live status page: `GET /status` (one self-contained HTML page, no external assets)
//! refreshed from `GET /status.json`. What a person watching a fleet scale wants at a glance:
//! per pool the desired and ready replicas with the planner's last decisions and reasons, per
//! worker its KV usage, queue and running requests, the share of prompt tokens found cached,
//! and TTFT/ITL against the planner's targets.
//!
//! The frontend follows the namespace's planner decisions and workers' load reports on the
//! bus; its own request statistics are those it publishes for the planner.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dynamo_protocols::kv::{LoadReport, LOAD_TOPIC};
use dynamo_protocols::planner::{PlannerDecision, DECISIONS_TOPIC, PLANNER_COMPONENT};
use dynamo_protocols::stats::FrontendStats;
use dynamo_runtime::serve::decode_event;
use dynamo_runtime::subject::{ComponentId, Namespace, Topic};
use dynamo_runtime::Runtime;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::membership::Member;

/// Decisions the page lists.
const DECISIONS: usize = 20;

/// The page itself.
pub const PAGE: &str = include_str!("status.html");

#[derive(Default)]
struct State {
    decisions: VecDeque<PlannerDecision>,
    /// Each worker's last load report, still encoded, and when it came.
    /// Per instance: the component whose subject it came on, the report, when.
    loads: HashMap<u64, (String, bytes::Bytes, Instant)>,
    frontend: Option<FrontendStats>,
}

/// What the page shows, kept current from the bus.
#[derive(Default)]
pub struct Board {
    namespace: String,
    state: Mutex<State>,
}

impl Board {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Follows `namespace`'s planner decisions and load reports until `stop`.
    pub fn start(
        runtime: &Runtime,
        namespace: &Namespace,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let board = Arc::new(Board {
            namespace: namespace.to_string(),
            ..Default::default()
        });
        let topic = |t: &str| Topic::new(t).map_err(|e| e.to_string());
        let decisions = ComponentId::new(namespace.as_str(), PLANNER_COMPONENT)
            .map_err(|e| e.to_string())?
            .event_pattern(&topic(DECISIONS_TOPIC)?);
        let loads = ComponentId::namespace_event_pattern(namespace, &topic(LOAD_TOPIC)?);
        let b = board.clone();
        let decisions = crate::follow(runtime, decisions, "the status page", move |_, payload| {
            if let Ok(d) = decode_event::<PlannerDecision>(&payload) {
                b.with(|s| {
                    s.decisions.push_front(d);
                    s.decisions.truncate(DECISIONS);
                });
            }
            true
        });
        // Reports are kept as they came and decoded only when the page is read: a frontend
        // follows every worker's load whether or not anyone looks.
        let b = board.clone();
        let loads = crate::follow(
            runtime,
            loads,
            "the status page",
            move |subject, payload| {
                if let Some((component, worker)) = subject.event_source() {
                    if let Ok(w) = dynamo_runtime::InstanceId::parse_hex(worker) {
                        let entry = (component.to_string(), payload, Instant::now());
                        b.with(|s| s.loads.insert(w.as_u64(), entry));
                    }
                }
                true
            },
        );
        tokio::spawn(async move {
            stop.cancelled().await;
            decisions.abort();
            loads.abort();
        });
        Ok(board)
    }

    /// This frontend's statistics of its last interval.
    pub fn frontend(&self, stats: &FrontendStats) {
        self.with(|s| s.frontend = Some(stats.clone()));
    }

    /// The page's data, with the live workers `members`.
    pub fn snapshot(&self, members: &[Arc<Member>]) -> Value {
        self.with(|s| {
            // Reports of workers that left are dropped.
            s.loads
                .retain(|w, _| members.iter().any(|m| m.instance.as_u64() == *w));
            let mut workers: Vec<Value> = members
                .iter()
                .map(|m| {
                    let load = s.loads.get(&m.instance.as_u64()).and_then(|(c, p, at)| {
                        // Only a report its own instance stamped, on its own component's
                        // subject (no worker speaks for another).
                        if *c != m.endpoint.component.component.as_str() {
                            return None;
                        }
                        let r = decode_event::<LoadReport>(p)
                            .ok()
                            .filter(|r| r.worker.map(|w| w.0) == Some(m.instance.as_u64()))?;
                        Some((r, at.elapsed().as_millis() as u64))
                    });
                    let (r, age) = match &load {
                        Some((r, age)) => (Some(r), Some(*age)),
                        None => (None, None),
                    };
                    json!({
                        "instance": m.instance.to_string(),
                        "component": m.endpoint.component.component.as_str(),
                        "kind": format!("{:?}", m.kind).to_lowercase(),
                        "model": m.card.name,
                        "kv_usage": r.map(|r| r.active_blocks as f64 / r.total_blocks.max(1) as f64),
                        "active_blocks": r.map(|r| r.active_blocks),
                        "total_blocks": r.map(|r| r.total_blocks),
                        "running": r.map(|r| r.running_requests),
                        "waiting": r.map(|r| r.waiting_requests),
                        "report_age_ms": age,
                    })
                })
                .collect();
            workers.sort_by(|a, b| {
                (a["component"].as_str(), a["instance"].as_str())
                    .cmp(&(b["component"].as_str(), b["instance"].as_str()))
            });
            let last = s.decisions.front();
            let (mut requests, mut inflight, mut input, mut cached) = (0u64, 0u64, 0u64, 0u64);
            let mut latency = json!(null);
            let mut interval_ms = 0;
            if let Some(f) = &s.frontend {
                inflight = f.inflight;
                interval_ms = f.interval_ms;
                for m in f.models.values() {
                    requests += m.requests;
                    input += m.input_tokens;
                    cached += m.cached_tokens;
                }
                // The busiest model's latencies.
                if let Some(m) = f.models.values().max_by_key(|m| m.ttft_ms.count + m.itl_ms.count) {
                    latency = json!({
                        "ttft_p50_ms": m.ttft_ms.p50,
                        "ttft_p99_ms": m.ttft_ms.p99,
                        "itl_p50_ms": m.itl_ms.p50,
                        "itl_p99_ms": m.itl_ms.p99,
                    });
                }
            }
            json!({
                "at_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default(),
                "namespace": self.namespace,
                "targets": last.map(|d| json!({"ttft_ms": d.ttft_target_ms, "itl_ms": d.itl_target_ms})),
                "pools": last.map(|d| d.pools.clone()).unwrap_or_default(),
                "decisions": s.decisions,
                "frontend": {
                    "interval_ms": interval_ms,
                    "requests_per_second": if interval_ms > 0 { requests as f64 * 1e3 / interval_ms as f64 } else { 0.0 },
                    "inflight": inflight,
                    "cached_ratio": if input > 0 { cached as f64 / input as f64 } else { 0.0 },
                    "latency": latency,
                },
                "workers": workers,
            })
        })
    }
}
