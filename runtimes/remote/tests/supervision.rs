//! Start-up failures of a pool, with stand-in commands for the server: an operator must see why a
//! runtime cannot start, and `start` must give up in time.

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
