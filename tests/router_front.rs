//! The router's front door over two pairs: requests reach the user's cell,
//! SubmitTransfers batches that span cells (and mix same-cell and
//! cross-cell items) are split and merged back in request order, GetTransfer
//! finds a transfer whichever cell holds it and follows a cross-cell one
//! until it reaches its recipient.

mod common;

use std::time::Duration;

use cellbank_proto::router::PairMode;
use cellbank_proto::v1::*;
use common::cluster::Cluster;
use common::ledger_checks::{seed, CURRENCY};

/// The pair a user's slice belongs to, from the routing table.
async fn pair_of_user(cluster: &Cluster, user: u64) -> u64 {
    let status = cluster.status().await.expect("status");
    cellbank_router::table::route(status.table.as_ref().unwrap(), user).unwrap().pair_id
}

fn transfer(id: &str, from: u64, to: u64, amount: u64) -> TransferRequest {
    TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: id.as_bytes().to_vec(),
        from_user_id: from,
        to_user_id: to,
        currency: CURRENCY.into(),
        amount,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_split_by_cell_merge_in_order_and_cross_cell_items_travel() {
    let cluster = Cluster::start(1, 2, |_| {});
    for pair in [1, 2] {
        cluster.wait_for_mode(pair, PairMode::Sync, Duration::from_secs(30)).await;
    }
    // Two users in each pair.
    let mut by_pair: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for user in 1..=40 {
        by_pair.entry(pair_of_user(&cluster, user).await).or_default().push(user);
    }
    let (a1, a2) = (by_pair[&1][0], by_pair[&1][1]);
    let (b1, b2) = (by_pair[&2][0], by_pair[&2][1]);
    let client = cluster.client();
    seed(&client, &[a1, a2, b1, b2]).await;

    // One batch: pair 1, pair 2, cross-cell, malformed, pair 1 again.
    let items = vec![
        transfer("mix-1", a1, a2, 10),
        transfer("mix-2", b1, b2, 20),
        transfer("mix-3", a1, b1, 30),
        transfer("", a2, a1, 40),
        transfer("mix-5", a2, a1, 50),
    ];
    let response = client.submit_transfers(SubmitTransfersRequest { transfers: items.clone() }).await.expect("submit");
    let codes: Vec<ResultCode> = response.results.iter().map(|r| ResultCode::try_from(r.code).unwrap()).collect();
    assert_eq!(codes, vec![ResultCode::Ok, ResultCode::Ok, ResultCode::Ok, ResultCode::InvalidItem, ResultCode::Ok]);
    assert_eq!(response.results[3].field, "transfer_id");
    let settlements: Vec<i32> = response.results.iter().map(|r| r.settlement).collect();
    assert_eq!(
        settlements,
        vec![
            Settlement::Local as i32,
            Settlement::Local as i32,
            Settlement::InTransit as i32,
            0,
            Settlement::Local as i32
        ]
    );

    // A unary transfer between cells, the other way.
    let cross = client.transfer(transfer("cross", b2, a2, 5)).await.expect("transfer");
    assert_eq!(cross.result.unwrap().code, ResultCode::Ok as i32);

    // A caller that cannot send bytes (JSON, grpcurl) names the transfer as
    // text; the same id as bytes is the same transfer (a retry); a request
    // naming two different ids is refused, naming the field; a record read
    // back carries its id as text too.
    let as_text = TransferRequest { transfer_id_text: "order-42".into(), ..transfer("", a1, a2, 7) };
    let first = client.transfer(as_text).await.expect("transfer").result.unwrap();
    assert_eq!(first.code, ResultCode::Ok as i32);
    let again = client.transfer(transfer("order-42", a1, a2, 7)).await.expect("retry").result.unwrap();
    assert!(again.duplicate && again.code == ResultCode::Ok as i32, "{again:?}");
    let both = TransferRequest { transfer_id_text: "order-43".into(), ..transfer("order-44", a1, a2, 7) };
    let refused = client.transfer(both).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(cellbank_client::errors::bad_field(&refused).as_deref(), Some("transfer_id_text"));
    let found = client
        .get_transfer(GetTransferRequest { transfer_id_text: "order-42".into(), ..Default::default() })
        .await
        .expect("get transfer by its text id")
        .transfer
        .unwrap();
    assert_eq!((found.transfer_id.as_slice(), found.transfer_id_text.as_str()), (&b"order-42"[..], "order-42"));

    // GetTransfer finds each transfer in its own cell, and nothing else.
    for (id, from) in [("mix-1", a1), ("mix-2", b1), ("mix-5", a2)] {
        let found = client
            .ledger(|mut c| async move {
                c.get_transfer(GetTransferRequest { transfer_id: id.as_bytes().to_vec(), ..Default::default() }).await
            })
            .await
            .expect("get transfer")
            .transfer
            .unwrap();
        assert_eq!(found.from_user_id, from);
    }
    // Cross-cell transfers live in their sender's cell and end CREDITED.
    for (id, from) in [("mix-3", a1), ("cross", b2)] {
        let started = std::time::Instant::now();
        loop {
            let found = client
                .get_transfer(GetTransferRequest { transfer_id: id.as_bytes().to_vec(), ..Default::default() })
                .await
                .expect("get transfer")
                .transfer
                .unwrap();
            assert_eq!(found.from_user_id, from);
            if found.settlement == Settlement::Credited as i32 {
                assert!(found.credited_at_ms >= found.timestamp_ms);
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{id} never reached its recipient");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let missing = client
        .get_transfer(GetTransferRequest { transfer_id: b"never-sent".to_vec(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Balances show exactly the applied items.
    let balance = |user: u64| {
        let client = &client;
        async move {
            client
                .get_account(GetAccountRequest { user_id: user, currency: CURRENCY.into() })
                .await
                .expect("balance")
                .balance
        }
    };
    let seed_amount = common::ledger_checks::SEED_AMOUNT;
    assert_eq!(balance(a1).await, seed_amount - 10 + 50 - 30 - 7);
    assert_eq!(balance(a2).await, seed_amount + 10 - 50 + 5 + 7);
    assert_eq!(balance(b1).await, seed_amount - 20 + 30);
    assert_eq!(balance(b2).await, seed_amount + 20 - 5);
}
