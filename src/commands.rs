//! Human-friendly client commands. Amounts are in minor units (fen, cents).

use cellbank_client::CellClient;
use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::{ChangeMembershipRequest, DigestRequest, StatusRequest, TransferLeaderRequest};
use cellbank_proto::v1::*;
use cellbank_proto::ShortName;
use clap::{Args, Subcommand};

use crate::output::{self, code as code_name, kind as kind_name, settlement as settlement_name};
use crate::Endpoints;

#[derive(Subcommand)]
pub enum AccountAction {
    /// Open the account (user, currency).
    Open(AccountArgs),
}

#[derive(Args)]
pub struct AccountArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long)]
    pub user: u64,
    #[arg(long, default_value = "CNY")]
    pub currency: String,
}

#[derive(Args)]
pub struct MoveArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long)]
    pub user: u64,
    /// Minor units.
    #[arg(long)]
    pub amount: u64,
    #[arg(long, default_value = "CNY")]
    pub currency: String,
    /// Idempotency key; a fresh one is generated (and printed) when absent.
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long)]
    pub from: u64,
    #[arg(long)]
    pub to: u64,
    /// Minor units.
    #[arg(long)]
    pub amount: u64,
    #[arg(long, default_value = "CNY")]
    pub currency: String,
    /// Idempotency key; a fresh one is generated (and printed) when absent.
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub account: AccountArgs,
    #[arg(long, default_value_t = 20)]
    pub page_size: u32,
    /// Follow every page.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args)]
pub struct GetTransferArgs {
    #[command(flatten)]
    pub endpoints: Endpoints,
    #[arg(long)]
    pub id: String,
}

#[derive(Subcommand)]
pub enum AdminAction {
    /// Planned switchover of a SYNC pair: its standby becomes active, nothing is lost.
    Switchover {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        #[arg(long)]
        pair: u64,
    },
    /// Fail a pair over to its standby. Without --force only a SYNC pair whose
    /// active cell has no reachable leader; --force also fails over a healthy or
    /// DEGRADED pair and prints what may be lost.
    Failover {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        #[arg(long)]
        pair: u64,
        #[arg(long)]
        force: bool,
    },
    /// Make a pair's standby drop its copy and rebuild it from the active's snapshot.
    RebuildStandby {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        #[arg(long)]
        pair: u64,
    },
    /// Add a pair of new cells to the routing table, with no slices. Start
    /// their replicas (a running `cellbank up` starts those on this machine
    /// itself); the coordinator pairs the cells and returns the pair to SYNC
    /// once the standby holds a copy. Waits for SYNC unless --wait-secs 0.
    AddPair {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        /// The new pair's id.
        #[arg(long)]
        pair: u64,
        /// The new active cell's id.
        #[arg(long)]
        active: u64,
        /// The active cell's replica addresses (host:port, the n-th is
        /// replica n). Default, for a cluster on this machine: three on the
        /// local address plan (cell C's replica R at 127.0.0.1:7000 + 100C + 10R).
        #[arg(long, value_delimiter = ',')]
        active_replicas: Vec<String>,
        /// The new standby cell's id (none: a pair without a standby).
        #[arg(long)]
        standby: Option<u64>,
        /// The standby cell's replica addresses (default as for the active).
        #[arg(long, value_delimiter = ',')]
        standby_replicas: Vec<String>,
        /// How long to wait for the pair to be SYNC (NO_STANDBY: for its
        /// active to have a leader); 0: do not wait.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Move one slice to another pair under load: a brief freeze of that
    /// slice's writes, its balances and records sent to the target, the
    /// table flipped. Give the slice, or a user whose slice it is.
    MoveSlice {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        #[arg(long, required_unless_present = "user", conflicts_with = "user")]
        slice: Option<u32>,
        /// The user whose slice moves.
        #[arg(long)]
        user: Option<u64>,
        #[arg(long)]
        to_pair: u64,
    },
    /// Replace one replica of a cell by a new one at another address (a
    /// host replaced). Start the new replica's process first, with no
    /// founding peers (`cellbank cell --cell-id C --replica-id N --listen
    /// … [--advertise …]`). The table and the cell's membership change one
    /// step at a time; run the same command again to carry on after a
    /// failure.
    ReplaceReplica {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        #[arg(long)]
        cell: u64,
        /// The address of the replica that leaves, as `cellbank status`
        /// lists it.
        #[arg(long)]
        old_addr: String,
        /// The id of the replica that joins (not yet used in the cell).
        #[arg(long)]
        new_id: u64,
        /// Its address (host:port, as the other processes reach it).
        #[arg(long)]
        new_addr: String,
    },
    /// Print the routing table's audit log of admin actions.
    Audit {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
    },
    /// Add a replica (already running with no founding peers) as a voter.
    AddReplica {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    /// Remove a replica from the cell.
    RemoveReplica {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        id: u64,
    },
    /// Ask the leader to hand leadership to another replica.
    TransferLeader {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        to: u64,
    },
    /// Print each replica's ledger digest at its applied index.
    Digest(Endpoints),
    /// Check the whole cluster: balances net to zero per currency, clearing
    /// accounts match the outboxes between every two cells, replicas and
    /// standbys hold the same ledger, no outbox entry is stuck. Exits
    /// non-zero on any discrepancy.
    Reconcile {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        /// Also write the report as JSON to this file (`-` for stdout).
        #[arg(long)]
        json: Option<String>,
        /// An outbox entry older than this (ms) is a discrepancy.
        #[arg(long, default_value_t = 60_000)]
        outbox_age_max_ms: u64,
        /// How long to wait for each pair's replicas to line up (ms).
        #[arg(long, default_value_t = 15_000)]
        settle_timeout_ms: u64,
        /// Run again every this many seconds, for ever, instead of once
        /// (a reconciler process: see `--metrics-listen`).
        #[arg(long)]
        every_secs: Option<u64>,
        /// With `--every-secs`: serve the runs' outcomes as Prometheus
        /// metrics (`cellbank_reconcile_*`) on this address, with
        /// `/healthz` and `/ready` (ready once a run has ended).
        #[arg(long, requires = "every_secs")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Settlement figures: per ordered pair of pairs and currency, what was
    /// credited across in a period (the clearing positions to pay).
    Settlement {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: crate::cluster::AdminAuth,
        /// Period start, ms since the Unix epoch (default: the beginning).
        #[arg(long, default_value_t = 0)]
        from_ms: u64,
        /// Period end, exclusive (default: now).
        #[arg(long, default_value_t = 0)]
        to_ms: u64,
        /// Instead of --from-ms: the last this many minutes.
        #[arg(long)]
        last_minutes: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum EnvelopeAction {
    /// Send a red envelope: the total leaves the sender at once.
    Send {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        from: u64,
        /// Minor units.
        #[arg(long)]
        total: u64,
        #[arg(long)]
        shares: u32,
        #[arg(long, default_value = "CNY")]
        currency: String,
        /// Equal shares instead of random ones.
        #[arg(long)]
        even: bool,
        /// Expires this many seconds from now (default 24 hours).
        #[arg(long)]
        expires_in_secs: Option<u64>,
        /// Idempotency key; a fresh one is generated (and printed) when absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// Grab the next share.
    Grab {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        envelope: String,
        #[arg(long)]
        user: u64,
    },
    /// Show an envelope and who grabbed what.
    Show {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        envelope: String,
    },
}

fn client(endpoints: &Endpoints) -> CellClient {
    CellClient::new(endpoints.endpoints.clone())
}

fn fresh_id() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

fn print_result(transfer_id: &str, result: Option<TransferResult>) -> anyhow::Result<()> {
    let result = result.unwrap_or_default();
    if output::json() {
        output::print(&output::result(transfer_id, &result));
        anyhow::ensure!(result.code == ResultCode::Ok as i32, "not applied: {}", code_name(result.code));
        return Ok(());
    }
    let mut line = format!("{}  transfer_id={transfer_id}", code_name(result.code));
    if result.duplicate {
        line.push_str("  (retry: the original result)");
    }
    if !result.field.is_empty() {
        line.push_str(&format!("  field={}", result.field));
    }
    if !result.detail.is_empty() {
        line.push_str(&format!("  {}", result.detail));
    }
    if result.settlement != 0 {
        line.push_str(&format!("  settlement={}", settlement_name(result.settlement)));
    }
    println!("{line}");
    anyhow::ensure!(result.code == ResultCode::Ok as i32, "not applied: {}", code_name(result.code));
    Ok(())
}

pub async fn account(action: AccountAction) -> anyhow::Result<()> {
    let AccountAction::Open(args) = action;
    let response = client(&args.endpoints)
        .open_account(OpenAccountRequest { user_id: args.user, currency: args.currency.clone() })
        .await?;
    if output::json() {
        output::print(&serde_json::json!({
            "code": code_name(response.code),
            "user_id": args.user,
            "currency": args.currency,
            "detail": response.detail,
        }));
    } else {
        println!("{}  user={} currency={} {}", code_name(response.code), args.user, args.currency, response.detail);
    }
    Ok(())
}

pub async fn deposit(args: MoveArgs, withdraw: bool) -> anyhow::Result<()> {
    let id = args.id.clone().unwrap_or_else(fresh_id);
    let client = client(&args.endpoints);
    let response = if withdraw {
        client
            .withdraw(WithdrawRequest {
                transfer_id_text: String::new(),
                transfer_id: id.clone().into_bytes(),
                user_id: args.user,
                currency: args.currency.clone(),
                amount: args.amount,
            })
            .await?
    } else {
        client
            .deposit(DepositRequest {
                transfer_id_text: String::new(),
                transfer_id: id.clone().into_bytes(),
                user_id: args.user,
                currency: args.currency.clone(),
                amount: args.amount,
            })
            .await?
    };
    print_result(&id, response.result)
}

pub async fn transfer(args: TransferArgs) -> anyhow::Result<()> {
    let id = args.id.clone().unwrap_or_else(fresh_id);
    let response = client(&args.endpoints)
        .transfer(TransferRequest {
            transfer_id_text: String::new(),
            transfer_id: id.clone().into_bytes(),
            from_user_id: args.from,
            to_user_id: args.to,
            currency: args.currency.clone(),
            amount: args.amount,
        })
        .await?;
    print_result(&id, response.result)
}

pub async fn balance(args: AccountArgs) -> anyhow::Result<()> {
    let response = client(&args.endpoints)
        .get_account(GetAccountRequest { user_id: args.user, currency: args.currency.clone() })
        .await?;
    if output::json() {
        output::print(&serde_json::json!({
            "user_id": response.user_id,
            "currency": response.currency,
            "balance": response.balance,
            "version": response.version,
            "read_index": response.read_index,
        }));
        return Ok(());
    }
    println!(
        "user {}  {} {}  (version {}, read at index {})",
        response.user_id, response.balance, response.currency, response.version, response.read_index
    );
    Ok(())
}

pub async fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let client = client(&args.account.endpoints);
    let mut token = Vec::new();
    let mut listed = Vec::new();
    if !output::json() {
        println!("{:<8} {:<24} {:>10} {:>10} {:>16} {:<4}", "index", "transfer_id", "from", "to", "amount", "ccy");
    }
    loop {
        let response = client
            .list_transfers(ListTransfersRequest {
                user_id: args.account.user,
                currency: args.account.currency.clone(),
                page_size: args.page_size,
                page_token: token.clone(),
            })
            .await?;
        if output::json() {
            listed.extend(response.transfers.iter().map(output::record));
            if response.next_page_token.is_empty() || !args.all {
                output::print(&serde_json::json!({
                    "user_id": args.account.user,
                    "currency": args.account.currency,
                    "transfers": listed,
                    "more": !response.next_page_token.is_empty(),
                }));
                return Ok(());
            }
            token = response.next_page_token;
            continue;
        }
        for t in &response.transfers {
            let from = if t.from_user_id == 0 { "-".to_string() } else { t.from_user_id.to_string() };
            let to = if t.to_user_id == 0 { "-".to_string() } else { t.to_user_id.to_string() };
            println!(
                "{:<8} {:<24} {:>10} {:>10} {:>16} {:<4} {}",
                t.applied_index,
                String::from_utf8_lossy(&t.transfer_id),
                from,
                to,
                t.amount,
                t.currency,
                kind_name(t.kind)
            );
        }
        if response.next_page_token.is_empty() || !args.all {
            if !response.next_page_token.is_empty() {
                println!("(more: pass --all)");
            }
            return Ok(());
        }
        token = response.next_page_token;
    }
}

pub async fn get_transfer(args: GetTransferArgs) -> anyhow::Result<()> {
    let response = client(&args.endpoints)
        .get_transfer(GetTransferRequest { transfer_id: args.id.clone().into_bytes(), ..Default::default() })
        .await?;
    let t = response.transfer.unwrap_or_default();
    if output::json() {
        output::print(&output::record(&t));
        return Ok(());
    }
    let mut settlement = settlement_name(t.settlement).to_string();
    if t.settlement == Settlement::Refunded as i32 {
        settlement.push_str(&format!(" ({})", code_name(t.refund_reason)));
    }
    println!(
        "{}  {}  from={} to={} amount={} {}  result={}  settlement={settlement}  applied_index={} timestamp_ms={}",
        String::from_utf8_lossy(&t.transfer_id),
        kind_name(t.kind),
        t.from_user_id,
        t.to_user_id,
        t.amount,
        t.currency,
        code_name(t.result),
        t.applied_index,
        t.timestamp_ms
    );
    Ok(())
}

pub async fn status(endpoints: &[String]) -> anyhow::Result<()> {
    let client = CellClient::new(endpoints.to_vec());
    if output::json() {
        let mut replicas = Vec::new();
        for (index, endpoint) in endpoints.iter().enumerate() {
            replicas.push(match client.admin(index)?.status(StatusRequest {}).await {
                Ok(status) => {
                    let s = status.into_inner();
                    serde_json::json!({
                        "addr": endpoint,
                        "reachable": true,
                        "replica_id": s.replica_id,
                        "role": s.role,
                        "term": s.term,
                        "commit_index": s.commit_index,
                        "applied_index": s.applied_index,
                        "first_log_index": s.first_log_index,
                        "leader_id": s.leader_id,
                        "leader": cellbank_client::is_leader(&s),
                    })
                }
                Err(e) => serde_json::json!({"addr": endpoint, "reachable": false, "error": e.message()}),
            });
        }
        output::print(&serde_json::json!({ "kind": "cell", "replicas": replicas }));
        return Ok(());
    }
    println!(
        "{:<8} {:<22} {:<14} {:>6} {:>10} {:>10} {:>10} {:>7}",
        "replica", "addr", "role", "term", "commit", "applied", "log-first", "leader"
    );
    let mut leaders = Vec::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        match client.admin(index)?.status(StatusRequest {}).await {
            Ok(status) => {
                let s = status.into_inner();
                if cellbank_client::is_leader(&s) {
                    leaders.push(format!("replica {} at {}", s.replica_id, s.addr));
                }
                println!(
                    "{:<8} {:<22} {:<14} {:>6} {:>10} {:>10} {:>10} {:>7}",
                    s.replica_id,
                    endpoint,
                    s.role,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    s.first_log_index,
                    s.leader_id
                );
            }
            Err(e) => println!("{:<8} {:<22} unreachable: {}", "?", endpoint, e.message()),
        }
    }
    match leaders.as_slice() {
        [] => println!("leader: none reachable"),
        [one] => println!("leader: {one}"),
        many => println!("leaders (different terms): {}", many.join(", ")),
    }
    Ok(())
}

pub async fn admin(action: AdminAction) -> anyhow::Result<()> {
    match action {
        AdminAction::Switchover { endpoints, auth, pair } => crate::cluster::switchover(&endpoints, &auth, pair).await,
        AdminAction::Failover { endpoints, auth, pair, force } => {
            crate::cluster::failover(&endpoints, &auth, pair, force).await
        }
        AdminAction::RebuildStandby { endpoints, auth, pair } => {
            crate::cluster::rebuild_standby(&endpoints, &auth, pair).await
        }
        AdminAction::Audit { endpoints, auth } => crate::cluster::audit(&endpoints, &auth).await,
        AdminAction::ReplaceReplica { endpoints, auth, cell, old_addr, new_id, new_addr } => {
            let replace = cellbank::hosts::Replace {
                cell_id: cell,
                old_addr,
                new_replica_id: new_id,
                new_addr,
                who: auth.who.clone(),
                why: auth.why.clone(),
            };
            let done =
                cellbank::hosts::replace_replica(&endpoints.endpoints, auth.admin_token.as_deref(), &replace).await?;
            println!("{}", done.detail);
            println!("cell {cell} replicas: {}", done.replicas.join(", "));
            println!("took {} ms ({} ms catching up)", done.total.as_millis(), done.catch_up.as_millis());
            Ok(())
        }
        AdminAction::MoveSlice { endpoints, auth, slice, user, to_pair } => {
            crate::cluster::move_slice(&endpoints, &auth, slice, user, to_pair).await
        }
        AdminAction::AddPair {
            endpoints,
            auth,
            pair,
            active,
            active_replicas,
            standby,
            standby_replicas,
            wait_secs,
        } => {
            let active = crate::cluster::new_cell(&endpoints, active, active_replicas)?;
            let standby = standby.map(|id| crate::cluster::new_cell(&endpoints, id, standby_replicas)).transpose()?;
            let add = cellbank_proto::router::AddPair { pair_id: pair, active: Some(active), standby };
            crate::cluster::add_pair(&endpoints, &auth, add, std::time::Duration::from_secs(wait_secs)).await
        }
        AdminAction::Reconcile {
            endpoints,
            auth,
            json,
            outbox_age_max_ms,
            settle_timeout_ms,
            every_secs,
            metrics_listen,
        } => {
            let options = cellbank::reconcile::Options {
                outbox_age_max: std::time::Duration::from_millis(outbox_age_max_ms),
                settle_timeout: std::time::Duration::from_millis(settle_timeout_ms),
            };
            if let Some(every) = every_secs {
                anyhow::ensure!(every > 0, "--every-secs must be at least 1");
                return crate::reconciler::run(
                    &endpoints.endpoints,
                    auth.admin_token.as_deref(),
                    &options,
                    std::time::Duration::from_secs(every),
                    metrics_listen,
                )
                .await;
            }
            let status = cellbank::routers::ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref())
                .status()
                .await?;
            let report = cellbank::reconcile::reconcile(&status, &options).await;
            let json = if output::json() && json.is_none() { Some("-".to_string()) } else { json };
            match json.as_deref() {
                Some("-") => println!("{}", serde_json::to_string_pretty(&report)?),
                Some(path) => {
                    std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
                    if output::json() {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        cellbank::reconcile::print(&report);
                    }
                }
                None => cellbank::reconcile::print(&report),
            }
            anyhow::ensure!(report.ok(), "reconcile found {} discrepancies", report.discrepancies.len());
            Ok(())
        }
        AdminAction::Settlement { endpoints, auth, from_ms, to_ms, last_minutes } => {
            let now = cellbank_client::clock::unix_ms();
            let from_ms = last_minutes.map(|m| now.saturating_sub(m * 60_000)).unwrap_or(from_ms);
            let request = cellbank_proto::cell::SettlementRequest { from_ms, to_ms };
            let figures = cellbank::routers::ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref())
                .settlement(request)
                .await?;
            if output::json() {
                let lines: Vec<_> = figures
                    .lines
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "from_pair_id": l.from_pair_id,
                            "to_pair_id": l.to_pair_id,
                            "currency": l.currency,
                            "amount": l.amount,
                            "credits": l.credits,
                        })
                    })
                    .collect();
                output::print(&serde_json::json!({"from_ms": figures.from_ms, "to_ms": figures.to_ms, "lines": lines}));
                return Ok(());
            }
            println!("credited across pairs, from {} to {} (ms; 0 = open):", figures.from_ms, figures.to_ms);
            println!("  {:<6} {:<6} {:<4} {:>20} {:>10}", "from", "to", "ccy", "amount", "credits");
            for line in &figures.lines {
                println!(
                    "  {:<6} {:<6} {:<4} {:>20} {:>10}",
                    line.from_pair_id, line.to_pair_id, line.currency, line.amount, line.credits
                );
            }
            // Net positions: what each side of a pair of pairs owes the other.
            let mut net: std::collections::BTreeMap<(u64, u64, String), i128> = Default::default();
            for line in &figures.lines {
                let amount: i128 = line.amount.parse().unwrap_or(0);
                let (a, b, sign) = if line.from_pair_id < line.to_pair_id {
                    (line.from_pair_id, line.to_pair_id, 1)
                } else {
                    (line.to_pair_id, line.from_pair_id, -1)
                };
                *net.entry((a, b, line.currency.clone())).or_default() += sign * amount;
            }
            println!("net (positive: the first pair's users paid the second's):");
            for ((a, b, currency), amount) in net {
                println!("  {a} -> {b} {currency}: {amount}");
            }
            Ok(())
        }
        AdminAction::AddReplica { endpoints, id, addr } => change(&endpoints, Action::AddVoter, id, addr).await,
        AdminAction::RemoveReplica { endpoints, id } => change(&endpoints, Action::Remove, id, String::new()).await,
        AdminAction::TransferLeader { endpoints, to } => {
            let client = client(&endpoints);
            let (leader, _) = client.find_leader().await?;
            client.admin(leader)?.transfer_leader(TransferLeaderRequest { replica_id: to }).await?;
            println!("asked the leader to hand over to replica {to}");
            Ok(())
        }
        AdminAction::Digest(endpoints) => {
            let client = client(&endpoints);
            let mut digests = Vec::new();
            for (index, endpoint) in endpoints.endpoints.iter().enumerate() {
                match client.admin(index)?.digest(DigestRequest {}).await {
                    Ok(d) if output::json() => {
                        let d = d.into_inner();
                        digests.push(serde_json::json!({
                            "addr": endpoint,
                            "applied_index": d.applied_index,
                            "digest": d.digest,
                            "accounts": d.accounts,
                            "transfers": d.transfers,
                            "balance_sum_by_currency": d.balance_sum_by_currency,
                        }));
                    }
                    Err(e) if output::json() => {
                        digests.push(serde_json::json!({"addr": endpoint, "error": e.message()}));
                    }
                    Ok(d) => {
                        let d = d.into_inner();
                        println!(
                            "{endpoint:<22} applied={:<10} digest={} accounts={} transfers={} sums={:?}",
                            d.applied_index, d.digest, d.accounts, d.transfers, d.balance_sum_by_currency
                        );
                    }
                    Err(e) => println!("{endpoint:<22} unreachable: {}", e.message()),
                }
            }
            if output::json() {
                output::print(&serde_json::json!({ "replicas": digests }));
            }
            Ok(())
        }
    }
}

async fn change(endpoints: &Endpoints, action: Action, id: u64, addr: String) -> anyhow::Result<()> {
    let client = client(endpoints);
    let (leader, _) = client.find_leader().await?;
    let response = client
        .admin(leader)?
        .change_membership(ChangeMembershipRequest { action: action as i32, replica_id: id, addr })
        .await?
        .into_inner();
    println!("applied at index {}; members:", response.applied_index);
    for peer in response.peers {
        println!("  replica {} at {}{}", peer.replica_id, peer.addr, if peer.voter { "" } else { " (not a voter)" });
    }
    Ok(())
}

pub async fn envelope(action: EnvelopeAction) -> anyhow::Result<()> {
    match action {
        EnvelopeAction::Send { endpoints, from, total, shares, currency, even, expires_in_secs, id } => {
            let id = id.unwrap_or_else(fresh_id);
            let expires_at_ms = match expires_in_secs {
                Some(secs) => cellbank_client::clock::unix_ms() + secs * 1000,
                None => 0,
            };
            let response = client(&endpoints)
                .send_envelope(SendEnvelopeRequest {
                    transfer_id_text: String::new(),
                    transfer_id: id.clone().into_bytes(),
                    sender_user_id: from,
                    currency: currency.clone(),
                    total,
                    shares,
                    split: if even { EnvelopeSplit::Even } else { EnvelopeSplit::Random } as i32,
                    expires_at_ms,
                })
                .await?;
            if output::json() {
                let result = response.result.clone().unwrap_or_default();
                let mut value = output::result(&id, &result);
                value["envelope_id"] = response.envelope_id.clone().into();
                value["expires_at_ms"] = response.expires_at_ms.into();
                output::print(&value);
                anyhow::ensure!(result.code == ResultCode::Ok as i32, "not applied: {}", code_name(result.code));
                return Ok(());
            }
            print_result(&id, response.result)?;
            println!("envelope_id={}  expires_at_ms={}", response.envelope_id, response.expires_at_ms);
            Ok(())
        }
        EnvelopeAction::Grab { endpoints, envelope, user } => {
            let response = client(&endpoints)
                .grab_envelope(GrabEnvelopeRequest { envelope_id: envelope.clone(), user_id: user })
                .await?;
            let result = response.result.clone().unwrap_or_default();
            if output::json() {
                output::print(&serde_json::json!({
                    "envelope_id": envelope,
                    "user_id": user,
                    "code": code_name(result.code),
                    "amount": response.amount,
                    "currency": response.currency,
                    "share_index": response.share_index,
                    "settlement": settlement_name(result.settlement),
                    "detail": result.detail,
                }));
                anyhow::ensure!(result.code == ResultCode::Ok as i32, "no share: {}", code_name(result.code));
                return Ok(());
            }
            println!(
                "{}  envelope={envelope} user={user} amount={} {} share={} settlement={} {}",
                code_name(result.code),
                response.amount,
                response.currency,
                response.share_index,
                settlement_name(result.settlement),
                result.detail
            );
            anyhow::ensure!(result.code == ResultCode::Ok as i32, "no share: {}", code_name(result.code));
            Ok(())
        }
        EnvelopeAction::Show { endpoints, envelope } => {
            let client = client(&endpoints);
            let mut token = Vec::new();
            let mut shown: Option<serde_json::Value> = None;
            let mut grabs = Vec::new();
            loop {
                let response = client
                    .get_envelope(GetEnvelopeRequest {
                        envelope_id: envelope.clone(),
                        page_size: 1000,
                        page_token: token.clone(),
                    })
                    .await?;
                if output::json() {
                    if token.is_empty() {
                        let e = response.envelope.clone().unwrap_or_default();
                        shown = Some(serde_json::json!({
                            "envelope_id": e.envelope_id,
                            "sender_user_id": e.sender_user_id,
                            "currency": e.currency,
                            "total": e.total,
                            "shares": e.shares,
                            "split": EnvelopeSplit::try_from(e.split).map(|s| s.short_name()).unwrap_or("UNKNOWN"),
                            "state": EnvelopeState::try_from(e.state).map(|s| s.short_name()).unwrap_or("UNKNOWN"),
                            "shares_grabbed": e.shares_grabbed,
                            "remaining": e.remaining,
                            "refunded": e.refunded,
                            "expires_at_ms": e.expires_at_ms,
                        }));
                    }
                    grabs.extend(response.grabs.iter().map(|g| {
                        serde_json::json!({
                            "share_index": g.share_index,
                            "user_id": g.user_id,
                            "amount": g.amount,
                            "settlement": settlement_name(g.settlement),
                        })
                    }));
                    if response.next_page_token.is_empty() {
                        let mut value = shown.take().unwrap_or_default();
                        value["grabs"] = grabs.into();
                        output::print(&value);
                        return Ok(());
                    }
                    token = response.next_page_token;
                    continue;
                }
                if token.is_empty() {
                    let e = response.envelope.clone().unwrap_or_default();
                    println!(
                        "envelope {}  from user {}  {} {} in {} shares ({})  state={}  grabbed={}  remaining={}  refunded={}  expires_at_ms={}",
                        e.envelope_id,
                        e.sender_user_id,
                        e.total,
                        e.currency,
                        e.shares,
                        EnvelopeSplit::try_from(e.split).map(|s| s.short_name()).unwrap_or("?"),
                        EnvelopeState::try_from(e.state).map(|s| s.short_name()).unwrap_or("?"),
                        e.shares_grabbed,
                        e.remaining,
                        e.refunded,
                        e.expires_at_ms
                    );
                    println!("  {:>6} {:>12} {:>12} {:<11}", "share", "user", "amount", "settlement");
                }
                for g in &response.grabs {
                    println!(
                        "  {:>6} {:>12} {:>12} {:<11}",
                        g.share_index,
                        g.user_id,
                        g.amount,
                        settlement_name(g.settlement)
                    );
                }
                if response.next_page_token.is_empty() {
                    return Ok(());
                }
                token = response.next_page_token;
            }
        }
    }
}
