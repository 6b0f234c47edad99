//! Start-up failures of a pool, and the death of its servers with it, with stand-in commands for the
//! server: an operator must see why a runtime cannot start, `start` must give up in time, and no server
//! (nor a worker it forked) may outlive the pool, even one whose owner was SIGKILLed.

use std::time::Duration;

use densemesh_runtime_core::Error;
use densemesh_runtime_remote::{RemoteRuntime, RemoteRuntimeConfig};

fn config(command: &[&str]) -> RemoteRuntimeConfig {
    let mut config = RemoteRuntimeConfig::mlserver("unused", 1);
    config.command = Some(command.iter().map(|s| s.to_string()).collect());
    config.timeouts.startup = Duration::from_secs(5);
    config
}

#[test]
fn a_missing_program_makes_the_runtime_unavailable() {
    let Err(error) = RemoteRuntime::start(config(&["/nonexistent/mlserver", "start", "{repository}"])) else {
        panic!("started a program that does not exist")
    };
    assert!(matches!(error, Error::RuntimeUnavailable(_)), "{error:?}");
    assert!(error.to_string().contains("cannot start \"/nonexistent/mlserver\""), "{error}");
}

#[test]
fn a_server_that_exits_before_it_is_ready_reports_its_last_output() {
    let Err(error) =
        RemoteRuntime::start(config(&["sh", "-c", "echo no module named mlserver_sklearn >&2; exit 3"]))
    else {
        panic!("a server that exits started")
    };
    let message = error.to_string();
    assert!(message.contains("exited (exit status: 3) before it was ready"), "{message}");
    assert!(message.contains("no module named mlserver_sklearn"), "{message}");
}

#[test]
fn a_server_that_never_answers_times_out() {
    let mut config = config(&["sleep", "60"]);
    config.timeouts.startup = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let Err(error) = RemoteRuntime::start(config) else { panic!("sleep answered ServerReady") };
    assert!(error.to_string().contains("was not ready after 500ms (raise `timeouts.startup`)"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "gave up after {:?}", started.elapsed());
}

#[test]
fn placeholders_reach_the_command() {
    // The "server" prints its arguments and exits, so the start error carries them back.
    let Err(error) = RemoteRuntime::start(config(&[
        "sh",
        "-c",
        "echo ports $0 $1 $2 in $3; exit 1",
        "{grpc_port}",
        "{http_port}",
        "{metrics_port}",
        "{repository}",
    ])) else {
        panic!("started")
    };
    let message = error.to_string();
    let line = message.lines().find(|l| l.starts_with("ports ")).unwrap_or_else(|| panic!("{message}"));
    let words: Vec<&str> = line.split(' ').collect();
    let ports: Vec<u16> = words[1..4].iter().map(|p| p.parse().expect("a port")).collect();
    assert!(
        ports.iter().all(|&p| p > 0) && ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2],
        "{line}"
    );
    assert!(words[5].ends_with("mlserver-0"), "each process has its own repository: {line}");
}

/// Whether `pid` names a living process: a zombie (killed, not yet reaped by whoever adopted it) is dead.
#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) state ...`; comm may hold spaces and parentheses, the state follows the last `)`.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

#[cfg(target_os = "linux")]
fn pid_in(file: &std::path::Path, timeout: Duration) -> u32 {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(pid) = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse().ok()) {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "{} not written within {timeout:?}", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(target_os = "linux")]
fn gone_within(pid: u32, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while alive(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Names the directory where [`pool_owner`] has its server write its pid.
const OWNER_DIR: &str = "DENSEMESH_TEST_POOL_OWNER_DIR";

/// Not a test of its own: the process that `a_sigkilled_owner_takes_its_server_along` starts (this
/// test binary again, with [`OWNER_DIR`] set) and kills. It starts a pool whose server writes its pid
/// and never becomes ready, so `start` waits on it until the owner is killed.
#[test]
#[ignore = "run as a separate process by a_sigkilled_owner_takes_its_server_along"]
fn pool_owner() {
    let dir = std::env::var(OWNER_DIR).expect("run by a_sigkilled_owner_takes_its_server_along");
    let script = format!("echo $$ > {dir}/server.pid; exec sleep 600");
    let mut config = config(&["sh", "-c", &script]);
    config.timeouts.startup = Duration::from_secs(600);
    let result = RemoteRuntime::start(config);
    panic!("the owner was to be killed while starting, but start returned: {:?}", result.err());
}

#[cfg(target_os = "linux")]
#[test]
fn a_sigkilled_owner_takes_its_server_along() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut owner = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["pool_owner", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(OWNER_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the pool owner");
    let server = pid_in(&dir.path().join("server.pid"), Duration::from_secs(30));
    assert!(alive(server), "the server runs while its owner does");
    // SIGKILL: no destructor, no shutdown, nothing in the owner runs.
    owner.kill().expect("SIGKILL the owner");
    owner.wait().expect("reap the owner");
    assert!(gone_within(server, Duration::from_secs(5)), "server {server} outlived its SIGKILLed owner");
}

#[cfg(target_os = "linux")]
#[test]
fn stopping_a_server_stops_the_workers_it_forked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let worker_file = dir.path().join("worker.pid");
    // A server that forks a worker, then never answers: start gives up and kills it.
    let script = format!("sleep 600 & echo $! > {}; exec sleep 600", worker_file.display());
    let mut config = config(&["sh", "-c", &script]);
    config.timeouts.startup = Duration::from_secs(2);
    let Err(error) = RemoteRuntime::start(config) else { panic!("sleep answered ServerReady") };
    assert!(error.to_string().contains("was not ready"), "{error}");
    let worker = pid_in(&worker_file, Duration::from_secs(1));
    assert!(gone_within(worker, Duration::from_secs(5)), "worker {worker} outlived its server");
}
