//! How commands print state: text for people, or JSON for scripts
//! (`-o json`, one document on stdout). Field names follow the protos;
//! enums are their names (`SYNC`, `OK`, `IN_TRANSIT`), ids that are bytes
//! are their UTF-8 text.

use std::sync::OnceLock;

use cellbank_proto::router::{ClusterStatus, PairMode};
use cellbank_proto::v1::{ResultCode, Settlement, TransferKind, TransferRecord, TransferResult};
use cellbank_proto::ShortName;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and lines for people.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Set once, from the command line.
pub fn set(output: Output) {
    let _ = OUTPUT.set(output);
}

/// Whether state is printed as JSON.
pub fn json() -> bool {
    OUTPUT.get() == Some(&Output::Json)
}

pub fn print(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON of a value"));
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn code(code: i32) -> &'static str {
    ResultCode::try_from(code).map(|c| c.short_name()).unwrap_or("UNKNOWN")
}

pub fn settlement(settlement: i32) -> &'static str {
    Settlement::try_from(settlement).map(|s| s.short_name()).unwrap_or("UNKNOWN")
}

pub fn kind(kind: i32) -> &'static str {
    TransferKind::try_from(kind).map(|k| k.short_name()).unwrap_or("UNKNOWN")
}

pub fn mode(mode: i32) -> &'static str {
    match PairMode::try_from(mode).unwrap_or(PairMode::Unspecified) {
        PairMode::Sync => "SYNC",
        PairMode::Degraded => "DEGRADED",
        PairMode::NoStandby => "NO_STANDBY",
        PairMode::Unspecified => "UNSPECIFIED",
    }
}

pub fn result(transfer_id: &str, result: &TransferResult) -> Value {
    json!({
        "transfer_id": transfer_id,
        "code": code(result.code),
        "duplicate": result.duplicate,
        "field": result.field,
        "detail": result.detail,
        "settlement": settlement(result.settlement),
    })
}

pub fn record(t: &TransferRecord) -> Value {
    json!({
        "transfer_id": text(&t.transfer_id),
        "kind": kind(t.kind),
        "from_user_id": t.from_user_id,
        "to_user_id": t.to_user_id,
        "currency": t.currency,
        "amount": t.amount,
        "result": code(t.result),
        "settlement": settlement(t.settlement),
        "refund_reason": if t.refund_reason == 0 { Value::Null } else { code(t.refund_reason).into() },
        "applied_index": t.applied_index,
        "timestamp_ms": t.timestamp_ms,
    })
}

/// The cluster as the routers' coordinator sees it.
pub fn cluster_status(status: &ClusterStatus) -> Value {
    let table = status.table.clone().unwrap_or_default();
    let routers: Vec<Value> =
        status.routers.iter().map(|r| json!({"router_id": r.router_id, "addr": r.addr, "leader": r.leader})).collect();
    let pairs: Vec<Value> = status
        .pairs
        .iter()
        .filter_map(|p| {
            let pair = p.pair.as_ref()?;
            Some(json!({
                "pair_id": pair.pair_id,
                "active_cell_id": pair.active_cell_id,
                "standby_cell_id": (pair.standby_cell_id != 0).then_some(pair.standby_cell_id),
                "mode": mode(pair.mode),
                "epoch": pair.epoch,
                "replication_lag_entries": p.replication_lag_entries,
                "replication_lag_ms": p.replication_lag_ms,
                "slices": p.slices.len(),
                "outbox_pending": p.outbox_pending,
                "outbox_oldest_age_ms": p.outbox_oldest_age_ms,
            }))
        })
        .collect();
    let moves: Vec<Value> = table
        .moves
        .iter()
        .map(|m| {
            json!({
                "move_id": m.move_id,
                "slice": m.slice,
                "from_pair_id": m.from_pair_id,
                "to_pair_id": m.to_pair_id,
                "started_ms": m.started_ms,
            })
        })
        .collect();
    let replicas: Vec<Value> = status
        .replicas
        .iter()
        .map(|r| {
            let s = r.status.clone().filter(|_| r.reachable);
            let pair = s.as_ref().and_then(|s| s.pair.clone()).unwrap_or_default();
            json!({
                "cell_id": r.cell_id,
                "addr": r.addr,
                "reachable": r.reachable,
                "serving": r.serving,
                "replica_id": s.as_ref().map(|s| s.replica_id),
                "role": s.as_ref().map(|s| s.role.clone()),
                "term": s.as_ref().map(|s| s.term),
                "commit_index": s.as_ref().map(|s| s.commit_index),
                "applied_index": s.as_ref().map(|s| s.applied_index),
                "pair_role": s.as_ref().map(|_| {
                    cellbank_proto::cell::PairRole::try_from(pair.role)
                        .map(|r| r.as_str_name().trim_start_matches("PAIR_ROLE_").to_string())
                        .unwrap_or_default()
                }),
                "pair_epoch": s.as_ref().map(|_| pair.epoch),
            })
        })
        .collect();
    json!({
        "kind": "cluster",
        "term": status.term,
        "routers": routers,
        "slice_count": table.slice_count,
        "pairs": pairs,
        "moves": moves,
        "replicas": replicas,
    })
}
