//! Shared by the end-to-end tests: `dynamo-run` child processes, the generated model folder,
//! the Python venv, and waiting for a condition.
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code, unused_macros)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `dynamo-run`, logging at `warn`.
pub fn dynamo_run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dynamo-run"));
    c.env("DYN_LOG", "warn");
    c
}

/// Runs `cmd` to its end and fails the test with its stderr unless it succeeded.
pub fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A model folder written once per test binary by `dynamo-run make-model`.
pub fn model_dir() -> &'static str {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dynamo_run()
            .args(["make-model", "--out", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
    .to_str()
    .unwrap()
}

/// A `dynamo-run` child that printed its ready line; killed on drop.
pub struct Proc {
    child: Child,
    pub ready: String,
}

impl Proc {
    /// Spawns `cmd` (stdout piped) and reads its first line, which must start with `ready`.
    pub fn start(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn dynamo-run");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .expect("read the ready line");
        assert!(
            ready.starts_with("ready"),
            "{cmd:?} did not get ready: {ready:?}"
        );
        Proc {
            child,
            ready: ready.trim().to_string(),
        }
    }

    /// `http://ADDR` from a frontend's ready line.
    pub fn http_base(&self) -> String {
        let addr = self
            .ready
            .split("://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_else(|| panic!("no address in {:?}", self.ready));
        format!("http://{addr}")
    }

    /// The `instance=` of a worker's ready line.
    pub fn instance(&self) -> &str {
        self.ready.rsplit("instance=").next().unwrap_or_default()
    }

    /// The child's stderr, when it was piped.
    #[allow(dead_code)]
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal the child");
    }

    /// Waits for the child to exit, failing after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the child is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs an idempotent install script of `scripts/` and returns the path it prints last.
pub fn installed(script: &str) -> String {
    let out = Command::new("bash")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(script),
        )
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/{script} prints the installed path"))
        .to_string()
}

/// The venv python with the test packages (`scripts/install-python.sh`, idempotent).
pub fn python() -> String {
    installed("install-python.sh")
}

/// Waits until `cond` holds (for state with no event to wait on), failing after `within`.
pub async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a Python check script of `tests/` with `args` (the official SDKs' checks print `ok
/// NAME` per check and exit non-zero on the first that fails); it must pass `checks` checks.
/// Returns its output.
#[allow(dead_code)]
pub fn python_checks(script: &str, args: &[&std::ffi::OsStr], checks: usize) -> String {
    let out = std::process::Command::new(python())
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        checks,
        "{stdout}"
    );
    stdout
}

/// [`eventually`] for a condition that must be awaited (e.g. an HTTP request).
#[allow(dead_code)]
pub async fn eventually_async<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` on a loopback port: the whole HTTP response (status line, headers, body).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

/// `dynamo-run in=http out=native` on [`model_dir`] (model `tiny`, 16-token blocks) on a free
/// loopback port.
pub fn native_server() -> Proc {
    Proc::start(dynamo_run().args([
        "in=http",
        "out=native",
        "--model-path",
        model_dir(),
        "--model-name",
        "tiny",
        "--block-size",
        "16",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        "0",
    ]))
}

/// A free loopback port (bound, then released for the caller).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A model folder of the test's own (`make_model` in process), loaded.
pub fn small_model() -> (tempfile::TempDir, dynamo_preprocessor::ModelFolder) {
    use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
    let dir = tempfile::tempdir().unwrap();
    make_model(dir.path(), &MakeModelSettings::default()).unwrap();
    let folder = dynamo_preprocessor::ModelFolder::load(dir.path()).unwrap();
    (dir, folder)
}

/// [`small_model`] with the `tiny` preset's random weights: a folder the native engine loads.
pub fn native_model() -> (tempfile::TempDir, dynamo_preprocessor::ModelFolder) {
    use dynamo_preprocessor::make_model::{make_model, MakeModelSettings};
    let dir = tempfile::tempdir().unwrap();
    let vocab = make_model(dir.path(), &MakeModelSettings::default()).unwrap();
    dynamo_engine::native::random::RandomModel::preset("tiny", vocab)
        .unwrap()
        .write(dir.path(), &mut |_, _| {})
        .unwrap();
    let folder = dynamo_preprocessor::ModelFolder::load(dir.path()).unwrap();
    (dir, folder)
}

/// A runtime on `bus` (the embedded bus when `None`).
pub async fn runtime_on(bus: Option<String>) -> dynamo_runtime::Runtime {
    dynamo_runtime::Runtime::start(dynamo_runtime::RuntimeSettings {
        bus,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A runtime on `bus` and a process supervisor on it.
pub async fn supervised(
    bus: Option<String>,
) -> (
    dynamo_runtime::Runtime,
    dynamo_actors::supervisor::SupervisorHandle,
) {
    let runtime = runtime_on(bus).await;
    let sup = dynamo_actors::supervisor::SupervisorHandle::start(&runtime)
        .await
        .unwrap();
    (runtime, sup)
}

/// Two tests running `$body(bus: Option<String>)`: on the embedded bus, and on a real
/// nats-server started for the test (`#[macro_use] mod common;`).
macro_rules! on_both_buses {
    ($embedded:ident, $nats:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            $body(None).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $nats() {
            let server = dynamo_runtime::testing::NatsServer::start().unwrap();
            $body(Some(server.url())).await;
        }
    };
}

/// A subscription to every instance's events of `topic` in `namespace.component`.
pub async fn subscribe_events(
    runtime: &dynamo_runtime::Runtime,
    namespace: &str,
    component: &str,
    topic: &str,
) -> dynamo_runtime::bus::Subscription {
    let component = dynamo_runtime::subject::ComponentId::new(namespace, component).unwrap();
    runtime
        .bus()
        .subscribe(
            component.event_pattern(&dynamo_runtime::subject::Topic::new(topic).unwrap()),
            None,
        )
        .await
        .unwrap()
}

/// Starts a frontend role (no HTTP) in `namespace` under `sup`; its request path.
pub async fn frontend_role(
    sup: &dynamo_actors::supervisor::SupervisorHandle,
    namespace: &str,
) -> std::sync::Arc<dynamo_actors::frontend::Serving> {
    use dynamo_actors::frontend::FrontendSettings;
    use dynamo_actors::supervisor::{RoleSpec, Started};
    let fs = FrontendSettings::new(dynamo_runtime::subject::Namespace::new(namespace).unwrap());
    match sup
        .start_role("frontend", RoleSpec::Frontend(Box::new(fs)))
        .await
    {
        Ok(Started::Frontend { serving, .. }) => serving,
        Ok(_) => panic!("a frontend spec started something else"),
        Err(e) => panic!("the frontend role did not start: {e}"),
    }
}

/// A runtime on the nats-server at `url` whose discovery leases last `lease`.
pub async fn runtime_with_lease(url: String, lease: Duration) -> dynamo_runtime::Runtime {
    dynamo_runtime::Runtime::start(dynamo_runtime::RuntimeSettings {
        bus: Some(url),
        discovery: dynamo_runtime::discovery::DiscoverySettings {
            lease,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A `dynamo-run watch WHAT` process over `url`, its lines collected.
pub struct Watch {
    child: std::process::Child,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Watch {
    /// Starts it and waits until it has subscribed (it says so on stderr).
    pub fn start(url: &str, what: &str) -> Watch {
        let mut child = dynamo_run()
            .args(["--bus", url, "watch", what])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stdout, sink) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let (subscribed, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if l.starts_with("watching ") {
                    let _ = subscribed.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("watch did not subscribe");
        Watch { child, lines }
    }

    /// Waits until `ok` holds for the lines so far.
    pub async fn until(&self, what: &str, ok: impl Fn(&[String]) -> bool) {
        eventually(what, Duration::from_secs(20), || {
            ok(&self.lines.lock().unwrap())
        })
        .await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn graph(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
        .display()
        .to_string()
}

/// A `dynamo-run serve` child whose output lines are collected.
pub struct Serve {
    pub child: Child,
    pub out: Arc<Mutex<Vec<String>>>,
    pub err: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    pub fn start(args: &[&str]) -> Serve {
        Self::start_with_env(args, &[])
    }

    /// [`Serve::start`] with environment variables set (its children inherit them).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Serve {
        let mut child = dynamo_run()
            .arg("serve")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let l = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            });
            lines
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Serve { child, out, err }
    }

    /// Waits for a stdout line containing `needle` (the n-th such line); returns it.
    pub fn wait_out(&mut self, needle: &str, nth: usize, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            if let Some(l) = self
                .out
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .nth(nth)
            {
                return l.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "serve exited ({status}) before {needle:?}: {}",
                    self.err.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < until,
                "no {needle:?} in {:?}",
                self.out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_err(&self, needle: &str, within: Duration) {
        let until = Instant::now() + within;
        while !self.err.lock().unwrap().iter().any(|l| l.contains(needle)) {
            assert!(Instant::now() < until, "no {needle:?} on stderr");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the exit status if it comes within `within`.
    pub fn stop(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        signal(self.child.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then the exit status within `within`.
    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        self.stop(within).expect("serve did not stop after SIGTERM")
    }
}

impl Drop for Serve {
    /// A failed test still stops the graph: SIGTERM (serve stops its children), then SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.stop(Duration::from_secs(20)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// `http://127.0.0.1:PORT` from a line holding `http://HOST:PORT/v1`.
pub fn base(line: &str) -> String {
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    format!("http://127.0.0.1:{port}")
}

/// Starts a streaming completion (`body`) and reads its first piece: the request is open on
/// its worker when this returns.
pub async fn open_completion(
    serving: &Arc<dynamo_actors::frontend::Serving>,
    body: &serde_json::Value,
) -> dynamo_actors::frontend::Generation {
    let mut g = serving
        .start(dynamo_actors::frontend::Endpoint::Completions, body)
        .await
        .unwrap();
    let first = g
        .next()
        .await
        .expect("a first piece")
        .expect("no error yet");
    assert!(first.finish.is_none());
    g
}

/// Test certificates as PEM files: a CA, a server certificate for 127.0.0.1 and localhost, and
/// a client certificate (for mutual TLS), both signed by the CA.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    /// A client certificate that expired in 2021.
    pub expired_cert: std::path::PathBuf,
    pub expired_key: std::path::PathBuf,
}

impl Pki {
    pub fn write(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        };
        let params = |names: &[&str], cn: &str| {
            let mut p =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p
        };
        let mut ca = params(&[], "dynamo test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let pki = Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("cert.pem"),
            server_key: dir.join("key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
            expired_cert: dir.join("expired.pem"),
            expired_key: dir.join("expired-key.pem"),
        };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        for (names, cn, cert, key) in [
            (
                &["localhost", "127.0.0.1"][..],
                "localhost",
                &pki.server_cert,
                &pki.server_key,
            ),
            (&[][..], "dynamo worker", &pki.client_cert, &pki.client_key),
            (&[][..], "expired", &pki.expired_cert, &pki.expired_key),
        ] {
            let leaf_key = KeyPair::generate().unwrap();
            let mut p = params(names, cn);
            if cn == "expired" {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let leaf = p.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
            std::fs::write(cert, leaf.pem()).unwrap();
            std::fs::write(key, leaf_key.serialize_pem()).unwrap();
        }
        pki
    }
}

/// Waits for a load report of `worker` (an instance id as its subject's last token) showing it
/// idle, after dropping the reports already queued on `loads` (taken while a request ran,
/// they can arrive after its end).
pub async fn until_idle(loads: &mut dynamo_runtime::bus::Subscription, worker: &str) {
    use futures::FutureExt;
    while let Some(Some(_)) = loads.next().now_or_never() {}
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = loads.next().await {
            if m.subject.last_token() != worker {
                continue;
            }
            let r: dynamo_protocols::kv::LoadReport =
                dynamo_runtime::serve::decode_event(&m.payload).unwrap();
            if r.running_requests == 0 && r.waiting_requests == 0 {
                return;
            }
        }
    })
    .await
    .expect("the worker reports idle");
}
