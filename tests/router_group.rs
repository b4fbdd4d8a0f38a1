//! Three routers: the routing table's Raft group loses its leader (the
//! failover coordinator) under load. Clients of the other routers keep
//! working, a new coordinator takes over, and it still fails a cell over.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellbank::supervisor::ProcessId;
use cellbank_proto::router::PairMode;
use common::cluster::Cluster;
use common::ledger_checks::{seed, start_load, stop_load, users, verify_ledger, History};

async fn acks_grow(history: &History, more: usize, timeout: Duration) {
    let from = history.acked_count();
    let started = Instant::now();
    while history.acked_count() < from + more {
        assert!(started.elapsed() < timeout, "writes stalled for {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_router_keeps_clients_and_failover_working() {
    let mut cluster = Cluster::start(3, 1, |t| t.coordinator.cooldown_ms = 5_000);
    let status = cluster
        .wait_until("a coordinator and a sync pair", Duration::from_secs(30), |s| {
            s.leader_router_id != 0 && Cluster::pair_of(s, 1).mode == PairMode::Sync as i32
        })
        .await;
    let old_leader = status.leader_router_id;
    let survivors: Vec<String> =
        status.routers.iter().filter(|r| r.router_id != old_leader).map(|r| r.addr.clone()).collect();
    assert_eq!(survivors.len(), 2);
    let mut client = cellbank_cell::client::CellClient::new(survivors.clone());
    client.deadline = Duration::from_secs(10);
    let users = users(20);
    seed(&client, &users).await;
    let history = Arc::new(History::default());
    let load = start_load(survivors.clone(), users.clone(), 6, history.clone(), 14);
    acks_grow(&history, 100, Duration::from_secs(20)).await;

    cluster.sup.kill(ProcessId::Router(old_leader));
    let killed = Instant::now();
    acks_grow(&history, 100, Duration::from_secs(10)).await;
    println!("clients of the other routers kept writing: 100 acks {:?} after the kill", killed.elapsed());
    let status = cluster
        .wait_until("a new coordinator", Duration::from_secs(15), |s| {
            s.leader_router_id != 0 && s.leader_router_id != old_leader
        })
        .await;
    println!("router {} coordinates after {:?}", status.leader_router_id, killed.elapsed());

    // The new coordinator fails a dead cell over.
    cluster.sup.kill_cell(1);
    let status = cluster
        .wait_until("pair 1 failed over to cell 2", Duration::from_secs(15), |s| {
            Cluster::pair_of(s, 1).active_cell_id == 2
        })
        .await;
    assert_eq!(Cluster::pair_of(&status, 1).epoch, 2);
    acks_grow(&history, 100, Duration::from_secs(15)).await;

    stop_load(&history, load).await;
    let (checked, ok) = verify_ledger(&client, &users, &history).await;
    println!("verified {checked} transfers ({ok} OK) through the surviving routers");
}
