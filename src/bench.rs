//! `cellbank bench`: drives a running cluster (through its routers) or a
//! single cell and reports throughput and latency (HDR histogram: p50, p99,
//! p99.9, max).
//!
//! Workloads (`--workload`):
//! - `same-cell` (default): every transfer pairs two users of one cell (the
//!   bench reads the routing table);
//! - `cross-cell`: a fraction (`--cross-fraction`) of transfers go between
//!   users of different cells. Besides the client's latency (the sender's
//!   cell has debited and recorded the outbox entry), it reports how long
//!   cross-cell money took to reach the recipient: after the run it reads
//!   the transfers back and takes `credited_at_ms` (the destination's clock)
//!   minus the send time (same host clock);
//! - `envelopes`: see `envelope_bench.rs`.
//!
//! - closed loop (`--concurrency N`): N workers, each sends its next request
//!   when the previous one answers;
//! - open loop (`--rate R`): R requests per second on a fixed schedule;
//!   latency is measured from the scheduled send time, so a stall shows up
//!   in the figures instead of hiding (no coordinated omission).
//!
//! `--api unary` sends one `Transfer` per request; `--api batch` sends
//! `SubmitTransfers` of `--batch-size` transfers; `--api coalesced` sends
//! one transfer per request through the client crate's opt-in coalescer
//! (concurrent requests leave as `SubmitTransfers` calls). Throughput is counted in
//! transfers applied with result OK.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank_client::CellClient;
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::*;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

use crate::Endpoints;

/// Cross-cell transfers whose arrival is read back after a run.
const CROSS_SAMPLES_MAX: usize = 200_000;

/// Most requests in flight in open-loop mode before the generator counts
/// the rest as missed.
const OPEN_LOOP_IN_FLIGHT_MAX: u64 = 20_000;
/// Money each benchmark account starts with (minor units).
const SEED_BALANCE: u64 = 1_000_000_000_000;
/// gRPC connections to the leader.
const CONNECTIONS: usize = 4;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// `load` drives a running cluster; `failover` starts its own local
    /// cluster and measures failover, leader-kill and switchover times;
    /// `move-slice` moves slices between two pairs of a running cluster
    /// under load and measures each slice's freeze.
    #[arg(long, default_value = "load")]
    scenario: String,
    /// Failover scenario: runs of each measurement; move-slice: slices moved.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Failover scenario: data directory of its cluster (a temporary one when absent).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// `unary` (Transfer), `batch` (SubmitTransfers), or `coalesced` (one
    /// transfer per request through the client's opt-in coalescer).
    #[arg(long, default_value = "unary")]
    api: String,
    /// Transfers per SubmitTransfers call.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Closed loop with this many concurrent requests.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Open loop at this many requests per second (overrides --concurrency).
    #[arg(long)]
    rate: Option<u64>,
    /// Distinct accounts transfers move between.
    #[arg(long, default_value_t = 10_000)]
    accounts: u64,
    /// First user id of the benchmark's accounts.
    #[arg(long, default_value_t = 1_000_000)]
    first_user: u64,
    #[arg(long, default_value = "CNY")]
    pub currency: String,
    /// Measured seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Unmeasured seconds before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Random seed for the account pairs (printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `same-cell`, `cross-cell` or `envelopes`.
    #[arg(long, default_value = "same-cell")]
    pub workload: String,
    /// cross-cell: the fraction of transfers between cells.
    #[arg(long, default_value_t = 1.0)]
    cross_fraction: f64,
    /// envelopes: distinct grabbers of the hot envelope (and its shares).
    #[arg(long, default_value_t = 10_000)]
    pub hot_shares: u32,
    /// envelopes: ordinary envelopes sent by users of every cell before the hot one.
    #[arg(long, default_value_t = 50)]
    pub envelopes: u32,
    /// envelopes: shares of each ordinary envelope.
    #[arg(long, default_value_t = 200)]
    pub shares: u32,
}

#[derive(Default)]
struct Tally {
    transfers_ok: AtomicU64,
    transfers_other: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    missed: AtomicU64,
}

#[derive(Serialize)]
struct Report {
    workload: String,
    api: String,
    mode: String,
    concurrency: usize,
    rate: Option<u64>,
    batch_size: usize,
    accounts: u64,
    seed: u64,
    duration_s: f64,
    transfers_ok: u64,
    transfers_per_s: f64,
    requests: u64,
    requests_per_s: f64,
    other_results: u64,
    errors: u64,
    missed_schedule: u64,
    latency_ms: BTreeMap<String, f64>,
    error_samples: Vec<String>,
    /// cross-cell: transfers between cells that were OK, and how long their
    /// money took to reach the recipient (send to credit, ms).
    cross_cell_ok: u64,
    reach_checked: u64,
    reach_not_yet_credited: u64,
    reach_ms: BTreeMap<String, f64>,
}

/// Where the load goes: the routers (with the routing table), or one cell's leader.
enum Target {
    Routers { endpoints: Vec<String>, table: cellbank_proto::router::RoutingTable },
    Cell { leader: String },
}

async fn find_target(endpoints: &[String]) -> anyhow::Result<Target> {
    for attempt in 0..50 {
        match cellbank::routers::ClusterClient::new(endpoints, None).status().await {
            Ok(status) => {
                let table = status.table.unwrap_or_default();
                if table.slice_count > 0 {
                    return Ok(Target::Routers { endpoints: endpoints.to_vec(), table });
                }
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Ok(Target::Cell { leader: leader_endpoint(endpoints).await? });
            }
            Err(_) => {}
        }
        if attempt == 0 {
            eprintln!("waiting for the routing table...");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no router among {endpoints:?} has a routing table")
}

async fn leader_endpoint(endpoints: &[String]) -> anyhow::Result<String> {
    let client = CellClient::new(endpoints.to_vec());
    let (_, status) = client.wait_for_leader(Duration::from_secs(10)).await?;
    Ok(status.addr)
}

async fn seed_accounts(client: &CellClient, args: &BenchArgs, run: u64) -> anyhow::Result<()> {
    let users: Vec<u64> = (args.first_user..args.first_user + args.accounts).collect();
    let progress = indicatif::ProgressBar::new(users.len() as u64);
    progress
        .set_style(indicatif::ProgressStyle::with_template("seeding accounts {bar:40} {pos}/{len}").expect("template"));
    let client = Arc::new(client);
    let mut tasks = futures::stream::iter(users.into_iter().map(|user| {
        let client = client.clone();
        let currency = args.currency.clone();
        let progress = progress.clone();
        async move {
            client.open_account(OpenAccountRequest { user_id: user, currency: currency.clone() }).await?;
            let response = client
                .deposit(DepositRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("bench-seed-{run:x}-{user}").into_bytes(),
                    user_id: user,
                    currency: currency.clone(),
                    amount: SEED_BALANCE,
                })
                .await?;
            progress.inc(1);
            let code = response.result.map(|r| r.code).unwrap_or_default();
            Ok::<i32, tonic::Status>(code)
        }
    }))
    .buffer_unordered(128);
    use futures::StreamExt;
    while let Some(result) = tasks.next().await {
        let code = result.context("seeding an account")?;
        // Overflow only if the account was seeded many times before.
        anyhow::ensure!(
            code == ResultCode::Ok as i32 || code == ResultCode::BalanceOverflow as i32,
            "seeding deposit answered {code}"
        );
    }
    progress.finish_and_clear();
    Ok(())
}

/// How long a coalesced transfer may take before it is counted an error.
const COALESCED_TIMEOUT: Duration = Duration::from_secs(10);

struct Workload {
    cross_fraction: f64,
    /// Cross-cell transfers sent while measuring: (id, send time in Unix ms).
    cross_sent: Mutex<Vec<(Vec<u8>, u64)>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    args_api_batch: bool,
    /// One per connection when `--api coalesced`.
    coalescers: Vec<cellbank_client::ledger::TransferCoalescer>,
    batch_size: usize,
    /// Users that may move money between each other (one group per cell).
    groups: Vec<Vec<u64>>,
    currency: String,
    run: u64,
    next_id: AtomicU64,
}

/// Splits the benchmark's users by the pair that serves them (one group
/// when there is no routing table).
fn user_groups(first_user: u64, accounts: u64, table: Option<&cellbank_proto::router::RoutingTable>) -> Vec<Vec<u64>> {
    let users = first_user..first_user + accounts;
    let Some(table) = table else { return vec![users.collect()] };
    let mut groups: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for user in users {
        let pair = cellbank_router::table::route(table, user).map(|r| r.pair_id).unwrap_or(0);
        groups.entry(pair).or_default().push(user);
    }
    groups.into_values().filter(|g| g.len() >= 2).collect()
}

impl Workload {
    fn transfer(&self, rng: &mut rand::rngs::StdRng) -> TransferRequest {
        let group_index = rng.gen_range(0..self.groups.len());
        let group = &self.groups[group_index];
        let cross = self.groups.len() > 1 && rng.gen_bool(self.cross_fraction.clamp(0.0, 1.0));
        let (from, to) = if cross {
            let mut other = rng.gen_range(0..self.groups.len() - 1);
            if other >= group_index {
                other += 1;
            }
            let other = &self.groups[other];
            (group[rng.gen_range(0..group.len())], other[rng.gen_range(0..other.len())])
        } else {
            let from_index = rng.gen_range(0..group.len());
            let mut to_index = rng.gen_range(0..group.len() - 1);
            if to_index >= from_index {
                to_index += 1;
            }
            (group[from_index], group[to_index])
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let transfer_id = format!("b{:x}-{id}", self.run).into_bytes();
        if cross && self.measuring.load(Ordering::Relaxed) {
            let mut sent = self.cross_sent.lock().expect("cross sent");
            if sent.len() < CROSS_SAMPLES_MAX {
                sent.push((transfer_id.clone(), cellbank_client::clock::unix_ms()));
            }
        }
        TransferRequest {
            transfer_id_text: String::new(),
            transfer_id,
            from_user_id: from,
            to_user_id: to,
            currency: self.currency.clone(),
            amount: rng.gen_range(1..=100),
        }
    }

    /// Sends one request; returns (transfers OK, other results).
    async fn send(
        &self,
        client: &mut LedgerClient<Channel>,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<(u64, u64), tonic::Status> {
        if self.args_api_batch {
            let transfers = (0..self.batch_size).map(|_| self.transfer(rng)).collect();
            let response = client.submit_transfers(SubmitTransfersRequest { transfers }).await?.into_inner();
            let ok = response.results.iter().filter(|r| r.code == ResultCode::Ok as i32).count() as u64;
            Ok((ok, response.results.len() as u64 - ok))
        } else if !self.coalescers.is_empty() {
            let coalescer = &self.coalescers[rng.gen_range(0..self.coalescers.len())];
            let result = coalescer.transfer(self.transfer(rng), COALESCED_TIMEOUT).await?;
            Ok(if result.code == ResultCode::Ok as i32 { (1, 0) } else { (0, 1) })
        } else {
            let response = client.transfer(self.transfer(rng)).await?.into_inner();
            let ok = response.result.map(|r| r.code == ResultCode::Ok as i32).unwrap_or(false);
            Ok(if ok { (1, 0) } else { (0, 1) })
        }
    }
}

struct Recorder {
    histogram: Mutex<Histogram<u64>>,
    tally: Tally,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    error_samples: Mutex<Vec<String>>,
}

impl Recorder {
    fn record(&self, latency: Duration, outcome: &Result<(u64, u64), tonic::Status>) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        self.tally.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok((ok, other)) => {
                self.tally.transfers_ok.fetch_add(*ok, Ordering::Relaxed);
                self.tally.transfers_other.fetch_add(*other, Ordering::Relaxed);
                let micros = latency.as_micros().clamp(1, u64::MAX as u128) as u64;
                let _ = self.histogram.lock().expect("histogram").record(micros);
            }
            Err(status) => {
                self.tally.errors.fetch_add(1, Ordering::Relaxed);
                let mut samples = self.error_samples.lock().expect("samples");
                if samples.len() < 5 {
                    samples.push(format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario.as_str() {
        "load" => {}
        "failover" => return crate::failover_bench::run(args.runs, args.json, args.data_dir.clone()).await,
        "move-slice" => {
            let options = crate::move_bench::MoveBench {
                endpoints: args.endpoints.endpoints.clone(),
                moves: args.runs,
                concurrency: args.concurrency,
                accounts: args.accounts,
                first_user: args.first_user,
                currency: args.currency.clone(),
                warmup: Duration::from_secs(args.warmup),
                json: args.json,
                seed: args.seed.unwrap_or_else(rand::random),
            };
            return crate::move_bench::run(options).await;
        }
        other => anyhow::bail!("--scenario: {other:?} is not load, failover or move-slice"),
    }
    match args.workload.as_str() {
        "same-cell" | "cross-cell" => {}
        "envelopes" => return crate::envelope_bench::run(&args.endpoints.endpoints, &args).await,
        other => anyhow::bail!("--workload: {other:?} is not same-cell, cross-cell or envelopes"),
    }
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    anyhow::ensure!(["unary", "batch", "coalesced"].contains(&args.api.as_str()), "--api is unary, batch or coalesced");
    anyhow::ensure!(
        (1..=cellbank_proto::SUBMIT_TRANSFERS_ITEMS_MAX).contains(&args.batch_size),
        "--batch-size is 1..=8189"
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    let run_id: u64 = rand::random();
    let target = find_target(&args.endpoints.endpoints).await?;
    let (servers, groups) = match &target {
        Target::Routers { endpoints, table } => {
            (endpoints.clone(), user_groups(args.first_user, args.accounts, Some(table)))
        }
        Target::Cell { leader } => (vec![leader.clone()], user_groups(args.first_user, args.accounts, None)),
    };
    anyhow::ensure!(!groups.is_empty(), "too few accounts to pair users of one cell; raise --accounts");
    let cross_fraction = if args.workload == "cross-cell" { args.cross_fraction } else { 0.0 };
    anyhow::ensure!(
        cross_fraction == 0.0 || groups.len() > 1,
        "--workload cross-cell needs a cluster with at least two active cells"
    );
    let setup_client = CellClient::new(servers.clone());
    seed_accounts(&setup_client, &args, run_id).await?;
    let mut channels = Vec::new();
    for index in 0..CONNECTIONS.max(servers.len()) {
        channels.push(cellbank_client::ChannelSettings::SERVICE.connect(&servers[index % servers.len()]).await?);
    }
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = Arc::new(Workload {
        cross_fraction,
        cross_sent: Mutex::new(Vec::new()),
        measuring: measuring.clone(),
        args_api_batch: args.api == "batch",
        coalescers: match args.api.as_str() {
            "coalesced" => channels
                .iter()
                .map(|channel| {
                    cellbank_client::ledger::TransferCoalescer::new(
                        cellbank_client::channel::ledger(channel.clone()),
                        Default::default(),
                    )
                })
                .collect(),
            _ => Vec::new(),
        },
        batch_size: args.batch_size,
        groups,
        currency: args.currency.clone(),
        run: run_id,
        next_id: AtomicU64::new(0),
    });
    let recorder = Arc::new(Recorder {
        histogram: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram")),
        tally: Tally::default(),
        measuring,
        error_samples: Mutex::new(Vec::new()),
    });
    let total = Duration::from_secs(args.warmup + args.duration);
    let started = Instant::now();
    let stop_at = started + total;
    let tasks = match args.rate {
        None => closed_loop(&args, &channels, &workload, &recorder, stop_at, seed),
        Some(rate) => {
            vec![tokio::spawn(open_loop(rate, channels.clone(), workload.clone(), recorder.clone(), stop_at, seed))]
        }
    };
    let progress =
        if args.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total.as_secs()) };
    progress
        .set_style(indicatif::ProgressStyle::with_template("{prefix} {bar:40} {pos}/{len}s {msg}").expect("template"));
    progress.set_prefix("warming up");
    let mut measure_started = None;
    let mut last_ok = 0;
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let elapsed = started.elapsed().as_secs();
        if measure_started.is_none() && elapsed >= args.warmup {
            recorder.measuring.store(true, Ordering::Relaxed);
            measure_started = Some(Instant::now());
            progress.set_prefix("measuring ");
        }
        let ok = recorder.tally.transfers_ok.load(Ordering::Relaxed);
        progress.set_message(format!("{} transfers/s", ok - last_ok));
        last_ok = ok;
        progress.set_position(elapsed.min(total.as_secs()));
    }
    recorder.measuring.store(false, Ordering::Relaxed);
    let measured = measure_started.map(|s| s.elapsed()).unwrap_or_default();
    progress.finish_and_clear();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let mut report = make_report(&args, seed, measured, &recorder);
    let sent = std::mem::take(&mut *workload.cross_sent.lock().expect("cross sent"));
    if !sent.is_empty() {
        reach_times(&setup_client, sent, &mut report, args.json).await;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn closed_loop(
    args: &BenchArgs,
    channels: &[Channel],
    workload: &Arc<Workload>,
    recorder: &Arc<Recorder>,
    stop_at: Instant,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..args.concurrency)
        .map(|worker| {
            let mut client = cellbank_client::channel::ledger(channels[worker % channels.len()].clone());
            let workload = workload.clone();
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(worker as u64));
                while Instant::now() < stop_at {
                    let sent = Instant::now();
                    let outcome = workload.send(&mut client, &mut rng).await;
                    recorder.record(sent.elapsed(), &outcome);
                    if outcome.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

async fn open_loop(
    rate: u64,
    channels: Vec<Channel>,
    workload: Arc<Workload>,
    recorder: Arc<Recorder>,
    stop_at: Instant,
    seed: u64,
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let in_flight = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut sequence: u64 = 0;
    loop {
        let scheduled = start + interval.mul_f64(sequence as f64);
        if scheduled >= stop_at {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        sequence += 1;
        if in_flight.load(Ordering::Relaxed) >= OPEN_LOOP_IN_FLIGHT_MAX {
            if recorder.measuring.load(Ordering::Relaxed) {
                recorder.tally.missed.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let mut client = cellbank_client::channel::ledger(channels[(sequence as usize) % channels.len()].clone());
        let workload = workload.clone();
        let recorder = recorder.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(sequence));
            let outcome = workload.send(&mut client, &mut rng).await;
            recorder.record(scheduled.elapsed(), &outcome);
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn make_report(args: &BenchArgs, seed: u64, measured: Duration, recorder: &Recorder) -> Report {
    let histogram = recorder.histogram.lock().expect("histogram");
    let seconds = measured.as_secs_f64().max(1e-9);
    let tally = &recorder.tally;
    let ms = |micros: u64| micros as f64 / 1000.0;
    let mut latency_ms = BTreeMap::new();
    if !histogram.is_empty() {
        latency_ms.insert("p50".into(), ms(histogram.value_at_quantile(0.50)));
        latency_ms.insert("p99".into(), ms(histogram.value_at_quantile(0.99)));
        latency_ms.insert("p99.9".into(), ms(histogram.value_at_quantile(0.999)));
        latency_ms.insert("max".into(), ms(histogram.max()));
        latency_ms.insert("mean".into(), histogram.mean() / 1000.0);
    }
    let transfers_ok = tally.transfers_ok.load(Ordering::Relaxed);
    let requests = tally.requests.load(Ordering::Relaxed);
    Report {
        workload: args.workload.clone(),
        cross_cell_ok: 0,
        reach_checked: 0,
        reach_not_yet_credited: 0,
        reach_ms: BTreeMap::new(),
        api: args.api.clone(),
        mode: if args.rate.is_some() { "open".into() } else { "closed".into() },
        concurrency: args.concurrency,
        rate: args.rate,
        batch_size: if args.api == "batch" { args.batch_size } else { 1 },
        accounts: args.accounts,
        seed,
        duration_s: seconds,
        transfers_ok,
        transfers_per_s: transfers_ok as f64 / seconds,
        requests,
        requests_per_s: requests as f64 / seconds,
        other_results: tally.transfers_other.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        missed_schedule: tally.missed.load(Ordering::Relaxed),
        latency_ms,
        error_samples: recorder.error_samples.lock().expect("samples").clone(),
    }
}

fn print_report(r: &Report) {
    let load = match r.rate {
        Some(rate) => format!("open loop at {rate} req/s"),
        None => format!("closed loop, concurrency {}", r.concurrency),
    };
    println!("cellbank bench: {} API, {load}, batch {}, {} accounts, seed {}", r.api, r.batch_size, r.accounts, r.seed);
    println!("  measured      {:.1} s", r.duration_s);
    println!("  throughput    {:.0} transfers/s ({:.0} requests/s)", r.transfers_per_s, r.requests_per_s);
    let get = |k: &str| r.latency_ms.get(k).copied().unwrap_or(f64::NAN);
    println!(
        "  latency (ms)  p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        get("p50"),
        get("p99"),
        get("p99.9"),
        get("max")
    );
    println!(
        "  transfers OK {}  other results {}  errors {}  missed schedule {}",
        r.transfers_ok, r.other_results, r.errors, r.missed_schedule
    );
    for sample in &r.error_samples {
        println!("  error: {sample}");
    }
    if r.reach_checked > 0 {
        let get = |k: &str| r.reach_ms.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "  cross-cell    {} OK; money reached the recipient (send -> credit, ms): p50 {:.0}  p99 {:.0}  max {:.0}  \
             ({} read back, {} not yet credited)",
            r.cross_cell_ok,
            get("p50"),
            get("p99"),
            get("max"),
            r.reach_checked,
            r.reach_not_yet_credited
        );
    }
}

/// Reads cross-cell transfers back (waiting up to 30 s for stragglers) and
/// records how long their money took to reach the recipient.
async fn reach_times(client: &CellClient, sent: Vec<(Vec<u8>, u64)>, report: &mut Report, quiet: bool) {
    use futures::StreamExt;
    if !quiet {
        eprintln!("reading back {} cross-cell transfers...", sent.len());
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).expect("histogram");
    let mut pending = sent;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ok = 0u64;
    let mut checked = 0u64;
    loop {
        let answers: Vec<_> = futures::stream::iter(pending.into_iter().map(|(id, at)| async move {
            let record = client
                .get_transfer(GetTransferRequest { transfer_id: id.clone(), ..Default::default() })
                .await
                .map(|r| r.transfer);
            (id, at, record)
        }))
        .buffer_unordered(256)
        .collect()
        .await;
        let mut again = Vec::new();
        for (id, at, record) in answers {
            let record = match record {
                // Never applied (its request failed): nothing to follow.
                Err(status) if status.code() == tonic::Code::NotFound => continue,
                Err(_) => None,
                Ok(record) => record,
            };
            match record {
                Some(r) if r.result != ResultCode::Ok as i32 => {}
                Some(r) if r.settlement == Settlement::Credited as i32 => {
                    ok += 1;
                    checked += 1;
                    let _ = histogram.record(r.credited_at_ms.saturating_sub(at).max(1));
                }
                Some(r) if r.settlement == Settlement::Refunded as i32 => {
                    ok += 1;
                    checked += 1;
                }
                // Not sent (an error) or still in transit: look again.
                _ => again.push((id, at)),
            }
        }
        if again.is_empty() || Instant::now() >= deadline {
            report.reach_not_yet_credited = again.len() as u64;
            break;
        }
        pending = again;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.cross_cell_ok = ok;
    report.reach_checked = checked;
    if !histogram.is_empty() {
        report.reach_ms.insert("p50".into(), histogram.value_at_quantile(0.50) as f64);
        report.reach_ms.insert("p99".into(), histogram.value_at_quantile(0.99) as f64);
        report.reach_ms.insert("max".into(), histogram.max() as f64);
    }
}
