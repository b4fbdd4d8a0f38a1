//! Crash safety with real processes: SIGKILL the leader under load, SIGKILL
//! and restart the whole cell, and leave a replica behind past log
//! compaction so that it must catch up from a snapshot. After each, every
//! acknowledged transfer is present exactly once and the replicas agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ledger_checks::{self, History};
use common::Cell;

/// A write sent straight to a follower is refused as UNAVAILABLE with the
/// leader's address in metadata, and changes nothing.
async fn follower_redirects_to_the_leader(cell: &Cell) {
    let (leader, _, _) = cell.wait_for_leader(Duration::from_secs(5), 0).await.expect("leader");
    let follower = *cell.running().iter().find(|id| **id != leader).expect("a follower");
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&cell.replicas[&follower].addr).await.unwrap();
    let mut client = cellbank_proto::v1::ledger_client::LedgerClient::new(channel);
    let request = cellbank_proto::v1::TransferRequest {
        transfer_id_text: String::new(),
        transfer_id: b"to-a-follower".to_vec(),
        from_user_id: 1,
        to_user_id: 2,
        currency: "CNY".into(),
        amount: 1,
    };
    let status = client.transfer(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let hinted = cellbank_client::retry::leader_hint(&status);
    assert_eq!(hinted, Some(cell.replicas[&leader].addr.as_str()));
    let lookup =
        cellbank_proto::v1::GetTransferRequest { transfer_id: b"to-a-follower".to_vec(), ..Default::default() };
    let reader = cell.client();
    let missing = reader.get_transfer(lookup.clone()).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_then_whole_cell_kill() {
    let mut cell = Cell::start(3, &[]);
    let (_, _, _) = cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a first leader");
    let users = ledger_checks::users(20);
    ledger_checks::seed(&cell.client(), &users).await;
    follower_redirects_to_the_leader(&cell).await;

    let history = Arc::new(History::default());
    let load = ledger_checks::start_load(cell.endpoints(), users.clone(), 8, history.clone(), 7);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (leader, term, _) = cell.wait_for_leader(Duration::from_secs(5), 0).await.expect("leader");
    let acked_before_kill = history.acked_count();
    assert!(acked_before_kill > 0, "no transfer was acknowledged before the kill");
    cell.kill(leader);
    let (new_leader, _, elected_after) =
        cell.wait_for_leader(Duration::from_secs(10), term).await.expect("a new leader");
    println!("killed leader {leader}; replica {new_leader} leads after {elected_after:?}");
    assert!(elected_after < Duration::from_secs(2), "new leader took {elected_after:?}");
    let acked_at_election = history.acked_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(history.acked_count() > acked_at_election, "transfers did not resume under the new leader");
    cell.restart(leader);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Now the whole cell, mid-load.
    history.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for id in [1, 2, 3] {
        cell.kill(id);
    }
    ledger_checks::stop_load(&history, load).await;
    for id in [1, 2, 3] {
        cell.restart(id);
    }
    cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader after the full restart");
    ledger_checks::verify(&cell, &users, &history).await;
}

/// A follower left behind past the leader's compacted log: a cell of three
/// compacting every 40 entries, 20 seeded users, one follower killed and
/// writes going on until the leader's log starts past what it held. Returns
/// the cell, the users, the follower, its last log index, and the load
/// (still running) with its history.
struct LeftBehind {
    cell: Cell,
    users: Vec<u64>,
    behind: u64,
    last_seen: u64,
    history: Arc<History>,
    load: Vec<tokio::task::JoinHandle<()>>,
}

async fn leave_a_follower_behind(seed: u64) -> LeftBehind {
    let mut cell = Cell::start(3, &["--log-compact-threshold-entries", "40", "--log-retain-entries", "10"]);
    let (leader, _, _) = cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader");
    let users = ledger_checks::users(20);
    ledger_checks::seed(&cell.client(), &users).await;
    let behind = *cell.running().iter().find(|id| **id != leader).expect("a follower");
    let last_seen = cell.status(behind).await.expect("follower status").last_log_index;
    cell.kill(behind);

    let history = Arc::new(History::default());
    let load = ledger_checks::start_load(cell.endpoints(), users.clone(), 8, history.clone(), seed);
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (leader, _, _) = cell.wait_for_leader(Duration::from_secs(5), 0).await.expect("leader");
        let first = cell.status(leader).await.map(|s| s.first_log_index).unwrap_or(0);
        if first > last_seen + 1 {
            println!("leader compacted its log to {first}; the stopped follower had {last_seen}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the leader never compacted past the follower");
    }
    LeftBehind { cell, users, behind, last_seen, history, load }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_left_behind_catches_up_from_snapshot() {
    let LeftBehind { mut cell, users, behind, last_seen, history, load } = leave_a_follower_behind(11).await;
    cell.restart(behind);
    // Keep writing while it catches up.
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(status) = cell.status(behind).await {
            if status.snapshots_installed >= 1 {
                assert!(status.applied_index > last_seen, "{status:?}");
                println!("follower {behind} installed a snapshot; applied {}", status.applied_index);
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the follower never installed a snapshot");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ledger_checks::stop_load(&history, load).await;
    ledger_checks::verify(&cell, &users, &history).await;
}

/// A follower that stops in the middle of installing a snapshot (an
/// injected crash once its state is half replaced) installs the same
/// snapshot again from its file when it restarts, before it serves, and
/// the ledger loses and duplicates nothing.
#[cfg(feature = "fault-points")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_stopped_in_the_middle_of_a_snapshot_install_completes_it_at_restart() {
    let LeftBehind { mut cell, users, behind, last_seen, history, load } = leave_a_follower_behind(12).await;
    let replica = cell.replicas.get_mut(&behind).unwrap();
    replica.env = vec![(cellbank_raft::faults::STARTUP_ENV.into(), "snapshot.install=crash:60000".into())];
    cell.restart(behind);
    assert!(cell.wait_exit(behind, Duration::from_secs(30)), "the follower never reached the install\n{}", cell.logs());
    assert!(cell.logs().contains("stopping in the middle of a snapshot install"), "{}", cell.logs());

    cell.replicas.get_mut(&behind).unwrap().env.clear();
    cell.restart(behind);
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(status) = cell.status(behind).await {
            if status.applied_index > last_seen && status.first_log_index > last_seen {
                println!("follower {behind} serves again at applied {}", status.applied_index);
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the follower never came back\n{}", cell.logs());
    }
    assert!(cell.logs().contains("a snapshot install was interrupted: installing it again"), "{}", cell.logs());
    ledger_checks::stop_load(&history, load).await;
    ledger_checks::verify(&cell, &users, &history).await;
}
