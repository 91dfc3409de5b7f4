//! Configuration: parsed once at startup into typed, validated settings.
//!
//! Precedence, lowest first: built-in defaults < a YAML file < `DYN_`-prefixed environment
//! variables (nested keys joined by `__`, e.g. `DYN_RPC__HEARTBEAT_INTERVAL=500ms`) < command
//! line overrides. This is the only module that reads the environment. Durations are written
//! the human way (`250ms`, `5s`, `2m`).

use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::bus::NatsSecurity;
use crate::discovery::DiscoverySettings;
use crate::rpc::RpcSettings;

/// Why configuration was refused. The message names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Settings of the runtime itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeSettings {
    /// `nats://HOST:PORT` (or `tls://HOST:PORT`) to use a nats-server; absent for the
    /// embedded in-process bus.
    pub bus: Option<String>,
    /// Credentials and TLS towards nats-server (secrets never shown by `Debug`).
    pub nats: NatsSecurity,
    pub discovery: DiscoverySettings,
    pub rpc: RpcSettings,
    /// How long a graceful shutdown waits for open requests before cancelling them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A `tracing` filter, e.g. `info` or `dynamo_runtime=debug,info`.
    pub log: String,
    /// Serve Prometheus metrics on this port (all interfaces) when set.
    pub metrics_port: Option<u16>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            bus: None,
            nats: NatsSecurity::default(),
            discovery: DiscoverySettings::default(),
            rpc: RpcSettings::default(),
            shutdown_grace: Duration::from_secs(30),
            log: "info".to_string(),
            metrics_port: None,
        }
    }
}

impl RuntimeSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.bus {
            if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                return Err(ConfigError::Invalid(format!(
                    "bus {url:?} must be a nats:// URL (leave it unset for the embedded bus)"
                )));
            }
        }
        if self.bus.is_some() {
            self.nats.validate().map_err(ConfigError::Invalid)?;
        }
        self.discovery.validate().map_err(ConfigError::Invalid)?;
        self.rpc.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }
}

/// Loads `T` from defaults < `file` < `DYN_*` env < `overrides` (a serializable struct whose
/// `None` fields are skipped).
pub fn load<T>(file: Option<&Path>, overrides: &impl Serialize) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.display().to_string()));
        }
        figment = figment.merge(Yaml::file(path));
    }
    figment
        .merge(Env::prefixed("DYN_").split("__"))
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(|e| ConfigError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct Cli {
        #[serde(skip_serializing_if = "Option::is_none")]
        log: Option<String>,
    }

    // figment's `Jail` fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    #[test]
    fn precedence_defaults_file_env_cli() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rt.yaml",
                "log: warn\nshutdown_grace: 7s\nrpc:\n  heartbeat_interval: 200ms\n  heartbeat_timeout: 1s\n",
            )?;
            let file = Some(Path::new("rt.yaml"));
            let s: RuntimeSettings = load(file, &Cli::default()).unwrap();
            assert_eq!(s.log, "warn");
            assert_eq!(s.shutdown_grace, Duration::from_secs(7));
            assert_eq!(s.rpc.heartbeat_interval, Duration::from_millis(200));
            assert_eq!(s.rpc.max_inflight, RpcSettings::default().max_inflight);

            jail.set_env("DYN_LOG", "debug");
            jail.set_env("DYN_DISCOVERY__LEASE", "9s");
            let s: RuntimeSettings = load(file, &Cli::default()).unwrap();
            assert_eq!(s.log, "debug");
            assert_eq!(s.discovery.lease, Duration::from_secs(9));

            let cli = Cli {
                log: Some("error".into()),
            };
            let s: RuntimeSettings = load(file, &cli).unwrap();
            assert_eq!(s.log, "error");
            Ok(())
        });
    }

    #[allow(clippy::result_large_err)]
    #[test]
    fn nats_credentials_come_from_env_and_never_show() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ca.pem", "-----BEGIN CERTIFICATE-----\n")?;
            jail.create_file(
                "rt.yaml",
                "bus: tls://nats:4222\nnats:\n  tls:\n    ca_file: ca.pem\n",
            )?;
            jail.set_env("DYN_NATS__USER", "worker");
            jail.set_env("DYN_NATS__PASSWORD", "hunter2-secret");
            let s: RuntimeSettings = load(Some(Path::new("rt.yaml")), &Cli::default()).unwrap();
            assert_eq!(s.nats.user.as_deref(), Some("worker"));
            assert_eq!(s.nats.password.as_ref().unwrap().expose(), "hunter2-secret");
            assert_eq!(s.nats.tls.ca_file.as_deref(), Some(Path::new("ca.pem")));
            s.validate().unwrap();
            let shown = format!("{s:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("[redacted]"), "{shown}");
            // A child process gets the same settings back.
            let env = s.nats.to_env();
            assert!(env.contains(&("DYN_NATS__PASSWORD".into(), "hunter2-secret".into())));
            assert!(env.contains(&("DYN_NATS__TLS__CA_FILE".into(), "ca.pem".into())));

            // Contradictions and unreadable files are refused, naming the key.
            jail.set_env("DYN_NATS__TOKEN", "t0ken");
            let s: RuntimeSettings = load(Some(Path::new("rt.yaml")), &Cli::default()).unwrap();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("one of"), "{err}");
            assert!(!err.contains("hunter2") && !err.contains("t0ken"), "{err}");
            Ok(())
        });
        let bad = |nats: NatsSecurity| {
            RuntimeSettings {
                bus: Some("nats://127.0.0.1:4222".into()),
                nats,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        let e = bad(NatsSecurity {
            user: Some("w".into()),
            ..Default::default()
        });
        assert!(e.contains("user and password go together"), "{e}");
        let e = bad(NatsSecurity {
            creds_file: Some("/nonexistent/w.creds".into()),
            ..Default::default()
        });
        assert!(
            e.contains("nats.creds_file") && e.contains("/nonexistent/w.creds"),
            "{e}"
        );
        let e = bad(NatsSecurity {
            nkey_seed: Some(crate::bus::Secret::new("UABC")),
            ..Default::default()
        });
        assert!(e.contains("nkey_seed"), "{e}");
        let e = bad(NatsSecurity {
            tls: crate::bus::NatsTls {
                cert_file: Some("/etc/hostname".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(e.contains("cert_file and key_file"), "{e}");
    }

    #[test]
    fn the_shipped_settings_file_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/runtime.yaml");
        let from_file: RuntimeSettings = Figment::from(Yaml::file(&path)).extract().unwrap();
        assert_eq!(from_file, RuntimeSettings::default());
    }

    #[allow(clippy::result_large_err)]
    #[test]
    fn bad_values_are_refused_with_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.yaml", "rpc:\n  heartbeat_interval: soon\n")?;
            let err = load::<RuntimeSettings>(Some(Path::new("bad.yaml")), &Cli::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("heartbeat_interval"), "{err}");
            jail.create_file("typo.yaml", "rpc:\n  heartbeat_intervall: 1s\n")?;
            let err = load::<RuntimeSettings>(Some(Path::new("typo.yaml")), &Cli::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("heartbeat_intervall"), "{err}");
            let missing = load::<RuntimeSettings>(Some(Path::new("nope.yaml")), &Cli::default());
            assert!(matches!(missing, Err(ConfigError::MissingFile(_))));
            Ok(())
        });
        let s = RuntimeSettings {
            rpc: RpcSettings {
                heartbeat_timeout: Duration::from_millis(10),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(s.validate().is_err());
        let s = RuntimeSettings {
            bus: Some("localhost:4222".into()),
            ..Default::default()
        };
        assert!(s.validate().is_err());
    }
}
