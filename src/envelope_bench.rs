//! `cellbank bench --workload envelopes`: the red-envelope rush, through the
//! routers.
//!
//! 1. Opens and funds accounts for every grabber (users spread over every
//!    cell by the routing table) and for senders in every cell.
//! 2. Ordinary envelopes: `--envelopes` senders (from every cell) each send
//!    one envelope of `--shares` shares; all are grabbed at once by random
//!    grabbers from every cell. Reports grabs per second.
//! 3. The hot envelope: one sender, `--hot-shares` shares, grabbed by as many
//!    distinct users from every cell, all at once. Reports grabs per second
//!    from the first grab sent to the last answer, and grab latency.
//!
//! Every answer is checked: each grab OK with a share of at least one unit,
//! no user twice, and the hot envelope's shares sum exactly to its total.

use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank_client::CellClient;
use cellbank_proto::v1::ledger_client::LedgerClient;
use cellbank_proto::v1::*;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;

use crate::bench::BenchArgs;

const CONNECTIONS: usize = 8;
const SEED_BALANCE: u64 = 1_000_000_000;

#[derive(Serialize, Default)]
struct Phase {
    envelopes: u32,
    grabs_ok: u64,
    grabs_other: u64,
    errors: u64,
    seconds: f64,
    grabs_per_s: f64,
    cross_cell_grabs: u64,
    latency_ms: std::collections::BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct Report {
    workload: &'static str,
    cells: usize,
    grabbers: u64,
    ordinary: Phase,
    hot: Phase,
    hot_total: u64,
    hot_shares_sum: u64,
}

async fn open_and_fund(client: &CellClient, users: &[u64], currency: &str, run: u64) -> anyhow::Result<()> {
    let progress = indicatif::ProgressBar::new(users.len() as u64);
    progress
        .set_style(indicatif::ProgressStyle::with_template("seeding accounts {bar:40} {pos}/{len}").expect("template"));
    let mut tasks = futures::stream::iter(users.iter().copied().map(|user| {
        let progress = progress.clone();
        async move {
            client.open_account(OpenAccountRequest { user_id: user, currency: currency.to_string() }).await?;
            client
                .deposit(DepositRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("env-seed-{run:x}-{user}").into_bytes(),
                    user_id: user,
                    currency: currency.to_string(),
                    amount: SEED_BALANCE,
                })
                .await?;
            progress.inc(1);
            Ok::<(), tonic::Status>(())
        }
    }))
    .buffer_unordered(128);
    while let Some(result) = tasks.next().await {
        result.context("seeding an account")?;
    }
    progress.finish_and_clear();
    Ok(())
}

async fn send(
    client: &CellClient,
    sender: u64,
    id: String,
    total: u64,
    shares: u32,
    currency: &str,
) -> anyhow::Result<String> {
    let response = client
        .send_envelope(SendEnvelopeRequest {
            transfer_id_text: String::new(),
            transfer_id: id.clone().into_bytes(),
            sender_user_id: sender,
            currency: currency.to_string(),
            total,
            shares,
            split: EnvelopeSplit::Random as i32,
            expires_at_ms: 0,
        })
        .await?;
    let code = response.result.map(|r| r.code).unwrap_or_default();
    anyhow::ensure!(code == ResultCode::Ok as i32, "sending envelope {id} answered {code}");
    Ok(response.envelope_id)
}

/// Grabs everything in `grabs` at once; returns the phase figures and the
/// (user, amount) of each OK grab.
async fn rush(channels: &[Channel], grabs: Vec<(String, u64, bool)>) -> (Phase, Vec<(String, u64, u64)>) {
    let started = Instant::now();
    let tasks: Vec<_> = grabs
        .into_iter()
        .enumerate()
        .map(|(i, (envelope_id, user, cross))| {
            let mut client = LedgerClient::new(channels[i % channels.len()].clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let mut request =
                    tonic::Request::new(GrabEnvelopeRequest { envelope_id: envelope_id.clone(), user_id: user });
                request.set_timeout(Duration::from_secs(30));
                let outcome = client.grab_envelope(request).await.map(|r| r.into_inner());
                (envelope_id, user, cross, sent.elapsed(), outcome)
            })
        })
        .collect();
    let mut phase = Phase::default();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut got = Vec::new();
    for task in tasks {
        let Ok((envelope_id, user, cross, latency, outcome)) = task.await else { continue };
        match outcome {
            Ok(response) => {
                let code = response.result.map(|r| r.code).unwrap_or_default();
                if code == ResultCode::Ok as i32 {
                    phase.grabs_ok += 1;
                    phase.cross_cell_grabs += u64::from(cross);
                    let _ = histogram.record(latency.as_micros().max(1) as u64);
                    got.push((envelope_id, user, response.amount));
                } else {
                    phase.grabs_other += 1;
                }
            }
            Err(_) => phase.errors += 1,
        }
    }
    phase.seconds = started.elapsed().as_secs_f64();
    phase.grabs_per_s = phase.grabs_ok as f64 / phase.seconds.max(1e-9);
    if !histogram.is_empty() {
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
            phase.latency_ms.insert(name.into(), histogram.value_at_quantile(q) as f64 / 1000.0);
        }
    }
    (phase, got)
}

pub async fn run(endpoints: &[String], args: &BenchArgs) -> anyhow::Result<()> {
    let status = cellbank::routers::ClusterClient::new(endpoints, None)
        .status()
        .await
        .context("the envelope bench needs routers")?;
    let table = status.table.unwrap_or_default();
    anyhow::ensure!(table.slice_count > 0, "the routing table is not ready");
    let pair_of = |user: u64| cellbank_router::table::route(&table, user).map(|r| r.pair_id).unwrap_or(0);
    let run: u64 = rand::random();
    let base = 50_000_000 + (run % 1000) * 100_000;
    let grabbers: Vec<u64> = (base..base + u64::from(args.hot_shares)).collect();
    let pairs: std::collections::BTreeSet<u64> = grabbers.iter().map(|u| pair_of(*u)).collect();
    // Senders: spread over every cell (the next users after the grabbers).
    let senders: Vec<u64> = (0..u64::from(args.envelopes.max(1)) + 1).map(|i| base + 90_000 + i).collect();
    let client = CellClient::new(endpoints.to_vec());
    let mut users = grabbers.clone();
    users.extend(&senders);
    open_and_fund(&client, &users, &args.currency, run).await?;
    let mut channels = Vec::new();
    for index in 0..CONNECTIONS {
        channels.push(cellbank_client::ChannelSettings::SERVICE.connect(&endpoints[index % endpoints.len()]).await?);
    }
    // Ordinary envelopes, grabbed by random users of every cell.
    let mut ordinary_ids = Vec::new();
    for (i, sender) in senders.iter().take(args.envelopes as usize).enumerate() {
        let id = send(
            &client,
            *sender,
            format!("bench-env-{run:x}-{i}"),
            u64::from(args.shares) * 100,
            args.shares,
            &args.currency,
        )
        .await?;
        ordinary_ids.push((id, *sender));
    }
    let mut grabs = Vec::new();
    for (n, (id, sender)) in ordinary_ids.iter().enumerate() {
        for k in 0..args.shares as usize {
            let user = grabbers[(n * 7919 + k * 104_729) % grabbers.len()];
            grabs.push((id.clone(), user, pair_of(user) != pair_of(*sender)));
        }
    }
    if !args.json {
        eprintln!("{} ordinary envelopes: {} grabs at once...", ordinary_ids.len(), grabs.len());
    }
    let (mut ordinary, _) = rush(&channels, grabs).await;
    ordinary.envelopes = ordinary_ids.len() as u32;
    // The hot envelope.
    let hot_sender = *senders.last().expect("a sender");
    let hot_total = u64::from(args.hot_shares) * 88;
    let hot_id =
        send(&client, hot_sender, format!("bench-hot-{run:x}"), hot_total, args.hot_shares, &args.currency).await?;
    let grabs: Vec<_> =
        grabbers.iter().map(|user| (hot_id.clone(), *user, pair_of(*user) != pair_of(hot_sender))).collect();
    if !args.json {
        eprintln!("hot envelope {hot_id}: {} shares, {} grabbers at once...", args.hot_shares, grabs.len());
    }
    let (mut hot, got) = rush(&channels, grabs).await;
    hot.envelopes = 1;
    let sum: u64 = got.iter().map(|(_, _, amount)| amount).sum();
    let distinct: std::collections::HashSet<u64> = got.iter().map(|(_, user, _)| *user).collect();
    anyhow::ensure!(distinct.len() == got.len(), "a user got two shares of the hot envelope");
    anyhow::ensure!(got.iter().all(|(_, _, amount)| *amount >= 1), "a share of zero");
    if hot.grabs_ok == u64::from(args.hot_shares) {
        anyhow::ensure!(sum == hot_total, "the hot envelope's shares sum to {sum}, not {hot_total}");
    }
    let report = Report {
        workload: "envelopes",
        cells: pairs.len(),
        grabbers: grabbers.len() as u64,
        ordinary,
        hot,
        hot_total,
        hot_shares_sum: sum,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let print = |name: &str, p: &Phase| {
            let get = |k: &str| p.latency_ms.get(k).copied().unwrap_or(f64::NAN);
            println!(
                "  {name:<9} {} envelopes: {} grabs OK ({} across cells) in {:.2} s = {:.0} grabs/s; latency ms p50 {:.1} \
                 p99 {:.1} max {:.1}; other {} errors {}",
                p.envelopes,
                p.grabs_ok,
                p.cross_cell_grabs,
                p.seconds,
                p.grabs_per_s,
                get("p50"),
                get("p99"),
                get("max"),
                p.grabs_other,
                p.errors
            );
        };
        println!("cellbank bench: envelopes through the routers, {} cells, {} grabbers", report.cells, report.grabbers);
        print("ordinary", &report.ordinary);
        print("hot", &report.hot);
        println!("  hot envelope: shares sum {} of total {}", report.hot_shares_sum, report.hot_total);
    }
    Ok(())
}
