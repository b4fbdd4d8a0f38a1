//! Money across cells end to end: real routers and cells on loopback,
//! transfers within and between cells and red-envelope grabs under load,
//! while leaders die and a whole cell fails over. Afterwards every outcome a
//! client heard is in the ledger exactly once, every cross-cell transfer
//! reached its recipient, every envelope's shares and refund add up to its
//! total with one share per user, and `reconcile` passes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellbank::supervisor::ProcessId;
use cellbank_client::clock::unix_ms;
use cellbank_client::CellClient;
use cellbank_proto::router::PairMode;
use cellbank_proto::v1::*;
use cellbank_router::table;
use common::call;
use common::cluster::Cluster;
use rand::{Rng, SeedableRng};

const CURRENCY: &str = "CNY";
const SEED_AMOUNT: u64 = 1_000_000;
const ENVELOPE_SHARES: u32 = 30;
const ENVELOPE_TOTAL: u64 = 30_000;

/// What clients were told.
#[derive(Default)]
struct Heard {
    /// transfer id -> (request, code)
    transfers: Mutex<HashMap<Vec<u8>, (TransferRequest, i32)>>,
    unknown_transfers: Mutex<Vec<TransferRequest>>,
    /// (envelope, user) -> amount of an OK grab
    grabs: Mutex<HashMap<(String, u64), u64>>,
    unknown_grabs: Mutex<Vec<(String, u64)>>,
    stop: AtomicBool,
}

impl Heard {
    fn acked(&self) -> usize {
        self.transfers.lock().unwrap().len() + self.grabs.lock().unwrap().len()
    }
}

async fn open_and_seed(client: &CellClient, users: &[u64]) {
    common::open_and_seed(client, users, CURRENCY, SEED_AMOUNT).await
}

async fn send_envelope(client: &CellClient, sender: u64, id: &str, expires_at_ms: u64) -> String {
    let response = call(client, |mut c| async move {
        c.send_envelope(SendEnvelopeRequest {
            transfer_id_text: String::new(),
            transfer_id: id.as_bytes().to_vec(),
            sender_user_id: sender,
            currency: CURRENCY.into(),
            total: ENVELOPE_TOTAL,
            shares: ENVELOPE_SHARES,
            split: EnvelopeSplit::Random as i32,
            expires_at_ms,
        })
        .await
    })
    .await;
    assert_eq!(response.result.unwrap().code, ResultCode::Ok as i32);
    response.envelope_id
}

/// Transfer workers (a mix of same-cell and cross-cell transfers) and grab
/// workers (each grabber tries every envelope once, in its own order).
fn start_load(
    routers: Vec<String>,
    users: Vec<u64>,
    envelopes: Vec<String>,
    heard: Arc<Heard>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for worker in 0..6u64 {
        let (heard, users) = (heard.clone(), users.clone());
        let mut client = CellClient::new(routers.clone());
        client.deadline = Duration::from_secs(6);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ worker);
            let mut n = 0u64;
            while !heard.stop.load(Ordering::Relaxed) {
                n += 1;
                let from = users[rng.gen_range(0..users.len())];
                let mut to = users[rng.gen_range(0..users.len())];
                if to == from {
                    to = users[(users.iter().position(|u| *u == from).unwrap() + 1) % users.len()];
                }
                let request = TransferRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("w{worker}-{n}").into_bytes(),
                    from_user_id: from,
                    to_user_id: to,
                    currency: CURRENCY.into(),
                    amount: if rng.gen_ratio(1, 50) { SEED_AMOUNT * 100 } else { rng.gen_range(1..=500) },
                };
                let sent = request.clone();
                let outcome = client.transfer(sent.clone()).await;
                match outcome {
                    Ok(r) => {
                        let code = r.result.unwrap().code;
                        heard.transfers.lock().unwrap().insert(request.transfer_id.clone(), (request, code));
                    }
                    Err(_) => heard.unknown_transfers.lock().unwrap().push(request),
                }
            }
        }));
    }
    for (index, &user) in users.iter().enumerate() {
        let (heard, envelopes) = (heard.clone(), envelopes.clone());
        let mut client = CellClient::new(routers.clone());
        client.deadline = Duration::from_secs(6);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (1000 + index as u64));
            let mut order = envelopes.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.gen_range(0..=i));
            }
            for envelope in order {
                // Spread the grabs over the load's whole run.
                tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1500))).await;
                if heard.stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = envelope.clone();
                let outcome =
                    client.grab_envelope(GrabEnvelopeRequest { envelope_id: id.clone(), user_id: user }).await;
                match outcome {
                    Ok(r) => {
                        let code = r.result.as_ref().unwrap().code;
                        // ALREADY_GRABBED on a first grab: the router retried
                        // a batch that had applied (a leader died meanwhile);
                        // it carries the share this user holds.
                        if code == ResultCode::Ok as i32 || code == ResultCode::AlreadyGrabbed as i32 {
                            let previous = heard.grabs.lock().unwrap().insert((envelope, user), r.amount);
                            assert!(previous.is_none(), "user {user} was given two shares");
                        } else {
                            assert!(
                                code == ResultCode::EnvelopeEmpty as i32 || code == ResultCode::OwnEnvelope as i32,
                                "grab answered {code}"
                            );
                        }
                    }
                    Err(_) => heard.unknown_grabs.lock().unwrap().push((envelope, user)),
                }
            }
        }));
    }
    tasks
}

async fn stop_load(heard: &Heard, tasks: Vec<tokio::task::JoinHandle<()>>) {
    heard.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task");
    }
}

async fn wait_for_acks(heard: &Heard, more: usize, timeout: Duration) {
    let from = heard.acked();
    let started = Instant::now();
    while heard.acked() < from + more {
        assert!(started.elapsed() < timeout, "the load stalled: fewer than {more} acks in {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn list_all(client: &CellClient, user: u64) -> Vec<TransferRecord> {
    let mut token = Vec::new();
    let mut all = Vec::new();
    loop {
        let page = call(client, |mut c| {
            let request = ListTransfersRequest {
                user_id: user,
                currency: CURRENCY.into(),
                page_size: 1000,
                page_token: token.clone(),
            };
            async move { c.list_transfers(request).await }
        })
        .await;
        all.extend(page.transfers);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// Resolves unknown outcomes, waits for every credit to arrive, and checks
/// the ledger against what clients heard.
async fn verify(cluster: &Cluster, users: &[u64], senders: &[(u64, String)], heard: &Heard) {
    let client = cluster.client();
    let mut transfers = heard.transfers.lock().unwrap().clone();
    let unknown = heard.unknown_transfers.lock().unwrap().clone();
    for request in unknown {
        let retry = request.clone();
        let response = call(&client, |mut c| {
            let request = retry.clone();
            async move { c.transfer(request).await }
        })
        .await;
        transfers.insert(request.transfer_id.clone(), (request, response.result.unwrap().code));
    }
    let mut grabs = heard.grabs.lock().unwrap().clone();
    let unknown = heard.unknown_grabs.lock().unwrap().clone();
    for (envelope, user) in unknown {
        let id = envelope.clone();
        let response = call(&client, |mut c| {
            let request = GrabEnvelopeRequest { envelope_id: id.clone(), user_id: user };
            async move { c.grab_envelope(request).await }
        })
        .await;
        let code = response.result.as_ref().unwrap().code;
        // A grab that applied before its answer was lost answers ALREADY_GRABBED with the share.
        if code == ResultCode::Ok as i32 || code == ResultCode::AlreadyGrabbed as i32 {
            grabs.insert((envelope, user), response.amount);
        }
    }
    // Every cross-cell transfer reaches its recipient (all recipients exist).
    let started = Instant::now();
    let mut cross = 0;
    for (id, (_, code)) in &transfers {
        let record = loop {
            let record = call(&client, |mut c| {
                let transfer_id = id.clone();
                async move { c.get_transfer(GetTransferRequest { transfer_id, ..Default::default() }).await }
            })
            .await
            .transfer
            .unwrap();
            if record.settlement != Settlement::InTransit as i32 {
                break record;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "a cross-cell transfer never arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(record.result, *code, "transfer {} recorded another result", String::from_utf8_lossy(id));
        if *code == ResultCode::Ok as i32 {
            assert!(
                record.settlement == Settlement::Local as i32 || record.settlement == Settlement::Credited as i32,
                "transfer {} ended {}",
                String::from_utf8_lossy(id),
                record.settlement
            );
            cross += usize::from(record.settlement == Settlement::Credited as i32);
        }
    }
    // Envelopes: shares + refund = total, one share per user, and every
    // share a client heard of is the one recorded.
    let mut grabbed_by: BTreeMap<u64, i128> = BTreeMap::new();
    for (_, envelope_id) in senders {
        let found = call(&client, |mut c| {
            let request = GetEnvelopeRequest { envelope_id: envelope_id.clone(), page_size: 1000, page_token: vec![] };
            async move { c.get_envelope(request).await }
        })
        .await;
        let envelope = found.envelope.unwrap();
        let sum: u64 = found.grabs.iter().map(|g| g.amount).sum();
        assert_eq!(sum + envelope.remaining + envelope.refunded, envelope.total, "envelope {envelope_id} leaks");
        let distinct: BTreeSet<u64> = found.grabs.iter().map(|g| g.user_id).collect();
        assert_eq!(distinct.len(), found.grabs.len(), "a user holds two shares of {envelope_id}");
        for grab in &found.grabs {
            *grabbed_by.entry(grab.user_id).or_default() += grab.amount as i128;
            if let Some(amount) = grabs.get(&(envelope_id.clone(), grab.user_id)) {
                assert_eq!(*amount, grab.amount, "user {} was told another share", grab.user_id);
            }
        }
        for ((e, user), _) in grabs.iter().filter(|((e, _), _)| e == envelope_id) {
            assert!(distinct.contains(user), "an acknowledged grab of {e} by {user} is missing");
        }
    }
    // Balances: what clients were told, and each account's own history.
    let mut expected: BTreeMap<u64, i128> = users.iter().map(|u| (*u, SEED_AMOUNT as i128)).collect();
    for (request, code) in transfers.values() {
        if *code == ResultCode::Ok as i32 {
            *expected.get_mut(&request.from_user_id).unwrap() -= request.amount as i128;
            *expected.get_mut(&request.to_user_id).unwrap() += request.amount as i128;
        }
    }
    for (user, amount) in &grabbed_by {
        *expected.get_mut(user).unwrap() += amount;
    }
    for (sender, _) in senders {
        *expected.get_mut(sender).unwrap() -= ENVELOPE_TOTAL as i128;
    }
    for &user in users {
        let records = list_all(&client, user).await;
        let mut seen = BTreeSet::new();
        let mut from_history: i128 = 0;
        for record in &records {
            assert!(
                seen.insert((record.transfer_id.clone(), record.kind)),
                "{} applied twice to user {user}",
                String::from_utf8_lossy(&record.transfer_id)
            );
            if record.kind == TransferKind::EnvelopeGrab as i32 {
                // In the grabber's history only (a sender may grab their own).
                from_history += record.amount as i128;
            } else if record.to_user_id == user {
                from_history += record.amount as i128;
            } else if record.from_user_id == user {
                from_history -= record.amount as i128;
            }
            if record.kind == TransferKind::EnvelopeRefund as i32 {
                // Refunds of expired envelopes are not part of this workload.
                panic!("unexpected envelope refund for user {user}");
            }
        }
        let account = call(&client, |mut c| async move {
            c.get_account(GetAccountRequest { user_id: user, currency: CURRENCY.into() }).await
        })
        .await;
        assert_eq!(account.balance as i128, from_history, "user {user}: balance differs from its history");
        assert_eq!(account.balance as i128, expected[&user], "user {user}: balance differs from what clients heard");
    }
    println!(
        "verified {} transfers ({cross} across cells) and {} grabs of {} envelopes",
        transfers.len(),
        grabs.len(),
        senders.len()
    );
    assert!(cross > 50, "the load crossed cells ({cross})");
}

async fn reconcile(cluster: &Cluster) -> cellbank::reconcile::Report {
    let status = cluster.status().await.expect("status");
    cellbank::reconcile::reconcile(&status, &cellbank::reconcile::Options::default()).await
}

async fn assert_reconciles(cluster: &Cluster) {
    let started = Instant::now();
    loop {
        let report = reconcile(cluster).await;
        if report.ok() {
            cellbank::reconcile::print(&report);
            assert!(!report.clearing.is_empty(), "clearing between the pairs was checked");
            return;
        }
        // Credits still travelling after a failover make the replicas busy.
        assert!(started.elapsed() < Duration::from_secs(60), "reconcile failed: {:#?}", report.discrepancies);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A grab of `envelope_id` by `user` through the routers: its result code.
async fn grab(client: &CellClient, user: u64, envelope_id: &str) -> i32 {
    call(client, |mut c| {
        let request = GrabEnvelopeRequest { envelope_id: envelope_id.to_string(), user_id: user };
        async move { c.grab_envelope(request).await }
    })
    .await
    .result
    .unwrap()
    .code
}

/// A rush on `envelope_id` from another pair: `holders` open an account in
/// its currency, then they and `strangers` grab at once. Each holder takes a
/// share; each stranger is refused ACCOUNT_NOT_FOUND and takes none; the
/// books reconcile.
async fn rush_of_holders_and_strangers(
    cluster: &Cluster,
    client: &CellClient,
    envelope_id: &str,
    holders: &[u64],
    strangers: &[u64],
) {
    for user in holders {
        let opened = call(client, |mut c| async move {
            c.open_account(OpenAccountRequest { user_id: *user, currency: CURRENCY.into() }).await
        })
        .await;
        assert_eq!(opened.code, ResultCode::Ok as i32);
    }
    let everyone = holders.iter().chain(strangers);
    let answers = futures::future::join_all(everyone.map(|user| grab(client, *user, envelope_id))).await;
    let (held, refused) = answers.split_at(holders.len());
    assert!(held.iter().all(|code| *code == ResultCode::Ok as i32), "holders: {answers:?}");
    assert!(
        refused.iter().all(|code| *code == ResultCode::AccountNotFound as i32),
        "strangers {strangers:?}: {answers:?}"
    );
    let found = call(client, |mut c| {
        let request = GetEnvelopeRequest { envelope_id: envelope_id.to_string(), page_size: 10, page_token: vec![] };
        async move { c.get_envelope(request).await }
    })
    .await;
    assert_eq!(found.envelope.unwrap().shares_grabbed, holders.len() as u32, "only the holders took shares");
    assert_reconciles(cluster).await;
}

struct Setup {
    cluster: Cluster,
    users: Vec<u64>,
    senders: Vec<(u64, String)>,
    heard: Arc<Heard>,
    load: Vec<tokio::task::JoinHandle<()>>,
}

/// Two pairs, 40 users spread over them, four envelopes, load running.
async fn setup(seed: u64) -> Setup {
    setup_with(seed, 1).await
}

/// [`setup`] behind `routers` routers.
async fn setup_with(seed: u64, routers: u64) -> Setup {
    let cluster = Cluster::start(routers, 2, |t| t.coordinator.cooldown_ms = 5_000);
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=40).collect();
    open_and_seed(&client, &users).await;
    let mut senders = Vec::new();
    for (i, sender) in [1u64, 2, 3, 4].into_iter().enumerate() {
        let id = send_envelope(&client, sender, &format!("red-{seed}-{i}"), 0).await;
        senders.push((sender, id));
    }
    let heard = Arc::new(Heard::default());
    let envelope_ids = senders.iter().map(|(_, id)| id.clone()).collect();
    let load = start_load(cluster.routers(), users.clone(), envelope_ids, heard.clone(), seed);
    wait_for_acks(&heard, 200, Duration::from_secs(30)).await;
    Setup { cluster, users, senders, heard, load }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_crosses_cells_exactly_once_while_leaders_die() {
    let Setup { mut cluster, users, senders, heard, load } = setup(21).await;
    // Kill the leader of each active cell in turn (each is both a source
    // and a destination of cross-cell transfers), under load.
    for cell in [1u64, 2] {
        let leader = cluster.cell_leader(cell).await.expect("a leader");
        cluster.sup.kill(leader);
        println!("killed {leader}");
        wait_for_acks(&heard, 100, Duration::from_secs(20)).await;
        cluster.sup.start(leader).expect("restart");
    }
    wait_for_acks(&heard, 100, Duration::from_secs(20)).await;
    stop_load(&heard, load).await;
    verify(&cluster, &users, &senders, &heard).await;
    assert_reconciles(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_crosses_cells_exactly_once_through_a_whole_cell_failover() {
    let Setup { mut cluster, users, senders, heard, load } = setup(22).await;
    cluster.sup.kill_cell(1);
    let killed = Instant::now();
    cluster
        .wait_until("pair 1 failed over to cell 3", Duration::from_secs(15), |s| {
            Cluster::pair_of(s, 1).active_cell_id == 3
        })
        .await;
    println!("pair 1 failed over {:?} after the kill", killed.elapsed());
    wait_for_acks(&heard, 200, Duration::from_secs(20)).await;
    // The old active returns as the standby.
    cluster.sup.start_cell(1).expect("restart cell 1");
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(40)).await;
    wait_for_acks(&heard, 100, Duration::from_secs(20)).await;
    stop_load(&heard, load).await;
    verify(&cluster, &users, &senders, &heard).await;
    assert_reconciles(&cluster).await;
}

/// Slices move between the two pairs one after another while transfers
/// (same-cell and cross-cell) and envelope grabs run: the slice of an
/// envelope's sender (its envelope open) is refused and nothing changes;
/// every other move ends with the slice served by its new pair, and every
/// outcome, balance, history, share and clearing figure checks out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn money_stays_exact_while_slices_move_under_load() {
    use cellbank_proto::router::MoveSliceRequest;
    let Setup { cluster, users, senders, heard, load } = setup(23).await;
    let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
    let table = cluster.status().await.unwrap().table.unwrap();
    let slice = |user: u64| cellbank_client::slices::slice_of(user, table.slice_count);
    let request =
        |slice: u32, to_pair_id: u64| MoveSliceRequest { slice, to_pair_id, who: String::new(), why: "test".into() };

    // An envelope's sender's slice stays while the envelope is open.
    let sender_slice = slice(senders[0].0);
    let other = if table.slice_pair[sender_slice as usize] == 1 { 2 } else { 1 };
    let refused = admin.move_slice(request(sender_slice, other)).await.expect_err("open envelopes stay");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("open"), "{}", refused.message());
    assert!(refused.message().contains("rolled back"), "{}", refused.message());
    let after = cluster.status().await.unwrap().table.unwrap();
    assert_eq!(after.slice_pair, table.slice_pair, "a refused move changes no slice");
    assert!(after.moves.is_empty());

    // Slices of users with accounts, none an envelope's sender.
    let busy: BTreeSet<u32> = senders.iter().map(|(s, _)| slice(*s)).collect();
    let mut movable: Vec<u32> = users.iter().map(|u| slice(*u)).filter(|s| !busy.contains(s)).collect();
    movable.sort();
    movable.dedup();
    let mut freezes = Vec::new();
    for &moving in movable.iter().take(4) {
        let from = cluster.status().await.unwrap().table.unwrap().slice_pair[moving as usize];
        let to = if from == 1 { 2 } else { 1 };
        let done = admin.move_slice(request(moving, to)).await.expect("a move under load");
        println!("{} ({} ms frozen, {} ms in all)", done.detail, done.freeze_ms, done.total_ms);
        freezes.push(done.freeze_ms);
        let table = cluster.status().await.unwrap().table.unwrap();
        assert_eq!(table.slice_pair[moving as usize], to);
        assert!(table.moves.is_empty());
        wait_for_acks(&heard, 50, Duration::from_secs(20)).await;
    }
    assert_eq!(freezes.len(), 4, "four slices moved");
    // And one back where it came from.
    let back = movable[0];
    let from = cluster.status().await.unwrap().table.unwrap().slice_pair[back as usize];
    admin.move_slice(request(back, if from == 1 { 2 } else { 1 })).await.expect("moved back");
    wait_for_acks(&heard, 100, Duration::from_secs(20)).await;
    stop_load(&heard, load).await;
    verify(&cluster, &users, &senders, &heard).await;
    assert_reconciles(&cluster).await;
    let audit = admin.audit_log().await.unwrap();
    let finished = audit.iter().filter(|r| r.what.starts_with("finish move")).count();
    assert_eq!(finished, 5, "every move is in the audit log");
    assert!(audit.iter().any(|r| r.what.starts_with("roll back move")), "the refused one too");
}

/// Slices of users (not an envelope's sender) in key order.
fn movable_slices(table: &cellbank_proto::router::RoutingTable, users: &[u64], senders: &[(u64, String)]) -> Vec<u32> {
    let slice = |user: u64| cellbank_client::slices::slice_of(user, table.slice_count);
    let busy: BTreeSet<u32> = senders.iter().map(|(s, _)| slice(*s)).collect();
    let slices: BTreeSet<u32> = users.iter().map(|u| slice(*u)).filter(|s| !busy.contains(s)).collect();
    slices.into_iter().collect()
}

/// The slice is served by the pair the table names and by no other: a
/// write to one of its users sent straight to each other pair's active
/// cell is refused as moved (or finds no account: never its slice), and
/// the routers serve it.
async fn assert_one_owner(cluster: &Cluster, users: &[u64], slice: u32) {
    let table = cluster.status().await.unwrap().table.unwrap();
    assert!(table.moves.iter().all(|m| m.slice != slice), "the move of slice {slice} ended");
    let owner = table.slice_pair[slice as usize];
    let user = *users.iter().find(|u| cellbank_client::slices::slice_of(**u, table.slice_count) == slice).unwrap();
    let probe = |n: &str| DepositRequest {
        transfer_id_text: String::new(),
        transfer_id: format!("owner-{slice}-{n}").into_bytes(),
        user_id: user,
        currency: CURRENCY.into(),
        amount: 1,
    };
    for pair in table.pairs.iter().filter(|p| p.pair_id != owner) {
        let mut direct = CellClient::new(cluster.sup.cell_endpoints(pair.active_cell_id));
        direct.deadline = Duration::from_secs(2);
        match direct.deposit(probe(&format!("p{}", pair.pair_id))).await {
            // A pair the slice left refuses it as moved.
            Err(status) => assert!(
                matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
                "pair {}: {status}",
                pair.pair_id
            ),
            // A pair it never lived in holds no account of its users.
            Ok(answer) => {
                assert_eq!(answer.result.unwrap().code, ResultCode::AccountNotFound as i32, "pair {}", pair.pair_id)
            }
        }
    }
    let read = GetAccountRequest { user_id: user, currency: CURRENCY.into() };
    cluster.client().get_account(read).await.expect("the owner serves the slice");
}

/// A move whose coordinator dies at each step of it (the slice frozen; its
/// money left the source; the target imported it, the table not flipped):
/// the next coordinator finds the move in the table and finishes it, once;
/// the slice ends with one owner and every checker passes. Each step is
/// armed on every router for one move, and a router that stops is started
/// again unarmed.
#[cfg(feature = "fault-points")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_ends_once_though_its_coordinator_dies_at_each_step() {
    use cellbank::supervisor::ProcessId;
    use cellbank_proto::router::MoveSliceRequest;
    let Setup { mut cluster, users, senders, heard, load } = setup_with(24, 3).await;
    let table = cluster.status().await.unwrap().table.unwrap();
    let slices = movable_slices(&table, &users, &senders);
    let routers = [ProcessId::Router(1), ProcessId::Router(2), ProcessId::Router(3)];
    for (n, step) in ["move.frozen", "move.left", "move.imported"].into_iter().enumerate() {
        let fault = format!("{step}=crash:600000");
        for router in routers {
            cluster.sup.kill(router);
            cluster.sup.start_with_env(router, &[("CELLBANK_FAULTS", &fault)]).expect("restart armed");
            cluster.wait_until("the routers lead again", Duration::from_secs(20), |s| s.leader_router_id != 0).await;
        }
        let slice = slices[n];
        let from = cluster.status().await.unwrap().table.unwrap().slice_pair[slice as usize];
        let to = if from == 1 { 2 } else { 1 };
        let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
        let request = MoveSliceRequest { slice, to_pair_id: to, who: String::new(), why: step.into() };
        let asked = tokio::spawn(async move { admin.move_slice(request).await });
        let started = Instant::now();
        let mut crashed = Vec::new();
        loop {
            for (id, status) in cluster.sup.exited() {
                println!("{id} stopped at {step}: {status}");
                crashed.push(id);
                cluster.sup.start(id).expect("restart unarmed");
            }
            let ended = cluster.status().await.and_then(|s| s.table).is_some_and(|t| t.moves.is_empty());
            if ended && !crashed.is_empty() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the move of slice {slice} never ended ({step})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let answer = asked.await.unwrap();
        println!(
            "{step}: the caller heard {:?}",
            answer.as_ref().map(|r| &r.detail).map_err(|e| e.message().to_string())
        );
        let table = cluster.status().await.unwrap().table.unwrap();
        assert_eq!(table.slice_pair[slice as usize], to, "{step}: the move was finished, not rolled back");
        // Disarm the routers still armed.
        for router in routers {
            if !crashed.contains(&router) {
                cluster.sup.kill(router);
                cluster.sup.start(router).expect("restart unarmed");
                cluster
                    .wait_until("the routers lead again", Duration::from_secs(20), |s| s.leader_router_id != 0)
                    .await;
            }
        }
        assert_one_owner(&cluster, &users, slice).await;
    }
    wait_for_acks(&heard, 100, Duration::from_secs(30)).await;
    stop_load(&heard, load).await;
    verify(&cluster, &users, &senders, &heard).await;
    assert_reconciles(&cluster).await;
}

/// A move whose money has left the source when its coordinator dies, and
/// then the whole target pair: the next coordinator keeps the move (it
/// only goes forward now), and finishes it once the target pair is back.
/// Then the same with only the target's active cell killed: the target
/// pair fails over to its standby, which takes the slice. Every checker
/// passes and reconcile agrees.
#[cfg(feature = "fault-points")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_whose_money_left_finishes_though_the_target_pair_dies() {
    use cellbank::supervisor::ProcessId;
    use cellbank_proto::router::MoveSliceRequest;
    let Setup { mut cluster, users, senders, heard, load } = setup(26).await;
    let table = cluster.status().await.unwrap().table.unwrap();
    let slices = movable_slices(&table, &users, &senders);
    let router = ProcessId::Router(1);
    for (n, whole_pair) in [true, false].into_iter().enumerate() {
        let slice = slices[n];
        let table = cluster.status().await.unwrap().table.unwrap();
        let from = table.slice_pair[slice as usize];
        let to = if from == 1 { 2 } else { 1 };
        let target = *table::find_pair(&table, to).unwrap();
        cluster.sup.kill(router);
        cluster.sup.start_with_env(router, &[("CELLBANK_FAULTS", "move.left=crash:600000")]).expect("armed");
        cluster.wait_until("the router leads", Duration::from_secs(20), |s| s.leader_router_id != 0).await;
        let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
        let request = MoveSliceRequest { slice, to_pair_id: to, who: String::new(), why: "target dies".into() };
        let asked = tokio::spawn(async move { admin.move_slice(request).await });
        let started = Instant::now();
        while !cluster.sup.exited().iter().any(|(id, _)| *id == router) {
            if asked.is_finished() {
                panic!("the move ended before move.left: {:?}", asked.await.unwrap().map(|r| r.detail));
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the coordinator never reached move.left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = asked.await;
        // The money has left pair `from`; now the target dies.
        cluster.sup.kill_cell(target.active_cell_id);
        if whole_pair {
            cluster.sup.kill_cell(target.standby_cell_id);
        }
        cluster.sup.start(router).expect("restart unarmed");
        cluster.wait_until("the router leads", Duration::from_secs(20), |s| s.leader_router_id != 0).await;
        if whole_pair {
            // Nothing to import into: the move waits, and is never rolled back.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let table = cluster.status().await.unwrap().table.unwrap();
            assert!(table.moves.iter().any(|m| m.slice == slice), "the move is still under way");
            assert_eq!(table.slice_pair[slice as usize], from, "not flipped before the target took it");
            cluster.sup.start_cell(target.standby_cell_id).unwrap();
            cluster.sup.start_cell(target.active_cell_id).unwrap();
        }
        cluster
            .wait_until("the move ended", Duration::from_secs(90), |s| {
                s.table.as_ref().is_some_and(|t| t.moves.is_empty())
            })
            .await;
        let table = cluster.status().await.unwrap().table.unwrap();
        assert_eq!(table.slice_pair[slice as usize], to, "the move finished at the target pair");
        let now = *table::find_pair(&table, to).unwrap();
        println!(
            "whole pair down: {whole_pair}; pair {to} active cell {} (was {}); moved in {:.1} s",
            now.active_cell_id,
            target.active_cell_id,
            started.elapsed().as_secs_f64()
        );
        if !whole_pair {
            assert_eq!(now.active_cell_id, target.standby_cell_id, "the target pair failed over");
            cluster.sup.start_cell(target.active_cell_id).unwrap();
        }
        cluster.wait_for_mode(to, PairMode::Sync, Duration::from_secs(90)).await;
        assert_one_owner(&cluster, &users, slice).await;
        wait_for_acks(&heard, 50, Duration::from_secs(30)).await;
    }
    stop_load(&heard, load).await;
    verify(&cluster, &users, &senders, &heard).await;
    assert_reconciles(&cluster).await;
}

/// Moves while the source's leader, then the target's, is killed in the
/// middle: each move finishes or rolls back (the table then keeps the slice
/// where it was), the slice has one owner, and every checker passes. With
/// the whole target pair down, a move is refused before any money leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_finish_or_roll_back_while_cell_leaders_die() {
    use cellbank_proto::router::MoveSliceRequest;
    let Setup { mut cluster, users, senders, heard, load } = setup(25).await;
    let table = cluster.status().await.unwrap().table.unwrap();
    let slices = movable_slices(&table, &users, &senders);
    for (n, victim) in ["source", "target", "source", "target"].into_iter().enumerate() {
        let slice = slices[n];
        let table = cluster.status().await.unwrap().table.unwrap();
        let from = table.slice_pair[slice as usize];
        let to = if from == 1 { 2 } else { 1 };
        let cell = table::find_pair(&table, if victim == "source" { from } else { to }).unwrap().active_cell_id;
        let leader = cluster.cell_leader(cell).await.expect("a leader");
        let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
        let request = MoveSliceRequest { slice, to_pair_id: to, who: String::new(), why: victim.into() };
        let asked = tokio::spawn(async move { admin.move_slice(request).await });
        tokio::time::sleep(Duration::from_millis(5 + 10 * n as u64)).await;
        cluster.sup.kill(leader);
        let answer = asked.await.unwrap();
        println!(
            "{victim} leader {leader} killed: {:?}",
            answer.as_ref().map(|r| &r.detail).map_err(|e| e.message().to_string())
        );
        cluster.sup.start(leader).expect("restart");
        cluster
            .wait_until("the move ended", Duration::from_secs(60), |s| {
                s.table.as_ref().is_some_and(|t| t.moves.is_empty())
            })
            .await;
        let owner = cluster.status().await.unwrap().table.unwrap().slice_pair[slice as usize];
        assert!(owner == from || owner == to);
        if answer.is_ok() {
            assert_eq!(owner, to, "a move that answered OK finished");
        }
        assert_one_owner(&cluster, &users, slice).await;
        wait_for_acks(&heard, 50, Duration::from_secs(30)).await;
    }
    // The whole target pair down: refused before any money leaves.
    let slice = slices[4];
    let table = cluster.status().await.unwrap().table.unwrap();
    let from = table.slice_pair[slice as usize];
    let to = if from == 1 { 2 } else { 1 };
    let target = *table::find_pair(&table, to).unwrap();
    cluster.sup.kill_cell(target.active_cell_id);
    cluster.sup.kill_cell(target.standby_cell_id);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
    let request = MoveSliceRequest { slice, to_pair_id: to, who: String::new(), why: "target down".into() };
    let refused = admin.move_slice(request).await.expect_err("no move to a pair that is down");
    println!("target pair down: {}", refused.message());
    assert_eq!(cluster.status().await.unwrap().table.unwrap().slice_pair[slice as usize], from);
    cluster.sup.start_cell(target.active_cell_id).unwrap();
    cluster.sup.start_cell(target.standby_cell_id).unwrap();
    cluster.wait_for_mode(to, PairMode::Sync, Duration::from_secs(60)).await;
    assert_one_owner(&cluster, &users, slice).await;
    wait_for_acks(&heard, 100, Duration::from_secs(30)).await;
    stop_load(&heard, load).await;
    verify(&cluster, &users, &senders, &heard).await;
    assert_reconciles(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_to_a_missing_account_in_another_cell_is_refunded() {
    let cluster = Cluster::start(1, 2, |_| {});
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let table = cluster.status().await.unwrap().table.unwrap();
    let pair = |user| cellbank_router::table::route(&table, user).unwrap().pair_id;
    let sender = 1u64;
    let missing = (1000..).find(|u| pair(*u) != pair(sender)).unwrap();
    open_and_seed(&client, &[sender]).await;
    let request = TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: b"to-nobody".to_vec(),
        from_user_id: sender,
        to_user_id: missing,
        currency: CURRENCY.into(),
        amount: 700,
    };
    let sent = call(&client, |mut c| {
        let request = request.clone();
        async move { c.transfer(request).await }
    })
    .await
    .result
    .unwrap();
    assert_eq!((sent.code, sent.settlement), (ResultCode::Ok as i32, Settlement::InTransit as i32));
    let started = Instant::now();
    let record = loop {
        let record = call(&client, |mut c| async move {
            c.get_transfer(GetTransferRequest { transfer_id: b"to-nobody".to_vec(), ..Default::default() }).await
        })
        .await
        .transfer
        .unwrap();
        if record.settlement != Settlement::InTransit as i32 {
            break record;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record.settlement, Settlement::Refunded as i32);
    assert_eq!(record.refund_reason, ResultCode::AccountNotFound as i32);
    let history = list_all(&client, sender).await;
    let kinds: Vec<(i32, u64)> = history.iter().map(|r| (r.kind, r.amount)).collect();
    assert_eq!(
        kinds,
        vec![
            (TransferKind::Deposit as i32, SEED_AMOUNT),
            (TransferKind::Transfer as i32, 700),
            (TransferKind::Refund as i32, 700)
        ]
    );
    assert!(history.iter().skip(1).all(|r| r.transfer_id == b"to-nobody"), "both entries name the transfer");
    let account = call(&client, |mut c| async move {
        c.get_account(GetAccountRequest { user_id: sender, currency: CURRENCY.into() }).await
    })
    .await;
    assert_eq!(account.balance, SEED_AMOUNT, "the refund restored the sender's balance");

    // Envelopes: bad input through the router is refused naming the field,
    // and a grabber in the other cell with no account gets its own code;
    // none of it moves money.
    for (total, shares, expires_at_ms, field) in [
        (10, 0, 0, "shares"),
        (10, 11, 0, "shares"),
        (0, 1, 0, "total"),
        (10, 2, 1, "expires_at_ms"),
        (10, 2, unix_ms() + 30 * 24 * 3600 * 1000, "expires_at_ms"),
    ] {
        let refused = client
            .send_envelope(SendEnvelopeRequest {
                transfer_id_text: String::new(),
                transfer_id: b"bad-envelope".to_vec(),
                sender_user_id: sender,
                currency: CURRENCY.into(),
                total,
                shares,
                split: EnvelopeSplit::Random as i32,
                expires_at_ms,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().starts_with(field), "{field}: {}", refused.message());
        // Through the router too, the field comes structured.
        assert_eq!(cellbank_client::errors::bad_field(&refused).as_deref(), Some(field));
    }
    let envelope_id = send_envelope(&client, sender, "for-nobody", 0).await;
    assert_eq!(grab(&client, missing, &envelope_id).await, ResultCode::AccountNotFound as i32);
    assert_eq!(
        grab(&client, missing, &format!("{sender}.no-such-envelope")).await,
        ResultCode::EnvelopeNotFound as i32
    );
    let found = call(&client, |mut c| {
        let request = GetEnvelopeRequest { envelope_id: envelope_id.clone(), page_size: 10, page_token: vec![] };
        async move { c.get_envelope(request).await }
    })
    .await;
    let envelope = found.envelope.unwrap();
    assert_eq!((envelope.shares_grabbed, envelope.remaining), (0, ENVELOPE_TOTAL), "the refused grab took nothing");

    // A rush from the other pair: 20 grabbers with an account and 20
    // without, at once (the router asks the grabbers' cell about them in
    // batches). Each without one is refused and takes no share; each with
    // one takes a share.
    let others: Vec<u64> = (2000..).filter(|u| pair(*u) != pair(sender)).take(40).collect();
    let (holders, strangers) = others.split_at(20);
    rush_of_holders_and_strangers(&cluster, &client, &envelope_id, holders, strangers).await;
}

/// During a rolling upgrade the routers may be newer than the cells: a
/// cell that answers `HoldsAccounts` UNIMPLEMENTED (as a build from before
/// it) is asked with `GetAccount`, and a rush of cross-cell grabs is
/// answered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_cell_grabs_are_answered_by_cells_without_holds_accounts() {
    let token = "upgrade-test-token";
    let mut cluster = Cluster::start_some(1, 2, |t| t.admin_token = Some(token.to_string()), |_| false);
    cluster.sup.set_env(cellbank_raft::faults::STARTUP_ENV, "clearing.holds_accounts=unimplemented:600000");
    for id in cluster.sup.ids() {
        cluster.sup.start(id).expect("start a process of the cluster");
    }
    for pair in [1, 2] {
        cluster.wait_for_mode(pair, PairMode::Sync, Duration::from_secs(30)).await;
    }
    // The replicas do answer as older builds.
    for cell in [1, 2] {
        for addr in cluster.sup.cell_endpoints(cell) {
            let addr = cellbank_client::planes::Plane::Admin.of(&addr);
            let channel = cellbank_client::ChannelSettings::SERVICE.connect(&addr).await.unwrap();
            let mut faults = cellbank_proto::cell::fault_points_client::FaultPointsClient::new(channel);
            let mut request = tonic::Request::new(cellbank_proto::cell::ListFaultsRequest {});
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            let list = faults.list(request).await.unwrap().into_inner();
            let points: Vec<&str> = list.faults.iter().map(|f| f.point.as_str()).collect();
            assert_eq!(points, ["clearing.holds_accounts"], "cell {cell} {addr}");
        }
    }
    let client = cluster.client();
    let table = cluster.status().await.unwrap().table.unwrap();
    let pair = |user| cellbank_router::table::route(&table, user).unwrap().pair_id;
    let sender = 1u64;
    open_and_seed(&client, &[sender]).await;
    let envelope_id = send_envelope(&client, sender, "rolling-upgrade", 0).await;
    let others: Vec<u64> = (2000..).filter(|u| pair(*u) != pair(sender)).take(20).collect();
    let (holders, strangers) = others.split_at(10);
    rush_of_holders_and_strangers(&cluster, &client, &envelope_id, holders, strangers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiring_envelope_returns_the_rest_once_across_a_leader_change() {
    let mut cluster = Cluster::start(1, 2, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=6).collect();
    open_and_seed(&client, &users).await;
    let sender = 1u64;
    let expires_at = unix_ms() + 4_000;
    let envelope_id = send_envelope(&client, sender, "expiring", expires_at).await;
    let mut grabbed = 0;
    for user in 2..=4u64 {
        let id = envelope_id.clone();
        let r = call(&client, |mut c| {
            let request = GrabEnvelopeRequest { envelope_id: id.clone(), user_id: user };
            async move { c.grab_envelope(request).await }
        })
        .await;
        assert_eq!(r.result.unwrap().code, ResultCode::Ok as i32);
        grabbed += r.amount;
    }
    // The sender's cell loses its leader just before the expiry.
    let table = cluster.status().await.unwrap().table.unwrap();
    let cell = cellbank_router::table::route(&table, sender).unwrap().cell_id;
    tokio::time::sleep(Duration::from_millis(expires_at.saturating_sub(unix_ms()).saturating_sub(300))).await;
    let leader: ProcessId = cluster.cell_leader(cell).await.expect("a leader");
    cluster.sup.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.sup.start(leader).expect("restart");
    let started = Instant::now();
    let envelope = loop {
        let found = call(&client, |mut c| {
            let request = GetEnvelopeRequest { envelope_id: envelope_id.clone(), page_size: 10, page_token: vec![] };
            async move { c.get_envelope(request).await }
        })
        .await;
        let envelope = found.envelope.unwrap();
        if envelope.state == EnvelopeState::Expired as i32 {
            break envelope;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the envelope never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(envelope.refunded, ENVELOPE_TOTAL - grabbed);
    assert_eq!(envelope.shares_grabbed, 3);
    // Grabbing now is refused and moves nothing.
    let late = call(&client, |mut c| {
        let request = GrabEnvelopeRequest { envelope_id: envelope_id.clone(), user_id: 5 };
        async move { c.grab_envelope(request).await }
    })
    .await;
    assert_eq!(late.result.unwrap().code, ResultCode::EnvelopeExpired as i32);
    // Give a second expiry every chance to happen, then count refunds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let history = list_all(&client, sender).await;
    let refunds: Vec<&TransferRecord> =
        history.iter().filter(|r| r.kind == TransferKind::EnvelopeRefund as i32).collect();
    assert_eq!(refunds.len(), 1, "the unclaimed money went back once");
    assert_eq!(refunds[0].amount, ENVELOPE_TOTAL - grabbed);
    let account = call(&client, |mut c| async move {
        c.get_account(GetAccountRequest { user_id: sender, currency: CURRENCY.into() }).await
    })
    .await;
    assert_eq!(account.balance, SEED_AMOUNT - grabbed);
    assert_reconciles(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_names_a_balance_changed_behind_the_ledger() {
    let mut cluster = Cluster::start(1, 2, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=8).collect();
    open_and_seed(&client, &users).await;
    for (n, (from, to)) in [(1u64, 2u64), (3, 4), (5, 6), (7, 8), (2, 7)].into_iter().enumerate() {
        let request = TransferRequest {
            transfer_id_text: String::new(),
            transfer_id: format!("r{n}").into_bytes(),
            from_user_id: from,
            to_user_id: to,
            currency: CURRENCY.into(),
            amount: 1234,
        };
        call(&client, |mut c| {
            let request = request.clone();
            async move { c.transfer(request).await }
        })
        .await;
    }
    assert_reconciles(&cluster).await;
    let routers = cluster.routers().join(",");
    let run_cli = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cellbank"))
            .args(["admin", "reconcile", "--endpoints", &routers, "--settle-timeout-ms", "5000"])
            .arg("--certs")
            .arg(common::test_certs())
            .output()
            .expect("run cellbank admin reconcile")
    };
    let clean = run_cli();
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stdout));

    // Behind the state machine's back: a follower of user 6's cell, stopped,
    // gets 1 fen more in its RocksDB.
    let table = cluster.status().await.unwrap().table.unwrap();
    let cell = cellbank_router::table::route(&table, 6).unwrap().cell_id;
    let leader = cluster.cell_leader(cell).await.expect("a leader");
    let victim = cluster.sup.cell_replicas(cell).into_iter().find(|r| *r != leader).unwrap();
    let ProcessId::Replica { replica, .. } = victim else { unreachable!() };
    cluster.sup.kill(victim);
    let path =
        cluster.sup.topology.data_dir.join(format!("cell-{cell}")).join(format!("replica-{replica}")).join("rocksdb");
    {
        let db = cellbank_raft::storage::open_db(&path);
        let id = cellbank_cell::ledger::AccountId::user(6, cellbank_cell::ledger::Currency::parse(CURRENCY).unwrap());
        let mut account = cellbank_cell::ledger::Account::decode(&db.get(id.key()).unwrap().unwrap()).unwrap();
        account.balance += 1;
        db.put(id.key(), account.encode()).unwrap();
        db.flush().unwrap();
    }
    cluster.sup.start(victim).expect("restart the replica");
    let report = reconcile(&cluster).await;
    assert!(!report.ok(), "reconcile must fail");
    let named: Vec<&String> = report.discrepancies.iter().filter(|d| d.contains("account user 6 CNY")).collect();
    assert!(!named.is_empty(), "the account is named: {:#?}", report.discrepancies);
    assert!(
        report.discrepancies.iter().any(|d| d.contains("digest")),
        "the replica's digest differs: {:#?}",
        report.discrepancies
    );
    let failed = run_cli();
    let out = String::from_utf8_lossy(&failed.stdout);
    println!("{out}");
    assert!(!failed.status.success(), "the CLI exits non-zero");
    assert!(out.contains("account user 6 CNY"), "the CLI names the account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_wait_in_the_outbox_while_their_cell_is_down_and_arrive_once() {
    let mut cluster = Cluster::start(1, 2, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let table = cluster.status().await.unwrap().table.unwrap();
    let pair = |user| cellbank_router::table::route(&table, user).unwrap().pair_id;
    let senders: Vec<u64> = (1..=40).filter(|u| pair(*u) == 1).take(3).collect();
    let recipients: Vec<u64> = (1..=40).filter(|u| pair(*u) == 2).take(3).collect();
    let mut users = senders.clone();
    users.extend(&recipients);
    open_and_seed(&client, &users).await;
    // Pair 2 loses both of its cells: no failover is possible.
    cluster.sup.kill_cell(2);
    cluster.sup.kill_cell(4);
    let mut sent = 0u64;
    for (n, from) in senders.iter().enumerate() {
        let request = TransferRequest {
            transfer_id_text: String::new(),
            transfer_id: format!("stuck-{n}").into_bytes(),
            from_user_id: *from,
            to_user_id: recipients[n],
            currency: CURRENCY.into(),
            amount: 100 + n as u64,
        };
        let result = call(&client, |mut c| {
            let request = request.clone();
            async move { c.transfer(request).await }
        })
        .await
        .result
        .unwrap();
        assert_eq!((result.code, result.settlement), (ResultCode::Ok as i32, Settlement::InTransit as i32));
        sent += 100 + n as u64;
    }
    // The entries wait, show in the status, and age.
    let status = cluster
        .wait_until("pair 1's outbox holds the credits", Duration::from_secs(10), |s| {
            s.pairs.iter().any(|p| {
                p.pair.is_some_and(|p| p.pair_id == 1) && p.outbox_pending == 3 && p.outbox_oldest_age_ms > 1_000
            })
        })
        .await;
    println!(
        "outbox while pair 2 is down: {:?}",
        status.pairs.iter().map(|p| (p.outbox_pending, p.outbox_oldest_age_ms)).collect::<Vec<_>>()
    );
    let stuck = reconcile(&cluster).await;
    assert!(!stuck.ok(), "reconcile reports pair 2 unreachable");
    cluster.sup.start_cell(2).expect("restart cell 2");
    cluster.sup.start_cell(4).expect("restart cell 4");
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(40)).await;
    let started = Instant::now();
    for n in 0..senders.len() {
        loop {
            let record = call(&client, |mut c| async move {
                c.get_transfer(GetTransferRequest { transfer_id_text: format!("stuck-{n}"), ..Default::default() })
                    .await
            })
            .await
            .transfer
            .unwrap();
            if record.settlement == Settlement::Credited as i32 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "credit {n} never arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut received = 0;
    for (n, user) in recipients.iter().enumerate() {
        let account = call(&client, |mut c| async move {
            c.get_account(GetAccountRequest { user_id: *user, currency: CURRENCY.into() }).await
        })
        .await;
        assert_eq!(account.balance, SEED_AMOUNT + 100 + n as u64, "credited exactly once");
        received += account.balance - SEED_AMOUNT;
    }
    assert_eq!(received, sent);
    assert_reconciles(&cluster).await;
}
