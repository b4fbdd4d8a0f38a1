//! Replacing a replica through Raft conf changes, with real processes: a new
//! replica joins (initialized by a snapshot, since a founded cell's log
//! starts past its founding), then an old one is removed, then another
//! replica joins after the membership changed. The cell keeps serving under
//! load throughout and the replicas agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::ChangeMembershipRequest;
use common::ledger_checks::{self, History};
use common::Cell;

/// Starts replica `id`, adds it through the leader, and waits until it has
/// been initialized by a snapshot and caught up.
async fn add_and_catch_up(cell: &mut Cell, leader: u64, id: u64) {
    let addr = cell.add_joiner(id, &[]);
    let mut admin = cell.admin(leader).await.expect("leader admin");
    let added = admin
        .change_membership(ChangeMembershipRequest {
            action: Action::AddVoter as i32,
            replica_id: id,
            addr: addr.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("add replica {id}: {e}"))
        .into_inner();
    assert!(added.peers.iter().any(|p| p.replica_id == id && p.voter && p.addr == addr), "{added:?}");
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let joined = cell.status(id).await;
        let lead = cell.status(leader).await.expect("leader status");
        if let Some(status) = joined {
            if status.raft_role == cellbank_proto::cell::RaftRole::Follower as i32
                && status.applied_index + 50 >= lead.applied_index
                && status.applied_index > 5
            {
                assert!(status.snapshots_installed >= 1, "a joiner is initialized by a snapshot");
                return;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "replica {id} never caught up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_replica() {
    let mut cell = Cell::start(3, &[]);
    let (leader, _, _) = cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader");
    let users = ledger_checks::users(10);
    ledger_checks::seed(&cell.client(), &users).await;
    let history = Arc::new(History::default());
    let load = ledger_checks::start_load(cell.endpoints(), users.clone(), 4, history.clone(), 3);

    add_and_catch_up(&mut cell, leader, 4).await;
    let mut admin = cell.admin(leader).await.expect("leader admin");

    // The leader may not remove itself (it would go on leading a group it
    // is not in): refused, nothing changes.
    let refused = admin
        .change_membership(ChangeMembershipRequest {
            action: Action::Remove as i32,
            replica_id: leader,
            addr: String::new(),
        })
        .await
        .expect_err("a leader's removal of itself is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("move the leadership"), "{}", refused.message());
    let status = cell.status(leader).await.expect("leader status");
    assert!(status.peers.iter().any(|p| p.replica_id == leader && p.voter), "still a voter");

    // Remove a founder that is not the leader, then stop its process.
    let removed = *cell.running().iter().find(|id| **id != leader && **id != 4).expect("a follower");
    let response = admin
        .change_membership(ChangeMembershipRequest {
            action: Action::Remove as i32,
            replica_id: removed,
            addr: String::new(),
        })
        .await
        .expect("remove")
        .into_inner();
    assert!(!response.peers.iter().any(|p| p.replica_id == removed), "{response:?}");
    cell.kill(removed);
    // A second joiner after the membership changed: it must get a snapshot
    // whose configuration names it (not one cached before the changes).
    add_and_catch_up(&mut cell, leader, 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ledger_checks::stop_load(&history, load).await;
    let status = cell.status(leader).await.expect("leader status");
    let mut voters: Vec<u64> = status.peers.iter().filter(|p| p.voter).map(|p| p.replica_id).collect();
    voters.sort();
    let mut expected: Vec<u64> = vec![1, 2, 3, 4, 5].into_iter().filter(|id| *id != removed).collect();
    expected.sort();
    assert_eq!(voters, expected);
    ledger_checks::verify(&cell, &users, &history).await;
}
