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

/// The answers to, in order: a retry of a recorded transfer, an id reused
/// with another amount, an overdraft and a transfer without an id; each as
/// `Transfer` answers it alone.
fn assert_retry_reuse_overdraft_malformed(answers: &[Result<TransferResult, tonic::Status>]) {
    let retried = answers[0].as_ref().expect("retry");
    assert!(retried.code == ResultCode::Ok as i32 && retried.duplicate, "{retried:?}");
    let reused = answers[1].as_ref().expect("reused id");
    assert_eq!((reused.code, reused.field.as_str()), (ResultCode::IdReusedWithDifferentFields as i32, "amount"));
    let overdraft = answers[2].as_ref().expect("overdraft");
    assert_eq!(overdraft.code, ResultCode::InsufficientFunds as i32, "{overdraft:?}");
    let malformed = answers[3].as_ref().unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument, "{malformed:?}");
    assert!(cellbank_client::errors::bad_field(malformed).is_some(), "names its field: {malformed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_split_by_cell_merge_in_order_and_cross_cell_items_travel() {
    let mut cluster =
        Cluster::start(1, 2, |t| t.routers[0].metrics = Some(format!("127.0.0.1:{}", common::free_port())));
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

    // Many unary transfers into one pair at once: the router carries them
    // to the cell in fewer calls than transfers (coalesced), and each gets
    // the answer it would get alone: a retry of an id is a duplicate, an id
    // reused with other fields is refused naming the field, an overdraft is
    // refused, a malformed one never leaves the router.
    let router_metrics = cluster.sup.metrics_addr(cellbank::supervisor::ProcessId::Router(1)).expect("router metrics");
    let calls_to_pair_1 = || common::metric(&router_metrics, "cellbank_router_requests_total", "pair=\"1\"");
    let before = calls_to_pair_1().await.expect("the router counts its calls to pair 1");
    let (c1, c2) = (by_pair[&1][2], by_pair[&1][3]);
    seed(&client, &[c1, c2]).await;
    let send_all = |requests: Vec<TransferRequest>| {
        let client = &client;
        futures::future::join_all(
            requests
                .into_iter()
                .map(move |r| async move { client.transfer(r).await.map(|response| response.result.unwrap()) }),
        )
    };
    // 150 transfers of 1 from c1 and 150 of 3 from c2, at once.
    let first: Vec<TransferRequest> = (0..300)
        .map(|i| {
            if i % 2 == 0 {
                transfer(&format!("many-{i}"), c1, c2, 1)
            } else {
                transfer(&format!("many-{i}"), c2, c1, 3)
            }
        })
        .collect();
    for answer in send_all(first).await {
        let answer = answer.expect("transfer");
        assert!(answer.code == ResultCode::Ok as i32 && !answer.duplicate, "{answer:?}");
    }
    // Then 100 more of 1 from c1, at once with a retry, an id reused with
    // another amount, an overdraft and a transfer without an id.
    let mut second: Vec<TransferRequest> = (0..100).map(|i| transfer(&format!("more-{i}"), c1, c2, 1)).collect();
    second.push(transfer("many-0", c1, c2, 1));
    second.push(transfer("many-1", c2, c1, 4));
    second.push(transfer("many-overdraft", c1, c2, seed_amount * 10));
    second.push(transfer("", c1, c2, 1));
    let answers = send_all(second).await;
    for answer in &answers[..100] {
        let answer = answer.as_ref().expect("transfer");
        assert!(answer.code == ResultCode::Ok as i32 && !answer.duplicate, "{answer:?}");
    }
    assert_retry_reuse_overdraft_malformed(&answers[100..]);
    assert_eq!(balance(c1).await, seed_amount - 150 + 450 - 100);
    assert_eq!(balance(c2).await, seed_amount + 150 - 450 + 100);
    let calls = calls_to_pair_1().await.unwrap() - before;
    // Without coalescing: 402 calls (the malformed one stays here) and the
    // seeds' 4.
    assert!(calls <= 200, "403 transfers and 2 seeds went to pair 1 in {calls} calls: not coalesced");
    eprintln!("403 unary transfers and 2 seeds reached pair 1 in {calls} calls");

    // A service's opt-in coalescer: one transfer per caller, sent as
    // SubmitTransfers calls, each caller answered as Transfer would answer
    // it alone (a malformed one is INVALID_ARGUMENT naming its field).
    let client_calls = |method: &'static str| {
        let router_metrics = router_metrics.clone();
        async move {
            let label = format!("method=\"{method}\"");
            common::metric(&router_metrics, "cellbank_grpc_server_handled_total", &label).await.unwrap_or(0)
        }
    };
    let (submits_before, unary_before) = (client_calls("SubmitTransfers").await, client_calls("Transfer").await);
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&cluster.routers()[0]).await.expect("channel");
    let coalescer =
        cellbank_client::ledger::TransferCoalescer::new(cellbank_client::channel::ledger(channel), Default::default());
    let (d1, d2) = (by_pair[&1][4], by_pair[&2][2]);
    seed(&client, &[d1, d2]).await;
    // 200 from c1 to d1 (same pair) and 100 from d1 to d2 (across pairs),
    // with a retry, an id reused with another amount, an overdraft and a
    // transfer without an id among them.
    let mut requests: Vec<TransferRequest> = (0..300)
        .map(
            |i| if i < 200 { transfer(&format!("co-{i}"), c1, d1, 2) } else { transfer(&format!("co-{i}"), d1, d2, 1) },
        )
        .collect();
    requests.push(transfer("more-0", c1, c2, 1));
    requests.push(transfer("many-2", c1, c2, 5));
    requests.push(transfer("co-overdraft", c1, d1, seed_amount * 10));
    requests.push(transfer("", c1, d1, 1));
    let answers =
        futures::future::join_all(requests.into_iter().map(|r| coalescer.transfer(r, Duration::from_secs(30)))).await;
    for answer in &answers[..300] {
        let answer = answer.as_ref().expect("coalesced transfer");
        assert!(answer.code == ResultCode::Ok as i32 && !answer.duplicate, "{answer:?}");
    }
    for answer in &answers[200..300] {
        let answer = answer.as_ref().unwrap();
        assert_eq!(answer.settlement, Settlement::InTransit as i32, "across pairs: {answer:?}");
    }
    assert_retry_reuse_overdraft_malformed(&answers[300..]);
    assert_eq!(balance(c1).await, seed_amount - 150 + 450 - 100 - 400);
    // d1's credits are local; its debits crossed to pair 2 and are credited
    // there once the courier delivers them.
    assert_eq!(balance(d1).await, seed_amount + 400 - 100);
    let delivered = tokio::time::timeout(Duration::from_secs(30), async {
        while balance(d2).await != seed_amount + 100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(delivered.is_ok(), "the 100 cross-pair transfers reach d2");
    let submits = client_calls("SubmitTransfers").await - submits_before;
    let unary = client_calls("Transfer").await - unary_before;
    assert_eq!(unary, 0, "the coalescer sends no Transfer calls when nothing is refused whole");
    assert!((1..=150).contains(&submits), "304 transfers in {submits} SubmitTransfers calls: not coalesced");
    eprintln!("304 coalesced transfers reached the router in {submits} SubmitTransfers calls");

    // Small SubmitTransfers calls from many callers at once share calls to
    // the cell, and each caller's items are applied in its order: the
    // second item of each call reuses the first one's id with another
    // amount, so only the first applies.
    let before = calls_to_pair_1().await.unwrap();
    let calls = (0..40).map(|call| {
        let items = vec![
            transfer(&format!("small-{call}"), c2, c1, 1),
            transfer(&format!("small-{call}"), c2, c1, 2),
            transfer(&format!("small-{call}-b"), c2, c1, 3),
        ];
        let client = &client;
        async move { client.submit_transfers(SubmitTransfersRequest { transfers: items }).await }
    });
    for response in futures::future::join_all(calls).await {
        let results = response.expect("small batch").results;
        let codes: Vec<(i32, &str)> = results.iter().map(|r| (r.code, r.field.as_str())).collect();
        assert_eq!(
            codes,
            [
                (ResultCode::Ok as i32, ""),
                (ResultCode::IdReusedWithDifferentFields as i32, "amount"),
                (ResultCode::Ok as i32, "")
            ],
            "{results:?}"
        );
    }
    let cell_calls = calls_to_pair_1().await.unwrap() - before;
    assert!(cell_calls < 40, "40 small SubmitTransfers calls reached pair 1 in {cell_calls} calls: not coalesced");
    assert_eq!(balance(c1).await, seed_amount - 150 + 450 - 100 - 400 + 40 * 4);
    // One pair's items of a call travel in order, however many: money
    // passes through an account that starts empty, 60 times.
    let x = by_pair[&1][5];
    let opened =
        client.open_account(OpenAccountRequest { user_id: x, currency: CURRENCY.into() }).await.expect("open account");
    assert_eq!(opened.code, ResultCode::Ok as i32, "{opened:?}");
    let chain: Vec<TransferRequest> = (0..60)
        .flat_map(|i| [transfer(&format!("chain-{i}-in"), c2, x, 1), transfer(&format!("chain-{i}-out"), x, c1, 1)])
        .collect();
    let results = client.submit_transfers(SubmitTransfersRequest { transfers: chain }).await.expect("chain").results;
    assert!(results.iter().all(|r| r.code == ResultCode::Ok as i32), "{results:?}");
    assert_eq!(balance(x).await, 0);
    assert_eq!(balance(c1).await, seed_amount - 150 + 450 - 100 - 400 + 40 * 4 + 60);

    // A call whose part for one pair is recorded while its part for another
    // fails is not answered as if nothing applied (which the clients' retry
    // rule would send again as new): it is ABORTED, saying so.
    cluster.sup.kill_cell(2);
    cluster.sup.kill_cell(4);
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&cluster.routers()[0]).await.expect("channel");
    let mut ledger = cellbank_client::channel::ledger(channel);
    let mut request = tonic::Request::new(SubmitTransfersRequest {
        transfers: vec![transfer("split-1", a1, a2, 1), transfer("split-2", b1, b2, 1)],
    });
    request.set_timeout(Duration::from_secs(3));
    let refused = ledger.submit_transfers(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("same transfer ids"), "{refused:?}");
    assert!(!cellbank_client::retry::retryable(&refused, true), "not retried as if nothing applied");
    assert_eq!(balance(a2).await, seed_amount + 10 - 50 + 5 + 7 + 1, "pair 1's item was recorded");
    // A call all of whose items failed still says so as it is.
    let mut request = tonic::Request::new(SubmitTransfersRequest { transfers: vec![transfer("split-3", b1, b2, 1)] });
    request.set_timeout(Duration::from_secs(2));
    let unavailable = ledger.submit_transfers(request).await.unwrap_err();
    assert_eq!(unavailable.code(), tonic::Code::Unavailable, "{unavailable:?}");
    eprintln!("40 small SubmitTransfers calls reached pair 1 in {cell_calls} calls");
}
