//! Replacing one replica of a cell by a new one at another address (a host
//! replaced): `cellbank admin replace-replica`, run with an operator's
//! identity. The routing table's addresses change through the routers
//! (`RouterAdmin.SetCellReplicas`); the cell's membership is changed by
//! the operator directly (routers may not change a cell's membership).
//!
//! Everything is checked before anything changes: the cell's leader (of
//! the replicas that say they lead and count themselves voters, the one
//! of the highest term), the new id and address unused in the cell, the
//! table and the cell naming replicas alike, and, when both addresses are
//! listed, that a replacement of the one by the other is under way (the
//! audit log's last change of the cell added the new address). Then the
//! order keeps the cell serving, and the routers able to reach its leader,
//! at every step:
//! 1. The table lists the new address too (a router that tries it before
//!    the replica is a member hears that it has no leader and moves on),
//!    and the right process must answer there (replica N of cell C): else
//!    the table is put back and the command stops.
//! 2. Membership. The new replica joins as a learner (it never counts
//!    toward a quorum while it catches up from a snapshot), then becomes a
//!    voter. While the old replica answers it leaves after that, once the
//!    leadership has moved off it (cells refuse a leader's removal of
//!    itself). When it does not answer (the usual reason to replace a
//!    host) it leaves first.
//! 3. The table forgets the old address.
//!
//! Every step looks at what is already done (the table, the cell's
//! membership) and skips it, so the same command run again after a failure
//! carries on where it stopped.

use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank_client::planes::Plane;
use cellbank_client::routers::ClusterClient;
use cellbank_client::ChannelSettings;
use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::{ChangeMembershipRequest, PeerInfo, ReplicaStatus, StatusRequest, TransferLeaderRequest};
use cellbank_proto::router::{RoutingTable, SetCellReplicas, SetCellReplicasRequest};
use cellbank_router::table::{ADDRESS_MAX, REPLICAS_MAX};

/// Longest a new replica may take to catch up with its cell's leader.
const CATCH_UP_MAX: Duration = Duration::from_secs(120);
/// How far behind the leader's applied index a new replica may be and
/// count as caught up (the leader applies on while we look).
const CATCH_UP_SLACK: u64 = 64;
/// How long a cell may go without a leader that answers before a step
/// gives up.
const LEADER_WAIT_MAX: Duration = Duration::from_secs(15);
/// How long the new replica's process may take to answer at its address
/// once the table lists it (a supervisor starts it then).
const PROCESS_WAIT_MAX: Duration = Duration::from_secs(30);

/// One replacement.
#[derive(Clone, Debug)]
pub struct Replace {
    pub cell_id: u64,
    /// The address of the replica that leaves, as the table lists it.
    pub old_addr: String,
    /// The replica that joins: an id new in the cell, and its address.
    pub new_replica_id: u64,
    pub new_addr: String,
    pub who: String,
    pub why: String,
}

#[derive(Clone, Debug)]
pub struct Replaced {
    /// The old replica's id; none when it was no longer a member.
    pub old_replica_id: Option<u64>,
    /// The cell's addresses in the table afterwards.
    pub replicas: Vec<String>,
    /// From the new replica's admission to its catching up.
    pub catch_up: Duration,
    pub total: Duration,
    pub detail: String,
}

/// Checks a replacement against the table and returns the cell's
/// addresses: the cell exists; the old address is one of them, or the new
/// one is and the old one is gone (the same replacement run again); the
/// new address is well-formed and used by no other cell; the new id is
/// set.
pub fn check_replace(table: &RoutingTable, r: &Replace) -> Result<Vec<String>, String> {
    if table.slice_count == 0 {
        return Err("the table is not bootstrapped yet".into());
    }
    let cell = table.cells.iter().find(|c| c.cell_id == r.cell_id).ok_or(format!("unknown cell {}", r.cell_id))?;
    let bad = |detail: String| format!("cell {}: {detail}", r.cell_id);
    if r.new_replica_id == 0 {
        return Err(bad("--new-id: must be set".into()));
    }
    if r.new_addr.len() > ADDRESS_MAX {
        return Err(bad(format!("--new-addr: {} bytes; at most {ADDRESS_MAX}", r.new_addr.len())));
    }
    cellbank_client::planes::check_process_addr(&r.new_addr).map_err(|e| bad(format!("--new-addr: {e}")))?;
    if r.new_addr == r.old_addr {
        return Err(bad("--new-addr: the same as --old-addr".into()));
    }
    if let Some(owner) = table.cells.iter().find(|c| c.cell_id != r.cell_id && c.replicas.contains(&r.new_addr)) {
        return Err(format!("address {} is already a replica of cell {}", r.new_addr, owner.cell_id));
    }
    let has_old = cell.replicas.contains(&r.old_addr);
    let has_new = cell.replicas.contains(&r.new_addr);
    if !has_old && !has_new {
        return Err(bad(format!(
            "--old-addr: {:?} is not one of its replicas ({})",
            r.old_addr,
            cell.replicas.join(", ")
        )));
    }
    if has_old && !has_new && cell.replicas.len() >= REPLICAS_MAX {
        return Err(bad(format!("it has {REPLICAS_MAX} replicas, the most a cell may have while one is replaced")));
    }
    Ok(cell.replicas.clone())
}

/// Runs a replacement (see the module's description).
pub async fn replace_replica(routers: &[String], admin_token: Option<&str>, r: &Replace) -> anyhow::Result<Replaced> {
    let started = Instant::now();
    let cluster = ClusterClient::new(routers, admin_token);
    let set = |replicas: Vec<String>| SetCellReplicasRequest {
        set: Some(SetCellReplicas { cell_id: r.cell_id, replicas }),
        who: r.who.clone(),
        why: r.why.clone(),
    };

    // Everything is checked before anything changes.
    let table = cluster.status().await?.table.context("the routers have no table yet")?;
    let replicas = check_replace(&table, r).map_err(|e| anyhow::anyhow!(e))?;
    let (has_old, has_new) = (replicas.contains(&r.old_addr), replicas.contains(&r.new_addr));
    let mut addrs = replicas.clone();
    if !has_new {
        addrs.push(r.new_addr.clone());
    }
    let (_, leader) = leader_of(&addrs).await?;
    let old_id = member_at(&leader.peers, &r.old_addr);
    if let Some(p) = leader.peers.iter().find(|p| p.replica_id == r.new_replica_id && p.addr != r.new_addr) {
        anyhow::bail!("cell {}: replica {} is already a member, at {}", r.cell_id, r.new_replica_id, p.addr);
    }
    if let Some(p) = leader.peers.iter().find(|p| p.addr == r.new_addr && p.replica_id != r.new_replica_id) {
        anyhow::bail!("cell {}: {} is already the address of member {}", r.cell_id, r.new_addr, p.replica_id);
    }
    if let Some(p) = leader.peers.iter().find(|p| !addrs.contains(&p.addr)) {
        // The table and the cell name a replica differently: which one
        // leaves cannot be told from addresses.
        anyhow::bail!(
            "cell {}: member {} is at {}, which the table does not list ({}); the table and the cell must name \
             replicas alike",
            r.cell_id,
            p.replica_id,
            p.addr,
            replicas.join(", ")
        );
    }
    if has_old && has_new {
        // Both listed: only a replacement of old by new that stopped
        // midway, not a second replica to drop.
        let audit = cluster.audit_log().await?;
        let prefix = format!("cell {}: ", r.cell_id);
        let last = audit.iter().rev().find(|a| a.what.starts_with(&prefix) && a.what.contains("replica address"));
        let pending = format!("cell {}: add replica address {}", r.cell_id, r.new_addr);
        anyhow::ensure!(
            last.is_some_and(|a| a.what == pending),
            "cell {}: {} and {} are both its replicas, and no replacement of one by the other is under way; \
             replacing one by the other would only remove a replica",
            r.cell_id,
            r.old_addr,
            r.new_addr
        );
    }

    // 1. The table lists the new address, and the right process answers
    //    there (else the table is put back as it was).
    if !has_new {
        let mut with_new = replicas.clone();
        with_new.push(r.new_addr.clone());
        cluster.set_cell_replicas(set(with_new)).await.context("adding the new address to the table")?;
    }
    if let Err(e) = await_process(r.cell_id, r.new_replica_id, &r.new_addr).await {
        if !has_new {
            cluster.set_cell_replicas(set(replicas.clone())).await.context("taking the new address out again")?;
        }
        return Err(e);
    }

    // 2. Membership.
    let old_answers = old_id.is_some_and(|old| leader.replica_id == old)
        || (old_id.is_some() && replica_status(&r.old_addr).await.is_some());
    if let (Some(old), false) = (old_id, old_answers) {
        println!("replica {old} at {} does not answer: it leaves first", r.old_addr);
        remove(&addrs, old, r.new_replica_id).await?;
    }
    let catch_up_started = Instant::now();
    let (_, leader) = leader_of(&addrs).await?;
    if member_at(&leader.peers, &r.new_addr).is_none() {
        change_membership(&addrs, Action::AddLearner, r.new_replica_id, r.new_addr.clone()).await?;
    }
    await_caught_up(&addrs, &r.new_addr).await?;
    let (_, leader) = leader_of(&addrs).await?;
    if !leader.peers.iter().any(|p| p.replica_id == r.new_replica_id && p.voter) {
        change_membership(&addrs, Action::AddVoter, r.new_replica_id, r.new_addr.clone()).await?;
    }
    let catch_up = catch_up_started.elapsed();
    if let (Some(old), true) = (old_id, old_answers) {
        remove(&addrs, old, r.new_replica_id).await?;
    }

    // 3. The table forgets the old address.
    let table = cluster.status().await?.table.context("the routers have no table")?;
    let mut replicas = cellbank_router::table::cell_addrs(&table, r.cell_id);
    if replicas.contains(&r.old_addr) {
        replicas.retain(|a| *a != r.old_addr);
        cluster.set_cell_replicas(set(replicas.clone())).await.context("removing the old address from the table")?;
    }
    let detail = format!(
        "cell {}: replica {} at {} replaced by replica {} at {}",
        r.cell_id,
        old_id.map(|id| id.to_string()).unwrap_or_else(|| "(already gone)".into()),
        r.old_addr,
        r.new_replica_id,
        r.new_addr
    );
    Ok(Replaced { old_replica_id: old_id, replicas, catch_up, total: started.elapsed(), detail })
}

/// The cell's leader among `addrs`: of the replicas that say they lead
/// and count themselves among the voters, the one of the highest term (a
/// removed or cut-off replica may still think it leads). Waits out an
/// election.
pub async fn leader_of(addrs: &[String]) -> anyhow::Result<(String, ReplicaStatus)> {
    let until = Instant::now() + LEADER_WAIT_MAX;
    loop {
        let asked =
            futures::future::join_all(addrs.iter().map(|a| async move { (a.clone(), replica_status(a).await) })).await;
        let leader = asked
            .into_iter()
            .filter_map(|(addr, status)| Some((addr, status?)))
            .filter(|(_, s)| {
                cellbank_client::is_leader(s) && s.peers.iter().any(|p| p.replica_id == s.replica_id && p.voter)
            })
            .max_by_key(|(_, s)| s.term);
        if let Some(found) = leader {
            return Ok(found);
        }
        anyhow::ensure!(Instant::now() < until, "no replica among {} leads the cell", addrs.join(", "));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn admin_of(
    addr: &str,
) -> anyhow::Result<cellbank_proto::cell::replica_admin_client::ReplicaAdminClient<tonic::transport::Channel>> {
    let channel = ChannelSettings::SERVICE.connect(&Plane::Admin.of(addr)).await?;
    Ok(cellbank_client::channel::admin(channel))
}

async fn change_membership(addrs: &[String], action: Action, replica_id: u64, addr: String) -> anyhow::Result<()> {
    let until = Instant::now() + LEADER_WAIT_MAX;
    loop {
        let (leader, _) = leader_of(addrs).await?;
        let request = ChangeMembershipRequest { action: action as i32, replica_id, addr: addr.clone() };
        match admin_of(&leader).await?.change_membership(request).await {
            Ok(done) => {
                let members: Vec<String> = done
                    .into_inner()
                    .peers
                    .iter()
                    .map(|p| format!("{}@{}{}", p.replica_id, p.addr, if p.voter { "" } else { " (learner)" }))
                    .collect();
                println!("{}: replica {replica_id}; members {}", action.as_str_name(), members.join(", "));
                return Ok(());
            }
            // Lost the leadership, or a change still under way: again.
            Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => anyhow::bail!("{}: replica {replica_id}: {}", action.as_str_name(), status.message()),
        }
    }
}

/// Removes replica `old`, first moving the leadership off it (to a voter
/// that stays, `rather` only when no other will do).
async fn remove(addrs: &[String], old: u64, rather: u64) -> anyhow::Result<()> {
    let until = Instant::now() + LEADER_WAIT_MAX;
    loop {
        let (leader, status) = leader_of(addrs).await?;
        if status.replica_id != old {
            return change_membership(addrs, Action::Remove, old, String::new()).await;
        }
        anyhow::ensure!(Instant::now() < until, "replica {old} kept the leadership; run the same command again");
        let to = status
            .peers
            .iter()
            .filter(|p| p.voter && p.replica_id != old && p.replica_id != rather)
            .map(|p| p.replica_id)
            .next()
            .unwrap_or(rather);
        // Its outcome is seen at the next look at the leader (a refused
        // or lost transfer is asked again until the limit).
        let _ = admin_of(&leader).await?.transfer_leader(TransferLeaderRequest { replica_id: to }).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until replica `replica_id` of cell `cell_id` answers at `addr`;
/// another process answering there is an error at once.
async fn await_process(cell_id: u64, replica_id: u64, addr: &str) -> anyhow::Result<()> {
    let until = Instant::now() + PROCESS_WAIT_MAX;
    loop {
        if let Some(status) = replica_status(addr).await {
            anyhow::ensure!(
                (status.cell_id, status.replica_id) == (cell_id, replica_id),
                "the process at {addr} is replica {} of cell {}, not replica {replica_id} of cell {cell_id}",
                status.replica_id,
                status.cell_id
            );
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "no replica answers at {addr}: start replica {replica_id} of cell {cell_id} there first, with no \
             founding peers (nothing was changed)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the replica at `addr` follows a leader and has applied
/// within [`CATCH_UP_SLACK`] entries of it.
async fn await_caught_up(addrs: &[String], addr: &str) -> anyhow::Result<()> {
    let until = Instant::now() + CATCH_UP_MAX;
    loop {
        let joined = replica_status(addr).await;
        let leader = leader_of(addrs).await.ok().map(|(_, s)| s);
        if let (Some(joined), Some(leader)) = (joined, leader) {
            if joined.leader_id != 0
                && joined.applied_index > 0
                && joined.applied_index + CATCH_UP_SLACK >= leader.applied_index
            {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the replica at {addr} did not catch up with its cell's leader within {} s; run the same command \
             again to carry on",
            CATCH_UP_MAX.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The member of a cell at `addr`, if any.
fn member_at(peers: &[PeerInfo], addr: &str) -> Option<u64> {
    peers.iter().find(|p| p.addr == addr).map(|p| p.replica_id)
}

/// The status of one replica, asked directly; none when it does not answer
/// within a second.
async fn replica_status(addr: &str) -> Option<ReplicaStatus> {
    let ask = async { admin_of(addr).await.ok()?.status(StatusRequest {}).await.ok().map(|r| r.into_inner()) };
    tokio::time::timeout(Duration::from_secs(1), ask).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use cellbank_proto::router::{CellReplicas, Pair};

    use super::*;

    fn table() -> RoutingTable {
        RoutingTable {
            slice_count: 2,
            cells: vec![
                CellReplicas { cell_id: 1, replicas: vec!["a:7000".into(), "b:7000".into(), "c:7000".into()] },
                CellReplicas { cell_id: 2, replicas: vec!["d:7000".into()] },
            ],
            pairs: vec![Pair { pair_id: 1, active_cell_id: 1, standby_cell_id: 2, epoch: 3, ..Default::default() }],
            slice_pair: vec![1, 1],
            ..Default::default()
        }
    }

    fn replace(cell_id: u64, old: &str, id: u64, new: &str) -> Replace {
        Replace {
            cell_id,
            old_addr: old.into(),
            new_replica_id: id,
            new_addr: new.into(),
            who: "tester".into(),
            why: String::new(),
        }
    }

    #[test]
    fn a_replacement_names_a_replica_of_the_cell_and_a_free_address() {
        let t = table();
        assert_eq!(check_replace(&t, &replace(1, "c:7000", 4, "e.example:7000")).unwrap().len(), 3);
        for (bad, words) in [
            (replace(9, "c:7000", 4, "e:7000"), "unknown cell 9"),
            (replace(1, "c:7000", 0, "e:7000"), "cell 1: --new-id: must be set"),
            (replace(1, "c:7000", 4, "e"), "cell 1: --new-addr: \"e\" is not host:port"),
            (replace(1, "c:7000", 4, "c:7000"), "cell 1: --new-addr: the same as --old-addr"),
            (replace(1, "c:7000", 4, "d:7000"), "address d:7000 is already a replica of cell 2"),
            (
                replace(1, "x:7000", 4, "e:7000"),
                "cell 1: --old-addr: \"x:7000\" is not one of its replicas (a:7000, b:7000, c:7000)",
            ),
        ] {
            assert_eq!(check_replace(&t, &bad).unwrap_err(), words);
        }
        // Run again after the old address left the table: it carries on.
        let mut done = table();
        done.cells[0].replicas = vec!["a:7000".into(), "b:7000".into(), "e:7000".into()];
        assert!(check_replace(&done, &replace(1, "c:7000", 4, "e:7000")).is_ok());
        assert!(check_replace(&RoutingTable::default(), &replace(1, "c:7000", 4, "e:7000")).is_err());
        let mut full = table();
        full.cells[0].replicas = (0..REPLICAS_MAX).map(|i| format!("h{i}:7000")).collect();
        assert!(check_replace(&full, &replace(1, "h0:7000", 12, "e:7000")).unwrap_err().contains("the most"));
    }
}
