//! Fencing by epoch: an active cell cut off from the routers (its replicas
//! keep running) is failed over, and afterwards it acknowledges nothing,
//! whoever asks. The promoted cell refuses requests that carry the old
//! epoch and tells the caller the new one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::router::PairMode;
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::{GetAccountRequest, GetTransferRequest, TransferRequest};
use cellbank_proto::EPOCH_METADATA_KEY;
use common::cluster::Cluster;
use common::ledger_checks::{seed, start_load, stop_load, users, verify_ledger, History, CURRENCY};

fn stale_transfer(id: &str, from: u64, to: u64, epoch: Option<u64>) -> tonic::Request<TransferRequest> {
    let mut request = tonic::Request::new(TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: id.as_bytes().to_vec(),
        from_user_id: from,
        to_user_id: to,
        currency: CURRENCY.into(),
        amount: 1,
    });
    request.set_timeout(Duration::from_secs(3));
    if let Some(epoch) = epoch {
        request.metadata_mut().insert(EPOCH_METADATA_KEY, epoch.to_string().parse().unwrap());
    }
    request
}

async fn ledger(addr: &str) -> LedgerClient<tonic::transport::Channel> {
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(addr).await.unwrap();
    cellbank_client::channel::ledger(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_active_acknowledges_nothing_and_stale_epochs_are_refused() {
    let cluster = Cluster::start(1, 1, |t| t.coordinator.cooldown_ms = 5_000);
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users = users(20);
    seed(&client, &users).await;
    // Two accounts outside the load, for the writes this test sends itself.
    let (a, b) = (1001, 1002);
    seed(&client, &[a, b]).await;
    let history = Arc::new(History::default());
    let load = start_load(cluster.routers(), users.clone(), 6, history.clone(), 13);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The router loses cell 1; cell 1's replicas keep running.
    cellbank::routers::ClusterClient::new(&cluster.routers(), None)
        .isolate_cells(&[1], Duration::from_secs(120))
        .await
        .expect("isolate");
    let status = cluster
        .wait_until("pair 1 failed over to cell 2", Duration::from_secs(15), |s| {
            Cluster::pair_of(s, 1).active_cell_id == 2
        })
        .await;
    assert_eq!(Cluster::pair_of(&status, 1).epoch, 2);

    // Anyone still talking to cell 1 (a stale router with epoch 1, or a
    // client with no epoch) gets no acknowledgement from any replica.
    let mut stale_ids = Vec::new();
    for (n, id) in cluster.sup.cell_replicas(1).into_iter().enumerate() {
        let addr = cluster.sup.addr(id).unwrap();
        let mut cell1 = ledger(&addr).await;
        for attempt in 0..5 {
            for epoch in [Some(1), None] {
                let transfer_id = format!("stale-{n}-{attempt}-{}", epoch.is_some());
                let answer = cell1.transfer(stale_transfer(&transfer_id, a, b, epoch)).await;
                match answer {
                    Ok(response) => panic!("deposed cell 1 acknowledged {transfer_id}: {:?}", response.into_inner()),
                    Err(status) => assert!(
                        matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
                        "unexpected refusal {status:?}"
                    ),
                }
                stale_ids.push(transfer_id);
            }
        }
    }
    println!("cell 1 refused all {} writes sent to it after the failover", stale_ids.len());
    // Nor does it serve reads: they could miss writes cell 2 has taken.
    for id in cluster.sup.cell_replicas(1) {
        let mut cell1 = ledger(&cluster.sup.addr(id).unwrap()).await;
        let mut read = tonic::Request::new(GetAccountRequest { user_id: a, currency: CURRENCY.into() });
        read.set_timeout(Duration::from_secs(3));
        let refused = cell1.get_account(read).await.expect_err("a deposed cell serves no read");
        assert!(matches!(refused.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded), "{refused:?}");
    }

    // The promoted cell refuses the old epoch and names the new one; a
    // caller that has caught up with epoch 2 is served.
    let leader = cluster.cell_leader(2).await.expect("cell 2 has a leader");
    let mut cell2 = ledger(&cluster.sup.addr(leader).unwrap()).await;
    let refused = cell2.transfer(stale_transfer("old-epoch", a, b, Some(1))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(refused.metadata().get(EPOCH_METADATA_KEY).and_then(|v| v.to_str().ok()), Some("2"));
    let future = cell2.transfer(stale_transfer("future-epoch", a, b, Some(7))).await.unwrap_err();
    assert_eq!(future.code(), tonic::Code::Unavailable, "an epoch from the future is refused too");
    // (Right after a failover the promoted cell waits out the old active's
    // read lease, answering UNAVAILABLE; a router retries, and so does this.)
    let started = std::time::Instant::now();
    let served = loop {
        match cell2.transfer(stale_transfer("new-epoch", a, b, Some(2))).await {
            Ok(served) => break served,
            Err(status) if status.code() == tonic::Code::Unavailable && started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(status) => panic!("epoch 2 was not served: {status:?}"),
        }
    };
    assert_eq!(served.into_inner().result.unwrap().code, cellbank_proto::v1::ResultCode::Ok as i32);

    // None of the refused writes exists in the ledger the routers serve.
    for transfer_id in stale_ids.iter().chain(["old-epoch".to_string(), "future-epoch".to_string()].iter()) {
        let found = client
            .get_transfer(GetTransferRequest { transfer_id: transfer_id.clone().into_bytes(), ..Default::default() })
            .await;
        assert_eq!(found.unwrap_err().code(), tonic::Code::NotFound, "{transfer_id} must not exist");
    }

    // Healed, cell 1 is rebuilt as the standby of cell 2.
    cellbank::routers::ClusterClient::new(&cluster.routers(), None)
        .isolate_cells(&[], Duration::ZERO)
        .await
        .expect("heal");
    let pair = cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    assert_eq!((pair.active_cell_id, pair.standby_cell_id), (2, 1));
    stop_load(&history, load).await;
    let (checked, ok) = verify_ledger(&client, &users, &history).await;
    println!("verified {checked} transfers ({ok} OK) through the router");
    cluster.assert_pair_identical(1, Duration::from_secs(30)).await;
}
