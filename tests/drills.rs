//! Chaos drills end to end: `cellbank chaos run` as a real process, with its
//! own local cluster of real processes, real SIGKILLs and the replicas' fault
//! points. The short CI suite of the drill library (deploy/drills/), the
//! drill that turns synchronous replication off and must be caught losing
//! acknowledged writes, `chaos halt`, and drills refused before any fault.

// They drive the replicas' fault points: built with `--features fault-points`
// (scripts/test.sh passes it; a production build has none).
#![cfg(feature = "fault-points")]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cellbank_proto::cell::fault_points_client::FaultPointsClient;
use cellbank_proto::cell::ListFaultsRequest;
use serde_json::Value;

fn cellbank() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cellbank"));
    // Attached drills call as the test certificates' operator; local drills
    // make their own cluster's.
    command.env("RUST_LOG", "warn").env_remove("CELLBANK_ADMIN_TOKEN").arg("--certs").arg(common::test_certs());
    command
}

struct Ran {
    output: Output,
    journal: Option<Value>,
    _dir: tempfile::TempDir,
}

impl Ran {
    fn text(&self) -> String {
        format!("{}{}", String::from_utf8_lossy(&self.output.stdout), String::from_utf8_lossy(&self.output.stderr))
    }
}

fn run_drill(file: &Path, extra: &[&str]) -> Ran {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = cellbank()
        .args(["chaos", "run"])
        .arg(file)
        .arg("--out")
        .arg(dir.path())
        .args(extra)
        .output()
        .expect("run cellbank chaos");
    let journal =
        std::fs::read(dir.path().join("journal.json")).ok().map(|b| serde_json::from_slice(&b).expect("json"));
    Ran { output, journal, _dir: dir }
}

fn verdict<'a>(journal: &'a Value, checker: &str) -> &'a Value {
    journal["verdicts"].as_array().unwrap().iter().find(|v| v["checker"] == checker).unwrap()
}

/// A library drill passes: exit 0, every checker passes (reads included:
/// no stale read), RPO 0, the heal verified, every fault has an RTO, the
/// credit delay was measured, and the HTML report exists.
fn library_drill_passes(name: &str) -> Value {
    let ran = run_drill(&Path::new("deploy/drills").join(format!("{name}.toml")), &[]);
    let text = ran.text();
    println!("{text}");
    assert!(ran.output.status.success(), "drill {name} failed:\n{text}");
    let journal = ran.journal.clone().expect("a journal");
    for v in journal["verdicts"].as_array().unwrap() {
        assert_eq!(v["status"], "Pass", "{name}: {v}");
    }
    assert_eq!(journal["rpo_lost"], 0);
    assert_eq!(journal["heal_verified"], true);
    assert!(journal["acknowledged"].as_u64().unwrap() > 1000, "{name}: the workload ran");
    assert!(journal["reads"].as_u64().unwrap() > 100, "{name}: the workload read");
    let reads = verdict(&journal, "reads_see_acknowledged_writes");
    assert!(reads["detail"].as_str().unwrap().contains("balance and"), "{name}: {reads}");
    assert!(journal["credit_delay"]["count"].as_u64().unwrap() > 100, "{name}: {}", journal["credit_delay"]);
    let faults = journal["faults"].as_array().unwrap();
    assert!(!faults.is_empty());
    for f in faults {
        assert!(f["rto_ms"].as_u64().is_some(), "{name}: fault without an RTO: {f}");
    }
    assert!(ran._dir.path().join("report.html").exists());
    let html = std::fs::read_to_string(ran._dir.path().join("report.html")).unwrap();
    assert!(html.contains("<svg") && !html.contains("http://") && !html.contains("https://"), "self-contained");
    assert!(text.contains(&format!("cellbank chaos run deploy/drills/{name}.toml --seed")), "the replay line");
    journal
}

#[test]
fn drill_leader_kill() {
    let journal = library_drill_passes("leader-kill");
    // A leader kill elects a new leader; it does not fail the pair over.
    assert!(journal["faults"][0]["failover"].is_null(), "{}", journal["faults"][0]);
}

#[test]
fn drill_cell_loss() {
    let journal = library_drill_passes("cell-loss");
    let timeline = &journal["faults"][0]["failover"];
    for part in ["detection_ms", "promotion_ms", "route_switch_ms", "first_success_ms"] {
        assert!(timeline[part].as_u64().is_some(), "failover timeline lacks {part}: {timeline}");
    }
}

#[test]
fn drill_cell_isolated_from_routers() {
    library_drill_passes("cell-isolated-from-routers");
}

#[test]
fn drill_old_active_restarts_isolated() {
    let journal = library_drill_passes("old-active-restarts-isolated");
    let fault = &journal["faults"][0];
    // The pair failed over while the cell was down...
    for part in ["detection_ms", "promotion_ms", "route_switch_ms"] {
        assert!(fault["failover"][part].as_u64().is_some(), "failover timeline lacks {part}: {fault}");
    }
    // ...and the cell came back with its standby stream already cut; the
    // step lasted until that cut (15 s after the restart, 10 s after the
    // kill) was healed.
    let restarted = journal["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["what"].as_str().unwrap().contains("with CELLBANK_FAULTS=standby.ship=drop:15000"));
    assert!(restarted, "{}", journal["events"]);
    let lasted = fault["end_ms"].as_u64().unwrap() - fault["start_ms"].as_u64().unwrap();
    assert!(lasted >= 24_000, "the step ended {lasted} ms after the kill: {fault}");
}

/// How many slices a drill's move-slices step moved (from its journal).
fn slices_moved(journal: &Value) -> u64 {
    slices_moved_by(journal, "move-slices")
}

fn slices_moved_by(journal: &Value, fault: &str) -> u64 {
    let faults = journal["faults"].as_array().expect("faults");
    let step = faults.iter().find(|f| f["fault"] == fault).unwrap_or_else(|| panic!("a {fault} step"));
    let detail = step["detail"].as_str().expect("a detail");
    println!("{fault}: {detail}");
    detail.split(' ').next().and_then(|n| n.parse().ok()).expect("the count moved")
}

#[test]
fn drill_move_under_leader_kill() {
    let journal = library_drill_passes("move-under-leader-kill");
    assert!(slices_moved(&journal) >= 8, "most of the 16 slices moved");
}

#[test]
fn drill_add_pair_at_peak() {
    let journal = library_drill_passes("add-pair-at-peak");
    assert_eq!(slices_moved_by(&journal, "add-pair"), 16, "every slice moved to the new pair");
    let detail = journal["faults"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("pair 3 was SYNC"), "{detail}");
}

#[test]
fn drill_router_leader_killed_mid_move() {
    let journal = library_drill_passes("router-leader-kill-mid-move");
    assert!(slices_moved(&journal) >= 32, "most of the 64 slices moved");
}

#[test]
fn drill_switchover_under_load() {
    let journal = library_drill_passes("switchover-under-load");
    assert_eq!(journal["faults"].as_array().unwrap().len(), 2, "switched over and back");
}

#[test]
fn the_lost_write_checker_fails_when_synchronous_replication_is_off() {
    let ran = run_drill(Path::new("deploy/drills/unsafe-async-standby.toml"), &[]);
    let text = ran.text();
    println!("{text}");
    assert!(!ran.output.status.success(), "a drill that loses acknowledged writes must fail:\n{text}");
    let journal = ran.journal.expect("a journal");
    let lost = verdict(&journal, "no_lost_ack");
    assert_eq!(lost["status"], "Fail", "{lost}");
    assert!(lost["offenses"].as_u64().unwrap() > 0);
    assert!(lost["first"]["what"].as_str().unwrap().contains("acknowledged"), "{lost}");
    assert!(journal["rpo_lost"].as_u64().unwrap() > 0);
    assert_eq!(journal["heal_verified"], true);
}

#[test]
fn a_second_command_halts_a_running_drill_and_everything_is_healed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long-partition.toml");
    std::fs::write(
        &file,
        r#"
name = "long-partition"
description = "A follower partitioned for a minute, to be halted."
seed = 5
[cluster]
mode = "local"
pairs = 1
[workload]
kind = "transfers"
rate = 100
accounts = 50
[steady_state]
warmup_s = 2
window_s = 2
[[method]]
fault = "partition"
target = { role = "follower", pair = 1 }
at_s = 1.0
duration_s = 60.0
"#,
    )
    .unwrap();
    let out = dir.path().join("report");
    let child = cellbank()
        .args(["chaos", "run"])
        .arg(&file)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the fault to be in place.
    let started = Instant::now();
    let cluster_log = out.join("cluster");
    loop {
        let injected = walk_logs(&cluster_log).contains("injected fault");
        if injected {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the drill never injected its fault");
        std::thread::sleep(Duration::from_millis(250));
    }
    let halted = cellbank().args(["chaos", "halt"]).output().unwrap();
    let halt_text = String::from_utf8_lossy(&halted.stdout).to_string();
    assert!(halted.status.success(), "{halt_text}");
    assert!(halt_text.contains("halting drill long-partition"), "{halt_text}");
    let output = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{text}");
    assert!(!output.status.success(), "a halted drill does not pass");
    let journal: Value = serde_json::from_slice(&std::fs::read(out.join("journal.json")).unwrap()).unwrap();
    assert!(journal["aborted"].as_str().unwrap().contains("halted"), "{}", journal["aborted"]);
    assert_eq!(journal["heal_verified"], true);
    // Healed long before the fault's minute was up, and the money is right.
    let fault = &journal["faults"][0];
    assert!(fault["end_ms"].as_u64().unwrap() - fault["start_ms"].as_u64().unwrap() < 50_000, "{fault}");
    for checker in ["no_lost_ack", "no_duplicates", "conservation", "balances_match", "reconcile"] {
        assert_eq!(verdict(&journal, checker)["status"], "Pass", "{checker}");
    }
}

fn walk_logs(dir: &Path) -> String {
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return text };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&walk_logs(&path));
        } else if path.file_name().is_some_and(|n| n == "process.log") {
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    text
}

#[test]
fn malformed_and_unknown_drills_are_refused_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let library = std::fs::read_to_string("deploy/drills/leader-kill.toml").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, library.replace("rate = 200", "rate = \"lots\"")).unwrap();
    let checked = cellbank().args(["chaos", "check"]).arg(&bad).output().unwrap();
    let text = String::from_utf8_lossy(&checked.stderr).to_string();
    assert!(!checked.status.success());
    let line = library.lines().position(|l| l.starts_with("rate = 200")).unwrap() + 1;
    assert!(text.contains(&format!("line {line}")) && text.contains("invalid type"), "{text}");

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, library.replace("fault = \"kill\"", "fault = \"meteor\"")).unwrap();
    let ran = run_drill(&unknown, &[]);
    assert!(!ran.output.status.success());
    assert!(ran.text().contains("unknown variant `meteor`"), "{}", ran.text());
    assert!(!ran.text().contains("local cluster:"), "no cluster was started for a bad file");
}

const ATTACHED: &str = r#"
name = "attached"
description = "An attached drill for the refusal tests."
seed = 3
[cluster]
mode = "attach"
router_addrs = ["ROUTER"]
admin_token_env = "DRILL_TEST_TOKEN"
blast_radius = [2, 4]
[workload]
kind = "transfers"
rate = 50
[[method]]
fault = "partition"
target = { role = "follower", pair = 1 }
at_s = 1.0
duration_s = 5.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_drills_need_credentials_and_stay_inside_their_blast_radius() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("attached.toml");
    // Without the credential nothing is contacted at all.
    std::fs::write(&file, ATTACHED.replace("ROUTER", "127.0.0.1:1")).unwrap();
    let ran = run_drill(&file, &[]);
    assert!(!ran.output.status.success());
    assert!(ran.text().contains("needs admin credentials: set DRILL_TEST_TOKEN"), "{}", ran.text());

    let token = "drill-test-token";
    let cluster = common::cluster::Cluster::start(1, 2, |t| t.admin_token = Some(token.to_string()));
    let routers = cluster.routers();
    let started = Instant::now();
    loop {
        let status = cellbank::routers::ClusterClient::new(&routers, Some(token)).status().await;
        let ready = status.is_ok_and(|s| {
            s.table.is_some_and(|t| {
                t.pairs.len() == 2 && t.pairs.iter().all(|p| p.mode == cellbank_proto::router::PairMode::Sync as i32)
            })
        });
        if ready {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the cluster never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(&file, ATTACHED.replace("ROUTER", &routers[0])).unwrap();

    // Pair 1 (cells 1 and 3) is outside the blast radius [2, 4].
    let outside = cellbank().args(["chaos", "run"]).arg(&file).env("DRILL_TEST_TOKEN", token).output().unwrap();
    let text = String::from_utf8_lossy(&outside.stderr).to_string();
    assert!(!outside.status.success());
    assert!(text.contains("outside the blast radius [2, 4]"), "{text}");

    // A wrong token is refused by the replicas before any fault.
    std::fs::write(&file, ATTACHED.replace("ROUTER", &routers[0]).replace("[2, 4]", "[1, 3]")).unwrap();
    let wrong = cellbank().args(["chaos", "run"]).arg(&file).env("DRILL_TEST_TOKEN", "guess").output().unwrap();
    let text = String::from_utf8_lossy(&wrong.stderr).to_string();
    assert!(!wrong.status.success());
    assert!(text.contains("admin token is wrong") || text.contains("PermissionDenied"), "{text}");

    // Nothing was injected anywhere.
    for cell in 1..=4 {
        for addr in cluster.sup.cell_endpoints(cell) {
            let addr = cellbank_client::planes::Plane::Admin.of(&addr);
            let channel = cellbank_client::ChannelSettings::SERVICE.connect(&addr).await.unwrap();
            let mut client = FaultPointsClient::new(channel);
            let mut request = tonic::Request::new(ListFaultsRequest {});
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            let list = client.list(request).await.unwrap().into_inner();
            assert!(list.compiled_in);
            assert!(list.faults.is_empty(), "cell {cell} {addr}: {:?}", list.faults);
        }
    }
}
