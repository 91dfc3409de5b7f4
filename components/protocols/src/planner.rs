//! The planner on the bus: the decisions it publishes (topic [`DECISIONS_TOPIC`] of the
//! planner component), and the `scale` endpoint through which its `local` connector asks the
//! `dynamo-run serve` process that runs a pool to change the pool's size.

use serde::{Deserialize, Serialize};

/// The component planners publish under (`dyn.ev.{ns}.planner.decisions.{instance}`).
pub const PLANNER_COMPONENT: &str = "planner";
/// The event topic of the planner's decisions.
pub const DECISIONS_TOPIC: &str = "decisions";
/// The component a `dynamo-run serve` process answers scale requests under, and its endpoint
/// (`{ns}.serve.scale`). Its discovery metadata lists the components it can scale
/// ([`ScalerMetadata`]).
pub const SCALER_COMPONENT: &str = "serve";
pub const SCALE_ENDPOINT: &str = "scale";

/// What a scaler publishes in discovery: the pools (component names) it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScalerMetadata {
    pub components: Vec<String>,
}

/// Run `replicas` of `component` (scale up or drain down); without `replicas`, only say what
/// runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub component: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

/// A pool as its scaler sees it after the request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleReply {
    pub component: String,
    /// Replicas the scaler runs now (started, starting or restarting), draining ones excluded.
    pub replicas: u32,
    /// Replicas still draining (they take no new requests, finish what they hold, then exit).
    pub draining: u32,
}

/// One pool's side of a decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolDecision {
    /// The component the pool is (its workers' component on the bus).
    pub component: String,
    /// `aggregated`, `decode` or `prefill`.
    pub kind: String,
    /// Replicas the load alone asks for (before min/max, budget and cooldown).
    pub wanted: u32,
    /// Replicas the planner runs from now.
    pub desired: u32,
    /// Replicas the connector ran before this decision.
    pub previous: u32,
    /// Workers of the pool registered on the bus (serving) when the decision was taken.
    pub ready: u32,
}

/// The load of an interval, observed or predicted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadFigures {
    /// Requests a second.
    pub rate: f64,
    /// Mean input and output tokens of a request.
    pub isl: f64,
    pub osl: f64,
    /// Cached share of the input tokens.
    pub cached: f64,
    /// Requests waiting in the pools' engine queues.
    pub waiting: f64,
}

/// Latencies the frontends saw over the interval (milliseconds; 0 without samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latencies {
    pub ttft_p50: f64,
    pub ttft_p99: f64,
    pub itl_p50: f64,
    pub itl_p99: f64,
}

/// One planner decision, with its inputs: published every interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlannerDecision {
    /// When it was taken (Unix milliseconds) and its interval number (from 1).
    pub at_ms: u64,
    pub interval: u64,
    pub model: String,
    pub observed: LoadFigures,
    pub predicted: LoadFigures,
    pub latency: Latencies,
    pub ttft_target_ms: f64,
    pub itl_target_ms: f64,
    pub pools: Vec<PoolDecision>,
    pub reason: String,
    /// A target that no replica count can meet (the pools run at max): why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmeetable: Option<String>,
    /// No frontend statistics arrived for this many intervals: the last decision holds.
    pub stale_intervals: u32,
    /// What carrying it out gave: `ok`, `unchanged`, or the connector's error (retried with
    /// backoff).
    pub applied: String,
}

/// One line: each pool's change, the reason, what was observed and predicted, and what
/// applying it gave.
impl std::fmt::Display for PlannerDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "decision {}:", self.interval)?;
        for (i, p) in self.pools.iter().enumerate() {
            write!(
                f,
                "{} {} {} -> {} (wanted {}, {} ready)",
                if i == 0 { "" } else { "," },
                p.component,
                p.previous,
                p.desired,
                p.wanted,
                p.ready
            )?;
        }
        let (o, p, l) = (&self.observed, &self.predicted, &self.latency);
        write!(
            f,
            "; {}; observed {:.1} req/s (isl {:.0}, osl {:.0}, {:.0}% cached, {:.0} waiting), predicted {:.1} req/s; TTFT p50 {:.1} p99 {:.1} ms (target {}), ITL p50 {:.1} p99 {:.1} ms (target {})",
            self.reason,
            o.rate,
            o.isl,
            o.osl,
            o.cached * 100.0,
            o.waiting,
            p.rate,
            l.ttft_p50,
            l.ttft_p99,
            self.ttft_target_ms,
            l.itl_p50,
            l.itl_p99,
            self.itl_target_ms,
        )?;
        if let Some(u) = &self.unmeetable {
            write!(f, "; UNMEETABLE: {u}")?;
        }
        if self.stale_intervals > 0 {
            write!(
                f,
                "; no statistics for {} interval(s)",
                self.stale_intervals
            )?;
        }
        write!(f, "; applied: {}", self.applied)
    }
}
