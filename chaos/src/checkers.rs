//! Checkers: each judges a drill's history against the ledger's final state
//! and gives a verdict (pass, fail, or unknown when the history cannot
//! decide), with the first, the worst (most money) and the last offending
//! operation, so a report can point at them.
//!
//! - `unknown_resolved`: every operation whose outcome the client never
//!   heard was resolved afterwards (else the other verdicts may be unknown).
//! - `no_lost_ack`: everything a client was told applied is in the ledger
//!   (RPO = 0).
//! - `no_duplicates`: nothing applied twice; no user holds two shares of one
//!   envelope.
//! - `conservation`: per cell and currency, all balances (system accounts
//!   included) sum to zero.
//! - `no_negative_balance`: no user balance below zero.
//! - `balances_match`: every user's balance is the seed plus what the
//!   acknowledged (and resolved) operations moved.
//! - `envelopes`: grabbed shares + remaining + refund = total.
//! - `replicas_identical`: every cell's replicas (and standby) hold one
//!   digest; a cell lost for good holds none, and must serve no pair.
//! - `reads_see_acknowledged_writes`: a read that began after a write was
//!   acknowledged reflects it (no stale read): a transfer read finds an
//!   acknowledged transfer with its result; a balance lies within what the
//!   writes acknowledged before the read, and those possibly applied, allow.
//!
//! Reads are not writes: the write checkers skip them, and an unanswered
//! read needs no resolution.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::history::{FinalState, History, Op, OpKind, Outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pass,
    Fail,
    Unknown,
}

/// One offending operation (or, for state-only findings, seq 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offense {
    pub seq: u64,
    pub amount: u64,
    pub what: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub checker: &'static str,
    pub status: Status,
    pub offenses: usize,
    pub first: Option<Offense>,
    pub worst: Option<Offense>,
    pub last: Option<Offense>,
    pub detail: String,
}

impl Verdict {
    fn from_offenses(checker: &'static str, offenses: Vec<Offense>, unknown: Option<String>) -> Verdict {
        let first = offenses.iter().min_by_key(|o| o.seq).cloned();
        let last = offenses.iter().max_by_key(|o| o.seq).cloned();
        let worst = offenses.iter().max_by_key(|o| (o.amount, std::cmp::Reverse(o.seq))).cloned();
        let (status, detail) = match (offenses.is_empty(), unknown) {
            (false, _) => (Status::Fail, first.as_ref().map(|o| o.what.clone()).unwrap_or_default()),
            (true, Some(why)) => (Status::Unknown, why),
            (true, None) => (Status::Pass, String::new()),
        };
        Verdict { checker, status, offenses: offenses.len(), first, worst, last, detail }
    }
}

impl Verdict {
    /// A verdict from findings that belong to no one operation (a
    /// reconciliation's discrepancies, say).
    pub fn from_findings(checker: &'static str, findings: Vec<String>) -> Verdict {
        let offenses = findings.into_iter().map(|what| Offense { seq: 0, amount: 0, what }).collect();
        Verdict::from_offenses(checker, offenses, None)
    }

    /// A verdict that could not be reached, and why.
    pub fn unknown(checker: &'static str, why: String) -> Verdict {
        Verdict::from_offenses(checker, Vec::new(), Some(why))
    }
}

fn offense(op: &Op, what: String) -> Offense {
    Offense { seq: op.seq, amount: op.amount(), what }
}

/// Runs every checker.
pub fn check_all(history: &History, state: &FinalState) -> Vec<Verdict> {
    vec![
        unknown_resolved(history),
        no_lost_ack(history, state),
        no_duplicates(history, state),
        conservation(state),
        no_negative_balance(state),
        balances_match(history, state),
        envelopes(state),
        replicas_identical(state),
        reads_see_acknowledged_writes(history, state),
    ]
}

fn unresolved(history: &History) -> usize {
    history.ops.iter().filter(|op| !op.is_read() && *op.effective() == Outcome::Unknown).count()
}

pub fn unknown_resolved(history: &History) -> Verdict {
    let offenses = history
        .ops
        .iter()
        .filter(|op| !op.is_read() && *op.effective() == Outcome::Unknown)
        .map(|op| offense(op, format!("operation {} was never resolved", op.seq)))
        .collect();
    Verdict::from_offenses("unknown_resolved", offenses, None)
}

pub fn no_lost_ack(history: &History, state: &FinalState) -> Verdict {
    let mut offenses = Vec::new();
    for op in history.ops.iter().filter(|op| op.outcome == Outcome::Ok) {
        match &op.kind {
            OpKind::Transfer { transfer_id, .. } | OpKind::SendEnvelope { transfer_id, .. } => {
                match state.recorded.get(transfer_id) {
                    Some(r) if r.code == "OK" && r.debits >= 1 => {}
                    Some(r) => offenses.push(offense(
                        op,
                        format!("acknowledged {transfer_id} is recorded as {} with {} debits", r.code, r.debits),
                    )),
                    None => offenses.push(offense(op, format!("acknowledged {transfer_id} is not in the ledger"))),
                }
            }
            OpKind::Grab { envelope_id, user, amount } => {
                let held = state
                    .envelopes
                    .get(envelope_id)
                    .and_then(|e| e.grabs.iter().find(|(u, _)| u == user).map(|(_, a)| *a));
                if held.is_none() || held != *amount {
                    offenses.push(offense(
                        op,
                        format!("user {user} was told share {amount:?} of {envelope_id}; the ledger holds {held:?}"),
                    ));
                }
            }
            OpKind::ReadBalance { .. } | OpKind::ReadTransfer { .. } => {}
        }
    }
    Verdict::from_offenses("no_lost_ack", offenses, None)
}

pub fn no_duplicates(history: &History, state: &FinalState) -> Verdict {
    let op_of = |id: &str| {
        history.ops.iter().find(|op| match &op.kind {
            OpKind::Transfer { transfer_id, .. } | OpKind::SendEnvelope { transfer_id, .. } => transfer_id == id,
            _ => false,
        })
    };
    let mut offenses = Vec::new();
    for (id, recorded) in state.recorded.iter().filter(|(_, r)| r.debits > 1) {
        let what = format!("{id} applied {} times", recorded.debits);
        offenses.push(match op_of(id) {
            Some(op) => offense(op, what),
            None => Offense { seq: 0, amount: 0, what },
        });
    }
    for (envelope_id, envelope) in &state.envelopes {
        let mut users = BTreeSet::new();
        for (user, amount) in &envelope.grabs {
            if !users.insert(*user) {
                let op = history.ops.iter().find(
                    |op| matches!(&op.kind, OpKind::Grab { envelope_id: e, user: u, .. } if e == envelope_id && u == user),
                );
                let what = format!("user {user} holds two shares of {envelope_id}");
                offenses.push(match op {
                    Some(op) => offense(op, what),
                    None => Offense { seq: 0, amount: *amount, what },
                });
            }
        }
    }
    Verdict::from_offenses("no_duplicates", offenses, None)
}

pub fn conservation(state: &FinalState) -> Verdict {
    // Each cell on its own (so the cluster too: every movement stays
    // inside one cell).
    let mut offenses = Vec::new();
    for ((cell, currency), sum) in &state.sums {
        if *sum != 0 {
            offenses.push(Offense {
                seq: 0,
                amount: sum.unsigned_abs().min(u64::MAX as u128) as u64,
                what: format!("cell {cell}: {currency} balances sum to {sum}"),
            });
        }
    }
    let unknown = state.sums.is_empty().then(|| "no balance sums were read".to_string());
    Verdict::from_offenses("conservation", offenses, unknown)
}

pub fn no_negative_balance(state: &FinalState) -> Verdict {
    let offenses = state
        .balances
        .iter()
        .filter(|(_, b)| **b < 0)
        .map(|((user, currency), b)| Offense {
            seq: 0,
            amount: b.unsigned_abs().min(u64::MAX as u128) as u64,
            what: format!("user {user} holds {b} {currency}"),
        })
        .collect();
    Verdict::from_offenses("no_negative_balance", offenses, None)
}

pub fn balances_match(history: &History, state: &FinalState) -> Verdict {
    let mut expected = state.seeded.clone();
    let mut last_touch: BTreeMap<(u64, String), &Op> = BTreeMap::new();
    for op in history.ops.iter().filter(|op| *op.effective() == Outcome::Ok) {
        let mut moved = |user: u64, currency: &str, delta: i128| {
            *expected.entry((user, currency.to_string())).or_default() += delta;
            last_touch.insert((user, currency.to_string()), op);
        };
        match &op.kind {
            OpKind::Transfer { transfer_id, from, to, currency, amount } => {
                if state.recorded.get(transfer_id).is_some_and(|r| r.refunded) {
                    continue;
                }
                moved(*from, currency, -(*amount as i128));
                moved(*to, currency, *amount as i128);
            }
            OpKind::SendEnvelope { sender, currency, total, .. } => moved(*sender, currency, -(*total as i128)),
            OpKind::Grab { .. } | OpKind::ReadBalance { .. } | OpKind::ReadTransfer { .. } => {}
        }
    }
    // Shares and refunds as the ledger recorded them (their amounts are
    // the ledger's to choose; no_lost_ack checks the acknowledged ones).
    for envelope in state.envelopes.values() {
        for (user, amount) in &envelope.grabs {
            *expected.entry((*user, envelope.currency.clone())).or_default() += *amount as i128;
        }
        *expected.entry((envelope.sender, envelope.currency.clone())).or_default() += envelope.refunded as i128;
    }
    let mut offenses = Vec::new();
    for (account, balance) in &state.balances {
        let want = expected.get(account).copied().unwrap_or(0);
        if *balance != want {
            let what = format!("user {} holds {balance} {}, the history says {want}", account.0, account.1);
            let amount = (*balance - want).unsigned_abs().min(u64::MAX as u128) as u64;
            offenses.push(match last_touch.get(account) {
                Some(op) => Offense { seq: op.seq, amount, what },
                None => Offense { seq: 0, amount, what },
            });
        }
    }
    let open = unresolved(history);
    let unknown = (open > 0).then(|| format!("{open} operations were never resolved"));
    if open > 0 && !offenses.is_empty() {
        // With unresolved operations a difference proves nothing.
        return Verdict::from_offenses("balances_match", Vec::new(), unknown);
    }
    Verdict::from_offenses("balances_match", offenses, unknown)
}

pub fn envelopes(state: &FinalState) -> Verdict {
    let offenses = state
        .envelopes
        .iter()
        .filter_map(|(id, e)| {
            let grabbed: u64 = e.grabs.iter().map(|(_, a)| a).sum();
            (grabbed + e.remaining + e.refunded != e.total).then(|| Offense {
                seq: 0,
                amount: e.total,
                what: format!(
                    "envelope {id}: shares {grabbed} + remaining {} + refund {} != total {}",
                    e.remaining, e.refunded, e.total
                ),
            })
        })
        .collect();
    Verdict::from_offenses("envelopes", offenses, None)
}

/// Every cell's replicas agree. A cell the drill lost for good has no
/// digest to compare and is not asked for one; but it must serve no pair
/// (its pair's other cell took over), and every other cell of the routing
/// table must have been compared: a missing one leaves the verdict unknown.
pub fn replicas_identical(state: &FinalState) -> Verdict {
    let mut offenses: Vec<Offense> = state
        .digests
        .iter()
        .filter(|(_, digests)| digests.windows(2).any(|w| w[0] != w[1]))
        .map(|(cell, digests)| Offense { seq: 0, amount: 0, what: format!("cell {cell}: digests differ: {digests:?}") })
        .collect();
    for (pair, (active, _)) in &state.pairs {
        if state.lost_cells.contains(active) {
            offenses.push(Offense {
                seq: 0,
                amount: 0,
                what: format!("pair {pair} is served by cell {active}, which was lost for good"),
            });
        }
    }
    let missing: BTreeSet<u64> = state
        .pairs
        .values()
        .flat_map(|(active, standby)| [*active, *standby])
        .filter(|c| *c != 0 && !state.lost_cells.contains(c) && !state.digests.contains_key(c))
        .collect();
    let unknown = if state.digests.is_empty() {
        Some("no digests were read".to_string())
    } else if !missing.is_empty() {
        Some(format!("the digests of cell(s) {missing:?} were not compared"))
    } else {
        None
    };
    let mut verdict = Verdict::from_offenses("replicas_identical", offenses, unknown);
    if verdict.status == Status::Pass && !state.lost_cells.is_empty() {
        verdict.detail = format!(
            "cell(s) {:?} lost for good: not compared; every other cell was",
            state.lost_cells.iter().collect::<Vec<_>>()
        );
    }
    verdict
}

/// A movement of one user's balance by one write.
struct Move<'a> {
    op: &'a Op,
    delta: i128,
    /// Applied to this balance by the write itself, so in place once it is
    /// acknowledged; false for what arrives later (an incoming cross-pair
    /// credit, a refund).
    bound: bool,
}

/// No stale read. A read that began (`sent_ms`) after a write was
/// acknowledged (`answered_ms`, outcome OK) must reflect it:
/// - a transfer read of an acknowledged transfer (or envelope send) finds it,
///   with result OK;
/// - a balance read lies within [min, max] of the balances possible at that
///   moment: the seed, plus every movement acknowledged before the read
///   began, plus any subset of the movements that may or may not have
///   applied: in flight or unanswered when the read began (not refused, and
///   sent before the read was answered), an incoming cross-pair credit (it
///   arrives after the sender's debit, acknowledged or not) and a refund.
pub fn reads_see_acknowledged_writes(history: &History, state: &FinalState) -> Verdict {
    const NAME: &str = "reads_see_acknowledged_writes";
    let mut writes: BTreeMap<&str, &Op> = BTreeMap::new();
    let mut moves: BTreeMap<(u64, String), Vec<Move>> = BTreeMap::new();
    // Envelope totals, for a grab whose share nobody heard.
    let totals: BTreeMap<&str, u64> = history
        .ops
        .iter()
        .filter_map(|op| match &op.kind {
            OpKind::SendEnvelope { envelope_id, total, .. } => Some((envelope_id.as_str(), *total)),
            _ => None,
        })
        .collect();
    for op in history.ops.iter().filter(|op| !op.is_read()) {
        // Refused: known not to have applied.
        if matches!(op.effective(), Outcome::Refused(_)) {
            continue;
        }
        let mut add = |user: u64, currency: &str, delta: i128, bound: bool| {
            moves.entry((user, currency.to_string())).or_default().push(Move { op, delta, bound });
        };
        match &op.kind {
            OpKind::Transfer { transfer_id, from, to, currency, amount } => {
                writes.insert(transfer_id, op);
                let amount = *amount as i128;
                add(*from, currency, -amount, true);
                add(*to, currency, amount, !history.crosses(*from, *to));
                if state.recorded.get(transfer_id).is_some_and(|r| r.refunded) {
                    add(*from, currency, amount, false);
                }
            }
            OpKind::SendEnvelope { transfer_id, sender, currency, total, .. } => {
                writes.insert(transfer_id, op);
                add(*sender, currency, -(*total as i128), true);
            }
            OpKind::Grab { envelope_id, user, amount } => {
                let envelope = state.envelopes.get(envelope_id);
                let share = amount
                    .or_else(|| envelope.and_then(|e| e.grabs.iter().find(|(u, _)| u == user).map(|(_, a)| *a)))
                    .or_else(|| totals.get(envelope_id.as_str()).copied())
                    .unwrap_or(0);
                let sender = envelope
                    .map(|e| e.sender)
                    .or_else(|| envelope_id.split('.').next().and_then(|s| s.parse().ok()))
                    .unwrap_or(0);
                let currency = envelope.map(|e| e.currency.as_str()).unwrap_or(crate::workload::CURRENCY);
                add(*user, currency, share as i128, sender != 0 && !history.crosses(sender, *user));
            }
            OpKind::ReadBalance { .. } | OpKind::ReadTransfer { .. } => {}
        }
    }
    let mut offenses = Vec::new();
    let (mut balances, mut transfers, mut unanswered, mut unseeded) = (0usize, 0usize, 0usize, 0usize);
    for read in history.ops.iter().filter(|op| op.is_read()) {
        if read.outcome != Outcome::Ok {
            unanswered += 1;
            continue;
        }
        match &read.kind {
            OpKind::ReadTransfer { transfer_id, found, code, .. } => {
                transfers += 1;
                let Some(write) = writes.get(transfer_id.as_str()) else { continue };
                if write.outcome != Outcome::Ok || write.answered_ms >= read.sent_ms {
                    continue;
                }
                let problem = if !found {
                    "found nothing".to_string()
                } else if code != "OK" {
                    format!("found it recorded as {code}")
                } else {
                    continue;
                };
                offenses.push(Offense {
                    seq: read.seq,
                    amount: write.amount(),
                    what: format!(
                        "read #{} of transfer {transfer_id}, sent at {} ms, {problem}; #{} was acknowledged OK at {} ms",
                        read.seq, read.sent_ms, write.seq, write.answered_ms
                    ),
                });
            }
            OpKind::ReadBalance { user, currency, balance: Some(balance) } => {
                balances += 1;
                let Some(seed) = state.seeded.get(&(*user, currency.clone())) else {
                    unseeded += 1;
                    continue;
                };
                let (mut low, mut high) = (*seed, *seed);
                let mut acknowledged = 0;
                let mut last_acknowledged: Option<&Op> = None;
                for m in moves.get(&(*user, currency.clone())).into_iter().flatten() {
                    if m.op.sent_ms > read.answered_ms {
                        continue; // began after the read ended
                    }
                    if m.bound && m.op.outcome == Outcome::Ok && m.op.answered_ms < read.sent_ms {
                        low += m.delta;
                        high += m.delta;
                        acknowledged += 1;
                        if last_acknowledged.is_none_or(|l| l.answered_ms < m.op.answered_ms) {
                            last_acknowledged = Some(m.op);
                        }
                    } else {
                        low += m.delta.min(0);
                        high += m.delta.max(0);
                    }
                }
                let balance = *balance as i128;
                if balance < low || balance > high {
                    let distance = if balance < low { low - balance } else { balance - high };
                    offenses.push(Offense {
                        seq: read.seq,
                        amount: distance.min(u64::MAX as i128) as u64,
                        what: format!(
                            "read #{} of user {user}'s balance, sent at {} ms, returned {balance} {currency}; possible: \
                             {low}..={high} given {acknowledged} movement(s) acknowledged before it{}",
                            read.seq,
                            read.sent_ms,
                            last_acknowledged
                                .map(|l| format!(" (the latest #{} at {} ms)", l.seq, l.answered_ms))
                                .unwrap_or_default()
                        ),
                    });
                }
            }
            _ => unanswered += 1,
        }
    }
    let unknown = (unseeded > 0 && unseeded == balances && transfers == 0)
        .then(|| "no seeded balance to judge the reads against".to_string());
    let mut verdict = Verdict::from_offenses(NAME, offenses, unknown);
    if verdict.status == Status::Pass {
        verdict.detail = format!("{balances} balance and {transfers} transfer reads checked ({unanswered} unanswered)");
    }
    verdict
}

/// The credit delays of the acknowledged cross-pair transfers: the
/// recipient cell's clock when it credited minus the sender cell's clock when
/// it debited, from the sender's records as the final read found them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditDelays {
    /// Credited transfers measured.
    pub count: usize,
    pub p50_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    pub max_ms: Option<i64>,
    /// The slowest (up to 5): (operation seq, delay ms), slowest first.
    pub slowest: Vec<(u64, i64)>,
    /// Acknowledged cross-pair transfers still IN_TRANSIT at the end.
    pub in_transit: usize,
    /// ... and refunded (the recipient's cell refused the credit).
    pub refunded: usize,
}

/// Nearest-rank percentile of sorted values.
fn nearest_rank(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

pub fn credit_delays(history: &History, state: &FinalState) -> CreditDelays {
    let mut delays: Vec<(i64, u64)> = Vec::new();
    let mut out = CreditDelays::default();
    for op in history.ops.iter().filter(|op| op.outcome == Outcome::Ok) {
        let OpKind::Transfer { transfer_id, .. } = &op.kind else { continue };
        let Some(recorded) = state.recorded.get(transfer_id) else { continue };
        match recorded.settlement.as_str() {
            "CREDITED" => {
                if let Some(delay) = recorded.credit_delay_ms {
                    delays.push((delay, op.seq));
                }
            }
            "IN_TRANSIT" => out.in_transit += 1,
            "REFUNDED" => out.refunded += 1,
            _ => {}
        }
    }
    delays.sort_unstable();
    let sorted: Vec<i64> = delays.iter().map(|d| d.0).collect();
    out.count = sorted.len();
    out.p50_ms = nearest_rank(&sorted, 0.5);
    out.p99_ms = nearest_rank(&sorted, 0.99);
    out.max_ms = sorted.last().copied();
    out.slowest = delays.iter().rev().take(5).map(|(delay, seq)| (*seq, *delay)).collect();
    out
}

#[cfg(test)]
mod tests;
