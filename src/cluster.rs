//! CLI commands that talk to routers: cluster status and the operator
//! actions on pairs (switchover, failover, standby rebuild, audit log).

use cellbank::routers::ClusterClient;
use cellbank_proto::router::*;

use crate::Endpoints;

#[derive(clap::Args, Clone)]
pub struct AdminAuth {
    /// The routers' admin token, when they have one.
    #[arg(long, env = "CELLBANK_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Who is acting, for the audit log.
    #[arg(long, env = "USER", default_value = "operator")]
    pub who: String,
    /// Why, for the audit log.
    #[arg(long, default_value = "")]
    pub why: String,
}

use crate::output::mode as mode_name;

pub fn print_status(status: &ClusterStatus) {
    println!("routers (term {}):", status.term);
    for router in &status.routers {
        let role = if router.leader { "leader (coordinator)" } else { "follower" };
        println!("  router {:<3} {:<22} {role}", router.router_id, router.addr);
    }
    println!("pairs:");
    println!(
        "  {:<5} {:<8} {:<8} {:<11} {:>6} {:>12} {:>9} {:>7} {:>8} {:>11}",
        "pair", "active", "standby", "mode", "epoch", "lag-entries", "lag-ms", "slices", "outbox", "oldest-ms"
    );
    for pair_status in &status.pairs {
        let Some(pair) = &pair_status.pair else { continue };
        let standby = if pair.standby_cell_id == 0 { "-".to_string() } else { pair.standby_cell_id.to_string() };
        println!(
            "  {:<5} {:<8} {:<8} {:<11} {:>6} {:>12} {:>9} {:>7} {:>8} {:>11}",
            pair.pair_id,
            pair.active_cell_id,
            standby,
            mode_name(pair.mode),
            pair.epoch,
            pair_status.replication_lag_entries,
            pair_status.replication_lag_ms,
            pair_status.slices.len(),
            pair_status.outbox_pending,
            pair_status.outbox_oldest_age_ms
        );
    }
    let moves = status.table.as_ref().map(|t| t.moves.clone()).unwrap_or_default();
    if !moves.is_empty() {
        println!("slice moves under way:");
        let now = cellbank_client::clock::unix_ms();
        for m in moves {
            println!(
                "  move {}: slice {} pair {} -> pair {} for {} ms",
                m.move_id,
                m.slice,
                m.from_pair_id,
                m.to_pair_id,
                now.saturating_sub(m.started_ms)
            );
        }
    }
    println!("replicas:");
    println!(
        "  {:<5} {:<22} {:<10} {:<9} {:>5} {:>9} {:>9} {:<10} {:>6}",
        "cell", "addr", "health", "role", "term", "commit", "applied", "pair-role", "epoch"
    );
    for replica in &status.replicas {
        let health = match (replica.reachable, replica.serving) {
            (true, true) => "serving",
            (true, false) => "reachable",
            _ => "DOWN",
        };
        match &replica.status {
            Some(s) if replica.reachable => {
                let pair = s.pair.clone().unwrap_or_default();
                let role = cellbank_proto::cell::PairRole::try_from(pair.role)
                    .map(|r| r.as_str_name().trim_start_matches("PAIR_ROLE_").to_string())
                    .unwrap_or_default();
                println!(
                    "  {:<5} {:<22} {:<10} {:<9} {:>5} {:>9} {:>9} {:<10} {:>6}",
                    replica.cell_id,
                    replica.addr,
                    health,
                    s.role,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    role,
                    pair.epoch
                );
            }
            _ => println!("  {:<5} {:<22} {:<10}", replica.cell_id, replica.addr, health),
        }
    }
}

pub async fn status(endpoints: &Endpoints, token: Option<&str>) -> anyhow::Result<bool> {
    match ClusterClient::new(&endpoints.endpoints, token).status().await {
        Ok(status) => {
            if crate::output::json() {
                crate::output::print(&crate::output::cluster_status(&status));
            } else {
                print_status(&status);
            }
            Ok(true)
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => Ok(false),
        Err(status) => Err(status.into()),
    }
}

fn print_action(what: &str, response: &AdminActionResponse) {
    println!("{what}: {}", response.detail);
    if response.write_pause_ms > 0 {
        println!("write pause: {} ms", response.write_pause_ms);
    }
    if !response.may_be_lost.is_empty() {
        println!("MAY BE LOST: {}", response.may_be_lost);
    }
}

pub async fn switchover(endpoints: &Endpoints, auth: &AdminAuth, pair_id: u64) -> anyhow::Result<()> {
    let message = SwitchoverRequest { pair_id, who: auth.who.clone(), why: auth.why.clone() };
    let response = ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref()).switchover(message).await?;
    print_action("switchover", &response);
    Ok(())
}

pub async fn failover(endpoints: &Endpoints, auth: &AdminAuth, pair_id: u64, force: bool) -> anyhow::Result<()> {
    let message = FailoverRequest { pair_id, force, who: auth.who.clone(), why: auth.why.clone() };
    let response = ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref()).failover(message).await?;
    print_action("failover", &response);
    Ok(())
}

pub async fn rebuild_standby(endpoints: &Endpoints, auth: &AdminAuth, pair_id: u64) -> anyhow::Result<()> {
    let message = RebuildStandbyRequest { pair_id, who: auth.who.clone(), why: auth.why.clone() };
    let response =
        ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref()).rebuild_standby(message).await?;
    print_action("rebuild", &response);
    Ok(())
}

/// A new cell: its replicas as given, or three on the local address plan
/// when none are given and the routers are on this machine.
pub fn new_cell(endpoints: &Endpoints, cell_id: u64, replicas: Vec<String>) -> anyhow::Result<CellReplicas> {
    if !replicas.is_empty() {
        return Ok(CellReplicas { cell_id, replicas });
    }
    let local = endpoints.endpoints.iter().all(|e| {
        let addr = e.trim_start_matches("https://").trim_start_matches("http://");
        cellbank::supervisor::is_loopback(addr)
    });
    anyhow::ensure!(
        local,
        "cell {cell_id}: give its replicas' addresses (--active-replicas / --standby-replicas); only a cluster on \
         this machine has a default"
    );
    let replicas =
        (1..=3).map(|r| cellbank::supervisor::local_replica_addr(cell_id, r)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(CellReplicas { cell_id, replicas })
}

/// Adds a pair, then waits up to `wait` for it to be SYNC (NO_STANDBY:
/// for its active cell to have a leader), printing its progress.
pub async fn add_pair(
    endpoints: &Endpoints,
    auth: &AdminAuth,
    add: AddPair,
    wait: std::time::Duration,
) -> anyhow::Result<()> {
    let client = ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref());
    let pair_id = add.pair_id;
    for cell in add.active.iter().chain(add.standby.iter()) {
        println!("cell {}: {}", cell.cell_id, cell.replicas.join(", "));
    }
    let message = AddPairRequest { pair: Some(add), who: auth.who.clone(), why: auth.why.clone() };
    let response = client.add_pair(message).await?;
    print_action("add-pair", &response);
    if wait.is_zero() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut last = String::new();
    loop {
        let status = client.status().await?;
        let pair = status.pairs.iter().find(|p| p.pair.as_ref().is_some_and(|p| p.pair_id == pair_id));
        let (mode, leader) = pair
            .and_then(|p| {
                p.pair.as_ref().map(|x| (PairMode::try_from(x.mode).unwrap_or_default(), p.active_leader_replica))
            })
            .unwrap_or_default();
        let ready = mode == PairMode::Sync || (mode == PairMode::NoStandby && leader != 0);
        let now = format!("pair {pair_id}: {}", mode_name(mode as i32));
        if now != last {
            println!("{now} after {:.1} s", started.elapsed().as_secs_f64());
            last = now;
        }
        if ready {
            println!("pair {pair_id} is ready for slices");
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < wait,
            "pair {pair_id} was added but is not ready after {} s: are its cells' replicas running? (`cellbank status`)",
            wait.as_secs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Moves a slice (given, or the slice of `user`) to `to_pair`.
pub async fn move_slice(
    endpoints: &Endpoints,
    auth: &AdminAuth,
    slice: Option<u32>,
    user: Option<u64>,
    to_pair: u64,
) -> anyhow::Result<()> {
    let client = ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref());
    let slice = match (slice, user) {
        (Some(slice), _) => slice,
        (None, Some(user)) => {
            let table = client.status().await?.table.unwrap_or_default();
            anyhow::ensure!(table.slice_count > 0, "the routing table is not ready yet");
            let slice = cellbank_client::slices::slice_of(user, table.slice_count);
            println!("user {user} is in slice {slice}");
            slice
        }
        (None, None) => anyhow::bail!("--slice or --user"),
    };
    let message = MoveSliceRequest { slice, to_pair_id: to_pair, who: auth.who.clone(), why: auth.why.clone() };
    let response = client.move_slice(message).await?;
    println!("{}", response.detail);
    println!(
        "slice {slice}: pair {} -> pair {} (move {}, slice epoch {}); writes to it waited at most {} ms; {} ms in all; \
         {} account(s), {} record(s)",
        response.from_pair_id,
        response.to_pair_id,
        response.move_id,
        response.slice_epoch,
        response.freeze_ms,
        response.total_ms,
        response.accounts,
        response.records
    );
    Ok(())
}

pub async fn audit(endpoints: &Endpoints, auth: &AdminAuth) -> anyhow::Result<()> {
    let records = ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref()).audit_log().await?;
    if crate::output::json() {
        let records: Vec<_> = records
            .iter()
            .map(
                |r| serde_json::json!({"seq": r.seq, "time_ms": r.time_ms, "who": r.who, "what": r.what, "why": r.why}),
            )
            .collect();
        crate::output::print(&serde_json::json!({ "records": records }));
        return Ok(());
    }
    for record in records {
        println!("#{:<4} {}  {:<12} {}  why: {}", record.seq, record.time_ms, record.who, record.what, record.why);
    }
    Ok(())
}
