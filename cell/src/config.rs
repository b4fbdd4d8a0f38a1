//! Configuration of one replica (`cellbank cell`), from TOML or flags.
//! Every field has a default that works on a laptop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use cellbank_raft::config::{peer_map, RaftTuning};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub cell_id: u64,
    pub replica_id: u64,
    /// The replica's address: its client plane listens here, its peer
    /// and admin planes on the next two ports (`cellbank_client::planes`).
    pub listen: SocketAddr,
    /// Prometheus metrics over HTTP; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// The founding members (replica id to address). Used only the first time
    /// the replica starts on an empty data directory; a replica that joins an
    /// existing cell through a conf change leaves this empty.
    #[serde(default, with = "peer_map")]
    pub peers: BTreeMap<u64, String>,
    #[serde(default)]
    pub raft: RaftTuning,
    /// Routers' client addresses, through which the courier delivers this
    /// cell's cross-cell credits (each routed by its recipient).
    #[serde(default)]
    pub routers: Vec<String>,
    /// Token for the `FaultPoints` service (`authorization: Bearer <token>`);
    /// without one, faults cannot be injected.
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
    /// The cluster's name: this replica's certificate must name it, and
    /// every Raft message and standby shipment carries it.
    #[serde(default = "cellbank_client::tls::default_cluster")]
    pub cluster: String,
    /// Below this many free bytes on the data disk, writes are refused
    /// (see `disk`).
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: u64,
}

/// 256 MiB: room for RocksDB to flush and compact what is in memory.
pub const MIN_FREE_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

fn default_min_free_bytes() -> u64 {
    MIN_FREE_BYTES_DEFAULT
}

impl ReplicaConfig {
    pub fn from_toml(text: &str) -> anyhow::Result<ReplicaConfig> {
        let config: ReplicaConfig = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.cell_id > 0, "cell_id must be at least 1");
        anyhow::ensure!(self.replica_id > 0, "replica_id must be at least 1");
        if !self.peers.is_empty() {
            anyhow::ensure!(
                self.peers.contains_key(&self.replica_id),
                "peers must include this replica ({}) when founding a cell",
                self.replica_id
            );
        }
        let process = |what: String, addr: &str| {
            cellbank_client::planes::check_process_addr(addr).map_err(|e| anyhow::anyhow!("{what}: {e}"))
        };
        process("listen".into(), &self.listen.to_string())?;
        for (id, addr) in &self.peers {
            anyhow::ensure!(*id > 0, "peer ids start at 1");
            addr.parse::<SocketAddr>().map_err(|_| anyhow::anyhow!("peer {id}: {addr:?} is not host:port"))?;
            process(format!("peer {id}"), addr)?;
        }
        anyhow::ensure!(self.raft.election_tick > self.raft.heartbeat_tick, "election_tick must exceed heartbeat_tick");
        for addr in &self.routers {
            addr.parse::<SocketAddr>().map_err(|_| anyhow::anyhow!("routers: {addr:?} is not host:port"))?;
            process("routers".into(), addr)?;
        }
        anyhow::ensure!(self.raft.log_compact_threshold_entries > 0, "log_compact_threshold_entries must be positive");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml() {
        let config = ReplicaConfig {
            cell_id: 1,
            replica_id: 2,
            listen: "127.0.0.1:7120".parse().unwrap(),
            metrics_listen: None,
            data_dir: "data/x".into(),
            peers: [(1, "127.0.0.1:7110".to_string()), (2, "127.0.0.1:7120".to_string())].into_iter().collect(),
            raft: RaftTuning::default(),
            routers: vec!["127.0.0.1:7000".into()],
            admin_token: Some("t".into()),
            tls: Some(cellbank_client::tls::TlsPaths::in_dir(std::path::Path::new("certs"), "cell-1-replica-2")),
            insecure: false,
            cluster: "prod".into(),
            min_free_bytes: 1 << 30,
        };
        let text = toml::to_string(&config).unwrap();
        assert_eq!(ReplicaConfig::from_toml(&text).unwrap(), config);
    }

    #[test]
    fn rejects_peers_without_self_and_unknown_fields() {
        let text =
            "cell_id = 1\nreplica_id = 3\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\n[peers]\n1 = \"127.0.0.1:2\"\n";
        assert!(ReplicaConfig::from_toml(text).is_err());
        let text = "cell_id = 1\nreplica_id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\ntypo = 3\n";
        assert!(ReplicaConfig::from_toml(text).is_err());
    }
}
