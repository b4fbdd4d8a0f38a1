//! Replacing a replica through Raft conf changes, with real processes: a new
//! replica joins (initialized by a snapshot, since a founded cell's log
//! starts past its founding), then an old one is removed. The cell keeps
//! serving and the remaining replicas agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::ChangeMembershipRequest;
use common::ledger_checks::{self, History};
use common::Cell;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_a_replica() {
    let mut cell = Cell::start(3, &[]);
    let (leader, _, _) = cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader");
    let users = ledger_checks::users(10);
    ledger_checks::seed(&cell.client(), &users).await;
    let history = Arc::new(History::default());
    let load = ledger_checks::start_load(cell.endpoints(), users.clone(), 4, history.clone(), 3);

    let addr = cell.add_joiner(4, &[]);
    let mut admin = cell.admin(leader).await.expect("leader admin");
    let added = admin
        .change_membership(ChangeMembershipRequest {
            action: Action::AddVoter as i32,
            replica_id: 4,
            addr: addr.clone(),
        })
        .await
        .expect("add replica 4")
        .into_inner();
    assert!(added.peers.iter().any(|p| p.replica_id == 4 && p.voter && p.addr == addr), "{added:?}");
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let joined = cell.status(4).await;
        let lead = cell.status(leader).await.expect("leader status");
        if let Some(status) = joined {
            if status.role == "follower" && status.applied_index + 50 >= lead.applied_index && status.applied_index > 5
            {
                assert!(status.snapshots_installed >= 1, "a joiner is initialized by a snapshot");
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "replica 4 never caught up");
    }

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
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ledger_checks::stop_load(&history, load).await;
    let status = cell.status(leader).await.expect("leader status");
    let mut voters: Vec<u64> = status.peers.iter().filter(|p| p.voter).map(|p| p.replica_id).collect();
    voters.sort();
    let mut expected: Vec<u64> = vec![1, 2, 3, 4].into_iter().filter(|id| *id != removed).collect();
    expected.sort();
    assert_eq!(voters, expected);
    ledger_checks::verify(&cell, &users, &history).await;
}
