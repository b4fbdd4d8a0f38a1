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
}
