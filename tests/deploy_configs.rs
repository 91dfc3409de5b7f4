//! The deployment files in `config/`: Kubernetes manifests are structurally valid (what
//! `kubectl apply --dry-run=client` checks for these kinds: API versions, names, selectors
//! matching template labels, containers with images, readiness probes on `/health` at a
//! declared port, Services selecting a Deployment) and their `dynamo-run` arguments parse;
//! the Grafana dashboard's queries name metrics the code exports.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

#[test]
fn kubernetes_manifests_are_valid_and_their_commands_parse() {
    let mut docs = Vec::new();
    for e in std::fs::read_dir(root().join("config/k8s")).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            docs.push((path.display().to_string(), v));
        }
    }
    let mut deployments: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut services = Vec::new();
    let (mut accounts, mut roles, mut bindings) = (Vec::new(), BTreeMap::new(), Vec::new());
    let mut planner_account = None;
    let (mut bus_clients, mut nats_server) = (Vec::new(), None);
    for (file, d) in &docs {
        let kind = d["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no kind"));
        let name = s(d, &["metadata", "name"]).and_then(Value::as_str);
        assert!(
            name.is_some_and(|n| !n.is_empty()),
            "{file}: {kind} without metadata.name"
        );
        let name = name.unwrap().to_string();
        match kind {
            "Deployment" => {
                assert_eq!(d["apiVersion"].as_str(), Some("apps/v1"), "{file}: {name}");
                let labels: BTreeMap<String, String> = serde_yaml::from_value(
                    s(d, &["spec", "template", "metadata", "labels"])
                        .cloned()
                        .unwrap(),
                )
                .unwrap();
                let selector: BTreeMap<String, String> = serde_yaml::from_value(
                    s(d, &["spec", "selector", "matchLabels"]).cloned().unwrap(),
                )
                .unwrap();
                assert!(
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                    "{file}: {name}: selector {selector:?} does not match labels {labels:?}"
                );
                let spec = s(d, &["spec", "template", "spec"]).unwrap();
                let containers = spec["containers"].as_sequence().unwrap();
                assert!(!containers.is_empty(), "{file}: {name}: no containers");
                let init = spec
                    .get("initContainers")
                    .and_then(Value::as_sequence)
                    .cloned()
                    .unwrap_or_default();
                for c in containers.iter().chain(&init) {
                    let cname = c["name"].as_str().unwrap();
                    assert!(
                        c["image"].as_str().is_some_and(|i| !i.is_empty()),
                        "{file}: {cname}: no image"
                    );
                    let args: Vec<String> = c
                        .get("args")
                        .map(|a| serde_yaml::from_value(a.clone()).unwrap())
                        .unwrap_or_default();
                    if c["image"].as_str().unwrap().starts_with("dynamo-rs") {
                        // The arguments parse: clap prints help only if everything before
                        // `--help` is a known flag or command.
                        let out = common::dynamo_run()
                            .args(&args)
                            .arg("--help")
                            .output()
                            .unwrap();
                        assert!(
                            out.status.success(),
                            "{file}: {cname}: {args:?}: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        if let Some(i) = args.iter().position(|a| a == "--bus") {
                            assert_eq!(args[i + 1], "tls://nats:4222", "{file}: {cname}");
                            bus_clients.push((file.clone(), c.clone(), spec.clone()));
                        }
                    }
                    if init.iter().any(|i| i == c) {
                        continue;
                    }
                    let ports: Vec<(Option<String>, u64)> = c["ports"]
                        .as_sequence()
                        .map(|p| {
                            p.iter()
                                .map(|p| {
                                    (
                                        p["name"].as_str().map(str::to_string),
                                        p["containerPort"].as_u64().unwrap(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let probe = s(c, &["readinessProbe", "httpGet"])
                        .unwrap_or_else(|| panic!("{file}: {cname}: no readiness probe"));
                    if c["image"].as_str().unwrap().starts_with("dynamo-rs") {
                        assert_eq!(probe["path"].as_str(), Some("/health"), "{file}: {cname}");
                    }
                    let port = &probe["port"];
                    assert!(
                        ports.iter().any(|(n, p)| port.as_u64() == Some(*p)
                            || (n.is_some() && port.as_str() == n.as_deref())),
                        "{file}: {cname}: probe port {port:?} is not a container port {ports:?}"
                    );
                }
                if name == "nats" {
                    nats_server = Some(containers[0].clone());
                }
                if name == "dynamo-planner" {
                    planner_account = spec["serviceAccountName"].as_str().map(str::to_string);
                }
                deployments.insert(name, labels);
            }
            "Service" => {
                assert_eq!(d["apiVersion"].as_str(), Some("v1"), "{file}: {name}");
                services.push((file.clone(), name, d.clone()));
            }
            "ServiceAccount" => {
                accounts.push(name);
            }
            "Role" => {
                roles.insert(name, d["rules"].clone());
            }
            "RoleBinding" => {
                bindings.push((
                    s(d, &["roleRef", "name"])
                        .and_then(Value::as_str)
                        .unwrap()
                        .to_string(),
                    s(d, &["subjects"]).cloned().unwrap(),
                ));
            }
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
    for name in [
        "nats",
        "dynamo-frontend",
        "dynamo-router",
        "dynamo-backend",
        "dynamo-planner",
    ] {
        assert!(deployments.contains_key(name), "no Deployment {name}");
    }
    check_bus_security(
        &bus_clients,
        nats_server.as_ref().expect("a nats Deployment"),
    );
    // The planner's service account may get and patch Deployments' scale, through a binding.
    let account = planner_account.expect("the planner runs under its own service account");
    assert!(accounts.contains(&account), "no ServiceAccount {account}");
    let granted = bindings.iter().any(|(role, subjects)| {
        subjects
            .as_sequence()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"].as_str() == Some(&account))
            && roles.get(role).is_some_and(|rules| {
                rules.as_sequence().unwrap().iter().any(|r| {
                    let has = |k: &str, v: &str| {
                        r[k].as_sequence()
                            .is_some_and(|l| l.iter().any(|x| x.as_str() == Some(v)))
                    };
                    has("resources", "deployments/scale")
                        && has("verbs", "get")
                        && has("verbs", "patch")
                        && has("apiGroups", "apps")
                })
            })
    });
    assert!(granted, "{account} cannot get and patch deployments/scale");
    for (file, name, d) in services {
        let selector: BTreeMap<String, String> =
            serde_yaml::from_value(s(&d, &["spec", "selector"]).cloned().unwrap()).unwrap();
        assert!(
            deployments
                .values()
                .any(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v))),
            "{file}: Service {name} selects no Deployment"
        );
        assert!(s(&d, &["spec", "ports"])
            .and_then(Value::as_sequence)
            .is_some_and(|p| !p.is_empty()));
    }
}

use serde::Deserialize;

/// The users of config/nats/permissions.conf with the variable each one's password comes
/// from.
fn nats_users() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("config/nats/permissions.conf")).unwrap();
    let mut users = Vec::new();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.starts_with('#'));
    while let Some(l) = lines.next() {
        if let Some(user) = l.strip_prefix("user: ") {
            let pw = lines.next().unwrap();
            let var = pw
                .strip_prefix("password: $")
                .unwrap_or_else(|| panic!("user {user}: password from a variable, not {pw:?}"));
            users.push((user.to_string(), var.to_string()));
        }
    }
    assert!(users.len() >= 6, "{users:?}");
    users
}

/// Every process on the bus connects over TLS with a client certificate as a user of
/// config/nats/permissions.conf, its password from a Secret and its own reply inbox; the
/// nats Deployment runs config/nats/ and gets every user's password from the same Secret.
fn check_bus_security(clients: &[(String, Value, Value)], nats: &Value) {
    let users = nats_users();
    assert!(
        clients.len() >= 4,
        "frontend, router, workers and planner are on the bus"
    );
    let env = |c: &Value, name: &str| -> Option<Value> {
        c["env"]
            .as_sequence()?
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .cloned()
    };
    let secret_key = |e: &Value| {
        let r = s(e, &["valueFrom", "secretKeyRef"])?;
        Some((
            r["name"].as_str()?.to_string(),
            r["key"].as_str()?.to_string(),
        ))
    };
    for (file, c, spec) in clients {
        let cname = c["name"].as_str().unwrap();
        let user = env(c, "DYN_NATS__USER")
            .and_then(|e| e["value"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("{file}: {cname}: no DYN_NATS__USER"));
        assert!(
            users.iter().any(|(u, _)| *u == user),
            "{file}: {cname}: user {user} is not in config/nats/permissions.conf"
        );
        let pw = env(c, "DYN_NATS__PASSWORD").unwrap_or_else(|| panic!("{file}: {cname}"));
        assert_eq!(
            secret_key(&pw),
            Some(("dynamo-nats-users".to_string(), user.clone())),
            "{file}: {cname}: the password comes from the users Secret"
        );
        let inbox = env(c, "DYN_NATS__INBOX_PREFIX").unwrap_or_else(|| panic!("{file}: {cname}"));
        assert_eq!(
            inbox["value"].as_str(),
            Some(format!("_INBOX.{user}").as_str())
        );
        // The certificate files are in a mounted Secret.
        let args: Vec<String> = serde_yaml::from_value(c["args"].clone()).unwrap();
        let mounts = c["volumeMounts"].as_sequence().cloned().unwrap_or_default();
        for flag in ["--nats-ca", "--nats-cert", "--nats-key"] {
            let i = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("{file}: {cname}: no {flag}"));
            let mount = mounts
                .iter()
                .find(|m| args[i + 1].starts_with(m["mountPath"].as_str().unwrap()))
                .unwrap_or_else(|| panic!("{file}: {cname}: {flag} is not in a mount"));
            let volume = spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            assert!(volume.get("secret").is_some(), "{file}: {cname}: {flag}");
        }
    }
    let args: Vec<String> = serde_yaml::from_value(nats["args"].clone()).unwrap();
    assert_eq!(args, ["-c", "/etc/nats/config/nats-server.conf"]);
    for (user, var) in &users {
        let e = env(nats, var).unwrap_or_else(|| panic!("nats: no {var}"));
        assert_eq!(
            secret_key(&e),
            Some(("dynamo-nats-users".to_string(), user.clone()))
        );
    }
    let conf = std::fs::read_to_string(root().join("config/nats/nats-server.conf")).unwrap();
    assert!(conf.contains("include permissions.conf") && conf.contains("verify: true"));
}

#[test]
fn the_dashboard_queries_metrics_the_code_exports() {
    let text = std::fs::read_to_string(root().join("config/grafana/dynamo-rs.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exported = HashSet::new();
    let mut stack = vec![
        root().join("actors/src"),
        root().join("runtime/src"),
        root().join("components"),
    ];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.extension().is_some_and(|e| e == "rs") {
            let src = std::fs::read_to_string(&p).unwrap();
            for part in src.split('"').skip(1).step_by(2) {
                if part.starts_with("dynamo_")
                    && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                {
                    exported.insert(part.to_string());
                }
            }
        }
    }
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("dynamo_") {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    exported.contains(base),
                    "panel {:?} queries {word}, which nothing exports",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 15, "{checked} metric references");
    // Frontend latency, router hit rate and worker KV usage are covered.
    for m in [
        "dynamo_frontend_time_to_first_token_seconds",
        "dynamo_router_hit_ratio",
        "dynamo_worker_active_blocks",
    ] {
        assert!(text.contains(m), "{m}");
    }
}
