//! [`Runtime`]: the bus, discovery and an RPC client, chosen once from settings.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, LocalBus, NatsBus, NatsSettings};
use crate::config::{ConfigError, RuntimeSettings};
use crate::discovery::{Discovery, DiscoveryError, LocalDiscovery, NatsDiscovery};
use crate::rpc::{RpcClient, RpcError};
use crate::serve::ComponentInstance;
use crate::subject::{ComponentId, InstanceId};

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// One process's connection to the system. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Arc<dyn Bus>,
    discovery: Arc<dyn Discovery>,
    client: RpcClient,
    settings: RuntimeSettings,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("transport", &self.inner.bus.transport())
            .finish()
    }
}

impl Runtime {
    /// Connects to the bus named in `settings` (NATS, with JetStream discovery), or starts the
    /// embedded in-process bus when none is named.
    pub async fn start(settings: RuntimeSettings) -> Result<Self, RuntimeError> {
        settings.validate()?;
        match &settings.bus {
            Some(url) => {
                let nats = NatsBus::connect(
                    &NatsSettings::new(url.clone()).with_security(settings.nats.clone()),
                )
                .await?;
                let discovery = NatsDiscovery::connect(&nats, settings.discovery.clone()).await?;
                Self::with(Arc::new(nats), Arc::new(discovery), settings).await
            }
            None => {
                Self::with(
                    Arc::new(LocalBus::new()),
                    Arc::new(LocalDiscovery::new()),
                    settings,
                )
                .await
            }
        }
    }

    /// A runtime over a given bus and discovery (tests, or several runtimes on one local bus).
    pub async fn with(
        bus: Arc<dyn Bus>,
        discovery: Arc<dyn Discovery>,
        settings: RuntimeSettings,
    ) -> Result<Self, RuntimeError> {
        settings.validate()?;
        let client = RpcClient::new(bus.clone(), settings.rpc.clone()).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                bus,
                discovery,
                client,
                settings,
                shutdown: CancellationToken::new(),
            }),
        })
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.inner.bus
    }

    pub fn discovery(&self) -> &Arc<dyn Discovery> {
        &self.inner.discovery
    }

    /// The process's RPC client (one multiplexed reply inbox).
    pub fn client(&self) -> &RpcClient {
        &self.inner.client
    }

    pub fn settings(&self) -> &RuntimeSettings {
        &self.inner.settings
    }

    /// Cancelled when the process begins shutting down; roles watch it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Starts a new instance of `component` (random instance id) that can serve endpoints.
    /// `metadata` (string values) shows in the service protocol's answers.
    pub async fn component(
        &self,
        component: ComponentId,
        metadata: serde_json::Value,
    ) -> Result<ComponentInstance, RuntimeError> {
        Ok(ComponentInstance::start(
            component,
            InstanceId::random(),
            self.inner.bus.clone(),
            self.inner.discovery.clone(),
            self.inner.settings.rpc.clone(),
            metadata,
        )
        .await?)
    }

    /// Final step of a shutdown: removes this process's registrations and flushes the bus.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        self.inner.discovery.close().await;
        // Bounded: without the bus a flush would wait for a server that is gone.
        match tokio::time::timeout(std::time::Duration::from_secs(1), self.inner.bus.flush()).await
        {
            Ok(Err(e)) => tracing::debug!(error = %e, "flush on close failed"),
            Err(_) => tracing::debug!("flush on close timed out (the bus is gone)"),
            Ok(Ok(())) => {}
        }
    }
}

/// Waits for SIGTERM or SIGINT and returns which one came.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
