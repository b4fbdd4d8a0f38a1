use super::*;

const GOOD: &str = r#"
name = "t"
seed = 7

[cluster]
mode = "local"

[workload]
kind = "transfers"
rate = 100

[[method]]
fault = "kill"
target = { role = "follower" }
at_s = 2.0
jitter_ms = 5000
duration_s = 3.0

[[method]]
fault = "partition"
target = { role = "replica" }
after_s = 1.0
jitter_ms = 5000
duration_s = 3.0
"#;

#[test]
fn the_library_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/drills");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let drill = Drill::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!drill.description.trim().is_empty(), "{} has no description", path.display());
            count += 1;
        }
    }
    assert!(count >= 13, "the library has {count} drills");
}

#[test]
fn the_same_seed_chooses_the_same_targets_and_timing() {
    let drill = Drill::parse(GOOD).unwrap();
    let first = plan(&drill, 2);
    assert_eq!(first, plan(&drill, 2));
    // Another seed chooses differently (pair, pick or jitter).
    let other = Drill { seed: 8, ..drill.clone() };
    assert_ne!(first, plan(&other, 2));
    // Jitter stays within its bound; serial steps are marked.
    assert!(first[0].start_ms >= 2000 && first[0].start_ms <= 7000);
    assert!(first[1].serial && !first[0].serial);
    assert!(first.iter().all(|s| s.pair == 1 || s.pair == 2));
}

#[test]
fn a_malformed_file_points_at_the_line_and_field() {
    let bad = GOOD.replace("rate = 100", "rate = \"fast\"");
    let e = Drill::parse(&bad).unwrap_err();
    assert_eq!(e.line, Some(10), "{e}");
    assert!(e.to_string().contains("line 10"), "{e}");

    let unknown_field = GOOD.replace("rate = 100", "rate = 100\nspeed = 3");
    let e = Drill::parse(&unknown_field).unwrap_err();
    assert_eq!(e.line, Some(11), "{e}");
    assert!(e.message.contains("speed"), "{e}");

    let unknown_fault = GOOD.replace("fault = \"kill\"", "fault = \"meteor\"");
    let e = Drill::parse(&unknown_fault).unwrap_err();
    assert_eq!(e.line, Some(13), "{e}");
    assert!(e.message.contains("meteor") && e.message.contains("partition"), "{e}");

    let missing = GOOD.replace("seed = 7\n", "");
    let e = Drill::parse(&missing).unwrap_err();
    assert!(e.message.contains("seed"), "{e}");
}

#[test]
fn checks_after_parsing_name_the_field() {
    let e = Drill::parse(&GOOD.replace("rate = 100", "rate = 0")).unwrap_err();
    assert!(e.message.starts_with("workload.rate"), "{e}");
    assert_eq!(e.line, Some(10));

    let both = GOOD.replace("after_s = 1.0", "after_s = 1.0\nat_s = 1.0");
    let e = Drill::parse(&both).unwrap_err();
    assert!(e.message.contains("exactly one of at_s"), "{e}");

    let no_duration = GOOD.replace("after_s = 1.0\njitter_ms = 5000\nduration_s = 3.0", "after_s = 1.0");
    let e = Drill::parse(&no_duration).unwrap_err();
    assert!(e.message.contains("duration_s"), "{e}");

    let wrong_role = GOOD.replace("target = { role = \"replica\" }", "target = { role = \"router-leader\" }");
    let e = Drill::parse(&wrong_role).unwrap_err();
    assert!(e.message.contains("target.role"), "{e}");

    let pair = GOOD.replace("target = { role = \"follower\" }", "target = { role = \"follower\", pair = 9 }");
    let e = Drill::parse(&pair).unwrap_err();
    assert!(e.message.contains("target.pair 9"), "{e}");
}

#[test]
fn an_attached_drill_needs_routers_a_blast_radius_and_no_process_faults() {
    let attached = GOOD.replace("mode = \"local\"", "mode = \"attach\"\nrouter_addrs = [\"127.0.0.1:7000\"]");
    let e = Drill::parse(&attached).unwrap_err();
    assert!(e.message.contains("blast_radius"), "{e}");

    let with_radius = attached.replace("mode = \"attach\"", "mode = \"attach\"\nblast_radius = [1, 3]");
    let e = Drill::parse(&with_radius).unwrap_err();
    assert!(e.message.contains("process faults need a local cluster"), "{e}");

    let fault_points_only = with_radius.replace("fault = \"kill\"", "fault = \"slow-disk\"\ndelay_ms = 20");
    let drill = Drill::parse(&fault_points_only).unwrap();
    assert_eq!(drill.cluster.blast_radius, vec![1, 3]);
}

#[test]
fn the_rng_is_fixed_for_a_seed() {
    let mut a = Rng::new(42);
    let mut b = Rng::new(42);
    let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
    assert_eq!(xs, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
    assert!((0..1000).all(|_| a.below(7) < 7));
}

#[test]
fn reads_are_a_modest_share_with_a_default() {
    let drill = Drill::parse(GOOD).unwrap();
    assert_eq!(drill.workload.reads, 0.1);
    let none = Drill::parse(&GOOD.replace("rate = 100", "rate = 100\nreads = 0.0")).unwrap();
    assert_eq!(none.workload.reads, 0.0);
    let e = Drill::parse(&GOOD.replace("rate = 100", "rate = 100\nreads = 0.8")).unwrap_err();
    assert!(e.message.starts_with("workload.reads"), "{e}");
    assert_eq!(e.line, Some(11));
}

const KILL_CELL: &str = r#"
name = "t"
seed = 7

[cluster]
mode = "local"

[workload]
kind = "transfers"
rate = 100

[[method]]
fault = "kill"
target = { role = "cell", side = "active" }
at_s = 2.0
duration_s = 10.0
"#;

#[test]
fn a_restart_with_faults_is_checked_as_the_replica_would() {
    let with = |value: &str| KILL_CELL.replace("duration_s = 10.0", &format!("duration_s = 10.0\n{value}"));
    let drill = Drill::parse(&with("restart_faults = \"standby.ship=drop:30000\"")).unwrap();
    assert_eq!(drill.method[0].restart_faults.as_deref(), Some("standby.ship=drop:30000"));
    assert_eq!(
        restart_fault_points("standby.ship=drop:30000;disk.sync=delay:5000:20;standby.ship=delay:100:5").unwrap(),
        (vec!["disk.sync".to_string(), "standby.ship".to_string()], 30_000)
    );
    for (bad, why) in [
        ("restart_faults = \"standby.ship=drop\"", "duration_ms is missing"),
        ("restart_faults = \"nowhere=drop:100\"", "unknown fault point"),
        ("restart_faults = \"standby.ship=skip:100\"", "action"),
        ("restart_faults = \"standby.ship=drop:900000\"", "duration_ms"),
        ("restart_faults = \" ; \"", "names no fault"),
    ] {
        let e = Drill::parse(&with(bad)).unwrap_err();
        assert!(e.message.contains("restart_faults") && e.message.contains(why), "{bad}: {e}");
        assert_eq!(e.line, Some(17), "{e}");
    }
    let not_a_kill = with("restart_faults = \"standby.ship=drop:30000\"").replace("\"kill\"", "\"pause\"");
    let e = Drill::parse(&not_a_kill).unwrap_err();
    assert!(e.message.contains("only a kill restarts"), "{e}");
}

#[test]
fn a_cell_lost_for_good_is_a_whole_cell_killed_and_never_restarted() {
    let lost = KILL_CELL.replace("duration_s = 10.0", "permanent = true");
    let drill = Drill::parse(&lost).unwrap();
    assert!(drill.method[0].permanent);
    assert_eq!(plan(&drill, 2)[0].duration_ms, 0);
    // A duration is how long the method observes the loss.
    let observed = KILL_CELL.replace("duration_s = 10.0", "duration_s = 45.0\npermanent = true");
    assert_eq!(plan(&Drill::parse(&observed).unwrap(), 2)[0].duration_ms, 45_000);
    let restarted = format!("{lost}\nrestart_faults = \"standby.ship=drop:1000\"");
    let e = Drill::parse(&restarted).unwrap_err();
    assert!(e.message.contains("never restarted"), "{e}");
    let one_replica = lost.replace("role = \"cell\"", "role = \"leader\"");
    let e = Drill::parse(&one_replica).unwrap_err();
    assert!(e.message.contains("only a kill of a whole cell"), "{e}");
    let paused = lost.replace("\"kill\"", "\"pause\"");
    assert!(Drill::parse(&paused).unwrap_err().message.contains("permanent"));
}

#[test]
fn a_forced_failover_acts_on_a_pair_and_needs_no_duration() {
    let failover = GOOD.replace(
        "fault = \"kill\"\ntarget = { role = \"follower\" }\nat_s = 2.0\njitter_ms = 5000\nduration_s = 3.0",
        "fault = \"failover\"\ntarget = { role = \"cell\", pair = 1 }\nat_s = 2.0",
    );
    let drill = Drill::parse(&failover).unwrap();
    assert_eq!(drill.method[0].fault, FaultKind::Failover);
    let e = Drill::parse(&failover.replace("role = \"cell\", pair = 1", "role = \"leader\", pair = 1")).unwrap_err();
    assert!(e.message.contains("target.role"), "{e}");
    let e = Drill::parse(&failover.replace("pair = 1 }", "pair = 1, side = \"standby\" }")).unwrap_err();
    assert!(e.message.contains("acts on the active cell"), "{e}");
}

#[test]
fn the_credit_delay_bound_is_checked() {
    let bound = |value: &str| format!("{KILL_CELL}\n[expect]\ncredit_delay_p99_max_ms = {value}\n");
    assert_eq!(Drill::parse(&bound("3000")).unwrap().expect.credit_delay_p99_max_ms, Some(3000));
    assert_eq!(Drill::parse(KILL_CELL).unwrap().expect.credit_delay_p99_max_ms, None);
    let e = Drill::parse(&bound("0")).unwrap_err();
    assert!(e.message.starts_with("expect.credit_delay_p99_max_ms"), "{e}");
    let local_only = bound("3000").replace("rate = 100", "rate = 100\ncross_cell = 0.0");
    let e = Drill::parse(&local_only).unwrap_err();
    assert!(e.message.contains("no cross-cell transfers"), "{e}");
}
