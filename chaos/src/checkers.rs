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
//! - `replicas_identical`: every cell's replicas (and standby) hold one digest.

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
    ]
}

fn unresolved(history: &History) -> usize {
    history.ops.iter().filter(|op| *op.effective() == Outcome::Unknown).count()
}

pub fn unknown_resolved(history: &History) -> Verdict {
    let offenses = history
        .ops
        .iter()
        .filter(|op| *op.effective() == Outcome::Unknown)
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
        }
    }
    Verdict::from_offenses("no_lost_ack", offenses, None)
}

pub fn no_duplicates(history: &History, state: &FinalState) -> Verdict {
    let op_of = |id: &str| {
        history.ops.iter().find(|op| match &op.kind {
            OpKind::Transfer { transfer_id, .. } | OpKind::SendEnvelope { transfer_id, .. } => transfer_id == id,
            OpKind::Grab { .. } => false,
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
            OpKind::Grab { .. } => {}
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

pub fn replicas_identical(state: &FinalState) -> Verdict {
    let offenses = state
        .digests
        .iter()
        .filter(|(_, digests)| digests.windows(2).any(|w| w[0] != w[1]))
        .map(|(cell, digests)| Offense { seq: 0, amount: 0, what: format!("cell {cell}: digests differ: {digests:?}") })
        .collect();
    let unknown = state.digests.is_empty().then(|| "no digests were read".to_string());
    Verdict::from_offenses("replicas_identical", offenses, unknown)
}

#[cfg(test)]
mod tests;
