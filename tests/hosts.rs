//! Replacing hosts in a running cluster under load (`admin replace-replica`),
//! with real processes: the active cell's leader replaced by a replica that
//! binds 127.0.0.1 and advertises a host name, and a dead replica of the
//! standby cell replaced. Bad requests are refused and change nothing; the
//! same replacement run again is a no-op; every outcome the load heard is
//! in the ledger, the pair stays identical and reconcile passes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cellbank::hosts::{replace_replica, Replace};
use cellbank::supervisor::{ProcessId, ProcessTopology};
use cellbank_proto::cell::StatusRequest;
use cellbank_proto::router::PairMode;
use common::cluster::Cluster;
use common::ledger_checks::{seed, start_load, stop_load, verify_ledger, History};

fn replace(cell_id: u64, old_addr: &str, new_replica_id: u64, new_addr: &str) -> Replace {
    Replace {
        cell_id,
        old_addr: old_addr.into(),
        new_replica_id,
        new_addr: new_addr.into(),
        who: "tester".into(),
        why: "host retired".into(),
    }
}

/// The voters of a cell as its leader lists them: (id, address).
async fn voters(cluster: &Cluster, cell: u64) -> Vec<(u64, String)> {
    let leader = cluster.cell_leader(cell).await.expect("a leader");
    let addr = cellbank_client::planes::Plane::Admin.of(&cluster.sup.addr(leader).unwrap());
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(&addr).await.expect("admin plane");
    let status = cellbank_client::channel::admin(channel).status(StatusRequest {}).await.expect("status").into_inner();
    let mut voters: Vec<(u64, String)> =
        status.peers.iter().filter(|p| p.voter).map(|p| (p.replica_id, p.addr.clone())).collect();
    voters.sort();
    voters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_are_replaced_under_load_and_nothing_is_lost() {
    let mut cluster = Cluster::start(1, 1, |_| {});
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    let client = cluster.client();
    let users: Vec<u64> = (1..=20).collect();
    seed(&client, &users).await;
    let history = Arc::new(History::default());
    let load = start_load(cluster.routers(), users.clone(), 2, history.clone(), 11);
    let admin = cellbank::routers::ClusterClient::new(&cluster.routers(), None);
    let before = cluster.status().await.unwrap().table.unwrap();
    let cell_1 = before.cells.iter().find(|c| c.cell_id == 1).unwrap().replicas.clone();
    let cell_2 = before.cells.iter().find(|c| c.cell_id == 2).unwrap().replicas.clone();

    let routers = cluster.routers();
    // Bad requests: refused with a clear error, the table unchanged.
    let free = format!("127.0.0.1:{}", common::free_port());
    for (bad, words) in [
        (replace(9, &cell_1[0], 4, &free), "unknown cell 9".to_string()),
        (replace(1, "127.0.0.1:1", 4, &free), "--old-addr: \"127.0.0.1:1\" is not one of its replicas".into()),
        (replace(1, &cell_1[0], 4, &cell_2[0]), format!("{} is already a replica of cell 2", cell_2[0])),
        (replace(1, &cell_1[0], 4, "no-port.example"), "is not host:port".into()),
        (replace(1, &cell_1[0], 0, &free), "--new-id: must be set".into()),
    ] {
        let refused = replace_replica(&routers, None, &bad).await.expect_err("a bad replacement is refused");
        assert!(refused.to_string().contains(&words), "{refused:#}");
    }
    // The table's own check, at the routers: an address of another cell,
    // and more than one change at once.
    use cellbank_proto::router::{SetCellReplicas, SetCellReplicasRequest};
    let set = |replicas: Vec<String>| SetCellReplicasRequest {
        set: Some(SetCellReplicas { cell_id: 1, replicas }),
        who: String::new(),
        why: "test".into(),
    };
    let mut three_plus = cell_1.clone();
    three_plus.push(cell_2[1].clone());
    let refused = admin.set_cell_replicas(set(three_plus)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{}", refused.message());
    let refused = admin.set_cell_replicas(set(vec![free.clone()])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{}", refused.message());
    assert!(refused.message().contains("one replica is added or removed at a time"), "{}", refused.message());
    let refused = admin.set_cell_replicas(SetCellReplicasRequest::default()).await.unwrap_err();
    assert_eq!((refused.code(), refused.message()), (tonic::Code::InvalidArgument, "set: must be set"));
    assert_eq!(cluster.status().await.unwrap().table.unwrap().cells, before.cells);

    // 1. The active cell's leader is replaced by a replica that binds
    //    127.0.0.1 and advertises a host name.
    let leader = cluster.cell_leader(1).await.expect("cell 1 has a leader");
    let ProcessId::Replica { replica: old_id, .. } = leader else { unreachable!() };
    let old_addr = cluster.sup.addr(leader).unwrap();
    let port = common::free_port();
    let mut joiner = ProcessTopology::new(4, format!("127.0.0.1:{port}"), None);
    joiner.advertise = Some(format!("localhost:{port}"));
    let new_addr = joiner.addr().to_string();
    cluster.sup.join_replica(1, joiner).expect("start the new replica");
    // Naming another replica id than the process at the address runs: the
    // table gains the address, sees the wrong replica there, and is put
    // back; nothing else changed.
    let wrong = replace_replica(&routers, None, &replace(1, &old_addr, 6, &new_addr)).await.unwrap_err();
    assert!(wrong.to_string().contains("is replica 4 of cell 1, not replica 6 of cell 1"), "{wrong:#}");
    assert_eq!(cluster.status().await.unwrap().table.unwrap().cells, before.cells);
    let started = std::time::Instant::now();
    let done = replace_replica(&routers, None, &replace(1, &old_addr, 4, &new_addr)).await.expect("replaced");
    println!(
        "{} ({} ms in all, {} ms catching up)",
        done.detail,
        started.elapsed().as_millis(),
        done.catch_up.as_millis()
    );
    assert_eq!(done.old_replica_id, Some(old_id));
    assert!(done.replicas.contains(&new_addr) && !done.replicas.contains(&old_addr), "{:?}", done.replicas);
    cluster.sup.retire(leader);
    let expected: Vec<(u64, String)> = {
        let mut v: Vec<(u64, String)> = (1..=3)
            .filter(|id| *id != old_id)
            .map(|id| (id, cluster.sup.addr(ProcessId::Replica { cell: 1, replica: id }).unwrap()))
            .collect();
        v.push((4, new_addr.clone()));
        v.sort();
        v
    };
    assert_eq!(voters(&cluster, 1).await, expected);
    let table = cluster.status().await.unwrap().table.unwrap();
    let mut listed = table.cells.iter().find(|c| c.cell_id == 1).unwrap().replicas.clone();
    listed.sort();
    let mut want: Vec<String> = expected.iter().map(|(_, a)| a.clone()).collect();
    want.sort();
    assert_eq!(listed, want, "the table lists the cell's members");

    // Replacing a member by another member is no replacement: it would
    // only shrink the cell. Refused; nothing changes.
    let other = expected.iter().find(|(id, _)| *id != 4).unwrap().1.clone();
    let shrink = replace_replica(&routers, None, &replace(1, &other, 4, &new_addr)).await.unwrap_err();
    assert!(shrink.to_string().contains("no replacement of one by the other is under way"), "{shrink:#}");
    assert_eq!(voters(&cluster, 1).await, expected);

    // The same replacement again: everything is done, nothing changes.
    let again = replace_replica(&routers, None, &replace(1, &old_addr, 4, &new_addr)).await.expect("a no-op");
    assert_eq!(again.old_replica_id, None, "{}", again.detail);
    assert_eq!(voters(&cluster, 1).await, expected);

    // 2. A dead replica of the standby cell: it leaves first, then the new
    //    one joins; the active ships to the standby's new addresses.
    let dead = ProcessId::Replica { cell: 2, replica: 3 };
    let dead_addr = cluster.sup.addr(dead).unwrap();
    cluster.sup.kill(dead);
    let joiner = ProcessTopology::new(5, format!("127.0.0.1:{}", common::free_port()), None);
    let standby_new = joiner.addr().to_string();
    cluster.sup.join_replica(2, joiner).expect("start the standby's new replica");
    let done = replace_replica(&routers, None, &replace(2, &dead_addr, 5, &standby_new)).await.expect("replaced");
    println!("{}", done.detail);
    assert_eq!(done.old_replica_id, Some(3));
    cluster.sup.retire(dead);
    let standby_voters: Vec<u64> = voters(&cluster, 2).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(standby_voters, vec![1, 2, 5]);

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load(&history, load).await;
    let (count, ok) = verify_ledger(&client, &users, &history).await;
    println!("verified {count} transfers ({ok} OK)");
    assert!(ok > 0, "the load made progress");
    cluster.wait_for_mode(1, PairMode::Sync, Duration::from_secs(30)).await;
    cluster.assert_pair_identical(1, Duration::from_secs(30)).await;
    let audit = admin.audit_log().await.expect("audit log");
    let replaced: Vec<&str> =
        audit.iter().filter(|r| r.what.contains("replica address")).map(|r| r.what.as_str()).collect();
    // Add and remove for each replacement, and add and take back for the
    // one that named the wrong replica.
    assert_eq!(replaced.len(), 6, "{replaced:#?}");
    let status = cluster.status().await.unwrap();
    let reconciled = cellbank::reconcile::reconcile(&status, &cellbank::reconcile::Options::default()).await;
    assert!(reconciled.ok(), "{:#?}", reconciled.discrepancies);
}
