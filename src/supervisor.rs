//! The local process supervisor: it owns every process of a local cluster
//! (routers and cell replicas, each a real `cellbank` process on loopback),
//! writes their configs, starts them, kills them with real signals and
//! restarts them on their data. `cellbank up`, the failover timing bench
//! and the end-to-end tests all run clusters through it.
//!
//! Invariants: a process it started is either running or reaped (never a
//! zombie); dropping the supervisor kills and reaps every process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank_cell::config::ReplicaConfig;
use cellbank_client::tls::{Credentials, Identity, TlsPaths};
use cellbank_raft::config::RaftTuning;
use cellbank_router::config::{CellConfig, CoordinatorConfig, PairConfig, RouterConfig};
use serde::{Deserialize, Serialize};

/// A cluster's shape: routers, cells (each a Raft group of replicas) and
/// the active/standby pairs that the routers' table starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub data_dir: PathBuf,
    #[serde(default = "default_slice_count")]
    pub slice_count: u32,
    #[serde(default)]
    pub routers: Vec<ProcessTopology>,
    pub cells: Vec<CellTopology>,
    /// When empty (and routers exist), every cell serves its own slices with no standby.
    #[serde(default)]
    pub pairs: Vec<PairConfig>,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Lets routers take injected faults (drills and tests).
    #[serde(default)]
    pub fault_injection: bool,
    /// Senders may not grab their own envelopes.
    #[serde(default)]
    pub forbid_own_grab: bool,
    /// The cluster's name: in every identity (`cellbank://<cluster>/...`)
    /// and in the name servers prove (`<cluster>.cellbank`).
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Where the CA and the certificates are (made when missing);
    /// `<data_dir>/certs` when absent.
    #[serde(default)]
    pub certs_dir: Option<PathBuf>,
    /// Plaintext, no identities: every process warns at every start. For a
    /// laptop only.
    #[serde(default)]
    pub insecure: bool,
}

fn default_cluster() -> String {
    cellbank_client::tls::default_cluster()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellTopology {
    pub id: u64,
    pub replicas: Vec<ProcessTopology>,
    #[serde(default)]
    pub raft: RaftTuning,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessTopology {
    pub id: u64,
    pub listen: String,
    #[serde(default)]
    pub metrics: Option<String>,
    /// The address the other processes reach it at, when not `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// A replica that joined its cell through a membership change (it
    /// starts with no founding peers) rather than founding it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joined: bool,
}

impl ProcessTopology {
    pub fn new(id: u64, listen: String, metrics: Option<String>) -> ProcessTopology {
        ProcessTopology { id, listen, metrics, advertise: None, joined: false }
    }

    /// The address the other processes reach it at.
    pub fn addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }
}

fn default_slice_count() -> u32 {
    cellbank_router::config::SLICE_COUNT_DEFAULT
}

/// A loopback port nobody listens on, nor on the two after it (a process
/// serves its peer and admin planes there, see
/// [`cellbank_client::planes`]), for a process about to start. Chosen
/// below the kernel's ephemeral range (32768 and up on Linux): a port from
/// that range can be taken by any outgoing connection between being chosen
/// and being bound, and the process then fails to start. Never the same
/// ports twice in one process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().expect("ports lock");
    for _ in 0..10_000 {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        let ports = port..port + cellbank_client::planes::PORTS_PER_PROCESS;
        if ports.clone().all(|p| !given.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            given.extend(ports);
            return port;
        }
    }
    panic!("no free loopback ports between 20000 and 32000")
}

impl Topology {
    pub fn from_toml(text: &str) -> anyhow::Result<Topology> {
        let topology: Topology = toml::from_str(text)?;
        anyhow::ensure!(!topology.cells.is_empty(), "a topology needs at least one cell");
        Ok(topology)
    }

    /// `routers` routers and `pairs` active cells of `replicas` replicas each
    /// (plus as many standbys when `standby`), on free loopback ports.
    pub fn on_free_ports(data_dir: &Path, routers: u64, pairs: u64, replicas: u64, standby: bool) -> Topology {
        let process = |id| ProcessTopology::new(id, format!("127.0.0.1:{}", free_port()), None);
        let cell_count = if standby { pairs * 2 } else { pairs };
        let cells = (1..=cell_count)
            .map(|id| CellTopology { id, replicas: (1..=replicas).map(process).collect(), raft: RaftTuning::default() })
            .collect();
        let pairs =
            (1..=pairs).map(|id| PairConfig { id, active: id, standby: standby.then_some(id + pairs) }).collect();
        Topology {
            data_dir: data_dir.to_path_buf(),
            slice_count: default_slice_count(),
            routers: (1..=routers).map(process).collect(),
            cells,
            pairs,
            coordinator: CoordinatorConfig::default(),
            admin_token: None,
            fault_injection: true,
            forbid_own_grab: false,
            cluster: default_cluster(),
            certs_dir: None,
            insecure: false,
        }
    }

    /// Where this cluster's certificates are.
    pub fn certs_dir(&self) -> PathBuf {
        self.certs_dir.clone().unwrap_or_else(|| crate::certs::default_dir(&self.data_dir))
    }

    /// Every process's identity, and the default service's and operator's.
    pub fn identities(&self) -> Vec<Identity> {
        let cluster = &self.cluster;
        let routers = self.routers.iter().map(|r| Identity::Router { cluster: cluster.clone(), router: r.id });
        let replicas = self.cells.iter().flat_map(|c| {
            c.replicas.iter().map(|r| Identity::Replica { cluster: cluster.clone(), cell: c.id, replica: r.id })
        });
        routers.chain(replicas).chain(crate::certs::client_identities(cluster)).collect()
    }

    /// The services' scope policy of the routers: `policy.toml` in the
    /// data directory (written with the local CLI's scope when missing).
    pub fn policy_path(&self) -> PathBuf {
        self.data_dir.join("policy.toml")
    }

    /// The TLS files of `identity` (none when the cluster is insecure).
    fn tls_of(&self, identity: Identity) -> Option<TlsPaths> {
        (!self.insecure).then(|| crate::certs::paths(&self.certs_dir(), &identity))
    }

    fn pairs_or_default(&self) -> Vec<PairConfig> {
        if !self.pairs.is_empty() {
            return self.pairs.clone();
        }
        self.cells.iter().map(|c| PairConfig { id: c.id, active: c.id, standby: None }).collect()
    }

    pub fn replica_configs(&self) -> anyhow::Result<Vec<ReplicaConfig>> {
        let mut configs = Vec::new();
        let routers: Vec<String> = self.routers.iter().map(|r| r.addr().to_string()).collect();
        for cell in &self.cells {
            let founders: BTreeMap<u64, String> =
                cell.replicas.iter().filter(|r| !r.joined).map(|r| (r.id, r.addr().to_string())).collect();
            for replica in &cell.replicas {
                let peers = if replica.joined { BTreeMap::new() } else { founders.clone() };
                configs.push(ReplicaConfig {
                    cell_id: cell.id,
                    replica_id: replica.id,
                    listen: replica
                        .listen
                        .parse()
                        .with_context(|| format!("cell {} replica {}", cell.id, replica.id))?,
                    advertise: replica.advertise.clone(),
                    metrics_listen: replica.metrics.as_deref().map(str::parse).transpose()?,
                    data_dir: self.data_dir.join(format!("cell-{}", cell.id)).join(format!("replica-{}", replica.id)),
                    peers,
                    raft: cell.raft.clone(),
                    routers: routers.clone(),
                    admin_token: self.admin_token.clone(),
                    tls: self.tls_of(Identity::Replica {
                        cluster: self.cluster.clone(),
                        cell: cell.id,
                        replica: replica.id,
                    }),
                    insecure: self.insecure,
                    cluster: self.cluster.clone(),
                    min_free_bytes: cellbank_cell::config::MIN_FREE_BYTES_DEFAULT,
                });
            }
        }
        Ok(configs)
    }

    pub fn router_configs(&self) -> anyhow::Result<Vec<RouterConfig>> {
        let peers: BTreeMap<u64, String> = self.routers.iter().map(|r| (r.id, r.addr().to_string())).collect();
        let cells: Vec<CellConfig> = self
            .cells
            .iter()
            .map(|c| CellConfig { id: c.id, replicas: c.replicas.iter().map(|r| r.addr().to_string()).collect() })
            .collect();
        let mut configs = Vec::new();
        for router in &self.routers {
            let config = RouterConfig {
                router_id: router.id,
                listen: router.listen.parse().with_context(|| format!("router {}", router.id))?,
                metrics_listen: router.metrics.as_deref().map(str::parse).transpose()?,
                data_dir: self.data_dir.join(format!("router-{}", router.id)),
                peers: peers.clone(),
                slice_count: self.slice_count,
                coordinator: self.coordinator.clone(),
                admin_token: self.admin_token.clone(),
                tls: self.tls_of(Identity::Router { cluster: self.cluster.clone(), router: router.id }),
                insecure: self.insecure,
                cluster: self.cluster.clone(),
                policy: Some(self.policy_path()),
                fault_injection: self.fault_injection,
                forbid_own_grab: self.forbid_own_grab,
                raft: RaftTuning::default(),
                cells: cells.clone(),
                pairs: self.pairs_or_default(),
            };
            config.check()?;
            configs.push(config);
        }
        Ok(configs)
    }
}

/// Writes the config of each replica and registers it, stopped.
fn register_replicas(
    processes: &mut BTreeMap<ProcessId, Managed>,
    configs: Vec<ReplicaConfig>,
) -> anyhow::Result<Vec<ProcessId>> {
    let mut ids = Vec::new();
    for config in configs {
        std::fs::create_dir_all(&config.data_dir)?;
        let path = config.data_dir.join("replica.toml");
        std::fs::write(&path, toml::to_string(&config)?)?;
        let id = ProcessId::Replica { cell: config.cell_id, replica: config.replica_id };
        let managed = Managed {
            args: vec!["cell".into(), "--config".into(), path.display().to_string()],
            dir: config.data_dir.clone(),
            addr: config.advertised(config.listen),
            metrics: config.metrics_listen.map(|m| m.to_string()),
            child: None,
        };
        processes.insert(id, managed);
        ids.push(id);
    }
    Ok(ids)
}

fn id_of(id: ProcessId) -> u64 {
    match id {
        ProcessId::Replica { replica, .. } => replica,
        ProcessId::Router(router) => router,
    }
}

/// The address of replica `replica` of cell `cell` in the local clusters
/// `cellbank up` makes: `127.0.0.1:7000 + 100 × cell + 10 × replica`
/// (cell 1's replicas at 7110, 7120, 7130), each process taking that port
/// and the two after it.
pub fn local_replica_addr(cell: u64, replica: u64) -> anyhow::Result<String> {
    anyhow::ensure!(
        (1..=LOCAL_CELLS_MAX).contains(&cell) && (1..=9).contains(&replica),
        "the local address plan covers cells 1 to {LOCAL_CELLS_MAX} of 1 to 9 replicas, not cell {cell} replica \
         {replica}: give the addresses"
    );
    Ok(format!("127.0.0.1:{}", 7000 + 100 * cell + 10 * replica))
}

/// Where the local address plan puts a replica's metrics: `9000 + 100 ×
/// cell + replica`.
pub fn local_metrics_addr(cell: u64, replica: u64) -> String {
    format!("127.0.0.1:{}", 9000 + 100 * cell + replica)
}

/// The highest cell id of the local address plan (its ports stay below the
/// kernel's ephemeral range).
pub const LOCAL_CELLS_MAX: u64 = 240;

/// Whether an address names this machine (a supervisor starts only those).
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Cells and pairs added to a running cluster (`admin add-pair`) that its
/// supervisor adopted, kept in the data directory so that the next start
/// runs them too.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Adopted {
    #[serde(default)]
    cells: Vec<CellTopology>,
    #[serde(default)]
    pairs: Vec<PairConfig>,
    /// Replicas that joined a cell (a replica replaced), in order.
    #[serde(default)]
    joined: Vec<JoinedReplica>,
    /// Replicas that left a cell for good.
    #[serde(default)]
    retired: Vec<RetiredReplica>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinedReplica {
    cell: u64,
    replica: ProcessTopology,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetiredReplica {
    cell: u64,
    replica: u64,
}

fn read_adopted(path: &Path) -> anyhow::Result<Adopted> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Adopted::default()),
        Err(e) => Err(e.into()),
    }
}

fn write_adopted(path: &Path, record: &Adopted) -> anyhow::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, toml::to_string(record)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The replica of cell `cell` that the local address plan puts at `addr`.
fn local_plan_replica(cell: u64, addr: &str) -> Option<u64> {
    (1..=9).find(|r| local_replica_addr(cell, *r).is_ok_and(|a| a == addr))
}

/// The file in a data directory that lists the adopted cells.
pub const ADOPTED_FILE: &str = "adopted.toml";

impl Topology {
    /// A local cluster of `pairs` pairs on the local address plan: one
    /// router at 127.0.0.1:7000, active cells 1..=pairs, each with the
    /// cell `pairs` above it as its synchronous standby, three replicas
    /// each. Two pairs is the built-in default cluster.
    pub fn local(pairs: u64) -> anyhow::Result<Topology> {
        anyhow::ensure!(
            (1..=LOCAL_CELLS_MAX / 2).contains(&pairs),
            "--pairs: 1 to {} (the local address plan's cells)",
            LOCAL_CELLS_MAX / 2
        );
        let mut topology = Topology::from_toml(crate::DEFAULT_TOPOLOGY)?;
        topology.cells = (1..=2 * pairs)
            .map(|cell| -> anyhow::Result<CellTopology> {
                let replicas = (1..=3)
                    .map(|r| {
                        Ok(ProcessTopology::new(r, local_replica_addr(cell, r)?, Some(local_metrics_addr(cell, r))))
                    })
                    .collect::<anyhow::Result<_>>()?;
                Ok(CellTopology { id: cell, replicas, raft: RaftTuning::default() })
            })
            .collect::<anyhow::Result<_>>()?;
        topology.pairs = (1..=pairs).map(|id| PairConfig { id, active: id, standby: Some(id + pairs) }).collect();
        Ok(topology)
    }

    /// Adds the cells and pairs this data directory's supervisor adopted
    /// earlier (those the topology does not name already).
    fn merge_adopted(&mut self) -> anyhow::Result<()> {
        let adopted = read_adopted(&self.data_dir.join(ADOPTED_FILE))?;
        for cell in adopted.cells {
            if self.cells.iter().all(|c| c.id != cell.id) {
                self.cells.push(cell);
            }
        }
        for pair in adopted.pairs {
            if self.pairs.iter().all(|p| p.id != pair.id) {
                self.pairs.push(pair);
            }
        }
        for joined in adopted.joined {
            if let Some(cell) = self.cells.iter_mut().find(|c| c.id == joined.cell) {
                if cell.replicas.iter().all(|r| r.id != joined.replica.id) {
                    cell.replicas.push(ProcessTopology { joined: true, ..joined.replica });
                }
            }
        }
        for retired in adopted.retired {
            if let Some(cell) = self.cells.iter_mut().find(|c| c.id == retired.cell) {
                cell.replicas.retain(|r| r.id != retired.replica);
            }
        }
        Ok(())
    }
}

/// One process of the cluster (the type the chaos drills name processes by).
pub use cellbank_chaos::faults::Proc as ProcessId;

struct Managed {
    args: Vec<String>,
    dir: PathBuf,
    addr: String,
    metrics: Option<String>,
    child: Option<Child>,
}

pub struct Supervisor {
    exe: PathBuf,
    pub topology: Topology,
    processes: BTreeMap<ProcessId, Managed>,
    /// Extra environment for every process (e.g. RUST_LOG).
    env: Vec<(String, String)>,
    /// Cells of the table this supervisor does not run (addresses
    /// elsewhere).
    left_alone: std::collections::BTreeSet<u64>,
    /// Replica addresses of its cells that the table gained and this
    /// supervisor does not run (not on its address plan).
    foreign: std::collections::BTreeSet<String>,
    /// The audit count of the newest table followed.
    table_seen: u64,
}

impl Supervisor {
    /// Writes every process's config under the topology's data dir and,
    /// unless the cluster is insecure, issues the certificates missing from
    /// its certificate directory and installs the operator's as this
    /// process's credentials (the supervisor talks to its cluster as its
    /// operator).
    pub fn new(exe: PathBuf, topology: Topology) -> anyhow::Result<Supervisor> {
        if topology.insecure {
            cellbank_client::tls::use_credentials(None);
        } else {
            let dir = topology.certs_dir();
            crate::certs::ensure(&dir, &topology.cluster, &topology.identities())
                .with_context(|| format!("certificates in {}", dir.display()))?;
            let operator = crate::certs::client_identities(&topology.cluster)[1].clone();
            let credentials = Credentials::load(crate::certs::paths(&dir, &operator))?;
            cellbank_client::tls::use_credentials(Some(credentials));
        }
        std::fs::create_dir_all(&topology.data_dir)?;
        if !topology.policy_path().exists() {
            std::fs::write(topology.policy_path(), cellbank_router::scopes::LOCAL_POLICY)?;
        }
        let mut topology = topology;
        topology.merge_adopted()?;
        let mut processes = BTreeMap::new();
        register_replicas(&mut processes, topology.replica_configs()?)?;
        for config in topology.router_configs()? {
            std::fs::create_dir_all(&config.data_dir)?;
            let path = config.data_dir.join("router.toml");
            std::fs::write(&path, toml::to_string(&config)?)?;
            let managed = Managed {
                args: vec!["router".into(), "--config".into(), path.display().to_string()],
                dir: config.data_dir.clone(),
                addr: config.peers[&config.router_id].clone(),
                metrics: config.metrics_listen.map(|m| m.to_string()),
                child: None,
            };
            processes.insert(ProcessId::Router(config.router_id), managed);
        }
        Ok(Supervisor {
            exe,
            topology,
            processes,
            env: Vec::new(),
            left_alone: Default::default(),
            foreign: Default::default(),
            table_seen: 0,
        })
    }

    /// Fails when another process already listens on one of the cluster's
    /// addresses (a cluster left running, say), naming it.
    pub fn check_ports_free(&self) -> anyhow::Result<()> {
        for (id, managed) in &self.processes {
            let planes = cellbank_client::planes::Plane::ALL.map(|plane| plane.of(&managed.addr));
            for addr in planes.iter().chain(managed.metrics.iter()) {
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    anyhow::bail!("{id}: {addr} is taken ({e}); is another cluster still running?");
                }
            }
        }
        Ok(())
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn ids(&self) -> Vec<ProcessId> {
        self.processes.keys().copied().collect()
    }

    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for id in self.ids() {
            if !self.is_running(id) {
                self.start(id)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts, on its data) one process.
    pub fn start(&mut self, id: ProcessId) -> anyhow::Result<()> {
        self.start_with_env(id, &[])
    }

    /// [`Supervisor::start`] with extra environment for this start only: for
    /// example `CELLBANK_FAULTS`, a fault in place from the process's first
    /// instant.
    pub fn start_with_env(&mut self, id: ProcessId, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let managed = self.processes.get_mut(&id).with_context(|| format!("no {id} in this cluster"))?;
        anyhow::ensure!(managed.child.is_none(), "{id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(managed.dir.join("process.log"))?;
        let mut command = Command::new(&self.exe);
        command.args(&managed.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        managed.child = Some(command.spawn().with_context(|| format!("starting {id}"))?);
        Ok(())
    }

    fn signal(child: &Child, signal: i32) {
        // SAFETY: kill(2) on a pid this supervisor spawned and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }

    /// SIGKILL and reap: no shutdown path runs.
    pub fn kill(&mut self, id: ProcessId) {
        if let Some(mut child) = self.processes.get_mut(&id).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGSTOP or SIGCONT (a paused process keeps its sockets open).
    pub fn pause(&mut self, id: ProcessId, paused: bool) {
        if let Some(child) = self.processes.get(&id).and_then(|m| m.child.as_ref()) {
            Supervisor::signal(child, if paused { libc::SIGSTOP } else { libc::SIGCONT });
        }
    }

    pub fn cell_replicas(&self, cell: u64) -> Vec<ProcessId> {
        self.ids().into_iter().filter(|id| matches!(id, ProcessId::Replica { cell: c, .. } if *c == cell)).collect()
    }

    pub fn kill_cell(&mut self, cell: u64) {
        for id in self.cell_replicas(cell) {
            self.kill(id);
        }
    }

    pub fn start_cell(&mut self, cell: u64) -> anyhow::Result<()> {
        self.start_cell_with_env(cell, &[])
    }

    /// Starts every stopped replica of a cell with extra environment.
    pub fn start_cell_with_env(&mut self, cell: u64, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        for id in self.cell_replicas(cell) {
            if !self.is_running(id) {
                self.start_with_env(id, extra)?;
            }
        }
        Ok(())
    }

    /// Starts a new replica of a running cell, to join it through a
    /// membership change (`admin replace-replica`): with no founding peers,
    /// its certificate issued, its config written. Returns its id.
    pub fn join_replica(&mut self, cell: u64, replica: ProcessTopology) -> anyhow::Result<ProcessId> {
        let id = ProcessId::Replica { cell, replica: replica.id };
        anyhow::ensure!(!self.processes.contains_key(&id), "{id} already exists");
        let topology =
            self.topology.cells.iter_mut().find(|c| c.id == cell).with_context(|| format!("no cell {cell}"))?;
        topology.replicas.push(ProcessTopology { joined: true, ..replica });
        let started = (|| -> anyhow::Result<()> {
            if !self.topology.insecure {
                let dir = self.topology.certs_dir();
                crate::certs::ensure(&dir, &self.topology.cluster, &self.topology.identities())
                    .with_context(|| format!("certificates in {}", dir.display()))?;
            }
            let config =
                self.topology.replica_configs()?.into_iter().filter(|c| c.cell_id == cell && c.replica_id == id_of(id));
            register_replicas(&mut self.processes, config.collect())?;
            self.start(id)
        })();
        if let Err(e) = started {
            // Not started: not part of the cluster either.
            self.retire(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Follows the table's replica addresses of the cells this supervisor
    /// runs (a replica replaced with `admin replace-replica`): starts a
    /// replica whose address the table gained, when the address is on the
    /// local address plan (which names its replica id), and returns those
    /// of its replicas whose addresses the table dropped: the caller stops
    /// each with [`Supervisor::retire_left`] once the cell's leader
    /// confirms it is no member. A table older than one followed before (a
    /// router behind) is ignored. What it did is recorded in the data
    /// directory ([`ADOPTED_FILE`]) as it goes, for the next start.
    /// Returns what it did (and addresses it leaves to others, once each).
    pub fn follow_replicas(
        &mut self,
        table: &cellbank_proto::router::RoutingTable,
    ) -> anyhow::Result<(Vec<String>, Vec<ProcessId>)> {
        let mut done = Vec::new();
        let mut gone = Vec::new();
        if table.audit_count < self.table_seen {
            return Ok((done, gone));
        }
        self.table_seen = table.audit_count;
        let path = self.topology.data_dir.join(ADOPTED_FILE);
        // Read only when the table names an address this supervisor does
        // not run (not at every tick).
        let mut retired: Option<Vec<RetiredReplica>> = None;
        let mut joined = Vec::new();
        for cell in &table.cells {
            let Some(ours) = self.topology.cells.iter().find(|c| c.id == cell.cell_id) else { continue };
            for addr in &cell.replicas {
                if ours.replicas.iter().any(|r| r.addr() == addr) || self.foreign.contains(addr) {
                    continue;
                }
                let planned =
                    local_plan_replica(cell.cell_id, addr).filter(|id| ours.replicas.iter().all(|r| r.id != *id));
                let retired = match &mut retired {
                    Some(retired) => retired,
                    None => retired.insert(read_adopted(&path)?.retired),
                };
                if let Some(id) =
                    planned.filter(|id| retired.iter().any(|r| (r.cell, r.replica) == (cell.cell_id, *id)))
                {
                    // Its data directory holds a member that left: a
                    // replica id is never used twice in a cell.
                    self.foreign.insert(addr.clone());
                    done.push(format!(
                        "cell {}: {addr} is where replica {id} was, and it left the cell; ids are not used twice: \
                         replace with another replica id and address",
                        cell.cell_id
                    ));
                    continue;
                }
                match planned {
                    Some(id) if is_loopback(addr) => joined.push((
                        cell.cell_id,
                        ProcessTopology::new(id, addr.clone(), Some(local_metrics_addr(cell.cell_id, id))),
                    )),
                    _ => {
                        self.foreign.insert(addr.clone());
                        done.push(format!(
                            "cell {}: replica address {addr} is not on this machine's address plan; not started here",
                            cell.cell_id
                        ));
                    }
                }
            }
            for replica in &ours.replicas {
                if !cell.replicas.iter().any(|a| a == replica.addr()) {
                    gone.push(ProcessId::Replica { cell: cell.cell_id, replica: replica.id });
                }
            }
        }
        for (cell, replica) in joined {
            let id = self.join_replica(cell, replica.clone())?;
            done.push(format!("{id} joined cell {cell} at {} (started)", replica.addr()));
            let mut record = read_adopted(&path)?;
            record.retired.retain(|r| (r.cell, r.replica) != (cell, replica.id));
            record.joined.push(JoinedReplica { cell, replica });
            write_adopted(&path, &record)?;
        }
        Ok((done, gone))
    }

    /// Stops for good a replica that left its cell (see
    /// [`Supervisor::follow_replicas`]), and records it.
    pub fn retire_left(&mut self, id: ProcessId) -> anyhow::Result<String> {
        let ProcessId::Replica { cell, replica } = id else { anyhow::bail!("{id} is not a replica") };
        let path = self.topology.data_dir.join(ADOPTED_FILE);
        let mut record = read_adopted(&path)?;
        record.joined.retain(|j| (j.cell, j.replica.id) != (cell, replica));
        if !record.retired.iter().any(|r| (r.cell, r.replica) == (cell, replica)) {
            record.retired.push(RetiredReplica { cell, replica });
        }
        write_adopted(&path, &record)?;
        self.retire(id);
        Ok(format!("{id} left its cell (stopped)"))
    }

    /// Stops a replica for good (it left its cell) and forgets it.
    pub fn retire(&mut self, id: ProcessId) {
        self.kill(id);
        self.processes.remove(&id);
        if let ProcessId::Replica { cell, replica } = id {
            if let Some(topology) = self.topology.cells.iter_mut().find(|c| c.id == cell) {
                topology.replicas.retain(|r| r.id != replica);
            }
        }
    }

    /// Takes on the cells the routing table names and this supervisor does
    /// not run (a pair added with `admin add-pair`) when all their replicas
    /// are on this machine: writes their configs and certificates, starts
    /// them, and records them in the data directory ([`ADOPTED_FILE`]) so
    /// that the next start runs them too. Replica `n` is the cell's `n`-th
    /// address. Returns the processes started, and the cells it leaves to
    /// others (an address elsewhere).
    pub fn adopt(
        &mut self,
        table: &cellbank_proto::router::RoutingTable,
    ) -> anyhow::Result<(Vec<ProcessId>, Vec<u64>)> {
        let mut adopted = Vec::new();
        let mut elsewhere = Vec::new();
        for cell in &table.cells {
            if self.topology.cells.iter().any(|c| c.id == cell.cell_id) {
                continue;
            }
            if self.left_alone.contains(&cell.cell_id) {
                continue;
            }
            if !cell.replicas.iter().all(|a| is_loopback(a)) {
                self.left_alone.insert(cell.cell_id);
                elsewhere.push(cell.cell_id);
                continue;
            }
            let replicas = (1u64..)
                .zip(&cell.replicas)
                .map(|(id, listen)| {
                    let planned = local_replica_addr(cell.cell_id, id).is_ok_and(|a| a == *listen);
                    let metrics = planned.then(|| local_metrics_addr(cell.cell_id, id));
                    ProcessTopology::new(id, listen.clone(), metrics)
                })
                .collect();
            adopted.push(CellTopology { id: cell.cell_id, replicas, raft: RaftTuning::default() });
        }
        if adopted.is_empty() {
            return Ok((Vec::new(), elsewhere));
        }
        let pairs: Vec<PairConfig> = table
            .pairs
            .iter()
            .filter(|p| adopted.iter().any(|c| c.id == p.active_cell_id || c.id == p.standby_cell_id))
            .map(|p| PairConfig {
                id: p.pair_id,
                active: p.active_cell_id,
                standby: (p.standby_cell_id != 0).then_some(p.standby_cell_id),
            })
            .collect();
        let path = self.topology.data_dir.join(ADOPTED_FILE);
        let mut record = read_adopted(&path)?;
        record.cells.extend(adopted.iter().cloned());
        record.pairs.extend(pairs.iter().cloned());
        let new_ids: Vec<u64> = adopted.iter().map(|c| c.id).collect();
        self.topology.cells.extend(adopted);
        self.topology.pairs.extend(pairs);
        if !self.topology.insecure {
            let dir = self.topology.certs_dir();
            crate::certs::ensure(&dir, &self.topology.cluster, &self.topology.identities())
                .with_context(|| format!("certificates in {}", dir.display()))?;
        }
        let configs = self.topology.replica_configs()?.into_iter().filter(|c| new_ids.contains(&c.cell_id)).collect();
        let ids = register_replicas(&mut self.processes, configs)?;
        write_adopted(&path, &record)?;
        for id in &ids {
            self.start(*id)?;
        }
        Ok((ids, elsewhere))
    }

    /// Whether [`Supervisor::adopt`] left this cell to others.
    pub fn left_alone(&self, cell_id: u64) -> bool {
        self.left_alone.contains(&cell_id)
    }

    pub fn is_running(&self, id: ProcessId) -> bool {
        self.processes.get(&id).is_some_and(|m| m.child.is_some())
    }

    /// Processes that exited on their own since the last call (reaped).
    pub fn exited(&mut self) -> Vec<(ProcessId, ExitStatus)> {
        let mut out = Vec::new();
        for (id, managed) in &mut self.processes {
            if let Some(child) = &mut managed.child {
                if let Ok(Some(status)) = child.try_wait() {
                    managed.child = None;
                    out.push((*id, status));
                }
            }
        }
        out
    }

    pub fn addr(&self, id: ProcessId) -> Option<String> {
        self.processes.get(&id).map(|m| m.addr.clone())
    }

    pub fn metrics_addr(&self, id: ProcessId) -> Option<String> {
        self.processes.get(&id).and_then(|m| m.metrics.clone())
    }

    pub fn router_endpoints(&self) -> Vec<String> {
        self.processes
            .iter()
            .filter(|(id, _)| matches!(id, ProcessId::Router(_)))
            .map(|(_, m)| m.addr.clone())
            .collect()
    }

    pub fn cell_endpoints(&self, cell: u64) -> Vec<String> {
        self.cell_replicas(cell).into_iter().filter_map(|id| self.addr(id)).collect()
    }

    pub fn log_path(&self, id: ProcessId) -> Option<PathBuf> {
        self.processes.get(&id).map(|m| m.dir.join("process.log"))
    }

    /// The last lines of every process's log, for a failing test.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (id, managed) in &self.processes {
            let log = std::fs::read_to_string(managed.dir.join("process.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            out.push_str(&format!("--- {id} ---\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// SIGTERM to everything, SIGKILL after `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        for managed in self.processes.values() {
            if let Some(child) = &managed.child {
                Supervisor::signal(child, libc::SIGCONT);
                Supervisor::signal(child, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for managed in self.processes.values_mut() {
            let Some(mut child) = managed.child.take() else { continue };
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for managed in self.processes.values_mut() {
            if let Some(mut child) = managed.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replaced replica is remembered: the next start runs the replica
    /// that joined (with no founding peers) and not the one that left, and
    /// the routers' seed lists the cell as the table does.
    #[test]
    fn replicas_that_joined_and_left_are_merged_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut topology = Topology::local(1).unwrap();
        topology.data_dir = dir.path().to_path_buf();
        let record = Adopted {
            joined: vec![JoinedReplica {
                cell: 1,
                replica: ProcessTopology::new(4, local_replica_addr(1, 4).unwrap(), None),
            }],
            retired: vec![RetiredReplica { cell: 1, replica: 1 }],
            ..Default::default()
        };
        write_adopted(&dir.path().join(ADOPTED_FILE), &record).unwrap();
        topology.merge_adopted().unwrap();
        let ids: Vec<(u64, bool)> = topology.cells[0].replicas.iter().map(|r| (r.id, r.joined)).collect();
        assert_eq!(ids, vec![(2, false), (3, false), (4, true)]);
        let configs = topology.replica_configs().unwrap();
        let joined = configs.iter().find(|c| c.cell_id == 1 && c.replica_id == 4).unwrap();
        assert!(joined.peers.is_empty(), "a replica that joined never founds a cell");
        let founder = configs.iter().find(|c| c.cell_id == 1 && c.replica_id == 2).unwrap();
        assert_eq!(founder.peers.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        let router = &topology.router_configs().unwrap()[0];
        assert_eq!(router.cells[0].replicas, vec!["127.0.0.1:7120", "127.0.0.1:7130", "127.0.0.1:7140"]);
        assert_eq!(local_plan_replica(1, "127.0.0.1:7140"), Some(4));
        assert_eq!(local_plan_replica(2, "127.0.0.1:7140"), None);
        assert_eq!(local_plan_replica(1, "127.0.0.1:7145"), None);
    }
}
