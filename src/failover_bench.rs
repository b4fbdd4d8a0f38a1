//! `cellbank bench --scenario failover`: measures, on a local cluster it
//! starts itself (one router, one pair of three-replica cells, real
//! processes, real SIGKILLs), how long clients wait:
//!
//! - whole-cell kill: every replica of the active cell is killed; the time
//!   until the first write sent after the kill is acknowledged (by the
//!   promoted standby). The killed cell is restarted and rebuilt before the
//!   next run, so every run starts from a SYNC pair.
//! - leader kill: the active cell's leader is killed; the time until the
//!   first write sent after the kill is acknowledged.
//! - planned switchover: the write pause the coordinator reports (fence to
//!   promotion), and the longest wait of any write sent during the call.
//!
//! A writer sends one transfer every [`WRITE_INTERVAL`] through the router,
//! so a figure is at most that much late.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank::supervisor::{ProcessId, Supervisor, Topology};
use cellbank_proto::router::{ClusterStatus, Pair, PairMode, SwitchoverRequest};
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::*;
use serde::Serialize;

const WRITE_INTERVAL: Duration = Duration::from_millis(5);
const USERS: u64 = 20;
const WAIT_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Writes {
    /// (sent, acknowledged) of every write answered OK.
    acked: Vec<(Instant, Instant)>,
    failed: u64,
    /// The first few failures, as `code: message`.
    failure_samples: Vec<String>,
}

#[derive(Serialize)]
struct Figures {
    runs: usize,
    median_ms: f64,
    worst_ms: f64,
    all_ms: Vec<f64>,
}

fn figures(mut samples: Vec<Duration>) -> Figures {
    samples.sort();
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let median = if ms.is_empty() {
        f64::NAN
    } else if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    Figures { runs: ms.len(), median_ms: median, worst_ms: ms.last().copied().unwrap_or(f64::NAN), all_ms: ms }
}

#[derive(Serialize)]
struct Report {
    whole_cell_kill_to_first_ack: Figures,
    leader_kill_to_first_ack: Figures,
    switchover_write_pause_reported: Figures,
    switchover_longest_client_wait: Figures,
    writes_acknowledged: usize,
    writes_failed: u64,
    failure_samples: Vec<String>,
}

struct Bench {
    sup: Supervisor,
    routers: Vec<String>,
    writes: Arc<Mutex<Writes>>,
}

impl Bench {
    async fn status(&self) -> Option<ClusterStatus> {
        tokio::time::timeout(
            Duration::from_secs(3),
            cellbank::routers::ClusterClient::new(&self.routers, None).status(),
        )
        .await
        .ok()?
        .ok()
    }

    async fn pair(&self) -> Option<Pair> {
        self.status().await?.table?.pairs.into_iter().find(|p| p.pair_id == 1)
    }

    async fn wait_for_sync(&self) -> anyhow::Result<Pair> {
        let started = Instant::now();
        loop {
            if let Some(pair) = self.pair().await {
                if pair.mode == PairMode::Sync as i32 {
                    return Ok(pair);
                }
            }
            anyhow::ensure!(started.elapsed() < WAIT_LIMIT, "the pair did not return to SYNC");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Time from `since` to the acknowledgement of the first write sent at
    /// or after it.
    async fn first_ack_after(&self, since: Instant) -> anyhow::Result<Duration> {
        loop {
            let found = {
                let writes = self.writes.lock().expect("writes");
                writes.acked.iter().filter(|(sent, _)| *sent >= since).map(|(_, acked)| *acked).min()
            };
            if let Some(acked) = found {
                return Ok(acked - since);
            }
            anyhow::ensure!(since.elapsed() < WAIT_LIMIT, "no write was acknowledged after the fault");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn cell_leader(&self, cell: u64) -> Option<ProcessId> {
        for id in self.sup.cell_replicas(cell) {
            let addr = self.sup.addr(id)?;
            let admin_plane = cellbank_client::planes::Plane::Admin.of(&addr);
            let Ok(channel) = cellbank_client::ChannelSettings::SERVICE.connect(&admin_plane).await else { continue };
            let mut admin = cellbank_client::channel::admin(channel);
            if let Ok(status) = admin.status(cellbank_proto::cell::StatusRequest {}).await {
                if cellbank_client::is_leader(status.get_ref()) {
                    return Some(id);
                }
            }
        }
        None
    }
}

async fn seed(router: &str) -> anyhow::Result<LedgerClient<tonic::transport::Channel>> {
    let channel = cellbank_client::ChannelSettings::SERVICE.connect(router).await?;
    let mut client = LedgerClient::new(channel);
    for user in 1..=USERS {
        client.open_account(OpenAccountRequest { user_id: user, currency: "CNY".into() }).await?;
        let deposit = DepositRequest {
            transfer_id_text: String::new(),
            transfer_id: format!("failover-bench-seed-{user}").into_bytes(),
            user_id: user,
            currency: "CNY".into(),
            amount: 1_000_000_000,
        };
        client.deposit(deposit).await?;
    }
    Ok(client)
}

fn start_writer(
    client: LedgerClient<tonic::transport::Channel>,
    writes: Arc<Mutex<Writes>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(WRITE_INTERVAL);
        let mut seq: u64 = 0;
        loop {
            ticker.tick().await;
            seq += 1;
            let mut client = client.clone();
            let writes = writes.clone();
            let from = 1 + seq % USERS;
            let to = 1 + (seq + 1) % USERS;
            tokio::spawn(async move {
                let mut request = tonic::Request::new(TransferRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("failover-bench-{seq}").into_bytes(),
                    from_user_id: from,
                    to_user_id: to,
                    currency: "CNY".into(),
                    amount: 1,
                });
                request.set_timeout(Duration::from_secs(20));
                let sent = Instant::now();
                let outcome = client.transfer(request).await;
                let mut writes = writes.lock().expect("writes");
                match outcome {
                    Ok(response)
                        if response.get_ref().result.as_ref().is_some_and(|r| r.code == ResultCode::Ok as i32) =>
                    {
                        writes.acked.push((sent, Instant::now()))
                    }
                    other => {
                        writes.failed += 1;
                        if writes.failure_samples.len() < 5 {
                            let sample = match other {
                                Ok(response) => format!("result {:?}", response.into_inner().result),
                                Err(status) => format!("{:?}: {}", status.code(), status.message()),
                            };
                            writes.failure_samples.push(sample);
                        }
                    }
                }
            });
        }
    })
}

pub async fn run(runs: usize, json: bool, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let temp = tempfile::tempdir()?;
    let dir = data_dir.unwrap_or_else(|| temp.path().to_path_buf());
    let mut topology = Topology::on_free_ports(&dir, 1, 1, 3, true);
    topology.slice_count = 16;
    // Runs follow each other quickly; the anti-flap cool-down would refuse
    // the next automatic failover of the same pair.
    topology.coordinator.cooldown_ms = 1_000;
    let sup = Supervisor::new(std::env::current_exe()?, topology)?;
    let routers = sup.router_endpoints();
    let mut bench = Bench { sup, routers, writes: Arc::new(Mutex::new(Writes::default())) };
    bench.sup.start_all()?;
    eprintln!("failover bench: starting a router and two cells of three replicas in {}", dir.display());
    bench.wait_for_sync().await?;
    let client = seed(&bench.routers[0]).await.context("seeding accounts")?;
    let writer = start_writer(client, bench.writes.clone());

    let mut cell_kills = Vec::new();
    for run in 1..=runs {
        let pair = bench.wait_for_sync().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed = Instant::now();
        bench.sup.kill_cell(pair.active_cell_id);
        let waited = bench.first_ack_after(killed).await?;
        eprintln!("whole-cell kill {run}/{runs}: cell {} killed, first ack after {waited:?}", pair.active_cell_id);
        cell_kills.push(waited);
        bench.sup.start_cell(pair.active_cell_id)?;
    }
    let mut leader_kills = Vec::new();
    for run in 1..=runs {
        let pair = bench.wait_for_sync().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leader = bench.cell_leader(pair.active_cell_id).await.context("the active cell has no leader")?;
        let killed = Instant::now();
        bench.sup.kill(leader);
        let waited = bench.first_ack_after(killed).await?;
        eprintln!("leader kill {run}/{runs}: {leader} killed, first ack after {waited:?}");
        leader_kills.push(waited);
        bench.sup.start(leader)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut pauses = Vec::new();
    let mut client_waits = Vec::new();
    for run in 1..=runs {
        bench.wait_for_sync().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let request = SwitchoverRequest { pair_id: 1, who: "failover-bench".into(), why: "measure".into() };
        let response = cellbank::routers::ClusterClient::new(&bench.routers, None).switchover(request).await?;
        let finished = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let longest = {
            let writes = bench.writes.lock().expect("writes");
            writes
                .acked
                .iter()
                .filter(|(sent, _)| *sent >= started && *sent <= finished)
                .map(|(sent, acked)| *acked - *sent)
                .max()
                .unwrap_or_default()
        };
        eprintln!(
            "switchover {run}/{runs}: {} write pause {} ms, longest client wait {longest:?}",
            response.detail, response.write_pause_ms
        );
        pauses.push(Duration::from_millis(response.write_pause_ms));
        client_waits.push(longest);
    }
    writer.abort();
    // Writes still in flight finish before the tally (and before the
    // cluster stops, which would cancel them).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acked, failed, failure_samples) = {
        let writes = bench.writes.lock().expect("writes");
        (writes.acked.len(), writes.failed, writes.failure_samples.clone())
    };
    let report = Report {
        whole_cell_kill_to_first_ack: figures(cell_kills),
        leader_kill_to_first_ack: figures(leader_kills),
        switchover_write_pause_reported: figures(pauses),
        switchover_longest_client_wait: figures(client_waits),
        writes_acknowledged: acked,
        writes_failed: failed,
        failure_samples,
    };
    tokio::task::block_in_place(|| bench.sup.stop_all(Duration::from_secs(5)));
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let line = |name: &str, f: &Figures| {
            println!("  {name:<38} median {:>8.1} ms  worst {:>8.1} ms  ({} runs)", f.median_ms, f.worst_ms, f.runs)
        };
        println!("cellbank failover bench (one router, one pair of 3-replica cells, loopback):");
        line("whole-cell kill -> first ack", &report.whole_cell_kill_to_first_ack);
        line("leader kill -> first ack", &report.leader_kill_to_first_ack);
        line("switchover write pause (coordinator)", &report.switchover_write_pause_reported);
        line("switchover longest client wait", &report.switchover_longest_client_wait);
        println!("  writes acknowledged {acked}, failed {failed}");
        for sample in &report.failure_samples {
            println!("  failure: {sample}");
        }
    }
    Ok(())
}
