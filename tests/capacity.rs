//! `cellbank capacity status` against a real cluster: per pair the user
//! accounts and balances the cells hold, per slice the load the routers
//! carried, with the slice a hot user lives in first.

mod common;

use std::time::Duration;

use cellbank_proto::router::PairMode;
use cellbank_proto::v1::TransferRequest;
use common::cluster::Cluster;
use common::ledger_checks::{seed, CURRENCY, SEED_AMOUNT};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capacity_status_shows_what_each_pair_holds_and_the_hottest_slice_first() {
    let cluster = Cluster::start(1, 2, |_| {});
    for pair in [1, 2] {
        cluster.wait_for_mode(pair, PairMode::Sync, Duration::from_secs(30)).await;
    }
    let client = cluster.client();
    let users: Vec<u64> = (1..=40).collect();
    seed(&client, &users).await;
    let table = cluster.status().await.unwrap().table.unwrap();
    let slice = |user: u64| cellbank_router::table::slice_of(user, table.slice_count);
    let pair = |user: u64| table.slice_pair[slice(user) as usize];
    // The hot user sends to one of its own pair (counted at the sender's
    // slice only); a few go to a user of the other pair, whose slice
    // counts the credits.
    let hot = 1;
    let other = (2..=40).find(|u| slice(*u) != slice(hot) && pair(*u) == pair(hot)).unwrap();
    let far = (2..=40).find(|u| pair(*u) != pair(hot)).unwrap();
    for n in 0..5 {
        let transfer = TransferRequest {
            transfer_id_text: String::new(),
            transfer_id: format!("far-{n}").into_bytes(),
            from_user_id: hot,
            to_user_id: far,
            currency: CURRENCY.into(),
            amount: 1,
        };
        client.transfer(transfer).await.expect("a cross-cell transfer");
    }

    // The credits reach the far user before the window opens.
    let started = std::time::Instant::now();
    loop {
        let request = cellbank_proto::v1::GetAccountRequest { user_id: far, currency: CURRENCY.into() };
        let balance = client.get_account(request).await.expect("an account").balance;
        if balance == SEED_AMOUNT + 5 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the credits never arrived: {balance}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The hot user sends from before the report's window to after it, so
    // the window sees its writes however fast this machine is.
    let sender = cluster.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let load = tokio::spawn(async move {
        let mut n = 0;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) || n < 60 {
            n += 1;
            let transfer = TransferRequest {
                transfer_id_text: String::new(),
                transfer_id: format!("hot-{n}").into_bytes(),
                from_user_id: hot,
                to_user_id: other,
                currency: CURRENCY.into(),
                amount: 1,
            };
            sender.transfer(transfer).await.expect("a transfer");
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = cellbank::capacity::gather(&cluster.routers(), Duration::from_millis(1500)).await.expect("report");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    println!("{}", cellbank::capacity::render(&report, 5));

    assert_eq!((report.routers, report.routers_counted), (1, 1));
    assert_eq!(report.slice_count, table.slice_count);
    // Every account once, on the pair its slice belongs to; money as seeded.
    assert_eq!(report.pairs.iter().map(|p| p.accounts).sum::<u64>(), users.len() as u64);
    let total: i128 = report.pairs.iter().map(|p| p.balances[CURRENCY].parse::<i128>().unwrap()).sum();
    assert_eq!(total, i128::from(SEED_AMOUNT) * users.len() as i128);
    for pair in &report.pairs {
        let theirs = users.iter().filter(|u| table.slice_pair[slice(**u) as usize] == pair.pair_id).count() as u64;
        assert_eq!(pair.accounts, theirs, "pair {}", pair.pair_id);
        assert_eq!(pair.slices as usize, table.slice_pair.iter().filter(|p| **p == pair.pair_id).count());
        assert!(pair.bytes > 0);
    }
    // The hot user's slice is first, with its writes counted.
    let first = &report.slices[0];
    assert_eq!(first.slice, slice(hot), "{:#?}", &report.slices[..3]);
    assert!(first.writes_per_s > 0.0, "{first:?}");
    assert!(first.writes >= 60, "{first:?}");
    // Nothing else wrote during the window.
    assert!(report.slices[1..].iter().all(|s| s.writes_per_s == 0.0), "{:#?}", &report.slices[..3]);
    assert_eq!(first.pair_id, table.slice_pair[slice(hot) as usize]);
    // The far user's slice counts each user's opening and deposit, and the
    // five credits applied there.
    let far_slice = report.slices.iter().find(|s| s.slice == slice(far)).unwrap();
    let seeded = users.iter().filter(|u| slice(**u) == slice(far)).count() as u64;
    assert!(far_slice.writes >= 2 * seeded + 5, "{far_slice:?}, {seeded} users seeded there");
    assert_eq!(far_slice.accounts, seeded);

    // A plan over both pairs evens the writes out; applied, the table
    // ends as planned and the books stay exact.
    let plan = cellbank::capacity::plan(&report.slices, &table.slice_pair, &[1, 2], 0.05, 16);
    print!("{}", cellbank::capacity::render_plan(&plan));
    let spread = |i: usize| -> f64 {
        let loads: Vec<f64> = plan.loads.values().map(|l| if i == 0 { l.0 } else { l.1 }).collect();
        loads.iter().cloned().fold(f64::MIN, f64::max) - loads.iter().cloned().fold(f64::MAX, f64::min)
    };
    assert!(spread(1) <= spread(0), "the plan never widens the gap: {plan:?}");
    assert!(!plan.moves.is_empty(), "one user's traffic leaves the pairs uneven: {plan:?}");
    assert_eq!(plan.dominant.map(|d| d.0), Some(slice(hot)), "the hot user's slice outweighs a pair's share");
    let done = cellbank::capacity::apply_plan(
        &cluster.routers(),
        &plan,
        "tester",
        "even the load",
        Duration::from_secs(5),
        Duration::from_millis(50),
        false,
    )
    .await
    .expect("the plan applies");
    assert_eq!(done.len(), plan.moves.len());
    let after = cluster.status().await.unwrap().table.unwrap();
    for planned in &plan.moves {
        assert_eq!(after.slice_pair[planned.slice as usize], planned.to_pair_id, "slice {}", planned.slice);
    }
    let status = cluster.status().await.unwrap();
    let reconciled = cellbank::reconcile::reconcile(&status, &cellbank::reconcile::Options::default()).await;
    assert!(reconciled.ok(), "{:#?}", reconciled.discrepancies);
}

/// `admin add-pair` on a running cluster under load: bad requests are
/// refused and change nothing; a good one adds a pair with no slices, the
/// supervisor (what `cellbank up` runs) starts its processes from the
/// table, the coordinator pairs them and brings the pair to SYNC, a
/// quarter of the slices move to it, a move from a DEGRADED pair is
/// refused, every outcome the load heard is in the ledger and reconcile
/// passes, and the next start of the cluster runs the added cells again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pair_added_live_is_started_paired_and_brought_to_sync() {
    use cellbank_proto::router::{AddPair, AddPairRequest, CellReplicas};
    use common::ledger_checks::{start_load, stop_load, verify_ledger, History};

    let mut cluster = Cluster::start(1, 1, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=20).collect();
    seed(&client, &users).await;
    let history = std::sync::Arc::new(History::default());
    let load = start_load(cluster.routers(), users.clone(), 2, history.clone(), 7);
    let before = cluster.status().await.unwrap().table.unwrap();
    let topology_before = cluster.sup.topology.clone();

    let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
    let fresh = |cell_id: u64| CellReplicas {
        cell_id,
        replicas: (0..3).map(|_| format!("127.0.0.1:{}", common::free_port())).collect(),
    };
    let request = |pair: Option<AddPair>| AddPairRequest { pair, who: String::new(), why: "test".into() };
    let add = |pair_id: u64, active: CellReplicas, standby: Option<CellReplicas>| {
        request(Some(AddPair { pair_id, active: Some(active), standby }))
    };
    let taken = before.cells[0].replicas[0].clone();
    for (bad, code, words) in [
        (request(None), tonic::Code::InvalidArgument, "pair: must be set"),
        (add(0, fresh(3), None), tonic::Code::InvalidArgument, "pair_id: must be set"),
        (add(1, fresh(3), Some(fresh(4))), tonic::Code::AlreadyExists, "pair 1 already exists"),
        (add(2, fresh(2), Some(fresh(4))), tonic::Code::AlreadyExists, "cell 2 already exists"),
        (
            add(2, CellReplicas { cell_id: 3, replicas: vec![taken.clone()] }, None),
            tonic::Code::AlreadyExists,
            "is already a replica of cell 1",
        ),
        (add(2, CellReplicas { cell_id: 3, replicas: vec![] }, None), tonic::Code::InvalidArgument, "0 replicas"),
        (
            add(2, CellReplicas { cell_id: 3, replicas: vec!["nowhere".into()] }, None),
            tonic::Code::InvalidArgument,
            "is not host:port",
        ),
        (add(2, fresh(3), Some(fresh(3))), tonic::Code::InvalidArgument, "cell 3 is in two pairs"),
    ] {
        let refused = admin.add_pair(bad).await.expect_err("a bad pair is refused");
        assert_eq!(refused.code(), code, "{}", refused.message());
        assert!(refused.message().contains(words), "{}", refused.message());
    }
    let unchanged = cluster.status().await.unwrap().table.unwrap();
    assert_eq!((&unchanged.cells, &unchanged.pairs), (&before.cells, &before.pairs));

    let started = std::time::Instant::now();
    let response = admin.add_pair(add(2, fresh(3), Some(fresh(4)))).await.expect("pair 2 added");
    assert_eq!((response.active_cell_id, response.standby_cell_id, response.new_epoch), (3, 4, 1));
    let table = cluster.status().await.unwrap().table.unwrap();
    let pair = table.pairs.iter().find(|p| p.pair_id == 2).expect("pair 2 in the table");
    assert_eq!(pair.mode, PairMode::Degraded as i32);
    assert!(table.slice_pair.iter().all(|p| *p == 1), "a new pair takes no slices");
    // The same request again: the pair exists now.
    let again = admin.add_pair(add(2, fresh(5), None)).await.expect_err("added once");
    assert_eq!(again.code(), tonic::Code::AlreadyExists);

    // Moves that cannot be are refused, naming why, and change nothing:
    // to the new pair before it is SYNC, an unknown slice or pair, a slice
    // to the pair it is on.
    let move_to = |slice: u32, to_pair_id: u64| cellbank_proto::router::MoveSliceRequest {
        slice,
        to_pair_id,
        who: String::new(),
        why: "bad input".into(),
    };
    for (bad, code, words) in [
        (move_to(0, 2), tonic::Code::FailedPrecondition, "pair 2 is PAIR_MODE_DEGRADED: the target pair must be SYNC"),
        (move_to(table.slice_count, 1), tonic::Code::NotFound, "there are 16 slices"),
        (move_to(0, 9), tonic::Code::NotFound, "unknown pair 9"),
        (move_to(0, 1), tonic::Code::InvalidArgument, "slice 0 already belongs to pair 1"),
        (move_to(0, 0), tonic::Code::InvalidArgument, "to_pair_id: must be set"),
    ] {
        let refused = admin.move_slice(bad).await.expect_err("a move that cannot be");
        assert_eq!(refused.code(), code, "{}", refused.message());
        assert!(refused.message().contains(words), "{}", refused.message());
    }
    let unchanged = cluster.status().await.unwrap().table.unwrap();
    assert_eq!(unchanged.slice_pair, table.slice_pair);
    assert!(unchanged.moves.is_empty());

    let (ids, elsewhere) = cluster.sup.adopt(&table).expect("the supervisor starts the new cells");
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert!(elsewhere.is_empty());
    assert!(ids.iter().all(|id| cluster.sup.is_running(*id)));
    cluster.wait_for_mode(2, PairMode::Sync, Duration::from_secs(60)).await;
    println!("pair 2 added and SYNC in {:.1} s under load", started.elapsed().as_secs_f64());
    let audit = admin.audit_log().await.unwrap();
    assert!(
        audit.iter().any(|r| r.what.starts_with("add pair 2 (pair 2: cell 3 active, cell 4 standby")),
        "{audit:#?}"
    );

    // Two moves of one slice at once: one moves it, the other is refused
    // (already moving, or already there).
    let twice = |admin: cellbank::routers::ClusterClient| async move { admin.move_slice(move_to(15, 2)).await };
    let (first, second) = tokio::join!(
        twice(cellbank::routers::ClusterClient::new(&cluster.routers(), None)),
        twice(cellbank::routers::ClusterClient::new(&cluster.routers(), None))
    );
    let outcomes = [first, second];
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    let refused = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
    assert!(
        matches!(refused.code(), tonic::Code::AlreadyExists | tonic::Code::InvalidArgument),
        "{}",
        refused.message()
    );
    // And back, so that the quarter below is the first four slices.
    admin.move_slice(move_to(15, 1)).await.expect("moved back");

    // A quarter of the slices move to the new pair, one at a time, under
    // the same load.
    let moving = std::time::Instant::now();
    let quarter = table.slice_count / 4;
    for slice in 0..quarter {
        let request = cellbank_proto::router::MoveSliceRequest {
            slice,
            to_pair_id: 2,
            who: String::new(),
            why: "a quarter to the new pair".into(),
        };
        let done = admin.move_slice(request).await.expect("a slice moves to the new pair");
        println!("{} ({} ms frozen)", done.detail, done.freeze_ms);
    }
    println!("{quarter} slices moved in {:.1} s under load", moving.elapsed().as_secs_f64());
    let table = cluster.status().await.unwrap().table.unwrap();
    assert_eq!(table.slice_pair.iter().filter(|p| **p == 2).count() as u32, quarter);

    // A move from a pair whose standby is down (DEGRADED) is refused and
    // changes nothing; once the standby is back and SYNC, it would go.
    cluster.sup.kill_cell(2);
    cluster.wait_for_mode(1, PairMode::Degraded, Duration::from_secs(30)).await;
    let refused = admin.move_slice(move_to(15, 2)).await.expect_err("the source is DEGRADED");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(
        refused.message().contains("pair 1 is PAIR_MODE_DEGRADED: the source pair must be SYNC"),
        "{}",
        refused.message()
    );
    let unchanged = cluster.status().await.unwrap().table.unwrap();
    assert_eq!((&unchanged.slice_pair, unchanged.moves.len()), (&table.slice_pair, 0));
    cluster.sup.start_cell(2).expect("the standby restarts");
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(60)).await;

    stop_load(&history, load).await;
    assert!(history.acked_count() > 20, "the load ran ({})", history.acked_count());
    verify_ledger(&client, &users, &history).await;
    let status = cluster.status().await.unwrap();
    let report = cellbank::reconcile::reconcile(&status, &cellbank::reconcile::Options::default()).await;
    assert!(report.ok(), "{:#?}", report.discrepancies);

    // The next start of this data directory runs the added cells too.
    cluster.sup.stop_all(Duration::from_secs(5));
    cluster.sup = cellbank::supervisor::Supervisor::new(env!("CARGO_BIN_EXE_cellbank").into(), topology_before)
        .expect("supervisor");
    assert_eq!(cluster.sup.cell_replicas(3).len(), 3);
    assert_eq!(cluster.sup.cell_replicas(4).len(), 3);
    cluster.sup.start_all().expect("restart");
    cluster
        .wait_until("both pairs SYNC after the restart", Duration::from_secs(60), |s| {
            [1, 2].iter().all(|p| Cluster::pair_of(s, *p).mode == PairMode::Sync as i32)
        })
        .await;
    let table = cluster.status().await.unwrap().table.unwrap();
    assert_eq!(table.cells.len(), 4);
    assert!(cluster.sup.adopt(&table).unwrap().0.is_empty(), "nothing left to adopt");
}
