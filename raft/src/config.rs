//! The tuning of a Raft group, shared by ledger cells and the routers'
//! group, and the serde form of a peer map (replica id to address).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub log_compact_threshold_entries: u64,
    pub log_retain_entries: u64,
    pub log_compact_threshold_bytes: u64,
    /// A follower further than this many entries behind the commit index
    /// its leader sent is not ready (`/ready`, gRPC health).
    pub ready_lag_entries: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            election_tick: 10,
            heartbeat_tick: 2,
            log_compact_threshold_entries: 10_000,
            log_retain_entries: 2_000,
            log_compact_threshold_bytes: 64 * 1024 * 1024,
            ready_lag_entries: 1_000,
        }
    }
}

/// TOML tables have string keys: peers are written `[peers]` / `1 = "host:port"`.
/// Serde for a peer map written with string keys (TOML needs them).
pub mod peer_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(peers: &BTreeMap<u64, String>, serializer: S) -> Result<S::Ok, S::Error> {
        let text: BTreeMap<String, &String> = peers.iter().map(|(id, addr)| (id.to_string(), addr)).collect();
        text.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<u64, String>, D::Error> {
        let text = BTreeMap::<String, String>::deserialize(deserializer)?;
        text.into_iter()
            .map(|(id, addr)| {
                id.parse::<u64>()
                    .map(|id| (id, addr))
                    .map_err(|_| serde::de::Error::custom(format!("peer id {id:?} is not a number")))
            })
            .collect()
    }
}
