//! A transfer workload that records what clients were told, and the checks
//! that compare it with what the cell holds afterwards.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellbank_client::CellClient;
use cellbank_proto::v1::*;
use rand::{Rng, SeedableRng};

use super::Cell;

pub const CURRENCY: &str = "CNY";
pub const SEED_AMOUNT: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct Ack {
    pub request: TransferRequest,
    pub code: i32,
}

#[derive(Default)]
pub struct History {
    pub acked: Mutex<Vec<Ack>>,
    /// Requests whose outcome the client never heard.
    pub unknown: Mutex<Vec<TransferRequest>>,
    pub stop: AtomicBool,
}

impl History {
    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

pub fn users(n: u64) -> Vec<u64> {
    (1..=n).collect()
}

pub async fn seed(client: &CellClient, users: &[u64]) {
    for &user in users {
        let response = client
            .open_account(OpenAccountRequest { user_id: user, currency: CURRENCY.into() })
            .await
            .expect("open account");
        assert!(
            response.code == ResultCode::Ok as i32 || response.code == ResultCode::AccountAlreadyExists as i32,
            "open account answered {}",
            response.code
        );
        let response = client
            .deposit(DepositRequest {
                transfer_id_text: String::new(),
                transfer_id: format!("seed-{user}").into_bytes(),
                user_id: user,
                currency: CURRENCY.into(),
                amount: SEED_AMOUNT,
            })
            .await
            .expect("seed deposit");
        assert_eq!(response.result.unwrap().code, ResultCode::Ok as i32);
    }
}

/// Starts `workers` clients sending transfers until `history.stop`.
pub fn start_load(
    endpoints: Vec<String>,
    users: Vec<u64>,
    workers: usize,
    history: Arc<History>,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|worker| {
            let history = history.clone();
            let users = users.clone();
            let mut client = CellClient::new(endpoints.clone());
            client.deadline = Duration::from_secs(6);
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ worker as u64);
                let mut seq = 0u64;
                while !history.stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let from = users[rng.gen_range(0..users.len())];
                    let mut to = users[rng.gen_range(0..users.len())];
                    if to == from {
                        to = users[(users.iter().position(|u| *u == from).unwrap() + 1) % users.len()];
                    }
                    let request = TransferRequest {
                        transfer_id_text: String::new(),
                        transfer_id: format!("w{worker}-{seq}").into_bytes(),
                        from_user_id: from,
                        to_user_id: to,
                        currency: CURRENCY.into(),
                        // Now and then more than a balance holds: a business failure.
                        amount: if rng.gen_ratio(1, 50) { SEED_AMOUNT * 100 } else { rng.gen_range(1..=500) },
                    };
                    let sent = request.clone();
                    let outcome = client.transfer(sent.clone()).await;
                    match outcome {
                        Ok(response) => {
                            let code = response.result.expect("a result").code;
                            history.acked.lock().unwrap().push(Ack { request, code });
                        }
                        Err(_) => history.unknown.lock().unwrap().push(request),
                    }
                }
            })
        })
        .collect()
}

pub async fn stop_load(history: &History, tasks: Vec<tokio::task::JoinHandle<()>>) {
    history.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("worker");
    }
}

async fn list_all(client: &CellClient, user: u64) -> Vec<TransferRecord> {
    let mut token = Vec::new();
    let mut all = Vec::new();
    loop {
        let page = client
            .list_transfers(ListTransfersRequest {
                user_id: user,
                currency: CURRENCY.into(),
                page_size: 1000,
                page_token: token.clone(),
            })
            .await
            .expect("list transfers");
        all.extend(page.transfers);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// Resolves every unknown outcome (by retrying with the same id), then checks:
/// every acknowledged transfer is present with the result the client heard;
/// no transfer is applied twice; each balance equals its history; no balance
/// is negative; balances (settlement included) sum to zero; every running
/// replica has the same digest at the same applied index.
pub async fn verify(cell: &Cell, users: &[u64], history: &History) {
    let (count, ok) = verify_ledger(&cell.client(), users, history).await;
    let digests = cell.converged_digests(Duration::from_secs(30)).await;
    let first = digests.values().next().expect("a digest");
    for (id, digest) in &digests {
        assert_eq!(
            digest.digest, first.digest,
            "replica {id} holds a different ledger at index {}",
            digest.applied_index
        );
        for (currency, sum) in &digest.balance_sum_by_currency {
            assert_eq!(sum, "0", "replica {id}: balances in {currency} sum to {sum}");
        }
    }
    println!("verified {count} transfers ({ok} OK) on {} replicas at index {}", digests.len(), first.applied_index);
}

/// The ledger checks of [`verify`] through any client (a cell's replicas or
/// the routers). Returns (transfers checked, of which OK).
pub async fn verify_ledger(client: &CellClient, users: &[u64], history: &History) -> (usize, usize) {
    let mut outcomes: HashMap<Vec<u8>, (TransferRequest, i32)> = HashMap::new();
    for ack in history.acked.lock().unwrap().iter() {
        let previous = outcomes.insert(ack.request.transfer_id.clone(), (ack.request.clone(), ack.code));
        assert!(previous.is_none(), "the workload reused a transfer id");
    }
    let unknown: Vec<TransferRequest> = history.unknown.lock().unwrap().clone();
    for request in unknown {
        let retry = request.clone();
        let response = client.transfer(retry.clone()).await.expect("resolving an unknown outcome");
        let code = response.result.expect("result").code;
        outcomes.insert(request.transfer_id.clone(), (request, code));
    }
    // Every outcome the clients heard is what the ledger recorded.
    for (id, (_, code)) in &outcomes {
        let record = client
            .get_transfer(GetTransferRequest { transfer_id: id.clone(), ..Default::default() })
            .await
            .unwrap_or_else(|e| panic!("acknowledged transfer {} is missing: {e}", String::from_utf8_lossy(id)))
            .transfer
            .expect("record");
        assert_eq!(record.result, *code, "transfer {} recorded a different result", String::from_utf8_lossy(id));
    }
    let mut expected_balance: BTreeMap<u64, i128> = users.iter().map(|u| (*u, SEED_AMOUNT as i128)).collect();
    for (request, code) in outcomes.values() {
        if *code == ResultCode::Ok as i32 {
            *expected_balance.get_mut(&request.from_user_id).unwrap() -= request.amount as i128;
            *expected_balance.get_mut(&request.to_user_id).unwrap() += request.amount as i128;
        }
    }
    for &user in users {
        let records = list_all(client, user).await;
        let mut seen = BTreeSet::new();
        let mut from_history: i128 = 0;
        for record in &records {
            assert!(
                seen.insert(record.transfer_id.clone()),
                "transfer {} applied twice",
                String::from_utf8_lossy(&record.transfer_id)
            );
            assert_eq!(record.result, ResultCode::Ok as i32, "history holds only applied movements");
            if record.to_user_id == user {
                from_history += record.amount as i128;
            }
            if record.from_user_id == user {
                from_history -= record.amount as i128;
            }
        }
        let account = client
            .get_account(GetAccountRequest { user_id: user, currency: CURRENCY.into() })
            .await
            .expect("get account");
        assert_eq!(account.balance as i128, from_history, "user {user}: balance differs from its history");
        assert_eq!(
            account.balance as i128, expected_balance[&user],
            "user {user}: balance differs from what clients were told"
        );
        assert!(expected_balance[&user] >= 0);
    }
    let ok = outcomes.values().filter(|(_, c)| *c == ResultCode::Ok as i32).count();
    (outcomes.len(), ok)
}
