//! The shipped deployment files are real: the example production configs
//! parse and pass the processes' own checks, and the systemd units' command
//! lines are ones the binary accepts.

use std::path::Path;

fn shipped(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_example_production_configs_are_accepted() {
    let router = cellbank_router::config::RouterConfig::from_toml(&shipped("deploy/production/router.toml"))
        .expect("deploy/production/router.toml");
    assert_eq!(router.peers.len(), 3);
    assert!(router.tls.is_some() && !router.insecure && !router.fault_injection);
    let replica = cellbank_cell::config::ReplicaConfig::from_toml(&shipped("deploy/production/replica.toml"))
        .expect("deploy/production/replica.toml");
    assert_eq!(replica.advertised(replica.listen), "cell-1a.cellbank.internal:7100");
    assert!(replica.tls.is_some() && !replica.insecure);
    assert!(replica.metrics_listen.is_some());
}

/// Each unit's `ExecStart`, run as written but for its config path: the
/// binary parses every flag and fails only on reading the missing config
/// (or reaching the routers), never on its arguments.
#[test]
fn the_systemd_units_command_lines_parse() {
    for unit in ["cellbank-router.service", "cellbank-replica.service", "cellbank-reconciler.service"] {
        let text = shipped(&format!("deploy/systemd/{unit}")).replace("\\\n", " ");
        let line = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/cellbank"), "{unit}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let args: Vec<String> = words
            .map(|w| if w.starts_with("/etc/cellbank/") { missing.display().to_string() } else { w.to_string() })
            .collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellbank"))
            .args(&args)
            // The reconciler's routers do not exist: it must get past its
            // arguments and try them, so it is stopped after a moment.
            .env("CELLBANK_CERTS", dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run cellbank");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{unit}: {stderr}");
        assert!(!stderr.contains("error: unexpected argument") && !stderr.contains("Usage:"), "{unit}: {stderr}");
        assert!(stderr.contains("missing.toml") || stderr.contains("no certificate"), "{unit}: {stderr}");
    }
}
