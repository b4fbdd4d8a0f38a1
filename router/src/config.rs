//! A router's configuration (TOML). The cells and pairs seed the routing
//! table once, when the group has none; after that the table in the
//! routers' log is the truth.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use cellbank_proto::router::{CellReplicas, Pair, PairMode, RoutingTable};
use cellbank_raft::config::RaftTuning;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub router_id: u64,
    pub listen: SocketAddr,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// The routers' Raft group: router id -> address (this router
    /// included), host names allowed. This router's entry is the address it
    /// advertises to the others, which may differ from `listen` (behind
    /// NAT, in a container, bound to 0.0.0.0) when its ports map to
    /// `listen`'s.
    #[serde(with = "cellbank_raft::config::peer_map")]
    pub peers: BTreeMap<u64, String>,
    #[serde(default = "default_slice_count")]
    pub slice_count: u32,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    /// When set, admin calls must carry `authorization: Bearer <token>`.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Mutual TLS: this process's CA, certificate and key. Without them
    /// the process refuses to start unless `insecure` is set.
    #[serde(default)]
    pub tls: Option<cellbank_client::tls::TlsPaths>,
    /// Run without TLS (plaintext, no identities: every caller may call
    /// everything). For a laptop only; the process warns at every start.
    #[serde(default)]
    pub insecure: bool,
    /// The cluster's name: this router's certificate must name it, and
    /// every message to the other routers carries it.
    #[serde(default = "cellbank_client::tls::default_cluster")]
    pub cluster: String,
    /// What each service may do through the Ledger API (TOML, reloaded
    /// when it changes; see `scopes`). Without one, services may do
    /// nothing (operators are not scoped).
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Allows the IsolateCells fault-injection call (drills and tests only).
    #[serde(default)]
    pub fault_injection: bool,
    /// Senders may not grab their own red envelopes (OWN_ENVELOPE).
    #[serde(default)]
    pub forbid_own_grab: bool,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub cells: Vec<CellConfig>,
    #[serde(default)]
    pub pairs: Vec<PairConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// How often every replica of every cell is probed.
    pub probe_interval_ms: u64,
    /// One probe's time limit.
    pub probe_timeout_ms: u64,
    /// A cell with no reachable leader for this long, and too few reachable
    /// replicas to elect one, is failed (sync pairs) or, as a standby, makes
    /// its pair degraded.
    pub failover_window_ms: u64,
    /// A cell with no leader whose replicas are reachable in a majority is
    /// electing one: it is given this long instead, so that a leader kill
    /// inside a cell never moves the pair.
    pub election_grace_ms: u64,
    /// A pair is not failed over automatically again within this time.
    pub cooldown_ms: u64,
    /// A degraded pair returns to sync once the standby is this close.
    pub resync_lag_entries_max: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            probe_interval_ms: 150,
            probe_timeout_ms: 300,
            failover_window_ms: 1_000,
            election_grace_ms: 3_000,
            cooldown_ms: 60_000,
            resync_lag_entries_max: 2_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    pub id: u64,
    /// Each replica's gRPC address.
    pub replicas: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    pub id: u64,
    pub active: u64,
    #[serde(default)]
    pub standby: Option<u64>,
}

/// Enough to spread over hundreds of pairs (see the README's "Choosing
/// the slice count"); fixed once the table is bootstrapped.
pub const SLICE_COUNT_DEFAULT: u32 = 4096;

fn default_slice_count() -> u32 {
    SLICE_COUNT_DEFAULT
}

impl RouterConfig {
    pub fn from_toml(text: &str) -> anyhow::Result<RouterConfig> {
        let config: RouterConfig = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.router_id > 0, "router_id must be at least 1");
        anyhow::ensure!(
            self.peers.contains_key(&self.router_id),
            "peers must include this router ({})",
            self.router_id
        );
        let process = |what: String, addr: &str| {
            cellbank_client::planes::check_process_addr(addr).map_err(|e| anyhow::anyhow!("{what}: {e}"))
        };
        process("listen".into(), &self.listen.to_string())?;
        for (id, addr) in &self.peers {
            process(format!("peer {id}"), addr)?;
        }

        for cell in &self.cells {
            for addr in &cell.replicas {
                process(format!("cell {}", cell.id), addr)?;
            }
        }
        anyhow::ensure!(self.coordinator.probe_interval_ms > 0, "probe_interval_ms must be positive");
        if !self.cells.is_empty() {
            crate::table::check_bootstrap(&self.seed_table())
                .map_err(|e| anyhow::anyhow!("the cells and pairs do not form a table: {e}"))?;
        }
        Ok(())
    }

    /// The table the group starts from. Slices go round-robin to pairs.
    pub fn seed_table(&self) -> RoutingTable {
        let cells = self.cells.iter().map(|c| CellReplicas { cell_id: c.id, replicas: c.replicas.clone() }).collect();
        let pairs: Vec<Pair> = self
            .pairs
            .iter()
            .map(|p| Pair {
                pair_id: p.id,
                active_cell_id: p.active,
                standby_cell_id: p.standby.unwrap_or(0),
                // A new standby holds nothing yet: the pair starts degraded
                // and turns sync once the standby has caught up.
                mode: if p.standby.is_some() { PairMode::Degraded } else { PairMode::NoStandby } as i32,
                epoch: 1,
                last_failover_ms: 0,
                mode_seq: 0,
            })
            .collect();
        let slice_pair = match pairs.len() {
            0 => Vec::new(),
            n => (0..self.slice_count as usize).map(|s| pairs[s % n].pair_id).collect(),
        };
        RoutingTable { slice_count: self.slice_count, cells, pairs, slice_pair, ..Default::default() }
    }
}
