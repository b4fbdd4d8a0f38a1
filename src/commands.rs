//! Human-friendly client commands. Amounts are in minor units (fen, cents).

use cellbank_cell::client::CellClient;
use cellbank_proto::cell::change_membership_request::Action;
use cellbank_proto::cell::{ChangeMembershipRequest, DigestRequest, StatusRequest, TransferLeaderRequest};
use cellbank_proto::v1::*;
use clap::{Args, Subcommand};

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
}

fn client(endpoints: &Endpoints) -> CellClient {
    CellClient::new(endpoints.endpoints.clone())
}

fn fresh_id() -> String {
    format!("cli-{:016x}", rand::random::<u64>())
}

fn code_name(code: i32) -> &'static str {
    ResultCode::try_from(code).map(|c| c.as_str_name()).unwrap_or("UNKNOWN")
}

fn print_result(transfer_id: &str, result: Option<TransferResult>) -> anyhow::Result<()> {
    let result = result.unwrap_or_default();
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
    println!("{line}");
    anyhow::ensure!(result.code == ResultCode::Ok as i32, "not applied: {}", code_name(result.code));
    Ok(())
}

pub async fn account(action: AccountAction) -> anyhow::Result<()> {
    let AccountAction::Open(args) = action;
    let response = client(&args.endpoints)
        .ledger(|mut c| {
            let request = OpenAccountRequest { user_id: args.user, currency: args.currency.clone() };
            async move { c.open_account(request).await }
        })
        .await?;
    println!("{}  user={} currency={} {}", code_name(response.code), args.user, args.currency, response.detail);
    Ok(())
}

pub async fn deposit(args: MoveArgs, withdraw: bool) -> anyhow::Result<()> {
    let id = args.id.clone().unwrap_or_else(fresh_id);
    let client = client(&args.endpoints);
    let response = if withdraw {
        client
            .ledger(|mut c| {
                let request = WithdrawRequest {
                    transfer_id: id.clone().into_bytes(),
                    user_id: args.user,
                    currency: args.currency.clone(),
                    amount: args.amount,
                };
                async move { c.withdraw(request).await }
            })
            .await?
    } else {
        client
            .ledger(|mut c| {
                let request = DepositRequest {
                    transfer_id: id.clone().into_bytes(),
                    user_id: args.user,
                    currency: args.currency.clone(),
                    amount: args.amount,
                };
                async move { c.deposit(request).await }
            })
            .await?
    };
    print_result(&id, response.result)
}

pub async fn transfer(args: TransferArgs) -> anyhow::Result<()> {
    let id = args.id.clone().unwrap_or_else(fresh_id);
    let response = client(&args.endpoints)
        .ledger(|mut c| {
            let request = TransferRequest {
                transfer_id: id.clone().into_bytes(),
                from_user_id: args.from,
                to_user_id: args.to,
                currency: args.currency.clone(),
                amount: args.amount,
            };
            async move { c.transfer(request).await }
        })
        .await?;
    print_result(&id, response.result)
}

pub async fn balance(args: AccountArgs) -> anyhow::Result<()> {
    let response = client(&args.endpoints)
        .ledger(|mut c| {
            let request = GetAccountRequest { user_id: args.user, currency: args.currency.clone() };
            async move { c.get_account(request).await }
        })
        .await?;
    println!(
        "user {}  {} {}  (version {}, read at index {})",
        response.user_id, response.balance, response.currency, response.version, response.read_index
    );
    Ok(())
}

fn kind_name(kind: i32) -> &'static str {
    TransferKind::try_from(kind).map(|k| k.as_str_name()).unwrap_or("UNKNOWN")
}

pub async fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let client = client(&args.account.endpoints);
    let mut token = Vec::new();
    println!("{:<8} {:<24} {:>10} {:>10} {:>16} {:<4}", "index", "transfer_id", "from", "to", "amount", "ccy");
    loop {
        let response = client
            .ledger(|mut c| {
                let request = ListTransfersRequest {
                    user_id: args.account.user,
                    currency: args.account.currency.clone(),
                    page_size: args.page_size,
                    page_token: token.clone(),
                };
                async move { c.list_transfers(request).await }
            })
            .await?;
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
        .ledger(|mut c| {
            let request = GetTransferRequest { transfer_id: args.id.clone().into_bytes() };
            async move { c.get_transfer(request).await }
        })
        .await?;
    let t = response.transfer.unwrap_or_default();
    println!(
        "{}  {}  from={} to={} amount={} {}  result={}  applied_index={} timestamp_ms={}",
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
    println!(
        "{:<8} {:<22} {:<14} {:>6} {:>10} {:>10} {:>10} {:>7}",
        "replica", "addr", "role", "term", "commit", "applied", "log-first", "leader"
    );
    let mut leaders = Vec::new();
    for (index, endpoint) in endpoints.iter().enumerate() {
        match client.admin(index).status(StatusRequest {}).await {
            Ok(status) => {
                let s = status.into_inner();
                if s.role == "leader" {
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
        AdminAction::AddReplica { endpoints, id, addr } => change(&endpoints, Action::AddVoter, id, addr).await,
        AdminAction::RemoveReplica { endpoints, id } => change(&endpoints, Action::Remove, id, String::new()).await,
        AdminAction::TransferLeader { endpoints, to } => {
            let client = client(&endpoints);
            let leader = find_leader(&client).await?;
            client.admin(leader).transfer_leader(TransferLeaderRequest { replica_id: to }).await?;
            println!("asked the leader to hand over to replica {to}");
            Ok(())
        }
        AdminAction::Digest(endpoints) => {
            let client = client(&endpoints);
            for (index, endpoint) in endpoints.endpoints.iter().enumerate() {
                match client.admin(index).digest(DigestRequest {}).await {
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
            Ok(())
        }
    }
}

async fn find_leader(client: &CellClient) -> anyhow::Result<usize> {
    for index in 0..client.endpoints().len() {
        if let Ok(status) = client.admin(index).status(StatusRequest {}).await {
            if status.get_ref().role == "leader" {
                return Ok(index);
            }
        }
    }
    anyhow::bail!("no reachable leader")
}

async fn change(endpoints: &Endpoints, action: Action, id: u64, addr: String) -> anyhow::Result<()> {
    let client = client(endpoints);
    let leader = find_leader(&client).await?;
    let response = client
        .admin(leader)
        .change_membership(ChangeMembershipRequest { action: action as i32, replica_id: id, addr })
        .await?
        .into_inner();
    println!("applied at index {}; members:", response.applied_index);
    for peer in response.peers {
        println!("  replica {} at {}{}", peer.replica_id, peer.addr, if peer.voter { "" } else { " (not a voter)" });
    }
    Ok(())
}
