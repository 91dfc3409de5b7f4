//! Connectors carry the planner's decisions out: "run N replicas of pool P".
//!
//! - [`LocalConnector`]: asks the `dynamo-run serve` process that runs the pool, over the bus
//!   (`{ns}.serve.scale`, the instance whose discovery metadata lists the pool). That process
//!   starts and drains worker roles of its own supervisor (embedded bus) or child processes
//!   (NATS); either way a scale-down drains: the worker deregisters, finishes what it holds,
//!   then exits.
//! - Anything else implementing [`Connector`] (the simulator's virtual one; Kubernetes).

use std::time::Duration;

use async_trait::async_trait;
use dynamo_protocols::planner::{
    ScaleReply, ScaleRequest, ScalerMetadata, SCALER_COMPONENT, SCALE_ENDPOINT,
};
use dynamo_runtime::subject::{EndpointId, Namespace};
use dynamo_runtime::{CallOptions, Runtime, Target};

/// Why a connector could not carry a decision out (the planner retries with backoff).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    #[error("no scaler runs pool {pool:?} in namespace {namespace} (start the pool with `dynamo-run serve GRAPH` that lists it in a planner, or pick another connector)")]
    NoScaler { pool: String, namespace: String },
    #[error("the scaler of pool {pool:?} failed: {reason}")]
    Failed { pool: String, reason: String },
}

/// What a connector does.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// A short name for logs and decisions (`local`, `kubernetes`, `virtual`).
    fn name(&self) -> &'static str;
    /// Replicas of `pool` the connector runs now (draining ones excluded).
    async fn replicas(&self, pool: &str) -> Result<u32, ConnectorError>;
    /// Runs `replicas` of `pool` from now; returns what it runs after the change.
    async fn scale(&self, pool: &str, replicas: u32) -> Result<u32, ConnectorError>;
}

/// See the module.
pub struct LocalConnector {
    runtime: Runtime,
    namespace: Namespace,
    timeout: Duration,
}

impl LocalConnector {
    pub fn new(runtime: Runtime, namespace: Namespace) -> Self {
        Self {
            runtime,
            namespace,
            timeout: Duration::from_secs(10),
        }
    }

    async fn call(&self, req: ScaleRequest) -> Result<ScaleReply, ConnectorError> {
        let pool = req.component.clone();
        let failed = |reason: String| ConnectorError::Failed {
            pool: pool.clone(),
            reason,
        };
        let ep = EndpointId::new(self.namespace.as_str(), SCALER_COMPONENT, SCALE_ENDPOINT)
            .map_err(|e| failed(e.to_string()))?;
        let instances = self
            .runtime
            .discovery()
            .list(&ep.discovery_filter())
            .await
            .map_err(|e| failed(e.to_string()))?;
        let scaler = instances
            .iter()
            .find(|i| {
                i.endpoint == ep
                    && serde_json::from_value::<ScalerMetadata>(i.metadata.clone())
                        .is_ok_and(|m| m.components.contains(&pool))
            })
            .ok_or_else(|| ConnectorError::NoScaler {
                pool: pool.clone(),
                namespace: self.namespace.to_string(),
            })?;
        let options = CallOptions {
            timeout: Some(self.timeout),
            ..Default::default()
        };
        let replies: Vec<ScaleReply> = self
            .runtime
            .client()
            .call(Target::Instance(ep, scaler.instance), &req, options)
            .await
            .map_err(|e| failed(e.to_string()))?
            .collect()
            .await
            .map_err(|e| failed(e.to_string()))?;
        replies
            .into_iter()
            .next()
            .ok_or_else(|| failed("the scaler answered nothing".into()))
    }
}

#[async_trait]
impl Connector for LocalConnector {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn replicas(&self, pool: &str) -> Result<u32, ConnectorError> {
        let r = self
            .call(ScaleRequest {
                component: pool.to_string(),
                replicas: None,
            })
            .await?;
        Ok(r.replicas)
    }

    async fn scale(&self, pool: &str, replicas: u32) -> Result<u32, ConnectorError> {
        let r = self
            .call(ScaleRequest {
                component: pool.to_string(),
                replicas: Some(replicas),
            })
            .await?;
        Ok(r.replicas)
    }
}
