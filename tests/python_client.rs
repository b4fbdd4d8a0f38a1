//! The Python client (`clients/python`) end to end, so that `cargo test`
//! runs it: `scripts/python-client-test.sh` keeps a virtualenv outside the
//! checkout (installing python3-venv and the pinned packages on a first
//! run), generates the code from `proto/`, installs the package and runs
//! its tests against a real local cluster of this build's binary (`cellbank
//! up` on free ports): accounts and deposits, a transfer retried with the
//! same id answered with the original result and applied once, refusals
//! with their `google.rpc` details decoded (the bad field named), a dead
//! endpoint left for the next, and a transfer between cells followed until
//! it is CREDITED.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest the script may take: a first run also makes the virtualenv.
const TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long the script has to stop its cluster after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Waits for the child until `limit` has passed since `started`.
fn wait_until(child: &mut std::process::Child, started: Instant, limit: Duration) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            return Some(status);
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `signal` to the process group `group`; false when no process is
/// left in it.
fn signal_group(group: libc::pid_t, signal: i32) -> bool {
    // SAFETY: kill(2) on the process group this test made for the script
    // (signal 0 only asks whether any process is left in it).
    unsafe { libc::kill(-group, signal) == 0 }
}

#[test]
fn python_client_passes_its_end_to_end_test_against_a_real_cluster() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut log = tempfile::tempfile().expect("a log file");
    let mut child = Command::new("bash")
        .arg(root.join("scripts/python-client-test.sh"))
        .current_dir(root)
        .env("CELLBANK_BIN", env!("CARGO_BIN_EXE_cellbank"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log.try_clone().expect("log"))
        // Its own process group, so that a timeout stops all of it.
        .process_group(0)
        .spawn()
        .expect("run scripts/python-client-test.sh");
    let started = Instant::now();
    let status = wait_until(&mut child, started, TIMEOUT);
    if status.is_none() {
        // SIGTERM first: the Python test then stops its cluster (which runs
        // in a process group of its own) and exits. The shell dies at once,
        // so wait for the whole group, then SIGKILL what is left.
        let group = child.id() as libc::pid_t;
        signal_group(group, libc::SIGTERM);
        let stopping = Instant::now();
        while signal_group(group, 0) && stopping.elapsed() < STOP_GRACE {
            let _ = child.try_wait(); // reaps the shell, which would otherwise stay in the group
            std::thread::sleep(Duration::from_millis(100));
        }
        if signal_group(group, 0) {
            signal_group(group, libc::SIGKILL);
        }
        let _ = child.wait();
    }
    let mut output = String::new();
    log.seek(SeekFrom::Start(0)).expect("rewind the log");
    log.read_to_string(&mut output).expect("read the log");
    println!("{output}");
    match status {
        Some(status) => assert!(status.success(), "scripts/python-client-test.sh exited with {status}:\n{output}"),
        None => panic!("scripts/python-client-test.sh did not finish within {TIMEOUT:?}:\n{output}"),
    }
}
