//! Tracing and metrics.
//!
//! Logs go to stderr through `tracing-subscriber` with the filter from settings (`log`, or
//! `DYN_LOG`). Metrics use the `metrics` facade with one process-wide Prometheus recorder;
//! [`install_metrics`] installs it once and, given an address, serves there `/metrics`,
//! `/live` (200 while the process runs) and `/health` (503 until the process calls
//! [`mark_ready`], then 200): what orchestrators probe.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("cannot start the metrics endpoint on {addr}: {reason}")]
    Metrics { addr: String, reason: String },
}

/// Installs the process's log subscriber (once; later calls are no-ops).
pub fn init_tracing(filter: &str) -> Result<(), TelemetryError> {
    let env_filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| TelemetryError::BadFilter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })?;
    // Colour codes only for a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    Ok(())
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static READY: AtomicBool = AtomicBool::new(false);

/// A health check of something this process runs (a supervisor's roles): whether it is
/// healthy, and what to show of it.
pub type HealthCheck = Arc<dyn Fn() -> (bool, serde_json::Value) + Send + Sync>;

static CHECKS: Mutex<Vec<(u64, HealthCheck)>> = Mutex::new(Vec::new());
static NEXT_CHECK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Registers a check that `/health` requires; returns its id for [`remove_health_check`].
pub fn add_health_check(check: HealthCheck) -> u64 {
    let id = NEXT_CHECK.fetch_add(1, Ordering::Relaxed);
    CHECKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((id, check));
    id
}

pub fn remove_health_check(id: u64) {
    CHECKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(i, _)| *i != id);
}

/// The registered checks together: healthy when all are, and what each shows.
pub fn health_checks() -> (bool, Vec<serde_json::Value>) {
    let checks: Vec<HealthCheck> = CHECKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    let mut ok = true;
    let mut shown = Vec::new();
    for c in checks {
        let (healthy, v) = c();
        ok &= healthy;
        shown.push(v);
    }
    (ok, shown)
}

/// `text` with every double-quoted part replaced by `"…"`.
fn unquoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut inside = true;
    for part in parts {
        if inside {
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

/// What a bus subscriber does with a message it cannot use (an undecodable payload, a
/// frame from an instance the call is not talking to): counts it in
/// `dynamo_bus_malformed_messages_total{kind}` and drops it. `kind` names the subject family
/// (`request`, `control`, `reply`, `kv_events`, `load`, `decision`, `statistics`, `discovery`,
/// ...). Anyone who can publish on the bus can send these, so the log is bounded: the first of
/// a kind is a warning, later ones a warning at most every ten seconds with how many came in
/// between (each one is logged at debug level).
pub fn malformed(kind: &'static str, detail: &dyn std::fmt::Display) {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    static SEEN: Mutex<Option<HashMap<&'static str, (Instant, u64)>>> = Mutex::new(None);
    metrics::counter!("dynamo_bus_malformed_messages_total", "kind" => kind).increment(1);
    let now = Instant::now();
    let warn_now = {
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        let seen = seen.get_or_insert_with(HashMap::new);
        match seen.get_mut(kind) {
            None => {
                seen.insert(kind, (now, 0));
                Some(0)
            }
            Some((last, since)) if now.duration_since(*last) >= Duration::from_secs(10) => {
                let n = std::mem::take(since);
                *last = now;
                Some(n)
            }
            Some((_, since)) => {
                *since += 1;
                None
            }
        }
    };
    // Decoding errors quote the values they choke on, which may be prompt text: the warning
    // leaves quoted values out (the debug line has them).
    match warn_now {
        Some(0) => tracing::warn!(
            kind,
            "dropped a malformed bus message: {}",
            unquoted(&detail.to_string())
        ),
        Some(n) => tracing::warn!(
            kind,
            "dropped a malformed bus message: {} ({n} more of this kind since the last warning)",
            unquoted(&detail.to_string())
        ),
        None => tracing::debug!(kind, "dropped a malformed bus message: {detail}"),
    }
}

/// The process serves what it is for (its roles started): `/health` answers 200 from now on,
/// as long as every registered [`HealthCheck`] passes. Call it before announcing readiness
/// (a `ready` line): a probe that follows the announcement must not see `starting`.
pub fn mark_ready() {
    READY.store(true, Ordering::Relaxed);
}

pub fn is_ready() -> bool {
    READY.load(Ordering::Relaxed)
}

async fn serve_http(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .route(
            "/live",
            get(|| async { (StatusCode::OK, "{\"status\":\"live\"}") }),
        )
        .route(
            "/health",
            get(|| async {
                let (healthy, checks) = health_checks();
                let (code, status) = match (is_ready(), healthy) {
                    (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
                    (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
                    (true, true) => (StatusCode::OK, "ready"),
                };
                let body = serde_json::json!({ "status": status, "checks": checks });
                (code, body.to_string())
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}
/// Serialises installation: two first callers must not both try to set the global recorder.
static INSTALL: Mutex<()> = Mutex::new(());

/// Histogram buckets by unit suffix: latencies (`*_seconds`) and lengths (`*_tokens`).
const SECONDS_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];
const TOKENS_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0,
    131072.0,
];

fn builder() -> Result<PrometheusBuilder, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_tokens".into()), &TOKENS_BUCKETS))
        .map_err(|e| e.to_string())
}

/// The kind of a described metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's name, kind and HELP text.
pub type MetricHelp = (&'static str, MetricKind, &'static str);

/// The runtime's own series.
const RUNTIME_METRICS: &[MetricHelp] = &[
    (
        "dynamo_bus_malformed_messages_total",
        MetricKind::Counter,
        "Bus messages a subscriber dropped as unusable (undecodable, or from an instance it is not talking to), by subject kind.",
    ),
    (
        "dynamo_bus_dropped_messages_total",
        MetricKind::Counter,
        "Messages the in-process bus dropped because a subscriber's queue was full.",
    ),
    (
        "dynamo_rpc_client_errors_total",
        MetricKind::Counter,
        "Calls that ended in an error at the caller, by error class.",
    ),
    (
        "dynamo_runtime_bad_requests_total",
        MetricKind::Counter,
        "Requests an endpoint refused as malformed, by reason.",
    ),
    (
        "dynamo_runtime_overloaded_total",
        MetricKind::Counter,
        "Requests an endpoint refused because its in-flight limit was reached.",
    ),
    (
        "dynamo_runtime_requests_total",
        MetricKind::Counter,
        "Requests an endpoint accepted.",
    ),
];

static DESCRIBED: Mutex<Vec<&'static [MetricHelp]>> = Mutex::new(Vec::new());

fn apply(catalog: &[MetricHelp]) {
    for &(name, kind, help) in catalog {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(name, help),
            MetricKind::Gauge => metrics::describe_gauge!(name, help),
            MetricKind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// Gives `catalog`'s metrics their HELP text on `/metrics`, whether the recorder is installed
/// already or later. Each crate describes its own series once, where its roles start.
pub fn describe(catalog: &'static [MetricHelp]) {
    let mut all = DESCRIBED.lock().unwrap_or_else(|p| p.into_inner());
    if all.iter().any(|c| std::ptr::eq(*c, catalog)) {
        return;
    }
    all.push(catalog);
    if HANDLE.get().is_some() {
        apply(catalog);
    }
}

/// Installs the Prometheus recorder (once per process) and returns its handle, whose `render()`
/// is the text of `/metrics`. With `listen`, also serves it over HTTP there; requires a tokio
/// runtime.
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, TelemetryError> {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = HANDLE.get() {
        if listen.is_some() {
            return Err(TelemetryError::Metrics {
                addr: format!("{listen:?}"),
                reason: "metrics are already installed in this process".into(),
            });
        }
        return Ok(h.clone());
    }
    let err = |reason: String| TelemetryError::Metrics {
        addr: listen.map(|a| a.to_string()).unwrap_or_default(),
        reason,
    };
    let handle = match listen {
        Some(addr) => {
            let std_listener = std::net::TcpListener::bind(addr).map_err(|e| err(e.to_string()))?;
            std_listener
                .set_nonblocking(true)
                .map_err(|e| err(e.to_string()))?;
            let listener =
                tokio::net::TcpListener::from_std(std_listener).map_err(|e| err(e.to_string()))?;
            let recorder = builder().map_err(err)?.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| err(e.to_string()))?;
            tokio::spawn(serve_http(listener, handle.clone()));
            handle
        }
        None => {
            let recorder = builder().map_err(err)?.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| err(e.to_string()))?;
            handle
        }
    };
    let _ = HANDLE.set(handle.clone());
    apply(RUNTIME_METRICS);
    for catalog in DESCRIBED.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        apply(catalog);
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn warnings_leave_quoted_values_out() {
        let e = r#"invalid type: string "my secret prompt", expected u32 at "x""#;
        let shown = super::unquoted(e);
        assert_eq!(shown, r#"invalid type: string "…", expected u32 at "…""#);
        // An unterminated quote hides everything after it.
        assert_eq!(super::unquoted(r#"bad "half"#), r#"bad "…""#);
        assert_eq!(super::unquoted("no quotes"), "no quotes");
    }
}
