//! Three routers: the routing table's Raft group loses its leader (the
//! failover coordinator) under load. Clients of the other routers keep
//! working, a new coordinator takes over, and it still fails a cell over.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellbank::supervisor::ProcessId;
use cellbank_proto::router::{PairMode, SwitchoverRequest};
use cellbank_proto::v1::TransferRequest;
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
    let mut client = cellbank_client::CellClient::new(survivors.clone());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_router_is_refused_by_the_old_active_and_catches_up() {
    let mut cluster = Cluster::start(3, 1, |t| {
        for router in &mut t.routers {
            router.metrics = Some(format!("127.0.0.1:{}", common::free_port()));
        }
    });
    let status = cluster
        .wait_until("a coordinator and a sync pair", Duration::from_secs(30), |s| {
            s.leader_router_id != 0 && Cluster::pair_of(s, 1).mode == PairMode::Sync as i32
        })
        .await;
    let stale = status.routers.iter().find(|r| r.router_id != status.leader_router_id).unwrap().router_id;
    let stale_id = ProcessId::Router(stale);
    let stale_addr = cluster.sup.addr(stale_id).unwrap();
    let stale_metrics = cluster.sup.metrics_addr(stale_id).unwrap();
    let users = users(4);
    let mut through_stale = cellbank_client::CellClient::new(vec![stale_addr.clone()]);
    through_stale.deadline = Duration::from_secs(10);
    seed(&through_stale, &users).await;
    let through_stale = Arc::new(through_stale);

    // The stale router sleeps through a switchover: the standby becomes
    // active at the next epoch and the old active, still running, its
    // standby. A request is already waiting in its socket when it wakes:
    // it routes with the old epoch to the old active, which refuses and
    // names the new one; the router waits for its table and is served by
    // the new active. When it wakes, its table may also catch up before it
    // reads the request (both wait in its sockets); then the stale path is
    // not taken, and the round is repeated (at most five times).
    let others: Vec<String> = cluster.routers().into_iter().filter(|a| *a != stale_addr).collect();
    let mut rounds = 0;
    let (before, after) = loop {
        rounds += 1;
        cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
        // A labelled counter has no sample until its first increment.
        let before = common::metric(&stale_metrics, "cellbank_router_retries_total", "stale_table").await.unwrap_or(0);
        cluster.sup.pause(stale_id, true);
        let request = SwitchoverRequest { pair_id: 1, who: "test".into(), why: "stale router".into() };
        let response =
            cellbank::routers::ClusterClient::new(&others, None).switchover(request).await.expect("switchover");
        assert_eq!(response.new_epoch, 1 + rounds, "one switchover, one new epoch");
        let client = through_stale.clone();
        let id = format!("through-a-stale-router-{rounds}").into_bytes();
        let sent = tokio::spawn(async move {
            client
                .ledger(|mut c| {
                    let transfer_id = id.clone();
                    async move {
                        c.transfer(TransferRequest {
                            transfer_id_text: String::new(),
                            transfer_id,
                            from_user_id: 1,
                            to_user_id: 2,
                            currency: common::ledger_checks::CURRENCY.into(),
                            amount: 7,
                        })
                        .await
                    }
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.sup.pause(stale_id, false);
        let response = sent.await.unwrap().expect("served after catching up");
        assert_eq!(response.result.unwrap().code, cellbank_proto::v1::ResultCode::Ok as i32);
        // Still no sample when this round's table caught up first.
        let after = common::metric(&stale_metrics, "cellbank_router_retries_total", "stale_table").await.unwrap_or(0);
        println!("round {rounds}: stale-table retries on router {stale}: {before} before, {after} after");
        if after > before || rounds == 5 {
            break (before, after);
        }
    };
    assert!(after > before, "the router was refused for its stale epoch and waited for its table");
}
