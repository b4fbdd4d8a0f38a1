//! Standby pairs end to end: real router and cell processes on loopback,
//! whole cells killed with SIGKILL under a steady transfer load through the
//! router. Every acknowledged transfer must be there afterwards, exactly
//! once, with balances that sum to zero and never go negative.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellbank_proto::router::{PairMode, SwitchoverRequest};
use common::cluster::Cluster;
use common::ledger_checks::{seed, start_load, stop_load, users, verify_ledger, History};

/// Waits until the workload has `more` acknowledgements beyond `from`;
/// returns how long that took.
async fn acks_grow(history: &History, from: usize, more: usize, timeout: Duration) -> Duration {
    let started = Instant::now();
    while history.acked_count() < from + more {
        assert!(started.elapsed() < timeout, "writes did not resume within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cell_failover_loses_no_acknowledged_transfer_and_fails_back() {
    let mut cluster = Cluster::start(1, 1, |t| t.coordinator.cooldown_ms = 5_000);
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users = users(40);
    seed(&client, &users).await;
    let history = Arc::new(History::default());
    let load = start_load(cluster.routers(), users.clone(), 8, history.clone(), 11);
    acks_grow(&history, 0, 200, Duration::from_secs(20)).await;

    // Every replica of the active cell dies at once.
    let killed = Instant::now();
    cluster.sup.kill_cell(1);
    let acked_at_kill = history.acked_count();
    let status = cluster
        .wait_until("pair 1 failed over to cell 2", Duration::from_secs(15), |s| {
            Cluster::pair_of(s, 1).active_cell_id == 2
        })
        .await;
    let switched = killed.elapsed();
    let pair = Cluster::pair_of(&status, 1);
    assert_eq!(pair.epoch, 2, "one failover, one new epoch");
    assert_eq!(pair.mode, PairMode::Degraded as i32, "no standby until cell 1 is rebuilt");
    acks_grow(&history, acked_at_kill, 50, Duration::from_secs(15)).await;
    println!(
        "routing switched {switched:?} after the kill; 50 more writes acknowledged {:?} after it",
        killed.elapsed()
    );

    // The old active comes back as the standby, is rebuilt and catches up.
    cluster.sup.start_cell(1).expect("restart cell 1");
    let pair = cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    assert_eq!((pair.active_cell_id, pair.standby_cell_id, pair.epoch), (2, 1, 2));

    // Planned failback: a switchover returns the traffic to cell 1.
    let acked_before = history.acked_count();
    let request = SwitchoverRequest { pair_id: 1, who: "test".into(), why: "failback".into() };
    let response =
        cellbank::routers::ClusterClient::new(&cluster.routers(), None).switchover(request).await.expect("switchover");
    println!("failback: {} (write pause {} ms)", response.detail, response.write_pause_ms);
    assert_eq!((response.active_cell_id, response.new_epoch), (1, 3));
    acks_grow(&history, acked_before, 100, Duration::from_secs(15)).await;
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(15)).await;

    stop_load(&history, load).await;
    let (checked, ok) = verify_ledger(&client, &users, &history).await;
    println!("verified {checked} transfers ({ok} OK) through the router");
    assert!(ok > 300, "the load made progress ({ok} OK)");
    cluster.assert_pair_identical(1, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_standby_degrades_the_pair_and_never_triggers_failover() {
    let mut cluster = Cluster::start(1, 1, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users = users(30);
    seed(&client, &users).await;
    let history = Arc::new(History::default());
    let load = start_load(cluster.routers(), users.clone(), 6, history.clone(), 12);
    acks_grow(&history, 0, 100, Duration::from_secs(20)).await;

    cluster.sup.kill_cell(2);
    let killed = Instant::now();
    let pair = cluster.wait_for_mode(1, PairMode::Degraded, Duration::from_secs(10)).await;
    println!("degraded {:?} after the standby died", killed.elapsed());
    assert_eq!((pair.active_cell_id, pair.epoch), (1, 1), "a dead standby never moves the traffic");
    let acked = history.acked_count();
    acks_grow(&history, acked, 100, Duration::from_secs(10)).await;
    // Long past the failover window: still no failover, and writes flow.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = cluster.status().await.expect("status");
    let pair = Cluster::pair_of(&status, 1);
    assert_eq!((pair.active_cell_id, pair.epoch, pair.mode), (1, 1, PairMode::Degraded as i32));

    cluster.sup.start_cell(2).expect("restart the standby");
    let pair = cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    assert_eq!((pair.active_cell_id, pair.standby_cell_id, pair.epoch), (1, 2, 1));
    let acked = history.acked_count();
    acks_grow(&history, acked, 100, Duration::from_secs(10)).await;

    stop_load(&history, load).await;
    let (checked, ok) = verify_ledger(&client, &users, &history).await;
    println!("verified {checked} transfers ({ok} OK) through the router");
    cluster.assert_pair_identical(1, Duration::from_secs(30)).await;
}
