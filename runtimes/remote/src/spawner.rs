//! Starting and killing the pool's server processes so that none outlives the process that owns the
//! pool, even one killed with SIGKILL, which runs no destructor.
//!
//! On Linux each server asks the kernel, between `fork` and `exec`, for SIGKILL when its parent dies
//! (`PR_SET_PDEATHSIG`). The kernel sends it when the *thread* that forked the server exits, not the
//! whole process, so every spawn happens on one dedicated thread that lives as long as the pool: a
//! tokio worker or a caller's thread could end while the server should run on.
//!
//! Each server also leads a process group of its own, so stopping it stops the workers it forked too
//! (MLServer's parallel inference workers). The death signal reaches the server alone: MLServer's
//! workers and multiprocessing's resource tracker exit when it dies (tests/e2e/test_runtimes.py checks
//! it with a SIGKILLed meshd), but a server whose workers ignore their parent's death would leave them
//! behind when its owner is SIGKILLed.
//!
//! This is the crate's only unsafe code: the `pre_exec` hook and the two system calls it needs.
#![allow(unsafe_code)]

use std::io;
use std::process::Stdio;
use std::thread::JoinHandle;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A thread that spawns processes, living as long as this handle.
pub(crate) struct Spawner {
    requests: Option<std::sync::mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

struct Request {
    command: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

impl Spawner {
    /// Starts the spawning thread; the children it makes are reaped by `handle`'s runtime.
    pub(crate) fn start(name: &str, handle: Handle) -> io::Result<Self> {
        let (requests, incoming) = std::sync::mpsc::channel::<Request>();
        let thread = std::thread::Builder::new().name(format!("spawn-{name}")).spawn(move || {
            // tokio's child processes register with the runtime that reaps them.
            let _runtime = handle.enter();
            while let Ok(Request { mut command, reply }) = incoming.recv() {
                let _ = reply.send(command.spawn());
            }
        })?;
        Ok(Self { requests: Some(requests), thread: Some(thread) })
    }

    /// Spawns `command` (a program and its arguments and environment; the rest is set here) from the
    /// spawning thread: no stdin, stdout and stderr piped, its own process group, killed when the pool
    /// is dropped or its owner dies.
    pub(crate) async fn spawn(&self, mut command: Command) -> io::Result<Child> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let (reply, answer) = oneshot::channel();
        let gone = || io::Error::other("the spawning thread has stopped");
        let requests = self.requests.as_ref().ok_or_else(gone)?;
        requests.send(Request { command, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop. Not joined when the last pool handle goes away on
        // that very thread (a panic unwinding there), which would wait for itself.
        self.requests.take();
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// Asks the kernel to SIGKILL the child when the spawning thread dies.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls are
    // allowed; it makes two (prctl, getppid), allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent died between fork and prctl: the signal it would have sent is lost, so the
            // child must not start.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the pool's owner exited while starting the server"));
            }
            Ok(())
        });
    }
}

/// Elsewhere a SIGKILLed owner leaves its servers running; a clean shutdown still stops them.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Sends SIGKILL to every process in the process group `pid` leads (the server and its workers).
///
/// Call it before the server is reaped: until then its pid, and so its group id, cannot be reused by
/// an unrelated process. After a server exited on its own, its group id stays reserved while a worker
/// of it lives, and sending to an empty group only fails with ESRCH.
pub(crate) fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid names a process group.
    let _ = unsafe { libc::kill(-pid, libc::SIGKILL) };
}
