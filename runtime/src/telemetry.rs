//! Tracing and metrics.
//!
//! Logs go to stderr through `tracing-subscriber` with the filter from settings (`log`, or
//! `DYN_LOG`). Metrics use the `metrics` facade with one process-wide Prometheus recorder;
//! [`install_metrics`] installs it once and, given an address, serves `/metrics` there.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .try_init();
    Ok(())
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
/// Serialises installation: two first callers must not both try to set the global recorder.
static INSTALL: Mutex<()> = Mutex::new(());

/// Histogram buckets by unit suffix: latencies (`*_seconds`) and lengths (`*_tokens`).
const SECONDS_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
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
            let (recorder, exporter) = builder()
                .map_err(err)?
                .with_http_listener(addr)
                .build()
                .map_err(|e| err(e.to_string()))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| err(e.to_string()))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "metrics endpoint stopped");
                }
            });
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
    Ok(handle)
}
