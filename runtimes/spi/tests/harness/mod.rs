//! Starts the Python SPI runtime (`tests/spi_runtime.py`) as a child process and follows the JSON
//! events it prints, so tests wait on what the runtime did (loaded, unloaded) with a deadline instead
//! of sleeping. A missing Python or grpcio fails the test with the runtime's stderr: never a skip.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use densemesh_runtime_spi::SpiRuntimeConfig;
use parking_lot::{Condvar, Mutex};
use serde_json::Value;

/// How long the runtime may take to generate its stubs and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The interpreter: the project's virtualenv (which has grpcio and grpcio-tools), else `python3`.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() { venv } else { PathBuf::from("python3") }
}

#[derive(Default)]
struct Log {
    events: Vec<Value>,
    exited: bool,
}

/// What the runtime printed so far, and a condition variable signalled on each new line.
#[derive(Default)]
struct Events {
    log: Mutex<Log>,
    changed: Condvar,
}

/// A running SPI runtime; killed on drop.
pub struct SpiServer {
    child: Child,
    /// `http://127.0.0.1:PORT` or `unix:///path`.
    pub endpoint: String,
    events: Arc<Events>,
    stderr: Arc<Mutex<String>>,
}

impl SpiServer {
    /// Starts the runtime listening on `listen` (`127.0.0.1:0`, `unix:///path`) with extra arguments,
    /// and waits until it listens.
    pub fn start(listen: &str, args: &[&str]) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/spi_runtime.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(["--listen", listen])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} {}", python().display(), script.display()))?;
        let events = Arc::new(Events::default());
        let stdout = child.stdout.take().context("no stdout")?;
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.log.lock().events.push(event);
                sink.changed.notify_all();
            }
            sink.log.lock().exited = true;
            sink.changed.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().context("no stderr")?;
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buffer) {
                err_sink.lock().push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        let mut server = Self { child, endpoint: String::new(), events, stderr };
        let Some(listening) = server.wait_for("listening", None, START_TIMEOUT) else {
            bail!("the SPI runtime did not start listening; its stderr:\n{}", server.stderr.lock());
        };
        server.endpoint = listening["endpoint"].as_str().context("endpoint")?.to_owned();
        Ok(server)
    }

    /// A config for this runtime with short deadlines, so a failing test fails fast.
    pub fn config(&self) -> SpiRuntimeConfig {
        let mut config = SpiRuntimeConfig::new("spi-test", &self.endpoint, &["multiplier"]);
        config.timeouts.startup = Duration::from_secs(20);
        config.timeouts.call = Duration::from_secs(5);
        config.timeouts.infer = Duration::from_secs(5);
        config
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// Waits until the runtime printed an event of `kind` (for `model_id`, if given) and returns it.
    pub fn wait_for(&self, kind: &str, model_id: Option<&str>, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let matches = |e: &Value| e["event"] == kind && model_id.is_none_or(|id| e["model_id"] == id);
        let mut log = self.events.log.lock();
        loop {
            if let Some(event) = log.events.iter().find(|e| matches(e)) {
                return Some(event.clone());
            }
            if log.exited || self.events.changed.wait_until(&mut log, deadline).timed_out() {
                return log.events.iter().find(|e| matches(e)).cloned();
            }
        }
    }

    /// Every event of `kind` so far.
    pub fn events(&self, kind: &str) -> Vec<Value> {
        self.events.log.lock().events.iter().filter(|e| e["event"] == kind).cloned().collect()
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} failed");
    }

    /// Kills the process (SIGKILL, as a crash would) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SpiServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a model file for the test runtime (see `spi_runtime.py`) and returns its path.
pub fn model_file(dir: &Path, name: &str, spec: Value) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).expect("write model file");
    path
}

/// Logs from the crate, shown for failing tests.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("densemesh_runtime_spi=debug"))
        .with_test_writer()
        .try_init();
}
