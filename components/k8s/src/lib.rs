//! The planner's `kubernetes` connector: each pool is a Deployment (`{prefix}{pool}`, e.g.
//! `dynamo-backend`, as in `config/k8s/`), read and resized through its `scale` subresource
//! (`GET`/`PATCH .../deployments/{name}/scale`), which is all the RBAC it needs
//! (`config/k8s/planner.yaml`). Scaling down is Kubernetes' own: the removed pods get SIGTERM
//! and a worker drains on it (deregisters, finishes what it holds within the shutdown grace),
//! so the pods' `terminationGracePeriodSeconds` must cover that grace.
//!
//! The runtime builds it with `--connector kubernetes` (binary feature `kubernetes`); it
//! reads the in-cluster service account, or the local kubeconfig outside a cluster.
#![forbid(unsafe_code)]

use async_trait::async_trait;
use dynamo_actors::planner::connector::{Connector, ConnectorError};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

/// A pool per Deployment `{prefix}{pool}` in one namespace.
pub struct KubernetesConnector {
    api: Api<Deployment>,
    namespace: String,
    prefix: String,
}

impl KubernetesConnector {
    /// Over `client` (any transport: a cluster, or a recorded exchange in tests), for the
    /// Deployments of `namespace`.
    pub fn new(client: Client, namespace: &str, prefix: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            prefix: prefix.to_string(),
        }
    }

    /// From the environment: the in-cluster service account (and its namespace unless one is
    /// given), or the kubeconfig outside a cluster.
    pub async fn from_env(namespace: Option<&str>, prefix: &str) -> Result<Self, String> {
        let client = Client::try_default().await.map_err(|e| {
            format!("cannot reach the Kubernetes API ({e}): run in a pod with a service account, or with a kubeconfig")
        })?;
        let ns = namespace
            .map(str::to_string)
            .unwrap_or_else(|| client.default_namespace().to_string());
        Ok(Self::new(client, &ns, prefix))
    }

    fn deployment(&self, pool: &str) -> String {
        format!("{}{pool}", self.prefix)
    }

    fn failed(&self, pool: &str, e: kube::Error) -> ConnectorError {
        let name = self.deployment(pool);
        let reason = match &e {
            kube::Error::Api(s) if s.code == 403 => format!(
                "the API server refused (403: {}); give the planner's service account get and patch on deployments/scale in namespace {} (config/k8s/planner.yaml)",
                s.message, self.namespace
            ),
            kube::Error::Api(s) if s.code == 404 => format!(
                "no Deployment {name} in namespace {} (404: {}); the pool {pool:?} must be a Deployment named {name}",
                self.namespace, s.message
            ),
            kube::Error::Api(s) => format!("the API server answered {}: {}", s.code, s.message),
            other => format!("Deployment {name}: {other}"),
        };
        ConnectorError::Failed {
            pool: pool.to_string(),
            reason,
        }
    }
}

#[async_trait]
impl Connector for KubernetesConnector {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn replicas(&self, pool: &str) -> Result<u32, ConnectorError> {
        let scale = self
            .api
            .get_scale(&self.deployment(pool))
            .await
            .map_err(|e| self.failed(pool, e))?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32)
    }

    async fn scale(&self, pool: &str, replicas: u32) -> Result<u32, ConnectorError> {
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        let scale = self
            .api
            .patch_scale(
                &self.deployment(pool),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| self.failed(pool, e))?;
        let now = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
        tracing::info!(deployment = %self.deployment(pool), namespace = %self.namespace, replicas = now, "scaled");
        Ok(now)
    }
}
