//! Safety through failovers, end to end and deterministic: fault points put
//! the cluster in the interleavings that once lost money, and the tests
//! check that nothing acknowledged is lost and no credit leaves without its
//! debit.
//!
//! - An old active, restarted after a whole-cell failover while cut off from
//!   its old standby (but reachable by the coordinator), holds an unshipped
//!   tail of debits whose credits the promoted cell never had. It must
//!   answer no write, deliver none of those credits, and be rebuilt as the
//!   standby; every transfer a client heard OK is in the ledger afterwards
//!   and the books reconcile.
//! - Writes pending on an active when it is demoted (failed over while cut
//!   off from the routers, then reconfigured as the standby) either fail
//!   retryably or are on the new active.

// They drive the replicas' fault points: built with `--features fault-points`
// (scripts/test.sh passes it; a production build has none).
#![cfg(feature = "fault-points")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellbank_chaos::faults::Access;
use cellbank_client::CellClient;
use cellbank_proto::cell::InjectFaultRequest;
use cellbank_proto::router::PairMode;
use cellbank_proto::v1::*;
use common::call;
use common::cluster::Cluster;

const TOKEN: &str = "safety-test-token";
const CURRENCY: &str = "CNY";
const SEED_AMOUNT: u64 = 1_000_000;

async fn open_and_seed(client: &CellClient, users: &[u64]) {
    common::open_and_seed(client, users, CURRENCY, SEED_AMOUNT).await
}

fn transfer_request(id: &str, from: u64, to: u64, amount: u64) -> TransferRequest {
    TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: id.as_bytes().to_vec(),
        from_user_id: from,
        to_user_id: to,
        currency: CURRENCY.into(),
        amount,
    }
}

async fn transfer(client: &CellClient, request: &TransferRequest) -> Result<TransferResult, tonic::Status> {
    client
        .ledger(|mut c| {
            // The router retries within the call's own deadline: the
            // client's, not a longer one per attempt.
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(client.deadline);
            async move { c.transfer(call).await }
        })
        .await
        .map(|r| r.result.unwrap_or_default())
}

fn fault(point: &str, action: &str, duration_ms: u64) -> InjectFaultRequest {
    InjectFaultRequest { point: point.into(), action: action.into(), duration_ms, ..Default::default() }
}

fn access(cluster: &Cluster) -> Access {
    Access { routers: cluster.routers(), token: Some(TOKEN.into()) }
}

/// Injects `fault` into every replica of `cell`.
async fn inject_cell(cluster: &Cluster, cell: u64, fault: InjectFaultRequest) {
    for id in cluster.sup.cell_replicas(cell) {
        let addr = cluster.sup.addr(id).unwrap();
        access(cluster).inject(&addr, fault.clone()).await.expect("inject a fault");
    }
}

async fn heal_cell(cluster: &Cluster, cell: u64) {
    for id in cluster.sup.cell_replicas(cell) {
        let addr = cluster.sup.addr(id).unwrap();
        access(cluster).heal(&addr).await.expect("heal");
    }
}

/// Follows a transfer through the routers until it leaves IN_TRANSIT.
async fn settled(client: &CellClient, id: &[u8]) -> TransferRecord {
    let started = Instant::now();
    loop {
        let record = call(client, |mut c| {
            let transfer_id = id.to_vec();
            async move { c.get_transfer(GetTransferRequest { transfer_id, ..Default::default() }).await }
        })
        .await
        .transfer
        .unwrap_or_default();
        if record.settlement != Settlement::InTransit as i32 {
            return record;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{} never arrived", String::from_utf8_lossy(id));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn balance(client: &CellClient, user: u64) -> u64 {
    call(
        client,
        |mut c| async move { c.get_account(GetAccountRequest { user_id: user, currency: CURRENCY.into() }).await },
    )
    .await
    .balance
}

async fn assert_reconciles(cluster: &Cluster) {
    let started = Instant::now();
    loop {
        let status = cluster.status().await.expect("status");
        let report = cellbank::reconcile::reconcile(&status, &cellbank::reconcile::Options::default()).await;
        if report.ok() {
            cellbank::reconcile::print(&report);
            assert!(!report.clearing.is_empty(), "clearing between the pairs was checked");
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "reconcile failed: {:#?}", report.discrepancies);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_active_restarted_cut_off_from_its_standby_answers_nothing_and_sends_no_credit() {
    let mut cluster = Cluster::start(1, 2, |t| {
        t.admin_token = Some(TOKEN.into());
        // Long enough that cutting the standby stream does not degrade the
        // pair before the whole cell is killed.
        t.coordinator.failover_window_ms = 3_000;
        t.coordinator.cooldown_ms = 5_000;
        for replica in &mut t.cells[0].replicas {
            replica.metrics = Some(format!("127.0.0.1:{}", common::free_port()));
        }
    });
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let table = cluster.status().await.unwrap().table.unwrap();
    let pair = |user| cellbank_router::table::route(&table, user).unwrap().pair_id;
    let users: Vec<u64> = (1..=24).collect();
    let senders: Vec<u64> = users.iter().copied().filter(|u| pair(*u) == 1).collect();
    let recipients: Vec<u64> = users.iter().copied().filter(|u| pair(*u) == 2).collect();
    assert!(senders.len() >= 3 && recipients.len() >= 3, "both pairs hold users");
    open_and_seed(&client, &users).await;

    // Cell 1's new entries stay unshipped: cross-cell debits that only cell
    // 1 will ever hold. Their clients give up before any failover.
    inject_cell(&cluster, 1, fault("standby.ship", "drop", 60_000)).await;
    let routers = cluster.routers();
    let doomed: Vec<TransferRequest> = (0..10)
        .map(|i| {
            transfer_request(
                &format!("tail-{i}"),
                senders[i % senders.len()],
                recipients[i % recipients.len()],
                100 + i as u64,
            )
        })
        .collect();
    let tasks: Vec<_> = doomed
        .iter()
        .cloned()
        .map(|request| {
            let mut client = CellClient::new(routers.clone());
            client.deadline = Duration::from_millis(1_500);
            tokio::spawn(async move { transfer(&client, &request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.sup.kill_cell(1);
    for task in tasks {
        let outcome = task.await.unwrap();
        assert!(outcome.is_err(), "a write was acknowledged without its standby: {outcome:?}");
    }
    cluster
        .wait_until("pair 1 failed over to cell 3", Duration::from_secs(20), |s| {
            Cluster::pair_of(s, 1).active_cell_id == 3
        })
        .await;

    // The promoted cell's own cross-cell transfers take the outbox numbers
    // that cell 1's unshipped entries hold.
    let mut acknowledged: Vec<TransferRequest> = Vec::new();
    for i in 0..10 {
        let request = transfer_request(
            &format!("after-{i}"),
            senders[(i + 1) % senders.len()],
            recipients[i % recipients.len()],
            1_000 + i as u64,
        );
        let result = transfer(&client, &request).await.expect("a transfer through the promoted cell");
        assert_eq!(result.code, ResultCode::Ok as i32);
        acknowledged.push(request);
    }

    // Cell 1 comes back believing it is the active at epoch 1, cut off
    // from its old standby from its first instant; the coordinator reaches it.
    cluster
        .sup
        .start_cell_with_env(1, &[(cellbank_raft::faults::STARTUP_ENV, "standby.ship=drop:60000")])
        .expect("restart cell 1");
    let cell_1 = cluster.sup.cell_endpoints(1);
    let answered = Arc::new(Mutex::new(Vec::new()));
    let restarted = Instant::now();
    let mut direct = Vec::new();
    let mut n = 0;
    while restarted.elapsed() < Duration::from_secs(8) {
        n += 1;
        let (answered, endpoints) = (answered.clone(), cell_1.clone());
        let user = senders[n % senders.len()];
        direct.push(tokio::spawn(async move {
            let mut client = CellClient::new(endpoints);
            client.deadline = Duration::from_secs(3);
            let request = DepositRequest {
                transfer_id_text: String::new(),
                transfer_id: format!("direct-{n}").into_bytes(),
                user_id: user,
                currency: CURRENCY.into(),
                amount: 7,
            };
            let outcome = client.deposit(request.clone()).await;
            if let Ok(response) = outcome {
                answered.lock().unwrap().push((n, response.result.unwrap_or_default().code));
            }
        }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for task in direct {
        task.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    assert!(answered.is_empty(), "the deposed cell answered writes: {answered:?}");
    println!("the restarted old active refused all {n} direct writes");

    // Its courier never sent a credit.
    for id in cluster.sup.cell_replicas(1) {
        let addr = cluster.sup.metrics_addr(id).unwrap();
        let calls = common::metric(&addr, "cellbank_credit_delivery_calls_total", "").await;
        assert_eq!(calls, Some(0), "{id} delivered credits");
    }

    // Healed, cell 1 is rebuilt as cell 3's standby.
    heal_cell(&cluster, 1).await;
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(60)).await;

    // The unknown outcomes resolve by retrying with their ids: they apply
    // now, once.
    for request in &doomed {
        let result = transfer(&client, request).await.expect("a retry through the routers");
        assert_eq!(result.code, ResultCode::Ok as i32);
        acknowledged.push(request.clone());
    }
    // Every transfer a client heard OK is in the ledger, credited once.
    let mut expected: std::collections::BTreeMap<u64, i128> = users.iter().map(|u| (*u, SEED_AMOUNT as i128)).collect();
    for request in &acknowledged {
        let record = settled(&client, &request.transfer_id).await;
        assert_eq!(record.result, ResultCode::Ok as i32, "{:?}", String::from_utf8_lossy(&request.transfer_id));
        assert_eq!(record.settlement, Settlement::Credited as i32);
        *expected.get_mut(&request.from_user_id).unwrap() -= request.amount as i128;
        *expected.get_mut(&request.to_user_id).unwrap() += request.amount as i128;
    }
    for (&user, &amount) in &expected {
        assert_eq!(balance(&client, user).await as i128, amount, "user {user}");
    }
    cluster.assert_pair_identical(1, Duration::from_secs(30)).await;
    assert_reconciles(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_pending_at_a_demotion_fail_retryably_or_are_on_the_new_active() {
    let cluster = Cluster::start(1, 1, |t| t.admin_token = Some(TOKEN.into()));
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=4).collect();
    open_and_seed(&client, &users).await;
    inject_cell(&cluster, 1, fault("standby.ship", "drop", 60_000)).await;

    // Writes straight to cell 1 (no router retries them elsewhere); each
    // attempt waits up to 5 s for the standby that never answers.
    let endpoints = cluster.sup.cell_endpoints(1);
    let tasks: Vec<_> = (0..20u64)
        .map(|i| {
            let endpoints = endpoints.clone();
            let user = users[i as usize % users.len()];
            tokio::spawn(async move {
                let mut client = CellClient::new(endpoints);
                client.deadline = Duration::from_secs(15);
                let request = DepositRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("pending-{i}").into_bytes(),
                    user_id: user,
                    currency: CURRENCY.into(),
                    amount: 10 + i,
                };
                let outcome = client.deposit(request.clone()).await;
                (request, outcome.map(|r| r.result.unwrap_or_default()))
            })
        })
        .collect();
    // Cut from the routers before the coordinator would degrade the pair
    // (it waits 1 s for the standby): it fails the pair over to cell 2, and
    // once the cut heals it demotes cell 1 while the writes still wait.
    tokio::time::sleep(Duration::from_millis(400)).await;
    cellbank::routers::ClusterClient::new(&cluster.routers(), Some(TOKEN))
        .isolate_cells(&[1], Duration::from_millis(2_500))
        .await
        .expect("isolate cell 1 from the routers");
    let status = cluster
        .wait_until("pair 1 failed over to cell 2", Duration::from_secs(10), |s| {
            Cluster::pair_of(s, 1).active_cell_id == 2
        })
        .await;
    assert_eq!(Cluster::pair_of(&status, 1).epoch, 2);

    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for task in tasks {
        let (request, outcome) = task.await.unwrap();
        match outcome {
            Ok(result) => {
                assert_eq!(result.code, ResultCode::Ok as i32);
                acknowledged.push(request);
            }
            Err(status) => {
                assert!(
                    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
                    "a pending write failed with a final error: {status:?}"
                );
                failed.push(request);
            }
        }
    }
    println!("{} pending writes acknowledged, {} failed retryably", acknowledged.len(), failed.len());
    // What was acknowledged is on the new active (cell 2), read through the router.
    for request in &acknowledged {
        let found = client
            .get_transfer(GetTransferRequest { transfer_id: request.transfer_id.clone(), ..Default::default() })
            .await;
        assert!(
            found.is_ok_and(|r| r.transfer.is_some_and(|t| t.result == ResultCode::Ok as i32)),
            "acknowledged write {} is missing on the new active",
            String::from_utf8_lossy(&request.transfer_id)
        );
    }
    // A failed one retried with its id applies exactly once.
    for request in &failed {
        let result = call(&client, |mut c| {
            let request = request.clone();
            async move { c.deposit(request).await }
        })
        .await
        .result
        .unwrap();
        assert_eq!(result.code, ResultCode::Ok as i32);
    }
    let total: u64 = [&acknowledged[..], &failed[..]].concat().iter().map(|r| r.amount).sum();
    let mut sum = 0;
    for &user in &users {
        sum += balance(&client, user).await;
    }
    assert_eq!(sum, users.len() as u64 * SEED_AMOUNT + total, "every pending write is in the ledger once");
    heal_cell(&cluster, 1).await;
}
