//! Reconciliation across the whole cluster (`cellbank admin reconcile`).
//!
//! What it proves, from the replicas' own figures (ReplicaAdmin.Audit):
//! - every replica of a pair's active cell holds the same ledger digest at
//!   the same applied index, and the standby's replicas the same digest at
//!   that index as their source index (it retries until they line up);
//! - per cell and currency, all balances (system accounts included) sum to
//!   zero; every account matches what explains it (history, clearing
//!   totals, open envelopes) — a balance changed behind the state machine's
//!   back is named;
//! - for every ordered pair of pairs (A, B): what A sent to B and did not
//!   refund, minus what B credited from A, equals the amounts of A's pending
//!   outbox entries that B has not credited. A is read first and B after,
//!   so B's figures are cut off at A's last outbox sequence number;
//! - no outbox entry is older than a bound (a stuck destination);
//! - every credit a destination applied has its debit at the source: the
//!   transfer or grab it names, applied, for that recipient and amount, not
//!   refunded (`ReplicaAdmin.Debits`). A credit without a surviving debit is
//!   money made from nothing: a discrepancy, listed one by one;
//! - orphaned entries: the pending outbox entries of a deposed old active
//!   (a pair's standby cell that still believes it is active, not yet
//!   rebuilt) whose debits the pair's active does not hold. They are listed
//!   (their credits must never leave, and do not: the cell serves nothing),
//!   not counted as discrepancies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cellbank_client::channel::{self, ChannelSettings};
use cellbank_proto::cell::replica_admin_client::ReplicaAdminClient;
use cellbank_proto::cell::{
    AuditRequest, AuditResponse, DebitsRequest, InboxCredit, InboxRequest, PairRole, StatusRequest,
};
use cellbank_proto::router::{ClusterStatus, RoutingTable};
use serde::Serialize;
use tonic::transport::Channel;

use crate::table;

#[derive(Debug, Clone)]
pub struct Options {
    /// An outbox entry older than this is a discrepancy.
    pub outbox_age_max: Duration,
    /// How long to wait for the replicas of a pair to line up.
    pub settle_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { outbox_age_max: Duration::from_secs(60), settle_timeout: Duration::from_secs(15) }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct CellFigures {
    pub pair_id: u64,
    pub cell_id: u64,
    pub role: String,
    pub applied_index: u64,
    pub source_index: u64,
    pub digest: String,
    pub replicas_agreeing: usize,
    pub balance_sums: BTreeMap<String, String>,
    pub outbox_pending: u64,
    pub outbox_oldest_age_ms: u64,
    pub envelopes_open: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClearingCheck {
    pub from_pair_id: u64,
    pub to_pair_id: u64,
    pub currency: String,
    /// Sent and not refunded, as the source says.
    pub sent: String,
    /// Credited at the destination (cut off at the source's last seq).
    pub credited: String,
    /// Pending at the source and not yet credited at the destination.
    pub in_flight: String,
    pub ok: bool,
}

/// A credit or an outbox entry named one by one.
#[derive(Debug, Clone, Serialize)]
pub struct CreditLine {
    pub from_pair_id: u64,
    pub to_pair_id: u64,
    /// The cell that holds it (the destination for a credit, the deposed
    /// cell for an orphaned entry).
    pub cell_id: u64,
    pub seq: u64,
    pub created_epoch: u64,
    pub created_index: u64,
    pub transfer_id: String,
    pub to_user_id: u64,
    pub currency: String,
    pub amount: u64,
}

impl CreditLine {
    fn new(from: u64, to: u64, cell_id: u64, credit: &InboxCredit) -> CreditLine {
        CreditLine {
            from_pair_id: from,
            to_pair_id: to,
            cell_id,
            seq: credit.seq,
            created_epoch: credit.created_epoch,
            created_index: credit.created_index,
            transfer_id: String::from_utf8_lossy(&credit.transfer_id).into_owned(),
            to_user_id: credit.to_user_id,
            currency: credit.currency.clone(),
            amount: credit.amount,
        }
    }
}

impl std::fmt::Display for CreditLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} to user {} (transfer {:?}, seq {} created at epoch {} index {}) from pair {} to pair {}",
            self.amount,
            self.currency,
            self.to_user_id,
            self.transfer_id,
            self.seq,
            self.created_epoch,
            self.created_index,
            self.from_pair_id,
            self.to_pair_id
        )
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub cells: Vec<CellFigures>,
    pub clearing: Vec<ClearingCheck>,
    /// Credits applied at a destination whose debit no source holds (there
    /// must be none: each is also a discrepancy).
    pub credits_without_debit: Vec<CreditLine>,
    /// Pending entries of deposed old actives whose debits the active lacks.
    pub orphaned_entries: Vec<CreditLine>,
    /// Said for the reader, not failures (e.g. a list cut at its bound).
    pub notes: Vec<String>,
    pub discrepancies: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.discrepancies.is_empty()
    }
}

async fn admin_client(addr: &str) -> anyhow::Result<ReplicaAdminClient<Channel>> {
    let admin_plane = cellbank_client::planes::Plane::Admin.of(addr);
    Ok(channel::admin(
        ChannelSettings::OPERATOR.connect_to(&admin_plane, cellbank_client::tls::Expect::Replica(None)).await?,
    ))
}

async fn audit(addr: &str) -> anyhow::Result<AuditResponse> {
    let mut client = admin_client(addr).await?;
    Ok(client.audit(AuditRequest { outbox_limit: 1_000_000 }).await?.into_inner())
}

/// Asks a cell's replicas (the first that answers, after its read barrier)
/// which of `credits` it holds the debits of.
async fn debits_at(table: &RoutingTable, cell_id: u64, credits: &[InboxCredit]) -> Result<Vec<bool>, String> {
    let mut problem = format!("cell {cell_id} has no replicas");
    for addr in replicas_of(table, cell_id) {
        let asked = async {
            let mut client = admin_client(&addr).await?;
            let request = DebitsRequest { credits: credits.to_vec() };
            anyhow::Ok(client.debits(request).await?.into_inner())
        };
        match asked.await {
            Ok(answer) if answer.held.len() == credits.len() => return Ok(answer.held),
            Ok(_) => problem = format!("replica {addr} answered for the wrong number of credits"),
            Err(e) => problem = format!("replica {addr}: {e}"),
        }
    }
    Err(problem)
}

/// The pending outbox entries of a pair's standby cell if it still believes
/// it is an active (a deposed old active not yet rebuilt), as credits.
async fn deposed_outbox(table: &RoutingTable, cell_id: u64, pair_epoch: u64) -> Vec<InboxCredit> {
    for addr in replicas_of(table, cell_id) {
        let Ok(mut client) = admin_client(&addr).await else { continue };
        let Ok(status) = client.status(StatusRequest {}).await.map(|r| r.into_inner()) else { continue };
        if !cellbank_client::is_leader(&status) {
            continue;
        }
        let state = status.pair.unwrap_or_default();
        let old_active = matches!(PairRole::try_from(state.role), Ok(PairRole::Active) | Ok(PairRole::Fenced))
            && state.epoch < pair_epoch;
        if !old_active {
            return Vec::new();
        }
        let Ok(found) = audit(&addr).await else { return Vec::new() };
        return found
            .outbox
            .into_iter()
            .map(|item| InboxCredit {
                seq: item.seq,
                created_epoch: item.created_epoch,
                created_index: item.created_index,
                kind: item.kind,
                transfer_id: item.transfer_id,
                to_user_id: item.to_user_id,
                currency: item.currency,
                amount: item.amount,
            })
            .collect();
    }
    Vec::new()
}

fn replicas_of(table: &RoutingTable, cell_id: u64) -> Vec<String> {
    table.cells.iter().find(|c| c.cell_id == cell_id).map(|c| c.replicas.clone()).unwrap_or_default()
}

/// The audits of a pair's replicas once they line up: every active replica
/// at one applied index, every standby replica at that source index.
/// Returns (active audits, standby audits), or why they never lined up
/// with the active's last audits (still good for the money checks).
async fn lined_up(
    active: &[String],
    standby: &[String],
    timeout: Duration,
) -> Result<(Audits, Audits), (String, Audits)> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut last_problem = String::new();
        let mut active_audits = Vec::new();
        for addr in active {
            match audit(addr).await {
                Ok(a) => active_audits.push((addr.clone(), a)),
                Err(e) => last_problem = format!("replica {addr} did not answer: {e}"),
            }
        }
        let mut standby_audits = Vec::new();
        for addr in standby {
            match audit(addr).await {
                Ok(a) => standby_audits.push((addr.clone(), a)),
                Err(e) => last_problem = format!("replica {addr} did not answer: {e}"),
            }
        }
        if last_problem.is_empty() {
            let index = active_audits.first().map(|(_, a)| a.applied_index).unwrap_or(0);
            let same = active_audits.iter().all(|(_, a)| a.applied_index == index)
                && standby_audits.iter().all(|(_, a)| a.source_index == index);
            if same {
                return Ok((active_audits, standby_audits));
            }
            last_problem = format!(
                "replicas at different indexes: active {:?}, standby source {:?}",
                active_audits.iter().map(|(_, a)| a.applied_index).collect::<Vec<_>>(),
                standby_audits.iter().map(|(_, a)| a.source_index).collect::<Vec<_>>()
            );
        }
        if Instant::now() >= deadline {
            return Err((last_problem, active_audits));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (replica address, its audit)
type Audits = Vec<(String, AuditResponse)>;

fn parse_i128(text: &str) -> i128 {
    text.parse().unwrap_or(0)
}

/// Runs every check against the cluster the routers describe.
pub async fn reconcile(status: &ClusterStatus, options: &Options) -> Report {
    let mut report = Report::default();
    let table = status.table.clone().unwrap_or_default();
    // pair id -> the active cell's audit (the first replica's, all equal).
    let mut sources: BTreeMap<u64, AuditResponse> = BTreeMap::new();
    for pair in &table.pairs {
        let active = replicas_of(&table, pair.active_cell_id);
        if active.is_empty() {
            report
                .discrepancies
                .push(format!("pair {}: the table names no replicas for cell {}", pair.pair_id, pair.active_cell_id));
            continue;
        }
        let standby = if pair.standby_cell_id == 0 { Vec::new() } else { replicas_of(&table, pair.standby_cell_id) };
        let (active_audits, standby_audits) = match lined_up(&active, &standby, options.settle_timeout).await {
            Ok(audits) => audits,
            Err((problem, active_audits)) => {
                report.discrepancies.push(format!("pair {}: digests not compared: {problem}", pair.pair_id));
                // The money checks still run on one replica's consistent view.
                match active_audits.into_iter().next() {
                    Some(first) => (vec![first], Vec::new()),
                    None => continue,
                }
            }
        };
        let reference = active_audits[0].1.clone();
        for (cell_id, role, audits) in
            [(pair.active_cell_id, "active", &active_audits), (pair.standby_cell_id, "standby", &standby_audits)]
        {
            if audits.is_empty() {
                continue;
            }
            let agreeing = audits.iter().filter(|(_, a)| a.digest == reference.digest).count();
            for (addr, a) in audits.iter().filter(|(_, a)| a.digest != reference.digest) {
                report.discrepancies.push(format!(
                    "pair {}: {role} cell {cell_id} replica {addr} has digest {} at index {}, cell {} replica {} has {}",
                    pair.pair_id,
                    &a.digest[..16.min(a.digest.len())],
                    reference.applied_index,
                    pair.active_cell_id,
                    active_audits[0].0,
                    &reference.digest[..16.min(reference.digest.len())]
                ));
            }
            for (addr, a) in audits.iter() {
                for mismatch in &a.mismatches {
                    report.discrepancies.push(format!(
                        "pair {}: {role} cell {cell_id} replica {addr}: account {} holds {} but its movements add up to {}",
                        pair.pair_id, mismatch.account, mismatch.balance, mismatch.expected
                    ));
                }
                for (currency, sum) in &a.balance_sum_by_currency {
                    if parse_i128(sum) != 0 {
                        report.discrepancies.push(format!(
                            "pair {}: {role} cell {cell_id} replica {addr}: {currency} balances sum to {sum}, not 0",
                            pair.pair_id
                        ));
                    }
                }
            }
            let first = &audits[0].1;
            let oldest = first
                .outbox
                .first()
                .map(|o| cellbank_client::clock::unix_ms().saturating_sub(o.created_at_ms))
                .unwrap_or(0);
            report.cells.push(CellFigures {
                pair_id: pair.pair_id,
                cell_id,
                role: role.to_string(),
                applied_index: first.applied_index,
                source_index: first.source_index,
                digest: first.digest.clone(),
                replicas_agreeing: agreeing,
                balance_sums: first.balance_sum_by_currency.clone().into_iter().collect(),
                outbox_pending: first.outbox_pending,
                outbox_oldest_age_ms: oldest,
                envelopes_open: first.envelopes_open,
            });
        }
        if let Some(oldest) = reference.outbox.first() {
            let age = cellbank_client::clock::unix_ms().saturating_sub(oldest.created_at_ms);
            if age > options.outbox_age_max.as_millis() as u64 {
                report.discrepancies.push(format!(
                    "pair {}: outbox entry {} ({} {} to pair {}) has waited {age} ms (bound {} ms)",
                    pair.pair_id,
                    oldest.seq,
                    oldest.amount,
                    oldest.currency,
                    oldest.dest_pair_id,
                    options.outbox_age_max.as_millis()
                ));
            }
        }
        if reference.outbox_pending > reference.outbox.len() as u64 {
            report.discrepancies.push(format!(
                "pair {}: {} outbox entries pending, more than can be checked at once",
                pair.pair_id, reference.outbox_pending
            ));
        }
        sources.insert(pair.pair_id, reference);
    }
    // Clearing between every ordered pair of pairs, source read first. A
    // pair is checked when either side has ever recorded the other, so a
    // source that lost every entry to a peer is still checked.
    for (from, source) in &sources {
        let mut peers: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for position in &source.positions {
            peers.entry(position.peer_pair_id).or_default();
        }
        for (to, audit) in &sources {
            if audit.positions.iter().any(|p| p.peer_pair_id == *from) {
                peers.entry(*to).or_default();
            }
        }
        for item in &source.outbox {
            peers.entry(item.dest_pair_id).or_default().push(item.seq);
        }
        for (to, seqs) in peers {
            let Some(pair) = table.pairs.iter().find(|p| p.pair_id == to) else {
                report.discrepancies.push(format!("pair {from}: clearing with unknown pair {to}"));
                continue;
            };
            let request = InboxRequest {
                source_pair_id: *from,
                seq_cutoff: source.outbox_seq,
                seqs: seqs.clone(),
                list_credits: true,
            };
            let mut answer = None;
            let mut problem = String::new();
            for addr in replicas_of(&table, pair.active_cell_id) {
                match admin_client(&addr).await {
                    Ok(mut client) => match client.inbox(request.clone()).await {
                        Ok(response) => {
                            answer = Some(response.into_inner());
                            break;
                        }
                        Err(status) => problem = status.message().to_string(),
                    },
                    Err(e) => problem = e.to_string(),
                }
            }
            let Some(inbox) = answer else {
                report
                    .discrepancies
                    .push(format!("pair {to}: no leader answered for its inbox from pair {from}: {problem}"));
                continue;
            };
            let credited: std::collections::HashSet<u64> = inbox.credited.iter().copied().collect();
            let mut currencies: BTreeMap<String, (i128, i128, i128)> = BTreeMap::new();
            for position in source.positions.iter().filter(|p| p.peer_pair_id == to) {
                currencies.entry(position.currency.clone()).or_default().0 +=
                    parse_i128(&position.sent) - parse_i128(&position.refunded);
            }
            for (currency, received) in &inbox.received {
                currencies.entry(currency.clone()).or_default().1 += parse_i128(received);
            }
            for item in source.outbox.iter().filter(|o| o.dest_pair_id == to && !credited.contains(&o.seq)) {
                currencies.entry(item.currency.clone()).or_default().2 += i128::from(item.amount);
            }
            for (currency, (sent, received, in_flight)) in currencies {
                let ok = sent - received == in_flight;
                if !ok {
                    report.discrepancies.push(format!(
                        "clearing {from}->{to} {currency}: sent {sent} − credited {received} = {} but {in_flight} is \
                         in flight",
                        sent - received
                    ));
                }
                report.clearing.push(ClearingCheck {
                    from_pair_id: *from,
                    to_pair_id: to,
                    currency,
                    sent: sent.to_string(),
                    credited: received.to_string(),
                    in_flight: in_flight.to_string(),
                    ok,
                });
            }
            if inbox.credits_truncated {
                report.notes.push(format!(
                    "pair {to}: only the first {} credits from pair {from} were matched to their debits",
                    inbox.credits.len()
                ));
            }
            if inbox.credits.is_empty() {
                continue;
            }
            // Asked after the destination was read: every debit of a
            // credit it applied is applied at the source by now.
            let source_cell = table.pairs.iter().find(|p| p.pair_id == *from).map(|p| p.active_cell_id).unwrap_or(0);
            match debits_at(&table, source_cell, &inbox.credits).await {
                Ok(held) => {
                    for (credit, held) in inbox.credits.iter().zip(held) {
                        if !held {
                            let line = CreditLine::new(*from, to, pair.active_cell_id, credit);
                            report.discrepancies.push(format!("credit without a surviving debit: {line}"));
                            report.credits_without_debit.push(line);
                        }
                    }
                }
                Err(problem) => report.discrepancies.push(format!(
                    "pair {from}: could not ask whether it holds the debits of {} credits pair {to} applied: {problem}",
                    inbox.credits.len()
                )),
            }
        }
    }
    for pair in table.pairs.iter().filter(|p| p.standby_cell_id != 0) {
        let entries = deposed_outbox(&table, pair.standby_cell_id, pair.epoch).await;
        if entries.is_empty() {
            continue;
        }
        match debits_at(&table, pair.active_cell_id, &entries).await {
            Ok(held) => {
                for (entry, held) in entries.iter().zip(held) {
                    if !held {
                        let to = table::route(&table, entry.to_user_id).map(|r| r.pair_id).unwrap_or(0);
                        report.orphaned_entries.push(CreditLine::new(pair.pair_id, to, pair.standby_cell_id, entry));
                    }
                }
            }
            Err(problem) => report.notes.push(format!(
                "pair {}: the deposed cell {}'s outbox was not matched: {problem}",
                pair.pair_id, pair.standby_cell_id
            )),
        }
    }
    report
}

/// A short report for a person.
pub fn print(report: &Report) {
    println!("cells:");
    println!(
        "  {:<5} {:<5} {:<8} {:>9} {:>9} {:<18} {:>5} {:>8} {:>9}",
        "pair", "cell", "role", "applied", "source", "digest", "agree", "outbox", "envelopes"
    );
    for c in &report.cells {
        println!(
            "  {:<5} {:<5} {:<8} {:>9} {:>9} {:<18} {:>5} {:>8} {:>9}",
            c.pair_id,
            c.cell_id,
            c.role,
            c.applied_index,
            c.source_index,
            &c.digest[..16.min(c.digest.len())],
            c.replicas_agreeing,
            c.outbox_pending,
            c.envelopes_open
        );
    }
    println!("clearing (per ordered pair of pairs):");
    for c in &report.clearing {
        println!(
            "  {} -> {} {}: sent {} credited {} in flight {}  {}",
            c.from_pair_id,
            c.to_pair_id,
            c.currency,
            c.sent,
            c.credited,
            c.in_flight,
            if c.ok { "ok" } else { "MISMATCH" }
        );
    }
    if !report.orphaned_entries.is_empty() {
        println!("orphaned entries (debited only in a deposed cell's unshipped tail; never delivered):");
        for line in &report.orphaned_entries {
            println!("  cell {}: {line}", line.cell_id);
        }
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    if report.ok() {
        println!("reconcile: ok (balances net to zero, clearing matches the outboxes, replicas agree)");
    } else {
        println!("reconcile: {} discrepancies", report.discrepancies.len());
        for d in &report.discrepancies {
            println!("  - {d}");
        }
    }
}
