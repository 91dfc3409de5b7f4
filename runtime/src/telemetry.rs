//! Tracing and metrics.
//!
//! Logs go to stderr through `tracing-subscriber` with the filter from settings (`log`, or
//! `DYN_LOG`). Metrics use the `metrics` facade with one process-wide Prometheus recorder;
//! [`install_metrics`] installs it once and, given an address, serves `/metrics` there.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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

/// Installs the Prometheus recorder (once per process) and returns its handle, whose `render()`
/// is the text of `/metrics`. With `listen`, also serves it over HTTP there; requires a tokio
/// runtime.
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<PrometheusHandle, TelemetryError> {
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
            let (recorder, exporter) = PrometheusBuilder::new()
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
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| err(e.to_string()))?;
            handle
        }
    };
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}
