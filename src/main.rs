//! `cellbank`: one binary for every role.
//!
//! - `cell`: run one replica of a cell.
//! - `router`: run one router (front door, routing table, coordinator).
//! - `up`: run a local cluster from a topology file, in the foreground.
//! - `status`: routers, pairs, slices and every replica's health (through a
//!   router), or one cell's replicas (given cell endpoints).
//! - `account`, `deposit`, `withdraw`, `transfer`, `balance`, `history`,
//!   `get-transfer`, `envelope`: human-friendly client commands.
//! - `admin`: switchover, failover, standby rebuild, audit log,
//!   reconciliation, settlement figures (routers); membership changes,
//!   leader transfer, ledger digests (cells).
//! - `bench`: drive a running cluster and report throughput and latency.
//! - `chaos`: run, check and halt chaos drills (deploy/drills/).
//! - `sim`: the deterministic simulator of the failover and money protocol.

// tonic::Status is the error type of every client call here.
#![allow(clippy::result_large_err)]

mod bench;
mod certs_cli;
mod chaos;
mod cluster;
mod commands;
mod envelope_bench;
mod failover_bench;
mod move_bench;
mod otlp;
mod output;
mod reconciler;
mod sim;
mod up;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The local cluster's router: clients talk to routers only.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7000";

#[derive(Parser)]
#[command(
    name = "cellbank",
    version = VERSION,
    about = "A cell-based transaction engine: Raft-replicated RocksDB ledgers behind gRPC."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CELLBANK_LOG_FORMAT")]
    log_format: LogFormat,
    /// How commands print state: `text` for people, `json` for scripts
    /// (status, balance, history, get-transfer, envelope, admin audit,
    /// digest, settlement, reconcile, capacity status and plan).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = output::Output::Text)]
    output: output::Output,
    /// A router or replica exports its sampled traces to this OTLP/gRPC
    /// collector (`http://host:4317`); without it, traces are in the logs only.
    #[arg(long, global = true, env = "CELLBANK_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    tls: ClientTls,
    #[command(subcommand)]
    command: Command,
}

/// How a client command proves who it is.
#[derive(clap::Args, Clone)]
pub struct ClientTls {
    /// Directory of the cluster's certificates (`cellbank up` and
    /// `cellbank certs init` make them in `<data>/certs`).
    #[arg(long, global = true, env = "CELLBANK_CERTS", default_value = "data/local/certs")]
    certs: PathBuf,
    /// The certificate to call with: its file stem in the certificate
    /// directory (`service-cli`, `operator-admin`, ...). By default
    /// `admin`, `status`, `bench` and `chaos` use `operator-admin`, the
    /// money commands `service-cli`.
    #[arg(long, global = true, env = "CELLBANK_IDENTITY")]
    identity: Option<String>,
    /// Call without TLS (a cluster started with `insecure = true`).
    #[arg(long, global = true, env = "CELLBANK_INSECURE")]
    insecure: bool,
}

impl ClientTls {
    /// Installs the credentials this command calls with: `identity`'s,
    /// or `default_stem`'s.
    fn install(&self, default_stem: &str) -> anyhow::Result<()> {
        if self.insecure {
            cellbank_client::tls::use_credentials(None);
            return Ok(());
        }
        let stem = self.identity.as_deref().unwrap_or(default_stem);
        let paths = cellbank_client::tls::TlsPaths::in_dir(&self.certs, stem);
        if !paths.cert.exists() {
            anyhow::bail!(
                "no certificate {} (start a local cluster with `cellbank up`, which makes them; give --certs DIR \
                 and --identity STEM for another cluster; --insecure for a cluster without TLS)",
                paths.cert.display()
            );
        }
        let credentials = cellbank_client::tls::Credentials::load(paths)?;
        cellbank_client::tls::use_credentials(Some(credentials));
        Ok(())
    }
}

/// The version line: says whether fault points are compiled in.
#[cfg(feature = "fault-points")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (fault points: compiled in; not for production)");
#[cfg(not(feature = "fault-points"))]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (fault points: not compiled in)");

#[derive(clap::Args, Clone)]
pub struct Endpoints {
    /// Router (or, for cell commands, replica) gRPC addresses, comma-separated.
    #[arg(long, env = "CELLBANK_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, value_delimiter = ',')]
    pub endpoints: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one replica of a cell.
    Cell(CellArgs),
    /// Run one router: the client front door, a member of the routing table's group.
    Router(RouterArgs),
    /// Run a local cluster (a router, two active cells and their standbys by default) in the foreground.
    Up(up::UpArgs),
    /// Show routers, pairs, replication lag, slices and each replica's health
    /// (given a router), or one cell's replicas (given replica endpoints).
    Status {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long, env = "CELLBANK_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Open an account.
    Account {
        #[command(subcommand)]
        action: commands::AccountAction,
    },
    /// Move money into a user's account from the cell's settlement account.
    Deposit(commands::MoveArgs),
    /// Move money out of a user's account to the cell's settlement account.
    Withdraw(commands::MoveArgs),
    /// Move money between two users.
    Transfer(commands::TransferArgs),
    /// Show an account's balance (a linearizable read).
    Balance(commands::AccountArgs),
    /// Show an account's movements, oldest first.
    History(commands::HistoryArgs),
    /// Show one transfer by its id (cross-cell: whether it reached the recipient).
    GetTransfer(commands::GetTransferArgs),
    /// Red envelopes: send, grab, show.
    Envelope {
        #[command(subcommand)]
        action: commands::EnvelopeAction,
    },
    /// Operator actions on a cell.
    Admin {
        #[command(subcommand)]
        action: commands::AdminAction,
    },
    /// Drive a running cluster and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Chaos drills: run one (local or attached cluster), check files, halt.
    Chaos {
        #[command(subcommand)]
        action: chaos::ChaosAction,
    },
    /// Run the deterministic simulator over many seeds, or replay one.
    Sim(sim::SimArgs),
    /// Capacity planning: what each pair and slice holds and carries.
    Capacity {
        #[command(subcommand)]
        action: CapacityAction,
    },
    /// Certificates: the cluster CA and one per process, service and operator.
    Certs {
        #[command(subcommand)]
        action: certs_cli::CertsAction,
    },
}

#[derive(Subcommand)]
enum CapacityAction {
    /// Per pair: slices, user accounts, balances, stored bytes, writes and
    /// requests per second; then the hottest slices.
    Status {
        #[command(flatten)]
        endpoints: Endpoints,
        /// How long to measure rates over.
        #[arg(long, default_value_t = 2000)]
        window_ms: u64,
        /// How many of the hottest slices to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print the whole report as JSON (the same as `-o json`).
        #[arg(long)]
        json: bool,
    },
    /// Propose slice moves that even the load (writes the routers counted;
    /// accounts when there were none) with few bytes moved; `--apply` runs
    /// them one slice at a time, each in the routers' audit log.
    Plan {
        #[command(flatten)]
        endpoints: Endpoints,
        #[command(flatten)]
        auth: cluster::AdminAuth,
        /// The pairs to spread the load over (comma-separated); slices of
        /// other pairs leave them.
        #[arg(long, value_delimiter = ',', conflicts_with = "after_add_pair")]
        target_pairs: Vec<u64>,
        /// Spread the load over every pair, pair P (just added) included.
        #[arg(long)]
        after_add_pair: Option<u64>,
        /// How long to measure rates over.
        #[arg(long, default_value_t = 2000)]
        window_ms: u64,
        /// How far above the mean a pair may stay (a fraction).
        #[arg(long, default_value_t = 0.05)]
        tolerance: f64,
        /// Most moves in the plan.
        #[arg(long, default_value_t = 64)]
        max_moves: usize,
        /// Run the plan.
        #[arg(long)]
        apply: bool,
        /// With --apply: stop after a move that kept its slice frozen longer.
        #[arg(long, default_value_t = 1000)]
        max_freeze_ms: u64,
        /// With --apply: the pause between moves (gentler during a peak).
        #[arg(long, default_value_t = 500)]
        pause_ms: u64,
        /// Print JSON (the same as `-o json`).
        #[arg(long)]
        json: bool,
    },
}

async fn capacity(action: CapacityAction) -> anyhow::Result<()> {
    match action {
        CapacityAction::Plan {
            endpoints,
            auth,
            target_pairs,
            after_add_pair,
            window_ms,
            tolerance,
            max_moves,
            apply,
            max_freeze_ms,
            pause_ms,
            json,
        } => {
            let json = json || output::json();
            let report =
                cellbank::capacity::gather(&endpoints.endpoints, std::time::Duration::from_millis(window_ms)).await?;
            let status = cellbank::routers::ClusterClient::new(&endpoints.endpoints, auth.admin_token.as_deref())
                .status()
                .await?;
            let table = status.table.unwrap_or_default();
            let known: Vec<u64> = table.pairs.iter().map(|p| p.pair_id).collect();
            let targets = match (after_add_pair, target_pairs.is_empty()) {
                (Some(pair), true) => {
                    anyhow::ensure!(known.contains(&pair), "--after-add-pair: no pair {pair} (pairs: {known:?})");
                    known.clone()
                }
                (None, false) => {
                    if let Some(unknown) = target_pairs.iter().find(|p| !known.contains(p)) {
                        anyhow::bail!("--target-pairs: no pair {unknown} (pairs: {known:?})");
                    }
                    target_pairs
                }
                _ => anyhow::bail!("give --target-pairs or --after-add-pair"),
            };
            anyhow::ensure!((0.0..1.0).contains(&tolerance), "--tolerance is a fraction below 1");
            let plan = cellbank::capacity::plan(&report.slices, &table.slice_pair, &targets, tolerance, max_moves);
            if json && !apply {
                println!("{}", serde_json::to_string_pretty(&plan)?);
                return Ok(());
            }
            if !json {
                print!("{}", cellbank::capacity::render_plan(&plan));
            }
            if !apply {
                if !plan.moves.is_empty() {
                    println!("(a plan only: --apply runs it, one slice at a time)");
                }
                return Ok(());
            }
            let why = if auth.why.is_empty() { "capacity plan".to_string() } else { auth.why.clone() };
            let done = cellbank::capacity::apply_plan(
                &endpoints.endpoints,
                &plan,
                &auth.who,
                &why,
                std::time::Duration::from_millis(max_freeze_ms),
                std::time::Duration::from_millis(pause_ms),
                !json,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&done.iter().map(|d| &d.detail).collect::<Vec<_>>())?);
            } else {
                let worst = done.iter().map(|d| d.freeze_ms).max().unwrap_or(0);
                println!("{} slice(s) moved; the longest freeze {worst} ms", done.len());
            }
            Ok(())
        }
        CapacityAction::Status { endpoints, window_ms, top, json } => {
            let report =
                cellbank::capacity::gather(&endpoints.endpoints, std::time::Duration::from_millis(window_ms)).await?;
            if json || output::json() {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", cellbank::capacity::render(&report, top));
            }
            Ok(())
        }
    }
}

#[derive(clap::Args)]
struct RouterArgs {
    /// TOML config file (see deploy/production/router.toml).
    #[arg(long)]
    config: PathBuf,
}

async fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let config = cellbank_router::config::RouterConfig::from_toml(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    abort_on_panic();
    cellbank_raft::faults::inject_from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
    let router = cellbank_router::server::start(config).await?;
    wait_for_signal().await;
    tracing::info!("stopping on signal");
    router.stop().await;
    Ok(())
}

#[derive(clap::Args)]
struct CellArgs {
    /// TOML config file; flags below are used when it is absent.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    cell_id: u64,
    #[arg(long, default_value_t = 1)]
    replica_id: u64,
    #[arg(long, default_value = "127.0.0.1:7110")]
    listen: SocketAddr,
    /// The address the other processes reach this replica at (HOST:PORT, a
    /// host name allowed), when not --listen: behind NAT, in a container,
    /// bound to 0.0.0.0. Default: this replica's --peer entry, else --listen.
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[arg(long, default_value = "data/cell-1/replica-1")]
    data_dir: PathBuf,
    /// Founding members as ID=HOST:PORT (repeat, or comma-separate).
    #[arg(long = "peer", value_delimiter = ',')]
    peers: Vec<String>,
    /// Compact the Raft log once it holds this many applied entries.
    #[arg(long)]
    log_compact_threshold_entries: Option<u64>,
    /// Applied entries kept after compaction.
    #[arg(long)]
    log_retain_entries: Option<u64>,
    /// A router's client address, through which cross-cell credits leave
    /// (repeat, or comma-separate).
    #[arg(long = "router", value_delimiter = ',')]
    routers: Vec<String>,
    /// Directory of the cluster's certificates: this replica uses
    /// `ca.pem`, `cell-<C>-replica-<R>.pem` and `.key` there.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Run without TLS (never in production).
    #[arg(long)]
    insecure: bool,
    /// The cluster's name (in certificates and in every peer message).
    #[arg(long, default_value = cellbank_client::tls::DEFAULT_CLUSTER)]
    cluster: String,
    /// Below this many free bytes on the data disk, refuse writes.
    #[arg(long, default_value_t = cellbank_cell::config::MIN_FREE_BYTES_DEFAULT)]
    min_free_bytes: u64,
}

fn parse_peers(peers: &[String]) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut map = BTreeMap::new();
    for peer in peers {
        let (id, addr) = peer.split_once('=').with_context(|| format!("peer {peer:?} is not ID=HOST:PORT"))?;
        map.insert(id.parse().with_context(|| format!("peer id {id:?}"))?, addr.to_string());
    }
    Ok(map)
}

fn cell_config(args: CellArgs) -> anyhow::Result<cellbank_cell::config::ReplicaConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            cellbank_cell::config::ReplicaConfig::from_toml(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => cellbank_cell::config::ReplicaConfig {
            cell_id: args.cell_id,
            replica_id: args.replica_id,
            listen: args.listen,
            advertise: args.advertise,
            metrics_listen: args.metrics_listen,
            data_dir: args.data_dir,
            peers: parse_peers(&args.peers)?,
            raft: Default::default(),
            routers: args.routers,
            admin_token: None,
            tls: args.tls_dir.as_deref().map(|dir| {
                cellbank_client::tls::TlsPaths::in_dir(
                    dir,
                    &format!("cell-{}-replica-{}", args.cell_id, args.replica_id),
                )
            }),
            insecure: args.insecure,
            cluster: args.cluster,
            min_free_bytes: args.min_free_bytes,
        },
    };
    if let Some(threshold) = args.log_compact_threshold_entries {
        config.raft.log_compact_threshold_entries = threshold;
    }
    if let Some(retain) = args.log_retain_entries {
        config.raft.log_retain_entries = retain;
    }
    config.check()?;
    Ok(config)
}

async fn run_cell(args: CellArgs) -> anyhow::Result<()> {
    let config = cell_config(args)?;
    abort_on_panic();
    cellbank_raft::faults::inject_from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
    let replica = cellbank_cell::server::start(config).await?;
    wait_for_signal().await;
    tracing::info!("stopping on signal");
    replica.stop().await;
    Ok(())
}

/// A client command piped into `head` ends quietly when the pipe closes,
/// as command-line tools do: SIGPIPE ends the process when it is stdout
/// that broke. A SIGPIPE from a socket (a server that closed the
/// connection, such as a TLS server refusing a plaintext client) is
/// ignored, and the call sees the error. (Servers, and `up` with its
/// children, ignore SIGPIPE altogether.)
fn end_quietly_when_stdout_closes() {
    extern "C" fn on_sigpipe(_: libc::c_int) {
        let mut stdout = libc::pollfd { fd: libc::STDOUT_FILENO, events: 0, revents: 0 };
        // SAFETY: poll and _exit are async-signal-safe; one valid pollfd.
        unsafe {
            if libc::poll(&mut stdout, 1, 0) > 0 && stdout.revents & libc::POLLERR != 0 {
                libc::_exit(128 + libc::SIGPIPE);
            }
        }
    }
    // SAFETY: installing a handler before any thread starts; the handler
    // only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGPIPE, on_sigpipe as *const () as libc::sighandler_t);
    }
}

/// A replica whose Raft thread panicked (a failed write, a corrupt entry)
/// must not keep serving: the whole process stops, loudly, and a supervisor
/// restarts it from its durable state.
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("fatal: a replica thread panicked; aborting the process");
        std::process::abort();
    }));
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

/// Logs to stderr (text or JSON), and with `otlp` (endpoint, service
/// name) spans to an OTLP collector too, from a task on `runtime`.
fn init_logging(
    format: LogFormat,
    default_level: &str,
    otlp: Option<(&str, &str)>,
    runtime: Option<&tokio::runtime::Runtime>,
) -> anyhow::Result<Option<otlp::Exporter>> {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let (exporting, exporter) = match (otlp, runtime) {
        (Some((endpoint, service)), Some(runtime)) => {
            let _inside = runtime.enter();
            let (layer, exporter) =
                otlp::layer(endpoint, service).with_context(|| format!("--otlp-endpoint {endpoint}"))?;
            (Some(layer), Some(exporter))
        }
        _ => (None, None),
    };
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(exporting).with(filter);
    if format == LogFormat::Json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    Ok(exporter)
}

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Cell(_) | Command::Router(_) => "info,raft=warn",
        // The simulator runs the cells' code: their logs would drown the summary.
        Command::Sim(_) => "off",
        _ => "warn",
    };
    // The runtime comes first: an OTLP exporter sends from a task on it.
    let runtime = (!matches!(cli.command, Command::Sim(_)))
        .then(|| tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime"));
    let service = match cli.command {
        Command::Cell(_) => Some("cellbank-replica"),
        Command::Router(_) => Some("cellbank-router"),
        _ => None,
    };
    let otlp = cli.otlp_endpoint.as_deref().zip(service);
    let exporter = match init_logging(cli.log_format, default_level, otlp, runtime.as_ref()) {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("error: {}", describe_error(&error));
            std::process::exit(1);
        }
    };
    output::set(cli.output);
    if let Command::Sim(args) = cli.command {
        // Plain threads, no runtime: the simulator is single-threaded per seed.
        if let Err(error) = sim::run(args) {
            eprintln!("error: {}", describe_error(&error));
            std::process::exit(1);
        }
        return;
    }
    if !matches!(cli.command, Command::Cell(_) | Command::Router(_) | Command::Up(_)) {
        end_quietly_when_stdout_closes();
    }
    let credentials = match &cli.command {
        // Servers read theirs from their configs; `up` and local drills
        // make their cluster's; the simulator and `certs` call no one.
        Command::Cell(_) | Command::Router(_) | Command::Up(_) | Command::Sim(_) | Command::Certs { .. } => Ok(()),
        // A local drill runs its own cluster with its own certificates; an
        // attached one calls with the operator's, when there are any.
        Command::Chaos { .. } if !cli.tls.insecure && cli.tls.identity.is_none() => {
            let operator = cellbank_client::tls::TlsPaths::in_dir(&cli.tls.certs, "operator-admin");
            if operator.cert.exists() {
                cli.tls.install("operator-admin")
            } else {
                Ok(())
            }
        }
        // The bench reads the routing table (an operator's call) to place its load.
        Command::Status { .. }
        | Command::Admin { .. }
        | Command::Chaos { .. }
        | Command::Bench(_)
        | Command::Capacity { .. } => cli.tls.install("operator-admin"),
        _ => cli.tls.install("service-cli"),
    };
    if let Err(error) = credentials {
        eprintln!("error: {}", describe_error(&error));
        std::process::exit(1);
    }
    let runtime = runtime.expect("a runtime for every command but sim");
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Cell(args) => run_cell(args).await,
            Command::Router(args) => run_router(args).await,
            Command::Up(args) => up::run(args).await,
            Command::Status { endpoints, admin_token } => {
                if cluster::status(&endpoints, admin_token.as_deref()).await? {
                    Ok(())
                } else {
                    commands::status(&endpoints.endpoints).await
                }
            }
            Command::Account { action } => commands::account(action).await,
            Command::Deposit(args) => commands::deposit(args, false).await,
            Command::Withdraw(args) => commands::deposit(args, true).await,
            Command::Transfer(args) => commands::transfer(args).await,
            Command::Balance(args) => commands::balance(args).await,
            Command::History(args) => commands::history(args).await,
            Command::GetTransfer(args) => commands::get_transfer(args).await,
            Command::Envelope { action } => commands::envelope(action).await,
            Command::Admin { action } => commands::admin(action).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Chaos { action } => chaos::run(action).await,
            Command::Sim(_) => unreachable!("run before the runtime starts"),
            Command::Capacity { action } => capacity(action).await,
            Command::Certs { action } => certs_cli::run(action),
        }
    });
    // Batched spans go out before the process ends.
    if let Some(exporter) = exporter {
        let _inside = runtime.enter();
        exporter.shutdown();
    }
    if let Err(error) = outcome {
        eprintln!("error: {}", describe_error(&error));
        std::process::exit(1);
    }
}

/// One line for a person: a gRPC status as `CODE: message`, anything else
/// with its chain of causes.
fn describe_error(error: &anyhow::Error) -> String {
    if let Some(status) = error.downcast_ref::<tonic::Status>() {
        return format!("{:?}: {}", status.code(), status.message());
    }
    format!("{error:#}")
}
