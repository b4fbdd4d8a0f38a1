//! `cellbank up`: a local cluster in the foreground.
//!
//! Reads a topology file (default `deploy/local/cluster.toml`: one router,
//! two active cells, two standbys), starts every process through the
//! [`Supervisor`], prints where to point a client and a live status line,
//! and on Ctrl-C stops every process (SIGTERM, then SIGKILL after a grace
//! period). Run again, it resumes the same data.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cellbank::supervisor::{Supervisor, Topology};
use cellbank_proto::router::PairMode;

pub use cellbank::DEFAULT_TOPOLOGY;
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct UpArgs {
    /// Topology file; the built-in default (a router, two pairs of cells) when absent.
    #[arg(long, conflicts_with = "pairs")]
    topology: Option<PathBuf>,
    /// A local cluster of this many pairs (each an active cell and its
    /// synchronous standby, three replicas each, on the local address plan:
    /// cell C's replica R at 127.0.0.1:7000 + 100C + 10R) instead of the
    /// default two. Pairs added later with `admin add-pair` are started by
    /// this command while it runs, and again at every start.
    #[arg(long)]
    pairs: Option<u64>,
    /// Data directory; overrides the topology's `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Stop after this many seconds instead of waiting for Ctrl-C (for scripts).
    #[arg(long)]
    exit_after_secs: Option<u64>,
    /// Run every process without TLS (plaintext, no identities; each
    /// process warns at every start). For measuring TLS's cost, not for use.
    #[arg(long)]
    insecure: bool,
}

pub fn load_topology(path: Option<&PathBuf>) -> anyhow::Result<Topology> {
    let text = match path {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => DEFAULT_TOPOLOGY.to_string(),
    };
    Topology::from_toml(&text).context("parsing the topology")
}

/// One status line, and the processes of cells added to the table since
/// the last tick started (see [`Supervisor::adopt`]).
async fn tick(supervisor: &mut Supervisor, token: Option<&str>) -> String {
    let exited: Vec<String> =
        supervisor.exited().into_iter().map(|(id, status)| format!("{id} exited ({status})")).collect();
    if !exited.is_empty() {
        return exited.join(" | ");
    }
    let routers = supervisor.router_endpoints();
    if routers.is_empty() {
        return "no routers in this topology".into();
    }
    let asked = tokio::time::timeout(
        Duration::from_millis(800),
        cellbank::routers::ClusterClient::new(&routers, token).status(),
    )
    .await;
    let status = match asked {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return format!("routers: {}", e.message()),
        Err(_) => return "routers: starting".into(),
    };
    if let Some(table) = &status.table {
        let known = |cell: &u64| supervisor.topology.cells.iter().any(|c| c.id == *cell);
        if table.cells.iter().any(|c| !known(&c.cell_id) && !supervisor.left_alone(c.cell_id)) {
            match tokio::task::block_in_place(|| supervisor.adopt(table)) {
                Ok((started, elsewhere)) => {
                    eprintln!();
                    for id in &started {
                        println!(
                            "{id:<22} grpc {} (added to the table; started)",
                            supervisor.addr(*id).unwrap_or_default()
                        );
                    }
                    for cell in elsewhere {
                        println!("cell {cell}: added to the table with addresses off this machine; not started here");
                    }
                    if let Err(e) = record_addresses(supervisor) {
                        println!("could not record the new addresses: {e:#}");
                    }
                }
                Err(e) => return format!("starting the added cells failed: {e:#}"),
            }
        }
    }
    if let Some(table) = &status.table {
        let (mut done, gone) = match tokio::task::block_in_place(|| supervisor.follow_replicas(table)) {
            Ok(followed) => followed,
            Err(e) => return format!("following the table's replicas failed: {e:#}"),
        };
        for id in gone {
            // Only once the cell's leader no longer lists it.
            if left_its_cell(table, id).await {
                match tokio::task::block_in_place(|| supervisor.retire_left(id)) {
                    Ok(line) => done.push(line),
                    Err(e) => return format!("stopping {id} failed: {e:#}"),
                }
            }
        }
        if !done.is_empty() {
            eprintln!();
            for line in done {
                println!("{line}");
            }
            if let Err(e) = record_addresses(supervisor) {
                println!("could not record the new addresses: {e:#}");
            }
        }
    }
    let mut parts = vec![format!("router {} leads (term {})", status.leader_router_id, status.term)];
    for pair in &status.pairs {
        let Some(p) = &pair.pair else { continue };
        let mode = PairMode::try_from(p.mode).map(|m| m.as_str_name().trim_start_matches("PAIR_MODE_")).unwrap_or("?");
        let standby = if p.standby_cell_id == 0 { String::new() } else { format!("/{}", p.standby_cell_id) };
        parts.push(format!(
            "pair {}: cell {}{standby} {mode} e{} lag {}",
            p.pair_id, p.active_cell_id, p.epoch, pair.replication_lag_entries
        ));
    }
    let down = status.replicas.iter().filter(|r| !r.reachable).count();
    parts.push(format!("{down} replica(s) down"));
    parts.join(" | ")
}

/// Whether replica `id` is no member of its cell, as the cell's leader
/// (found among the table's addresses of the cell) says; false when no
/// leader answers.
async fn left_its_cell(table: &cellbank_proto::router::RoutingTable, id: cellbank::supervisor::ProcessId) -> bool {
    let cellbank::supervisor::ProcessId::Replica { cell, replica } = id else { return false };
    let addrs = cellbank_router::table::cell_addrs(table, cell);
    let Ok(leader) = tokio::time::timeout(Duration::from_secs(2), cellbank::hosts::leader_of(&addrs)).await else {
        return false;
    };
    leader.is_ok_and(|(_, status)| status.peers.iter().all(|p| p.replica_id != replica))
}

/// The file in a data directory that records the address of every process
/// of the cluster made there.
pub const ADDRESSES_FILE: &str = "addresses.txt";

/// Refuses to start a cluster's data under other addresses than it was
/// made with: the routing table and every cell's Raft address book hold
/// them, so processes moved to other ports would not find each other.
/// Records them on the first start.
fn addresses(supervisor: &Supervisor) -> String {
    supervisor.ids().into_iter().map(|id| format!("{id} {}\n", supervisor.addr(id).unwrap_or_default())).collect()
}

/// Records the addresses of every process the supervisor now runs (after
/// it adopted added cells).
fn record_addresses(supervisor: &Supervisor) -> anyhow::Result<()> {
    let path = supervisor.topology.data_dir.join(ADDRESSES_FILE);
    let tmp = path.with_extension("txt.tmp");
    std::fs::write(&tmp, addresses(supervisor))?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

fn check_addresses(supervisor: &Supervisor) -> anyhow::Result<()> {
    let dir = &supervisor.topology.data_dir;
    let path = dir.join(ADDRESSES_FILE);
    let now = addresses(supervisor);
    match std::fs::read_to_string(&path) {
        Ok(recorded) if recorded == now => Ok(()),
        Ok(recorded) if recorded.lines().all(|line| now.lines().any(|l| l == line)) => anyhow::bail!(
            "{} was made with fewer processes than this topology has; a cluster grows by `cellbank admin \
             add-pair` while it runs (this command then starts the new cells, now and at every start): start \
             with the topology it was made with, or delete the directory to start afresh",
            dir.display()
        ),
        Ok(recorded) => {
            let moved = recorded.lines().find(|line| !now.lines().any(|l| l == *line)).unwrap_or("a process");
            anyhow::bail!(
                "{} was made with other addresses than this topology's ({moved}, now elsewhere); moving a \
                 cluster's processes is not supported: start with the topology it was made with, or delete the \
                 directory to start afresh",
                dir.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A Raft log anywhere below: a cluster was made here before.
            let made_before = walk_for(dir, "rocksdb", 3);
            anyhow::ensure!(
                !made_before,
                "{} holds a cluster made by an older cellbank, whose processes took one port each (each now \
                 serves its client, peer and admin planes on three): delete the directory to start afresh",
                dir.display()
            );
            std::fs::write(&path, now)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a directory named `name` is under `dir`, at most `depth` down.
fn walk_for(dir: &std::path::Path, name: &str, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .any(|entry| entry.file_name() == name || (depth > 1 && walk_for(&entry.path(), name, depth - 1)))
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut topology = match args.pairs {
        Some(pairs) => Topology::local(pairs)?,
        None => load_topology(args.topology.as_ref())?,
    };
    if let Some(dir) = &args.data_dir {
        topology.data_dir = dir.clone();
    }
    topology.insecure |= args.insecure;
    std::fs::create_dir_all(&topology.data_dir)?;
    topology.data_dir = topology.data_dir.canonicalize()?;
    let token = topology.admin_token.clone();
    let mut supervisor = Supervisor::new(std::env::current_exe()?, topology)?;
    check_addresses(&supervisor)?;
    let topology = supervisor.topology.clone();
    println!(
        "cellbank local cluster: {} router(s), {} cell(s) in {} pair(s), {} process(es)",
        topology.routers.len(),
        topology.cells.len(),
        if topology.pairs.is_empty() { topology.cells.len() } else { topology.pairs.len() },
        supervisor.ids().len()
    );
    println!("data:      {} (kept between runs; delete it to start afresh)", topology.data_dir.display());
    if topology.insecure {
        println!("security:  INSECURE: no TLS, no identities; any local process may call anything");
    } else {
        println!(
            "security:  mutual TLS; certificates in {} (clients: --certs, default data/local/certs)",
            topology.certs_dir().display()
        );
    }
    supervisor.check_ports_free()?;
    supervisor.start_all()?;
    for id in supervisor.ids() {
        let metrics = supervisor.metrics_addr(id).map(|m| format!("  metrics http://{m}/metrics")).unwrap_or_default();
        println!("{id:<22} grpc {}{metrics}", supervisor.addr(id).unwrap_or_default());
    }
    println!("planes:    each process serves clients at its address, peers at port + 1, admin at port + 2");
    for pair in &topology.pairs {
        match pair.standby {
            Some(standby) => {
                println!("pair {}: cell {} active, cell {standby} its synchronous standby", pair.id, pair.active)
            }
            None => println!("pair {}: cell {} active, no standby", pair.id, pair.active),
        }
    }
    println!("logs:      <data>/router-N/process.log, <data>/cell-N/replica-N/process.log");
    let routers = supervisor.router_endpoints();
    let exe = std::env::current_exe()?;
    let exe = exe.display();
    println!("clients:   point them at the router(s): {}", routers.join(","));
    println!("try:       {exe} account open --user 1");
    println!("           {exe} deposit --user 1 --amount 10000");
    println!("           {exe} status");
    println!("           {exe} admin switchover --pair 1");
    if routers.first().map(String::as_str) != Some(crate::DEFAULT_ENDPOINTS) {
        println!("           (set CELLBANK_ENDPOINTS={} for this topology)", routers.join(","));
    }
    let default_certs = std::path::Path::new("data/local/certs").canonicalize().ok();
    if !topology.insecure && default_certs.as_deref() != Some(topology.certs_dir().as_path()) {
        println!("           (set CELLBANK_CERTS={} for this cluster)", topology.certs_dir().display());
    }
    if topology.insecure {
        println!("           (set CELLBANK_INSECURE=true for this cluster)");
    }
    println!("Ctrl-C stops the cluster.");
    let stop = crate::wait_for_signal();
    tokio::pin!(stop);
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticker.tick() => {
                let line = tick(&mut supervisor, token.as_deref()).await;
                eprint!("\r\x1b[2K{line}");
                if let Some(secs) = args.exit_after_secs {
                    if started.elapsed() >= Duration::from_secs(secs) {
                        break;
                    }
                }
            }
        }
    }
    eprintln!();
    let count = supervisor.ids().into_iter().filter(|id| supervisor.is_running(*id)).count();
    println!("stopping {count} process(es)...");
    tokio::task::block_in_place(|| supervisor.stop_all(STOP_GRACE));
    println!("stopped.");
    Ok(())
}
