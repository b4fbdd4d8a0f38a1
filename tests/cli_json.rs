//! `-o json`: every command that prints state prints one JSON document a
//! script can read, with the same facts as its text; an unknown output
//! format is an error.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use serde_json::Value;

/// Runs the binary as the tests' operator; stdout parsed as JSON when the
/// command succeeded.
fn cellbank(cluster: &Cluster, args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cellbank"))
        .args(["-o", "json", "--identity", "operator-admin", "--certs"])
        .arg(common::test_certs())
        .args(args)
        .args(["--endpoints", &cluster.routers().join(",")])
        .output()
        .expect("run cellbank");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_printing_commands_speak_json() {
    let cluster = Cluster::start(1, 2, |_| {});
    for pair in [1, 2] {
        cluster.wait_for_mode(pair, cellbank_proto::router::PairMode::Sync, Duration::from_secs(60)).await;
    }
    let status = cellbank(&cluster, &["status"]);
    let modes: Vec<&str> = status["pairs"].as_array().unwrap().iter().map(|p| p["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["SYNC", "SYNC"]);
    assert_eq!(status["replicas"].as_array().unwrap().len(), 12);
    assert_eq!(status["slice_count"], 16);
    assert!(status["routers"][0]["leader"].as_bool().unwrap());
    assert_eq!(status["kind"], "cluster");

    for user in ["1", "2"] {
        let opened = cellbank(&cluster, &["account", "open", "--user", user]);
        assert_eq!(opened["code"], "OK", "{opened}");
    }
    let deposit = cellbank(&cluster, &["deposit", "--user", "1", "--amount", "500", "--id", "json-d1"]);
    assert_eq!((deposit["code"].as_str(), deposit["transfer_id"].as_str()), (Some("OK"), Some("json-d1")));
    let transfer = cellbank(&cluster, &["transfer", "--from", "1", "--to", "2", "--amount", "120", "--id", "json-t1"]);
    assert_eq!(transfer["code"], "OK", "{transfer}");
    let balance = cellbank(&cluster, &["balance", "--user", "1"]);
    assert_eq!((balance["balance"].as_i64(), balance["currency"].as_str()), (Some(380), Some("CNY")));
    let history = cellbank(&cluster, &["history", "--user", "1", "--all"]);
    let ids: Vec<&str> =
        history["transfers"].as_array().unwrap().iter().map(|t| t["transfer_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["json-d1", "json-t1"], "{history}");
    assert_eq!(history["more"], false);
    let record = cellbank(&cluster, &["get-transfer", "--id", "json-t1"]);
    assert_eq!(record["kind"], "TRANSFER", "{record}");
    assert_eq!((record["from_user_id"].as_u64(), record["amount"].as_u64()), (Some(1), Some(120)));

    let sent =
        cellbank(&cluster, &["envelope", "send", "--from", "1", "--total", "100", "--shares", "2", "--id", "e1"]);
    let envelope = sent["envelope_id"].as_str().expect("an envelope id").to_string();
    let grabbed = cellbank(&cluster, &["envelope", "grab", "--envelope", &envelope, "--user", "2"]);
    assert_eq!(grabbed["code"], "OK", "{grabbed}");
    let shown = cellbank(&cluster, &["envelope", "show", "--envelope", &envelope]);
    assert_eq!((shown["shares"].as_u64(), shown["shares_grabbed"].as_u64()), (Some(2), Some(1)), "{shown}");
    assert_eq!(shown["grabs"][0]["user_id"], 2);

    let audit = cellbank(&cluster, &["admin", "audit"]);
    assert!(!audit["records"].as_array().unwrap().is_empty(), "{audit}");
    let settlement = cellbank(&cluster, &["admin", "settlement"]);
    assert!(settlement["lines"].is_array(), "{settlement}");
    let reconcile = cellbank(&cluster, &["admin", "reconcile"]);
    assert_eq!(reconcile["discrepancies"].as_array().map(Vec::len), Some(0), "{reconcile}");
    let capacity = cellbank(&cluster, &["capacity", "status", "--window-ms", "200"]);
    assert!(capacity.is_object(), "{capacity}");
    let cell_endpoints = cluster.sup.cell_endpoints(1).join(",");
    let digests = std::process::Command::new(env!("CARGO_BIN_EXE_cellbank"))
        .args(["-o", "json", "--identity", "operator-admin", "--certs"])
        .arg(common::test_certs())
        .args(["admin", "digest", "--endpoints", &cell_endpoints])
        .output()
        .unwrap();
    let digests: Value = serde_json::from_slice(&digests.stdout).expect("digests as JSON");
    let replicas = digests["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 3);
    assert!(replicas.iter().all(|r| r["digest"].is_string()), "{digests}");

    // An unknown format is refused by name, not silently taken as text.
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_cellbank")).args(["-o", "yaml", "status"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid value 'yaml'") && stderr.contains("json"), "{stderr}");
}
