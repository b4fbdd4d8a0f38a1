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
    /// The address the other processes reach this replica at (`host:port`,
    /// a host name or an IP), when it is not `listen`: behind NAT, in a
    /// container, or bound to 0.0.0.0. Its port must map to `listen`'s, and
    /// the next two ports to the peer and admin planes'. Default: this
    /// replica's entry in `peers`, else `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
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
            process(format!("peer {id}"), addr)?;
        }
        if self.listen.ip().is_unspecified() && self.advertise.is_none() && !self.peers.contains_key(&self.replica_id) {
            anyhow::bail!(
                "listen {} is every interface, which no peer can dial: give the address they reach this replica at \
                 (advertise)",
                self.listen
            );
        }
        if let Some(advertise) = &self.advertise {
            process("advertise".into(), advertise)?;
            if let Some(founding) = self.peers.get(&self.replica_id) {
                anyhow::ensure!(
                    founding == advertise,
                    "advertise {advertise:?} differs from this replica's founding address {founding:?} in peers"
                );
            }
        }
        anyhow::ensure!(self.raft.election_tick > self.raft.heartbeat_tick, "election_tick must exceed heartbeat_tick");
        for addr in &self.routers {
            process("routers".into(), addr)?;
        }
        anyhow::ensure!(self.raft.log_compact_threshold_entries > 0, "log_compact_threshold_entries must be positive");
        Ok(())
    }

    /// The address this replica gives its peers (see `advertise`);
    /// `bound` is where its listener ended up.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        self.advertise
            .clone()
            .or_else(|| self.peers.get(&self.replica_id).cloned())
            .unwrap_or_else(|| bound.to_string())
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
            advertise: Some("cell-1-b.example:7120".into()),
            metrics_listen: None,
            data_dir: "data/x".into(),
            peers: [(1, "cell-1-a.example:7110".to_string()), (2, "cell-1-b.example:7120".to_string())]
                .into_iter()
                .collect(),
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

    /// Peers and routers may be host names; a replica may advertise an
    /// address other than the one it binds, the same as its founding one.
    #[test]
    fn host_names_and_an_advertised_address() {
        let base = "cell_id = 1\nreplica_id = 2\nlisten = \"0.0.0.0:7120\"\ndata_dir = \"d\"\n";
        let joiner = format!("{base}advertise = \"cell-1-b.example:7120\"\nrouters = [\"router-1.example:7000\"]\n");
        let config = ReplicaConfig::from_toml(&joiner).unwrap();
        assert_eq!(config.advertised("0.0.0.0:7120".parse().unwrap()), "cell-1-b.example:7120");
        let founder = format!("{base}[peers]\n1 = \"cell-1-a.example:7110\"\n2 = \"cell-1-b.example:7120\"\n");
        let config = ReplicaConfig::from_toml(&founder).unwrap();
        assert_eq!(config.advertised("0.0.0.0:7120".parse().unwrap()), "cell-1-b.example:7120");
        let unspecified = ReplicaConfig::from_toml(base).unwrap_err().to_string();
        assert!(unspecified.contains("which no peer can dial"), "{unspecified}");
        let plain = ReplicaConfig::from_toml(&base.replace("0.0.0.0", "127.0.0.1")).unwrap();
        assert_eq!(plain.advertised("127.0.0.1:7120".parse().unwrap()), "127.0.0.1:7120");
        let clash = founder.replace("[peers]", "advertise = \"other.example:7120\"\n[peers]");
        let refused = ReplicaConfig::from_toml(&clash).unwrap_err().to_string();
        assert!(refused.contains("differs from this replica's founding address"), "{refused}");
        let bad = format!("{base}advertise = \"cell-1-b.example\"\n");
        assert!(ReplicaConfig::from_toml(&bad).unwrap_err().to_string().contains("advertise"));
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
