//! API keys on the frontend: who may call the API, and how much.
//!
//! Keys come from `--api-key` (repeatable; named `key-1`, `key-2`, ... in order), the
//! `DYN_API_KEYS` environment variable (comma-separated, named after them) and a keys file
//! (`--api-keys-file`: one key per line as `KEY` or `NAME KEY`, optionally followed by
//! `inflight=N` and `rpm=N`, its own limits; `#` starts a comment), re-read on SIGHUP (a file
//! that no longer parses keeps the keys in force, with a warning). With any key configured,
//! every API route needs `Authorization: Bearer KEY` or `x-api-key: KEY`; a missing, malformed
//! or wrong key gets a 401 in the API's own error shape (`invalid_api_key`). Keys are
//! compared in constant time, every configured key each time, and never logged: a key is
//! known by its name in logs and metrics (`dynamo_frontend_api_key_requests_total{key,
//! outcome}`). `/health`, `/live`, `/metrics` and the status page stay open unless
//! `--api-key-protect-ops`.
//!
//! Per-key limits (a key's own, else `--api-key-max-inflight` / `--api-key-rpm`): requests in
//! flight (held until the response's body ends, streams included) and requests in any
//! 60-second window; over either, a 429 with `Retry-After`. Operations endpoints do not count.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

use super::serving::ApiError;

/// How keys are configured (`Debug` shows how many keys, never them).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// Keys without a name (flags, environment), in order.
    pub keys: Vec<String>,
    /// A keys file, re-read on SIGHUP.
    pub file: Option<PathBuf>,
    /// Default per-key limits: requests in flight, requests a minute.
    pub max_inflight: Option<usize>,
    pub rpm: Option<usize>,
    /// Whether `/health`, `/live` and `/metrics` need a key too.
    pub protect_ops: bool,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("file", &self.file)
            .field("max_inflight", &self.max_inflight)
            .field("rpm", &self.rpm)
            .field("protect_ops", &self.protect_ops)
            .finish()
    }
}

impl AuthSettings {
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.file.is_some()
    }
}

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    name: String,
    secret: Vec<u8>,
    max_inflight: Option<usize>,
    rpm: Option<usize>,
}

/// A key that a line or flag cannot be (whitespace, empty, non-ASCII): the error names where.
fn check_secret(secret: &str, at: &str) -> Result<(), String> {
    if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{at}: an API key must be printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// Parses a keys file's text.
fn parse_file(text: &str, path: &Path) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let mut limits = (None, None);
        while let Some(last) = words.last() {
            let Some((k, v)) = last.split_once('=') else {
                break;
            };
            let v: usize = v
                .parse()
                .map_err(|_| format!("{at}: {k}= needs a number"))?;
            match k {
                "inflight" => limits.0 = Some(v),
                "rpm" => limits.1 = Some(v),
                _ => return Err(format!("{at}: unknown limit {k:?} (inflight, rpm)")),
            }
            words.pop();
        }
        let (name, secret) = match words.as_slice() {
            [secret] => (format!("line-{}", n + 1), *secret),
            [name, secret] => (name.to_string(), *secret),
            _ => {
                return Err(format!(
                    "{at}: expected `KEY` or `NAME KEY`, then optional inflight=N rpm=N"
                ))
            }
        };
        check_secret(secret, &at)?;
        keys.push(Key {
            name,
            secret: secret.as_bytes().to_vec(),
            max_inflight: limits.0,
            rpm: limits.1,
        });
    }
    Ok(keys)
}

/// Per-key usage.
#[derive(Default)]
struct Usage {
    inflight: Arc<AtomicUsize>,
    recent: Mutex<VecDeque<Instant>>,
}

/// The frontend's keys and their usage.
pub struct Auth {
    settings: AuthSettings,
    keys: RwLock<Vec<Key>>,
    usage: Mutex<HashMap<String, Arc<Usage>>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl Auth {
    /// Loads the keys (an unreadable or malformed keys file is an error naming it).
    pub fn new(settings: AuthSettings) -> Result<Arc<Self>, String> {
        let auth = Arc::new(Self {
            keys: RwLock::new(Vec::new()),
            usage: Mutex::new(HashMap::new()),
            settings,
        });
        auth.reload()?;
        Ok(auth)
    }

    /// Re-reads the keys (the keys file included); on error the keys in force stay.
    pub fn reload(&self) -> Result<usize, String> {
        let mut keys = Vec::new();
        for (i, secret) in self.settings.keys.iter().enumerate() {
            check_secret(secret, &format!("API key {}", i + 1))?;
            keys.push(Key {
                name: format!("key-{}", i + 1),
                secret: secret.as_bytes().to_vec(),
                max_inflight: None,
                rpm: None,
            });
        }
        if let Some(path) = &self.settings.file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the API keys file {}: {e}", path.display()))?;
            keys.extend(parse_file(&text, path)?);
        }
        if keys.is_empty() {
            return Err("no API key is configured (the keys file has none)".into());
        }
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(n)
    }

    /// Reloads on SIGHUP until `stop`.
    pub fn reload_on_sighup(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        if self.settings.file.is_none() {
            return;
        }
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: the API keys file is read once");
                return;
            }
        };
        let auth = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                match auth.reload() {
                    Ok(n) => tracing::info!(keys = n, "reloaded the API keys"),
                    Err(e) => {
                        tracing::warn!(error = %e, "API keys not reloaded; the previous ones stay in force")
                    }
                }
            }
        });
    }

    /// The key that `presented` is, compared in constant time against every key.
    fn find(&self, presented: &[u8]) -> Option<Key> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for k in keys.iter() {
            if constant_time_eq(&k.secret, presented) {
                found = Some(k.clone());
            }
        }
        found
    }

    fn usage(&self, name: &str) -> Arc<Usage> {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

/// Equal slices, in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() != b.len()) as u8);
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// The key a request presents: `Authorization: Bearer KEY` or `x-api-key: KEY`.
fn presented(headers: &HeaderMap) -> Result<Vec<u8>, &'static str> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        let token = v
            .strip_prefix(b"Bearer ")
            .or_else(|| v.strip_prefix(b"bearer "))
            .ok_or("the Authorization header must be `Bearer KEY`")?;
        let token = token.trim_ascii();
        if token.is_empty() {
            return Err("the Authorization header has no key after `Bearer`");
        }
        return Ok(token.to_vec());
    }
    if let Some(v) = headers.get("x-api-key") {
        return Ok(v.as_bytes().trim_ascii().to_vec());
    }
    Err("no API key: send `Authorization: Bearer KEY` (or `x-api-key: KEY`)")
}

/// Which error shape a path answers in.
fn is_messages(path: &str) -> bool {
    path.starts_with("/v1/messages")
}

fn refuse(path: &str, e: ApiError) -> Response {
    if is_messages(path) {
        super::anthropic::error_response(&e)
    } else {
        super::http::error_response(&e)
    }
}

/// A 429 for key `name` (`what` it is over), counted as `outcome`.
fn limited(path: &str, name: &str, outcome: &'static str, what: String, retry: u32) -> Response {
    count(name, outcome);
    let mut e = ApiError::new(429, "rate_limit_error", format!("API key {name} is {what}"));
    e.retry_after = Some(retry);
    refuse(path, e)
}

fn count(key: &str, outcome: &'static str) {
    metrics::counter!("dynamo_frontend_api_key_requests_total", "key" => key.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The middleware: checks the key and the key's limits.
pub(super) async fn check(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let ops = matches!(
        path.as_str(),
        "/health" | "/live" | "/metrics" | "/status" | "/status.json"
    );
    if ops && !auth.settings.protect_ops {
        return next.run(req).await;
    }
    let key = match presented(req.headers()) {
        Ok(p) => auth.find(&p),
        Err(why) => {
            count("", "unauthorized");
            let mut e = ApiError::new(401, "invalid_request_error", why);
            e.code = Some("invalid_api_key");
            return refuse(&path, e);
        }
    };
    let Some(key) = key else {
        count("", "unauthorized");
        let mut e = ApiError::new(401, "invalid_request_error", "incorrect API key provided");
        e.code = Some("invalid_api_key");
        return refuse(&path, e);
    };
    if ops {
        // Operations endpoints need a key (protect_ops) but do not count against its limits.
        return next.run(req).await;
    }
    let usage = auth.usage(&key.name);
    if let Some(rpm) = key.rpm.or(auth.settings.rpm) {
        let now = Instant::now();
        let mut recent = usage.recent.lock().unwrap_or_else(|p| p.into_inner());
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() >= rpm {
            let wait = recent
                .front()
                .map_or(WINDOW, |t| WINDOW.saturating_sub(now.duration_since(*t)));
            drop(recent);
            return limited(
                &path,
                &key.name,
                "rate_limited",
                format!("over its limit of {rpm} requests a minute"),
                wait.as_secs().max(1) as u32,
            );
        }
        recent.push_back(now);
    }
    let guard = InFlight(usage.inflight.clone());
    let before = usage.inflight.fetch_add(1, Ordering::AcqRel);
    if let Some(max) = key.max_inflight.or(auth.settings.max_inflight) {
        if before >= max {
            drop(guard);
            return limited(
                &path,
                &key.name,
                "inflight_limited",
                format!("at its limit of {max} requests in flight"),
                1,
            );
        }
    }
    count(&key.name, "ok");
    let response = next.run(req).await;
    // The request is in flight until its body (a stream, maybe) ends or is dropped.
    let (parts, body) = response.into_parts();
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    }));
    Response::from_parts(parts, body)
}

/// A request in flight for its key.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_parse_and_refuse_bad_lines() {
        let p = Path::new("keys");
        let keys = parse_file(
            "# team keys\nalpha sk-aaa inflight=1\nsk-bbb\n\nbeta sk-ccc rpm=60 inflight=2 # note\n",
            p,
        )
        .unwrap();
        let got: Vec<_> = keys
            .iter()
            .map(|k| (k.name.as_str(), k.max_inflight, k.rpm))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alpha", Some(1), None),
                ("line-3", None, None),
                ("beta", Some(2), Some(60))
            ]
        );
        for (bad, needle) in [
            ("a b c", "expected"),
            ("a sk inflight=x", "number"),
            ("a sk burst=3", "unknown limit"),
            ("a sk\u{e9}", "printable ASCII"),
        ] {
            let e = parse_file(bad, p).unwrap_err();
            assert!(e.contains("keys:1") && e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn keys_compare_in_constant_time_and_headers_parse() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        let mut h = HeaderMap::new();
        assert!(presented(&h).is_err());
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(presented(&h).unwrap_err().contains("Bearer"));
        h.insert(header::AUTHORIZATION, "Bearer  sk-1 ".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), b"sk-1");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "sk-2".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), b"sk-2");
    }
}
