//! `cellbank chaos`: run, check and halt drills (crate `cellbank-chaos`).
//! A local drill's cluster is started here, through the supervisor, on free
//! loopback ports with a fresh admin token; its data and logs stay in the
//! report directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank::supervisor::{Supervisor, Topology};
use cellbank_chaos::drill::{ClusterMode, Drill};
use cellbank_chaos::faults::{Access, Proc, Processes};
use cellbank_chaos::runner::{self, Cluster, RunOptions};
use serde::{Deserialize, Serialize};

#[derive(clap::Subcommand)]
pub enum ChaosAction {
    /// Run a drill; exits non-zero when any checker or expectation fails.
    Run {
        /// The drill file (see deploy/drills/).
        file: PathBuf,
        /// Replaces the file's seed (replay a report's run with its seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the journal, the HTML report and a local cluster's data go
        /// (default: chaos-reports/<drill>-<unix ms>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Attached drills: the admin token (else the variable the drill
        /// names, CELLBANK_ADMIN_TOKEN by default).
        #[arg(long, hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Parse and check drill files without running them.
    Check { files: Vec<PathBuf> },
    /// Stop every drill running on this machine: each heals everything
    /// it injected, writes its report and exits.
    Halt {
        /// How long to wait for the drills to finish healing.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
}

/// What `halt` needs to find a running drill.
#[derive(Serialize, Deserialize)]
struct Registration {
    pid: u32,
    drill: String,
    routers: Vec<String>,
    /// The throwaway token of a local drill's own cluster (attached drills
    /// store none: `halt` then reads the drill's variable).
    local_token: Option<String>,
    token_env: String,
    /// The cells the drill may touch (an attached drill's blast radius;
    /// empty: the whole local cluster).
    radius: Vec<u64>,
    /// A local drill's certificate directory: `halt` heals as its operator.
    #[serde(default)]
    local_certs: Option<PathBuf>,
}

fn registry_dir() -> PathBuf {
    std::env::temp_dir().join("cellbank-chaos")
}

struct Local {
    supervisor: Supervisor,
}

/// A local drill's processes as Prometheus file-based discovery targets
/// (`deploy/prometheus/prometheus.yml` reads `<temp dir>/cellbank-chaos/*.targets.json`),
/// under the jobs the alert rules and dashboards know, labelled with the drill.
fn prometheus_targets(drill: &str, supervisor: &Supervisor) -> serde_json::Value {
    use cellbank::supervisor::ProcessId;
    let ids = supervisor.ids();
    let group = |job: &str, routers: bool| {
        let targets: Vec<String> = ids
            .iter()
            .filter(|id| matches!(id, ProcessId::Router(_)) == routers)
            .filter_map(|id| supervisor.metrics_addr(*id))
            .collect();
        serde_json::json!({ "targets": targets, "labels": { "job": job, "drill": drill } })
    };
    serde_json::json!([group("cellbank-router", true), group("cellbank-replica", false)])
}

impl Processes for Local {
    fn kill(&mut self, p: Proc) -> anyhow::Result<()> {
        anyhow::ensure!(self.supervisor.ids().contains(&p), "no {p} in this cluster");
        self.supervisor.kill(p);
        Ok(())
    }

    fn start(&mut self, p: Proc) -> anyhow::Result<()> {
        self.supervisor.start(p)
    }

    fn start_with_env(&mut self, p: Proc, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.supervisor.start_with_env(p, env)
    }

    fn pause(&mut self, p: Proc, paused: bool) -> anyhow::Result<()> {
        anyhow::ensure!(self.supervisor.ids().contains(&p), "no {p} in this cluster");
        self.supervisor.pause(p, paused);
        Ok(())
    }

    fn all(&self) -> Vec<Proc> {
        self.supervisor.ids()
    }

    fn is_running(&self, p: Proc) -> bool {
        self.supervisor.is_running(p)
    }

    fn reap_exited(&mut self) -> Vec<Proc> {
        self.supervisor.exited().into_iter().map(|(id, _)| id).collect()
    }

    fn stop_all(&mut self) {
        self.supervisor.stop_all(Duration::from_secs(5));
    }

    fn plan_pair(
        &self,
        table: &cellbank_proto::router::RoutingTable,
    ) -> anyhow::Result<cellbank_proto::router::AddPair> {
        use cellbank_proto::router::CellReplicas;
        let pair_id = table.pairs.iter().map(|p| p.pair_id).max().unwrap_or(0) + 1;
        let cell_id = table.cells.iter().map(|c| c.cell_id).max().unwrap_or(0) + 1;
        let cell = |cell_id: u64| CellReplicas {
            cell_id,
            replicas: (0..3).map(|_| format!("127.0.0.1:{}", cellbank::supervisor::free_port())).collect(),
        };
        Ok(cellbank_proto::router::AddPair { pair_id, active: Some(cell(cell_id)), standby: Some(cell(cell_id + 1)) })
    }

    fn adopt(&mut self, table: &cellbank_proto::router::RoutingTable) -> anyhow::Result<Vec<Proc>> {
        let (started, elsewhere) = self.supervisor.adopt(table)?;
        anyhow::ensure!(elsewhere.is_empty(), "cells {elsewhere:?} are not on this machine");
        Ok(started)
    }
}

fn load(path: &Path) -> anyhow::Result<Drill> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Drill::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub async fn run(action: ChaosAction) -> anyhow::Result<()> {
    match action {
        ChaosAction::Check { files } => {
            anyhow::ensure!(!files.is_empty(), "name at least one drill file");
            let mut failed = 0;
            for file in &files {
                match load(file) {
                    Ok(drill) => println!("{}: ok ({}, {} step(s))", file.display(), drill.name, drill.method.len()),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{e}");
                    }
                }
            }
            anyhow::ensure!(failed == 0, "{failed} drill file(s) have errors");
            Ok(())
        }
        ChaosAction::Halt { wait_secs } => halt(Duration::from_secs(wait_secs)).await,
        ChaosAction::Run { file, seed, out, admin_token } => {
            let drill = load(&file)?;
            let seed = seed.unwrap_or(drill.seed);
            let out = out.unwrap_or_else(|| {
                PathBuf::from("chaos-reports").join(format!("{}-{}", drill.name, cellbank_client::clock::unix_ms()))
            });
            let passed = run_drill(&file, drill, seed, &out, admin_token).await?;
            if !passed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn run_drill(
    file: &Path,
    drill: Drill,
    seed: u64,
    out: &Path,
    admin_token: Option<String>,
) -> anyhow::Result<bool> {
    let mut local_certs = None;
    let (cluster, local_token, targets) = match drill.cluster.mode {
        ClusterMode::Attach => {
            let token =
                admin_token.or_else(|| std::env::var(&drill.cluster.admin_token_env).ok()).filter(|t| !t.is_empty());
            let Some(token) = token else {
                anyhow::bail!(
                    "an attached drill needs admin credentials: set {} or pass --admin-token; nothing was injected",
                    drill.cluster.admin_token_env
                );
            };
            let access = Access { routers: drill.cluster.router_addrs.clone(), token: Some(token) };
            (Cluster { access, processes: None, logs: None }, None, None)
        }
        ClusterMode::Local => {
            let data = out.join("cluster");
            std::fs::create_dir_all(&data)?;
            let data = data.canonicalize()?;
            let c = &drill.cluster;
            let mut topology = Topology::on_free_ports(&data, c.routers, c.pairs, c.replicas, c.standby);
            let token = format!("drill-{:016x}", rand::random::<u64>());
            topology.admin_token = Some(token.clone());
            topology.fault_injection = true;
            // Every process serves metrics, so that Prometheus can watch
            // the drill (see `prometheus_targets`).
            for process in
                topology.routers.iter_mut().chain(topology.cells.iter_mut().flat_map(|c| c.replicas.iter_mut()))
            {
                process.metrics = Some(format!("127.0.0.1:{}", cellbank::supervisor::free_port()));
            }
            local_certs = Some(topology.certs_dir());
            let mut supervisor = Supervisor::new(std::env::current_exe()?, topology)?;
            supervisor.check_ports_free()?;
            supervisor.start_all()?;
            eprintln!("local cluster: {} processes, data and logs in {}", supervisor.ids().len(), data.display());
            let access = Access { routers: supervisor.router_endpoints(), token: Some(token.clone()) };
            let logs = Some(data.display().to_string());
            let targets = prometheus_targets(&drill.name, &supervisor);
            (Cluster { access, processes: Some(Box::new(Local { supervisor })), logs }, Some(token), Some(targets))
        }
    };
    std::fs::create_dir_all(registry_dir())?;
    let registration_path = registry_dir().join(format!("{}.json", std::process::id()));
    let registration = Registration {
        pid: std::process::id(),
        drill: drill.name.clone(),
        routers: cluster.access.routers.clone(),
        local_token,
        token_env: drill.cluster.admin_token_env.clone(),
        radius: if drill.cluster.mode == ClusterMode::Attach { drill.cluster.blast_radius.clone() } else { Vec::new() },
        local_certs,
    };
    write_private(&registration_path, &serde_json::to_vec(&registration)?)?;
    let targets_path = registry_dir().join(format!("{}.targets.json", std::process::id()));
    if let Some(targets) = &targets {
        std::fs::write(&targets_path, serde_json::to_vec_pretty(targets)?)?;
    }
    let halt = Arc::new(AtomicBool::new(false));
    let watcher = {
        let halt = halt.clone();
        tokio::spawn(async move {
            crate::wait_for_signal().await;
            eprintln!("halting: healing everything, then writing the report");
            halt.store(true, Ordering::Relaxed);
        })
    };
    let options = RunOptions { seed, replay: format!("cellbank chaos run {} --seed {seed}", file.display()), halt };
    let outcome = runner::run(&drill, &options, cluster, &runner::Stdout).await;
    watcher.abort();
    let _ = std::fs::remove_file(&registration_path);
    let _ = std::fs::remove_file(&targets_path);
    let journal = outcome?;
    let (json, html) = cellbank_chaos::report::write(&journal, out)?;
    print!("{}", cellbank_chaos::report::summary(&journal));
    println!("  journal: {}\n  report:  {}", json.display(), html.display());
    Ok(journal.passed())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    Ok(())
}

/// True while `pid` is a `cellbank chaos run` (a pid left in a stale
/// registration may have been reused by another program).
fn alive(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"chaos" && w[1] == b"run")
}

async fn halt(wait: Duration) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(registry_dir()) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect::<Vec<_>>(),
        Err(_) => Vec::new(),
    };
    let mut found = 0;
    for path in entries {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let Ok(registration) = serde_json::from_slice::<Registration>(&bytes) else { continue };
        found += 1;
        if alive(registration.pid) {
            println!("halting drill {} (pid {})", registration.drill, registration.pid);
            // SAFETY: SIGTERM to the drill runner that registered itself.
            unsafe {
                libc::kill(registration.pid as i32, libc::SIGTERM);
            }
            let started = Instant::now();
            while alive(registration.pid) && started.elapsed() < wait {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !alive(registration.pid) {
                println!("drill {} healed and stopped", registration.drill);
                continue;
            }
            eprintln!("drill {} did not stop in {wait:?}; healing its cluster from here", registration.drill);
        }
        // The runner is gone: heal what it may have left behind.
        if let Some(dir) = &registration.local_certs {
            let operator = cellbank_client::tls::TlsPaths::in_dir(dir, "operator-admin");
            match cellbank_client::tls::Credentials::load(operator) {
                Ok(credentials) => cellbank_client::tls::use_credentials(Some(credentials)),
                Err(e) => eprintln!("drill {}: its certificates do not load ({e})", registration.drill),
            }
        }
        let token = registration.local_token.clone().or_else(|| std::env::var(&registration.token_env).ok());
        let access = Access { routers: registration.routers.clone(), token };
        let healed = heal_cluster(&access, &registration.radius).await;
        println!("drill {}: {healed}", registration.drill);
        let _ = std::fs::remove_file(&path);
    }
    if found == 0 {
        println!("no drill is running on this machine");
    }
    Ok(())
}

/// Heals the fault points of every replica in `radius` (every replica when
/// empty: a local cluster, whose router isolation is cleared too; on an
/// attached cluster an isolation expires on its own).
async fn heal_cluster(access: &Access, radius: &[u64]) -> String {
    let table = match access.table().await {
        Ok(table) => table,
        Err(e) => return format!("cluster unreachable ({e}); its fault points expire on their own"),
    };
    if radius.is_empty() {
        let _ = access.clear_isolation().await;
    }
    let mut healed = 0;
    let mut failed = Vec::new();
    let inside = table.cells.iter().filter(|c| radius.is_empty() || radius.contains(&c.cell_id));
    for addr in inside.flat_map(|c| c.replicas.clone()) {
        match access.heal(&addr).await {
            Ok(_) => healed += 1,
            Err(e) => failed.push(format!("{addr}: {e}")),
        }
    }
    if failed.is_empty() {
        format!("healed {healed} replica(s) and cleared router isolation")
    } else {
        format!("healed {healed} replica(s); could not reach {}", failed.join("; "))
    }
}
