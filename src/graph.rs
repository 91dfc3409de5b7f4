//! Component graphs: a deployment declared once in YAML (`config/*.yaml`) and started with
//! `dynamo-run serve`.
//!
//! ```yaml
//! namespace: dynamo            # optional, default "dynamo"
//! defaults:                    # settings every component inherits (and may override)
//!   model_path: models/tiny
//! components:
//!   backend:                   # the component's name on the bus
//!     role: worker             # frontend | router | worker | prefill | decode (planner and
//!     replicas: 4              #   offloader are reserved for later roles)
//!     engine: mocker           # worker: echo | mocker | native
//!     num_gpu_blocks: 1024
//!   router:
//!     role: router
//!   frontend:
//!     role: frontend
//!     http_port: 8080
//!     router_mode: kv
//!     depends_on: [router]     # optional; roles already start workers, routers, frontends
//! ```
//!
//! Settings resolve with one precedence: `defaults` < the component's own keys < environment
//! (`DYN_GRAPH__{COMPONENT}__{KEY}`, `DEFAULTS` for defaults) < `--set component.key=value`.
//! Validation happens before anything starts and names the file, line and key: unknown keys
//! or roles, bad references, dependency cycles, impossible replica counts, a worker without an
//! engine or model, and port clashes.
//!
//! A graph compiles to one `dynamo-run` command line per component replica
//! ([`Component::args`]): `serve` runs those in this process on the embedded bus, or as
//! supervised child processes with `--bus`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use dynamo_protocols::llm::WorkerKind;
use dynamo_runtime::subject::EndpointId;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::launch::{Input, Output};
use crate::settings::{to_flags, EngineKind, Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Worker,
    Router,
    Frontend,
    Prefill,
    Decode,
    Planner,
    Offloader,
}

impl Role {
    /// Start order when `depends_on` says nothing: workers, then routers, then frontends.
    fn rank(self) -> u8 {
        match self {
            Role::Worker | Role::Prefill | Role::Decode | Role::Offloader => 0,
            Role::Router => 1,
            Role::Frontend | Role::Planner => 2,
        }
    }
}

/// Settings every role takes.
const COMMON_KEYS: &[&str] = &[
    "model_path",
    "model_name",
    "block_size",
    "metrics_port",
    "log",
];
const WORKER_KEYS: &[&str] = &[
    "engine",
    "endpoint",
    "mocker_panic_at_step",
    "mocker_panic_on_token",
    "mocker_stall_at_step",
    "mocker_stall_ms",
    "mocker_drop_bus_after_ms",
    "num_gpu_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "speedup_ratio",
    "echo_delay_ms",
    "engine_url",
    "engine_kind",
    "engine_model",
    "kv_events",
    "kv_events_topic",
    "kv_events_replay",
    "kv_cache_memory",
    "dtype",
    "kv_cache_dtype",
    "host_kv_cache",
    "mocker_host_gbps",
    "disk_kv_cache",
    "disk_kv_dir",
    "disk_min_uses",
    "mocker_disk_gbps",
    "mocker_disk_latency_ms",
    "mocker_transfer_gbps",
    "mocker_transfer_latency_ms",
    "mocker_kv_bytes_per_token",
    "kv_transfer",
    "kv_transfer_listen",
    "kv_staging_blocks",
    "kv_share",
    "prefill_fallback",
    "prefill_timeout_ms",
];
const ROUTER_KEYS: &[&str] = &[
    "router_mode",
    "kv_overlap_score_weight",
    "kv_host_credit",
    "kv_disk_credit",
    "kv_peer_credit",
    "router_temperature",
    "busy_threshold",
    "disagg_min_remote_tokens",
    "disagg_max_prefill_queue",
];
const FRONTEND_KEYS: &[&str] = &[
    "http_port",
    "http_host",
    "max_inflight",
    "max_body_bytes",
    "migration_limit",
    "tool_call_parser",
    "reasoning_parser",
    "api_keys_file",
    "api_key_max_inflight",
    "api_key_rpm",
    "api_key_protect_ops",
    "tls_cert",
    "tls_key",
];
const PLANNER_KEYS: &[&str] = &[
    "pool",
    "prefill_pool",
    "profile",
    "ttft_target_ms",
    "itl_target_ms",
    "planner_interval_ms",
    "predictor",
    "min_replicas",
    "max_replicas",
    "min_prefill_replicas",
    "max_prefill_replicas",
    "max_workers",
    "scale_down_after",
    "connector",
    "k8s_namespace",
    "k8s_deployment_prefix",
];

/// Every key a graph may set.
fn setting_keys() -> impl Iterator<Item = &'static str> {
    [
        COMMON_KEYS,
        WORKER_KEYS,
        ROUTER_KEYS,
        FRONTEND_KEYS,
        PLANNER_KEYS,
    ]
    .into_iter()
    .flatten()
    .copied()
}

/// One component of a graph, settings resolved.
#[derive(Debug, Clone)]
pub struct Component {
    pub name: String,
    pub role: Role,
    pub replicas: usize,
    pub depends_on: Vec<String>,
    pub settings: Settings,
    /// Its own bus credentials when `serve --bus` runs it as processes (see [`ComponentNats`]).
    pub nats: Option<ComponentNats>,
}

/// A component's own NATS user, so that each role of a `serve --bus` graph connects with
/// least privilege (`config/nats/permissions.conf`) rather than as the supervisor:
///
/// ```yaml
/// backend:
///   role: worker
///   nats:
///     user: backend                       # or creds_file: /etc/dynamo/backend.creds
///     password_env: DYN_NATS_BACKEND_PASSWORD  # a variable of serve's environment
///     inbox_prefix: _INBOX.backend         # default: _INBOX.<user>
/// ```
///
/// The password never sits in the graph file; the supervisor reads the variable at start and
/// hands it to that component's processes only. TLS settings stay the supervisor's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentNats {
    pub user: Option<String>,
    pub password_env: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub inbox_prefix: Option<String>,
}

/// A component's own environment for its processes: variables to drop, then to set.
pub type OwnEnv = (Vec<&'static str>, Vec<(String, String)>);

impl ComponentNats {
    /// The environment of the component's processes: the credential variables to drop
    /// (inherited from the supervisor) and the ones to set; `lookup` reads the supervisor's
    /// environment. Errors name the key at fault.
    pub fn env(&self, component: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<OwnEnv> {
        let at = |k: &str| format!("components.{component}.nats.{k}");
        let mut set = Vec::new();
        match (&self.user, &self.password_env, &self.creds_file) {
            (Some(user), Some(var), None) => {
                let password = lookup(var).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: {var} is not set in this process's environment; export the {component} role's NATS password there",
                        at("password_env")
                    )
                })?;
                set.push(("DYN_NATS__USER".to_string(), user.clone()));
                set.push(("DYN_NATS__PASSWORD".to_string(), password));
            }
            (None, None, Some(creds)) => {
                set.push((
                    "DYN_NATS__CREDS_FILE".to_string(),
                    creds.display().to_string(),
                ));
            }
            _ => bail!(
                "components.{component}.nats: give `user` with `password_env`, or `creds_file`"
            ),
        }
        let prefix = self
            .inbox_prefix
            .clone()
            .or_else(|| self.user.as_ref().map(|u| format!("_INBOX.{u}")));
        if let Some(p) = prefix {
            dynamo_runtime::subject::validate_inbox_prefix(&p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", at("inbox_prefix")))?;
            set.push(("DYN_NATS__INBOX_PREFIX".to_string(), p));
        }
        Ok((
            dynamo_runtime::bus::NatsSecurity::CREDENTIAL_VARS.to_vec(),
            set,
        ))
    }
}

#[derive(Debug, Clone)]
pub struct Graph {
    pub file: PathBuf,
    pub namespace: String,
    pub bus: Option<String>,
    /// In start order (dependencies first).
    pub components: Vec<Component>,
}

/// Where a key is in the file, for errors: `FILE:LINE: key`.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    /// Line (1-based) of `key` inside the block of `section` (a top-level key, or
    /// `components.NAME`), or of the section itself.
    fn line(&self, path: &[&str]) -> Option<usize> {
        let mut indent = -1i64;
        let mut from = 0;
        let lines: Vec<&str> = self.text.lines().collect();
        let mut found = None;
        for part in path {
            found = None;
            for (i, l) in lines.iter().enumerate().skip(from) {
                let trimmed = l.trim_start();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                let ind = (l.len() - trimmed.len()) as i64;
                if ind <= indent && i > from {
                    break;
                }
                if ind > indent
                    && (trimmed.starts_with(&format!("{part}:"))
                        || trimmed.starts_with(&format!("\"{part}\":")))
                {
                    found = Some(i);
                    indent = ind;
                    from = i + 1;
                    break;
                }
            }
            found?;
        }
        found.map(|i| i + 1)
    }

    fn error(&self, path: &[&str], msg: impl std::fmt::Display) -> anyhow::Error {
        let key = path.join(".");
        match self
            .line(path)
            .or_else(|| self.line(&path[..path.len().saturating_sub(1)]))
        {
            Some(line) => anyhow::anyhow!("{}:{line}: {key}: {msg}", self.file.display()),
            None => anyhow::anyhow!("{}: {key}: {msg}", self.file.display()),
        }
    }
}

/// Parses a scalar override (`--set a.b=V`, environment) as YAML, so numbers are numbers.
fn scalar(v: &str) -> Value {
    serde_yaml::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()))
}

fn key(s: &str) -> Value {
    Value::String(s.to_string())
}

/// Applies `section.key=value` to the raw document (`defaults.x`, or `NAME.x` for component
/// NAME).
fn apply_override(doc: &mut Mapping, target: &str, value: Value, origin: &str) -> Result<()> {
    let Some((section, k)) = target.split_once('.') else {
        bail!("{origin} {target:?}: expected COMPONENT.KEY=VALUE or defaults.KEY=VALUE");
    };
    let map = if section == "defaults" {
        doc.entry(key("defaults"))
            .or_insert_with(|| Value::Mapping(Mapping::new()))
    } else {
        let comps = doc
            .get_mut(key("components"))
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| anyhow::anyhow!("{origin} {target:?}: the graph has no components"))?;
        comps.get_mut(key(section)).ok_or_else(|| {
            anyhow::anyhow!("{origin} {target:?}: no component {section:?} in the graph")
        })?
    };
    let Some(map) = map.as_mapping_mut() else {
        bail!("{origin} {target:?}: {section} is not a mapping");
    };
    map.insert(key(k), value);
    Ok(())
}

/// Reads, overrides and validates a graph.
pub fn load(file: &Path, env: &[(String, String)], sets: &[String]) -> Result<Graph> {
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let loc = Locator { file, text: &text };
    let mut doc: Mapping = match serde_yaml::from_str(&text) {
        Ok(Value::Mapping(m)) => m,
        Ok(_) => bail!(
            "{}: a graph is a mapping with `components:`",
            file.display()
        ),
        Err(e) => match e.location() {
            Some(l) => bail!("{}:{}: {e}", file.display(), l.line()),
            None => bail!("{}: {e}", file.display()),
        },
    };
    for k in doc.keys() {
        let name = k.as_str().unwrap_or("?");
        if !["namespace", "bus", "defaults", "components"].contains(&name) {
            return Err(loc.error(
                &[name],
                "unknown key; expected namespace, bus, defaults, components",
            ));
        }
    }
    // Environment, then --set, over the file.
    for (k, v) in env {
        if let Some(rest) = k.strip_prefix("DYN_GRAPH__") {
            let target = rest.to_ascii_lowercase().replace("__", ".");
            apply_override(&mut doc, &target, scalar(v), k)?;
        }
    }
    for s in sets {
        let Some((target, v)) = s.split_once('=') else {
            bail!("--set {s:?}: expected COMPONENT.KEY=VALUE");
        };
        apply_override(&mut doc, target, scalar(v), "--set")?;
    }
    let namespace = match doc.get(key("namespace")) {
        None => "dynamo".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(loc.error(&["namespace"], "must be a string")),
    };
    dynamo_runtime::subject::Namespace::new(&namespace)
        .map_err(|e| loc.error(&["namespace"], e))?;
    let bus = match doc.get(key("bus")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "embedded" => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(loc.error(&["bus"], "must be a nats:// URL or `embedded`")),
    };
    let defaults = match doc.get(key("defaults")) {
        None | Some(Value::Null) => Mapping::new(),
        Some(Value::Mapping(m)) => m.clone(),
        Some(_) => return Err(loc.error(&["defaults"], "must be a mapping of settings")),
    };
    check_settings(&loc, &["defaults"], &defaults)?;
    let comps = match doc.get(key("components")) {
        Some(Value::Mapping(m)) if !m.is_empty() => m.clone(),
        _ => {
            return Err(loc.error(
                &["components"],
                "the graph needs a non-empty `components:` mapping",
            ))
        }
    };
    let mut components = Vec::new();
    for (name, spec) in &comps {
        let name = name.as_str().unwrap_or_default().to_string();
        dynamo_runtime::subject::ComponentName::new(&name)
            .map_err(|e| loc.error(&["components", &name], e))?;
        let path = ["components", name.as_str()];
        let Value::Mapping(spec) = spec else {
            return Err(loc.error(&path, "must be a mapping with at least `role:`"));
        };
        let mut own = spec.clone();
        let role: Role = match own.remove(key("role")) {
            Some(v) => serde_yaml::from_value(v).map_err(|_| {
                loc.error(&["components", &name, "role"], "unknown role; expected frontend, router, worker, prefill, decode or planner (offloader comes with a later role)")
            })?,
            None => return Err(loc.error(&path, "missing `role:`")),
        };
        let replicas = match own.remove(key("replicas")) {
            None => 1,
            Some(Value::Number(n)) if n.as_u64().is_some_and(|r| (1..=4096).contains(&r)) => {
                n.as_u64().unwrap_or(1) as usize
            }
            Some(v) => {
                return Err(loc.error(
                    &["components", &name, "replicas"],
                    format!("{v:?} is not a replica count (1 to 4096)"),
                ))
            }
        };
        let depends_on: Vec<String> = match own.remove(key("depends_on")) {
            None => Vec::new(),
            Some(v) => serde_yaml::from_value(v).map_err(|_| {
                loc.error(
                    &["components", &name, "depends_on"],
                    "must be a list of component names",
                )
            })?,
        };
        let nats: Option<ComponentNats> = match own.remove(key("nats")) {
            None => None,
            Some(v) => Some(serde_yaml::from_value(v).map_err(|e| {
                loc.error(
                    &["components", &name, "nats"],
                    format!(
                        "{e}; expected user and password_env, or creds_file (and inbox_prefix)"
                    ),
                )
            })?),
        };
        check_settings(&loc, &path, &own)?;
        // defaults < component.
        let mut merged = defaults.clone();
        for (k, v) in own {
            merged.insert(k, v);
        }
        let settings: Settings =
            serde_yaml::from_value(Value::Mapping(merged)).map_err(|e| loc.error(&path, e))?;
        components.push(Component {
            name,
            role,
            replicas,
            depends_on,
            settings,
            nats,
        });
    }
    // A planner starts after the pools it scales.
    let names: HashSet<String> = components.iter().map(|c| c.name.clone()).collect();
    for c in components.iter_mut().filter(|c| c.role == Role::Planner) {
        for p in [c.settings.pool.clone(), c.settings.prefill_pool.clone()]
            .into_iter()
            .flatten()
        {
            if names.contains(&p) && !c.depends_on.contains(&p) && p != c.name {
                c.depends_on.push(p);
            }
        }
    }
    let components = validate(&loc, components)?;
    Ok(Graph {
        file: file.to_path_buf(),
        namespace,
        bus,
        components,
    })
}

/// Unknown keys and wrongly typed values of a settings mapping.
fn check_settings(loc: &Locator<'_>, path: &[&str], m: &Mapping) -> Result<()> {
    for (k, v) in m {
        let name = k.as_str().unwrap_or("?");
        let mut p = path.to_vec();
        p.push(name);
        if !setting_keys().any(|key| key == name) {
            let keys: Vec<&str> = setting_keys().collect();
            return Err(loc.error(
                &p,
                format!("unknown key; settings are: {}", keys.join(", ")),
            ));
        }
        let mut one = Mapping::new();
        one.insert(k.clone(), v.clone());
        serde_yaml::from_value::<Settings>(Value::Mapping(one)).map_err(|e| loc.error(&p, e))?;
    }
    Ok(())
}

fn validate(loc: &Locator<'_>, comps: Vec<Component>) -> Result<Vec<Component>> {
    let names: HashSet<&str> = comps.iter().map(|c| c.name.as_str()).collect();
    for c in &comps {
        let at = |k: &'static str| vec!["components", c.name.as_str(), k];
        if c.role == Role::Offloader {
            return Err(loc.error(
                &at("role"),
                format!("role {:?} is not available yet", c.role),
            ));
        }
        for d in &c.depends_on {
            if !names.contains(d.as_str()) {
                return Err(loc.error(&at("depends_on"), format!("no component named {d:?}")));
            }
            if d == &c.name {
                return Err(loc.error(&at("depends_on"), "a component cannot depend on itself"));
            }
        }
        let s = &c.settings;
        let own = |keys: &[&'static str], role: &str| -> Result<()> {
            let set: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| loc.line(&["components", c.name.as_str(), k]).is_some())
                .collect();
            if let Some(k) = set.first() {
                return Err(loc.error(&at(k), format!("only a {role} has this setting")));
            }
            Ok(())
        };
        match c.role {
            Role::Worker | Role::Prefill | Role::Decode => {
                own(FRONTEND_KEYS, "frontend")?;
                own(PLANNER_KEYS, "planner")?;
                let Some(engine) = s.engine else {
                    return Err(loc.error(
                        &at("engine"),
                        "a worker needs `engine:` (echo, mocker or native)",
                    ));
                };
                let _ = engine;
                if s.model_path.is_none() {
                    return Err(loc.error(
                        &at("model_path"),
                        "a worker needs `model_path:` (here or in defaults; `--set defaults.model_path=DIR`)",
                    ));
                }
            }
            Role::Frontend => {
                own(WORKER_KEYS, "worker")?;
                own(PLANNER_KEYS, "planner")?;
                if c.replicas > 1 && s.http_port.is_some_and(|p| p != 0) {
                    return Err(loc.error(
                        &at("replicas"),
                        format!(
                            "{} replicas cannot all listen on http_port {} on one machine",
                            c.replicas,
                            s.http_port.unwrap_or(0)
                        ),
                    ));
                }
            }
            Role::Router => {
                own(WORKER_KEYS, "worker")?;
                own(FRONTEND_KEYS, "frontend")?;
                own(&["router_mode"], "frontend")?;
                own(PLANNER_KEYS, "planner")?;
            }
            Role::Planner => {
                own(WORKER_KEYS, "worker")?;
                own(FRONTEND_KEYS, "frontend")?;
                own(ROUTER_KEYS, "router or frontend")?;
                if c.replicas > 1 {
                    return Err(loc.error(
                        &at("replicas"),
                        "one planner per pool: several would undo each other's decisions",
                    ));
                }
                let pool = |key: &'static str,
                            v: Option<&str>,
                            roles: &[Role],
                            what: &str|
                 -> Result<()> {
                    let Some(v) = v else { return Ok(()) };
                    match comps.iter().find(|o| o.name == v) {
                        Some(o) if roles.contains(&o.role) => Ok(()),
                        Some(o) => Err(loc.error(
                            &at(key),
                            format!(
                                "{v:?} is a {:?} component; a planner's {key} is {what}",
                                o.role
                            ),
                        )),
                        None => Err(loc.error(&at(key), format!("no component named {v:?}"))),
                    }
                };
                let Some(main) = s.pool.as_deref() else {
                    return Err(loc.error(
                        &at("pool"),
                        "a planner needs `pool:` (the worker or decode component it scales)",
                    ));
                };
                let decode = s.prefill_pool.is_some();
                pool(
                    "pool",
                    Some(main),
                    if decode {
                        &[Role::Decode]
                    } else {
                        &[Role::Worker, Role::Decode]
                    },
                    if decode {
                        "a decode component (with prefill_pool)"
                    } else {
                        "a worker or decode component"
                    },
                )?;
                pool(
                    "prefill_pool",
                    s.prefill_pool.as_deref(),
                    &[Role::Prefill],
                    "a prefill component",
                )?;
                if s.profile.is_none() {
                    return Err(loc.error(
                        &at("profile"),
                        "a planner needs `profile:` (a file from `dynamo-run profile --out FILE`)",
                    ));
                }
                for (k, v) in [
                    ("ttft_target_ms", s.ttft_target_ms),
                    ("itl_target_ms", s.itl_target_ms),
                ] {
                    if v.is_none() {
                        return Err(loc.error(&at(k), "a planner needs both latency targets"));
                    }
                }
                if comps
                    .iter()
                    .filter(|o| o.role == Role::Planner && o.settings.pool.as_deref() == Some(main))
                    .count()
                    > 1
                {
                    return Err(
                        loc.error(&at("pool"), format!("another planner also scales {main:?}"))
                    );
                }
            }
            Role::Offloader => {}
        }
    }
    // Port clashes: HTTP ports and metrics port ranges.
    let mut ports: HashMap<u16, String> = HashMap::new();
    for c in &comps {
        let mut claim = |port: u16, what: &str| -> Result<()> {
            if port == 0 {
                return Ok(());
            }
            if let Some(other) = ports.insert(port, format!("{} {what}", c.name)) {
                return Err(loc.error(
                    &["components", &c.name, what],
                    format!("port {port} is also {other}"),
                ));
            }
            Ok(())
        };
        if c.role == Role::Frontend {
            claim(c.settings.http_port.unwrap_or(8080), "http_port")?;
        }
        if let Some(m) = c.settings.metrics_port {
            for i in 0..c.replicas {
                claim(m.wrapping_add(i as u16), "metrics_port")?;
            }
        }
    }
    // Start order: dependencies first (explicit edges, then roles), cycles refused.
    let mut order: Vec<Component> = Vec::new();
    let mut left: BTreeMap<(u8, usize), Component> = comps
        .into_iter()
        .enumerate()
        .map(|(i, c)| ((c.role.rank(), i), c))
        .collect();
    while !left.is_empty() {
        let ready = left
            .iter()
            .find(|(_, c)| {
                c.depends_on
                    .iter()
                    .all(|d| order.iter().any(|o| &o.name == d))
            })
            .map(|(k, _)| *k);
        match ready {
            Some(k) => order.push(left.remove(&k).expect("found above")),
            None => {
                let c = left.values().next().expect("not empty");
                return Err(loc.error(
                    &["components", &c.name, "depends_on"],
                    format!(
                        "dependency cycle among {}",
                        left.values()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
    }
    Ok(order)
}

impl Graph {
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// The components some planner scales (the `serve` process answers their scale requests).
    pub fn scaled(&self) -> Vec<String> {
        self.components
            .iter()
            .filter(|c| c.role == Role::Planner)
            .flat_map(|c| [c.settings.pool.clone(), c.settings.prefill_pool.clone()])
            .flatten()
            .collect()
    }

    /// Whether some component is a router (frontends in kv mode then ask it).
    pub fn has_router(&self) -> bool {
        self.components.iter().any(|c| c.role == Role::Router)
    }
}

/// Appends `--name value` when `v` is set.
fn flag(a: &mut Vec<String>, name: &str, v: Option<impl std::fmt::Display>) {
    if let Some(v) = v {
        a.push(format!("--{name}"));
        a.push(v.to_string());
    }
}

/// `s` with only the keys of `groups` set.
fn only(s: &Settings, groups: &[&[&str]]) -> Settings {
    let mut v = serde_json::to_value(s).expect("settings serialize");
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| groups.iter().any(|g| g.contains(&k.as_str())));
    }
    serde_json::from_value(v).expect("a subset of settings deserializes")
}

/// What one component runs, in the launcher's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    /// A router component.
    Router(Settings),
    /// A planner.
    Planner(Settings),
    /// A frontend or a worker: its input, its output, its settings.
    Process {
        input: Input,
        output: Output,
        settings: Settings,
    },
}

impl Component {
    /// The component's settings for its role, with what the graph implies (a frontend routes
    /// through the graph's router component; a prefill worker serves `prefill`): the one
    /// place a graph becomes launcher settings, whether started in this process or as a child.
    pub fn launch(&self, g: &Graph) -> Launch {
        let s = &self.settings;
        match self.role {
            Role::Router => {
                let mut r = only(s, &[ROUTER_KEYS]);
                // A router component routes by KV; the mode is its frontends' setting.
                r.router_mode = None;
                Launch::Router(r)
            }
            Role::Planner => {
                Launch::Planner(only(s, &[PLANNER_KEYS, &["model_path", "model_name"]]))
            }
            Role::Frontend => {
                let mut f = only(s, &[COMMON_KEYS, ROUTER_KEYS, FRONTEND_KEYS]);
                // A frontend serves whatever the workers on the bus register.
                f.model_path = None;
                f.block_size = None;
                let mode = f.router_mode.clone().unwrap_or_else(|| {
                    if g.has_router() {
                        "kv".into()
                    } else {
                        "round-robin".into()
                    }
                });
                if g.has_router() && (mode == "kv" || mode == "least-loaded") {
                    f.remote_router = Some(true);
                }
                f.router_mode = Some(mode);
                f.http_port = Some(f.http_port.unwrap_or(8080));
                Launch::Process {
                    input: Input::Http,
                    output: Output::Dyn,
                    settings: f,
                }
            }
            _ => {
                let mut w = only(s, &[COMMON_KEYS, WORKER_KEYS]);
                let output = match s.engine {
                    Some(EngineKind::Echo) => Output::Echo,
                    Some(EngineKind::Native) => Output::Native,
                    Some(EngineKind::Openai) => Output::OpenAi,
                    _ => Output::Mocker,
                };
                let (kind, endpoint) = match self.role {
                    Role::Prefill => (WorkerKind::Prefill, WorkerKind::PREFILL_ENDPOINT),
                    Role::Decode => (WorkerKind::Decode, "generate"),
                    _ => (WorkerKind::Aggregated, "generate"),
                };
                if kind != WorkerKind::Aggregated {
                    w.worker_kind = Some(kind);
                }
                let endpoint = s.endpoint.as_deref().unwrap_or(endpoint);
                let id = EndpointId::new(&g.namespace, &self.name, endpoint)
                    .expect("graph names are validated");
                Launch::Process {
                    input: Input::Endpoint(id),
                    output,
                    settings: w,
                }
            }
        }
    }

    /// The `dynamo-run` arguments of replica `replica` (after the binary name), `bus` given
    /// or not: [`Component::launch`] rendered as flags.
    pub fn args(&self, g: &Graph, bus: Option<&str>, replica: usize) -> Vec<String> {
        let s = &self.settings;
        let mut a: Vec<String> = Vec::new();
        if let Some(b) = bus {
            flag(&mut a, "bus", Some(b));
            // Children of a supervisor: no orphans if it is killed outright.
            a.push("--exit-with-parent".into());
        }
        flag(&mut a, "namespace", Some(&g.namespace));
        flag(&mut a, "log", s.log.as_deref());
        flag(
            &mut a,
            "metrics-port",
            s.metrics_port.map(|p| p as usize + replica),
        );
        match self.launch(g) {
            Launch::Router(r) => {
                a.push("router".into());
                a.extend(to_flags(&r));
            }
            Launch::Planner(p) => {
                a.push("planner".into());
                a.extend(to_flags(&p));
            }
            Launch::Process {
                input,
                output,
                mut settings,
            } => {
                if self.replicas > 1 || g.scaled().contains(&self.name) {
                    // Each replica its own disk tier (see `launch::own_disk_dir`); a pool a
                    // planner scales has several replicas sooner or later.
                    if let Some(d) = settings.disk_kv_dir.as_mut() {
                        d.push(format!("worker-{replica}"));
                    }
                }
                a.push(format!("in={input}"));
                a.push(format!("out={output}"));
                a.extend(to_flags(&settings));
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.yaml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    const GRAPH: &str = "defaults:\n  model_path: /d\n  block_size: 16\ncomponents:\n  backend:\n    role: worker\n    engine: mocker\n    block_size: 32\n    replicas: 2\n  frontend:\n    role: frontend\n    http_port: 9000\n";

    /// A graph that names a component twice is refused before anything starts, with the line.
    #[test]
    fn a_component_named_twice_is_refused() {
        let (_d, p) = write("defaults:\n  model_path: /d\ncomponents:\n  backend:\n    role: worker\n    engine: echo\n  backend:\n    role: worker\n    engine: mocker\n");
        let e = load(&p, &[], &[]).unwrap_err().to_string();
        assert!(e.contains("duplicate") && e.contains("backend"), "{e}");
        assert!(e.contains("g.yaml:"), "names the file and line: {e}");
    }

    /// A component's own NATS user: its processes' credential variables, the password read
    /// from the variable the graph names (never from the file); incomplete or unknown keys
    /// and a missing variable are refused naming them.
    #[test]
    fn a_component_s_own_nats_user_becomes_its_processes_environment() {
        let g = |nats: &str| {
            format!("defaults:\n  model_path: /d\ncomponents:\n  backend:\n    role: worker\n    engine: mocker\n    nats:\n{nats}")
        };
        let (_d, p) = write(&g(
            "      user: backend\n      password_env: GRAPH_TEST_NATS_PW\n",
        ));
        let c = load(&p, &[], &[])
            .unwrap()
            .component("backend")
            .unwrap()
            .clone();
        let n = c.nats.as_ref().unwrap();
        let e = n.env("backend", |_| None).unwrap_err().to_string();
        assert!(
            e.contains("components.backend.nats.password_env") && e.contains("GRAPH_TEST_NATS_PW"),
            "{e}"
        );
        let env = |v: &str| (v == "GRAPH_TEST_NATS_PW").then(|| "s3cret".to_string());
        let (drop, set) = n.env("backend", env).unwrap();
        assert!(
            drop.contains(&"DYN_NATS__TOKEN"),
            "inherited credentials are dropped"
        );
        assert_eq!(
            set,
            [
                ("DYN_NATS__USER".to_string(), "backend".to_string()),
                ("DYN_NATS__PASSWORD".to_string(), "s3cret".to_string()),
                (
                    "DYN_NATS__INBOX_PREFIX".to_string(),
                    "_INBOX.backend".to_string()
                ),
            ]
        );
        let (_d, p) = write(&g("      user: backend\n"));
        let c = load(&p, &[], &[])
            .unwrap()
            .component("backend")
            .unwrap()
            .clone();
        let e = c.nats.unwrap().env("backend", env).unwrap_err().to_string();
        assert!(e.contains("user` with `password_env`"), "{e}");
        let (_d, p) = write(&g("      user: backend\n      password: inline\n"));
        let e = load(&p, &[], &[]).unwrap_err().to_string();
        assert!(e.contains("nats") && e.contains("password"), "{e}");
    }

    #[test]
    fn prefill_and_decode_roles_are_workers_of_their_kind() {
        let (_d, p) = write("defaults:\n  model_path: /d\ncomponents:\n  pre:\n    role: prefill\n    engine: mocker\n  dec:\n    role: decode\n    engine: mocker\n");
        let g = load(&p, &[], &[]).unwrap();
        let pre = g.component("pre").unwrap().args(&g, None, 0);
        assert!(
            pre.contains(&"in=dyn://dynamo.pre.prefill".to_string()),
            "{pre:?}"
        );
        assert!(
            pre.windows(2).any(|w| w == ["--worker-kind", "prefill"]),
            "{pre:?}"
        );
        let dec = g.component("dec").unwrap().args(&g, None, 0);
        assert!(
            dec.contains(&"in=dyn://dynamo.dec.generate".to_string()),
            "{dec:?}"
        );
        assert!(
            dec.windows(2).any(|w| w == ["--worker-kind", "decode"]),
            "{dec:?}"
        );
        // A prefill worker without an engine is refused like any worker.
        let (_d2, p2) =
            write("defaults:\n  model_path: /d\ncomponents:\n  pre:\n    role: prefill\n");
        assert!(load(&p2, &[], &[]).is_err());
    }

    /// A planner's targets may come from anywhere settings come from (here `--set`), and a
    /// pool it scales gives each replica its own disk-tier folder even at one replica.
    #[test]
    fn planner_settings_resolve_like_any_other() {
        let (_d, p) = write("defaults:\n  model_path: /d\ncomponents:\n  backend:\n    role: worker\n    engine: mocker\n    disk_kv_dir: /kv\n  planner:\n    role: planner\n    pool: backend\n    profile: /p.json\n");
        let e = load(&p, &[], &[]).unwrap_err().to_string();
        assert!(e.contains("latency targets"), "{e}");
        let sets = [
            "planner.ttft_target_ms=100".to_string(),
            "planner.itl_target_ms=20".to_string(),
        ];
        let g = load(&p, &[], &sets).unwrap();
        assert_eq!(g.scaled(), vec!["backend".to_string()]);
        let b = g
            .component("backend")
            .unwrap()
            .args(&g, Some("nats://h:4222"), 2);
        assert!(
            b.windows(2).any(|w| w == ["--disk-kv-dir", "/kv/worker-2"]),
            "{b:?}"
        );
    }

    #[test]
    fn settings_resolve_defaults_component_env_then_set() {
        let (_d, p) = write(GRAPH);
        let g = load(&p, &[], &[]).unwrap();
        let b = g.component("backend").unwrap();
        assert_eq!(b.settings.block_size, Some(32), "component over defaults");
        assert_eq!(
            b.settings.model_path.as_deref(),
            Some(Path::new("/d")),
            "inherited"
        );
        let env = vec![
            (
                "DYN_GRAPH__BACKEND__BLOCK_SIZE".to_string(),
                "64".to_string(),
            ),
            (
                "DYN_GRAPH__DEFAULTS__MODEL_PATH".to_string(),
                "/e".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let g = load(&p, &env, &[]).unwrap();
        let b = g.component("backend").unwrap();
        assert_eq!(b.settings.block_size, Some(64), "env over component");
        assert_eq!(b.settings.model_path.as_deref(), Some(Path::new("/e")));
        let g = load(
            &p,
            &env,
            &[
                "backend.block_size=128".into(),
                "frontend.http_port=0".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            g.component("backend").unwrap().settings.block_size,
            Some(128),
            "--set over env"
        );
        // Start order: workers before the frontend; command lines per replica.
        assert_eq!(g.components[0].name, "backend");
        let args = g.components[0].args(&g, Some("nats://h:4222"), 1);
        assert!(
            args.windows(2).any(|w| w == ["--block-size", "128"]),
            "{args:?}"
        );
        assert!(args.contains(&"in=dyn://dynamo.backend.generate".to_string()));
        let f = g.component("frontend").unwrap().args(&g, None, 0);
        assert!(f.windows(2).any(|w| w == ["--http-port", "0"]), "{f:?}");
        assert!(
            f.windows(2).any(|w| w == ["--router-mode", "round-robin"]),
            "no router component: {f:?}"
        );
    }
}
