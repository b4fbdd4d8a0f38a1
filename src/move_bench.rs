//! `cellbank bench --scenario move-slice`: slices moved between pairs of a
//! running cluster under a steady load of transfers, one after another.
//!
//! Each client write is timed and tagged with the slices it touches. For
//! each move, its *freeze* is the longest time any write to the moving
//! slice took while it overlapped the move (what a user of that slice
//! waited at worst); the report gives the median and the worst over the
//! moves, the coordinator's own figure (freeze to flip), and the rate of
//! writes to every other slice while slices were moving next to the same
//! length of time right after, with no move.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cellbank::routers::ClusterClient;
use cellbank_client::slices::slice_of;
use cellbank_client::CellClient;
use cellbank_proto::router::{MoveSliceRequest, PairMode, RoutingTable};
use cellbank_proto::v1::{DepositRequest, OpenAccountRequest, ResultCode, TransferRequest};
use rand::{Rng, SeedableRng};

/// Options of the scenario (the bench's own flags, as they apply here).
pub struct MoveBench {
    pub endpoints: Vec<String>,
    pub moves: usize,
    pub concurrency: usize,
    pub accounts: u64,
    pub first_user: u64,
    pub currency: String,
    pub warmup: Duration,
    pub json: bool,
    pub seed: u64,
}

/// One client write: when it started and ended, the slices it touched,
/// and whether it applied.
struct Write {
    start: Instant,
    end: Instant,
    slices: [u32; 2],
    ok: bool,
}

#[derive(serde::Serialize)]
struct MoveFigure {
    slice: u32,
    from_pair: u64,
    to_pair: u64,
    /// Longest wait of any write to the slice that overlapped the move.
    freeze_ms: f64,
    /// The coordinator's figure: from the freeze to the flip.
    coordinator_freeze_ms: u64,
    total_ms: u64,
    writes_to_slice: usize,
}

#[derive(serde::Serialize)]
struct MoveReport {
    moves: Vec<MoveFigure>,
    freeze_median_ms: f64,
    freeze_worst_ms: f64,
    coordinator_freeze_median_ms: f64,
    /// Writes per second to the other slices while slices moved, and for
    /// as long again right after the moves, with none.
    rest_without_moves_per_s: f64,
    rest_while_moving_per_s: f64,
    rest_ratio: f64,
    failed_writes: usize,
    concurrency: usize,
    accounts: u64,
    seed: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn seed(client: &CellClient, users: &[u64], currency: &str, run: u64) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut tasks = futures::stream::iter(users.iter().copied().map(|user| {
        let currency = currency.to_string();
        async move {
            client.open_account(OpenAccountRequest { user_id: user, currency: currency.clone() }).await?;
            let deposit = DepositRequest {
                transfer_id_text: String::new(),
                transfer_id: format!("move-bench-{run:x}-{user}").into_bytes(),
                user_id: user,
                currency,
                amount: 1_000_000_000,
            };
            client.deposit(deposit).await.map(|_| ())
        }
    }))
    .buffer_unordered(64);
    while let Some(result) = tasks.next().await {
        result.context("seeding an account")?;
    }
    Ok(())
}

pub async fn run(options: MoveBench) -> anyhow::Result<()> {
    let admin = ClusterClient::new(&options.endpoints, None);
    let status = admin.status().await.context("asking the routers for the cluster's status")?;
    let table: RoutingTable = status.table.unwrap_or_default();
    let ready: Vec<u64> = table
        .pairs
        .iter()
        .filter(|p| matches!(PairMode::try_from(p.mode), Ok(PairMode::Sync | PairMode::NoStandby)))
        .map(|p| p.pair_id)
        .collect();
    anyhow::ensure!(ready.len() >= 2, "moving slices needs two pairs that are SYNC (or without a standby)");
    let users: Vec<u64> = (options.first_user..options.first_user + options.accounts).collect();
    let mut client = CellClient::new(options.endpoints.clone());
    client.deadline = Duration::from_secs(30);
    let client = Arc::new(client);
    if !options.json {
        println!("seeding {} accounts...", users.len());
    }
    seed(&client, &users, &options.currency, rand::random()).await?;
    // Transfers within each pair (moving slices' users among them).
    let count = table.slice_count;
    let mut by_pair: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for user in &users {
        by_pair.entry(table.slice_pair[slice_of(*user, count) as usize]).or_default().push(*user);
    }
    let groups: Vec<Vec<u64>> = by_pair.into_values().filter(|g| g.len() >= 2).collect();
    anyhow::ensure!(!groups.is_empty(), "too few accounts; raise --accounts");
    // Users by slice, for the writers of the slice about to move.
    let mut users_of: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for user in &users {
        users_of.entry(slice_of(*user, count)).or_default().push(*user);
    }
    let users_of = Arc::new(users_of);
    let focus = Arc::new(std::sync::atomic::AtomicU32::new(u32::MAX));
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // `concurrency` writers over all users, and as many again that write
    // only from the slice about to move (idle between moves), so the rest's
    // offered load does not depend on the moving slice's waits.
    for worker in 0..2 * options.concurrency {
        let focused = worker >= options.concurrency;
        let (writes, stop, groups, client) = (writes.clone(), stop.clone(), groups.clone(), client.clone());
        let (focus, users_of) = (focus.clone(), users_of.clone());
        let currency = options.currency.clone();
        let seed = options.seed ^ worker as u64;
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let group = &groups[rng.gen_range(0..groups.len())];
                let mut from = group[rng.gen_range(0..group.len())];
                let to = group[rng.gen_range(0..group.len())];
                if focused {
                    let hot = focus.load(Ordering::Relaxed);
                    let Some(senders) = users_of.get(&hot) else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    from = senders[rng.gen_range(0..senders.len())];
                }
                if from == to {
                    continue;
                }
                let request = TransferRequest {
                    transfer_id_text: String::new(),
                    transfer_id: format!("mb-{seed:x}-{n}").into_bytes(),
                    from_user_id: from,
                    to_user_id: to,
                    currency: currency.clone(),
                    amount: 1,
                };
                let start = Instant::now();
                let outcome = client.transfer(request).await;
                let ok = outcome.is_ok_and(|r| r.result.is_some_and(|r| r.code == ResultCode::Ok as i32));
                let slices = [slice_of(from, count), slice_of(to, count)];
                writes.lock().expect("writes lock").push(Write { start, end: Instant::now(), slices, ok });
            }
        }));
    }
    tokio::time::sleep(options.warmup).await;
    // The slices to move: those of the bench's users, in turn.
    let mut slices: Vec<u32> = users.iter().map(|u| slice_of(*u, count)).collect();
    slices.sort_unstable();
    slices.dedup();
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let before_start = Instant::now();
    let mut windows = Vec::new();
    let mut figures = Vec::new();
    let progress = (!options.json).then(|| {
        let bar = indicatif::ProgressBar::new(options.moves as u64);
        bar.set_style(indicatif::ProgressStyle::with_template("moving slices {bar:40} {pos}/{len}").expect("template"));
        bar
    });
    for _ in 0..options.moves {
        let slice = slices[rng.gen_range(0..slices.len())];
        let table = admin.status().await?.table.unwrap_or_default();
        let from = table.slice_pair[slice as usize];
        let to = *ready.iter().find(|p| **p != from).expect("two pairs");
        focus.store(slice, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let request = MoveSliceRequest { slice, to_pair_id: to, who: String::new(), why: "bench".into() };
        let done = admin.move_slice(request).await.with_context(|| format!("moving slice {slice}"))?;
        windows.push((slice, started, Instant::now()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        focus.store(u32::MAX, Ordering::Relaxed);
        figures.push((slice, from, to, done.freeze_ms, done.total_ms));
        if let Some(bar) = &progress {
            bar.inc(1);
        }
    }
    let moving = before_start.elapsed();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    // The same length of time without moves, for the rest's rate.
    let after_start = Instant::now();
    tokio::time::sleep(moving.max(Duration::from_secs(2))).await;
    let after_end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let writes = std::mem::take(&mut *writes.lock().expect("writes lock"));
    let moved: std::collections::BTreeSet<u32> = windows.iter().map(|w| w.0).collect();
    let rest_in = |from: Instant, to: Instant| {
        let n = writes
            .iter()
            .filter(|w| w.ok && w.end >= from && w.end < to && !w.slices.iter().any(|s| moved.contains(s)))
            .count();
        n as f64 / to.duration_since(from).as_secs_f64()
    };
    // While moving: inside the moves' own windows only.
    let inside: f64 =
        windows.iter().map(|(_, from, to)| rest_in(*from, *to) * to.duration_since(*from).as_secs_f64()).sum();
    let spent: f64 = windows.iter().map(|(_, from, to)| to.duration_since(*from).as_secs_f64()).sum();
    let rest_while = if spent > 0.0 { inside / spent } else { 0.0 };
    let rest_without = rest_in(after_start, after_end);
    let mut report_moves = Vec::new();
    for ((slice, from, to, coordinator_freeze_ms, total_ms), (_, start, end)) in figures.into_iter().zip(&windows) {
        let touching: Vec<&Write> =
            writes.iter().filter(|w| w.slices.contains(&slice) && w.start < *end && w.end > *start).collect();
        let freeze_ms =
            touching.iter().map(|w| w.end.duration_since(w.start).as_secs_f64() * 1000.0).fold(0.0, f64::max);
        report_moves.push(MoveFigure {
            slice,
            from_pair: from,
            to_pair: to,
            freeze_ms,
            coordinator_freeze_ms,
            total_ms,
            writes_to_slice: touching.len(),
        });
    }
    let mut freezes: Vec<f64> = report_moves.iter().map(|m| m.freeze_ms).collect();
    freezes.sort_by(f64::total_cmp);
    let mut coordinator: Vec<f64> = report_moves.iter().map(|m| m.coordinator_freeze_ms as f64).collect();
    coordinator.sort_by(f64::total_cmp);
    let report = MoveReport {
        freeze_median_ms: percentile(&freezes, 0.5),
        freeze_worst_ms: freezes.last().copied().unwrap_or(0.0),
        coordinator_freeze_median_ms: percentile(&coordinator, 0.5),
        rest_without_moves_per_s: rest_without,
        rest_while_moving_per_s: rest_while,
        rest_ratio: if rest_without > 0.0 { rest_while / rest_without } else { 0.0 },
        failed_writes: writes.iter().filter(|w| !w.ok).count(),
        moves: report_moves,
        concurrency: options.concurrency,
        accounts: options.accounts,
        seed: options.seed,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("slice  from  to   freeze-ms  coordinator-ms  total-ms  writes");
    for m in &report.moves {
        println!(
            "{:<6} {:<5} {:<4} {:>9.1} {:>15} {:>9} {:>7}",
            m.slice, m.from_pair, m.to_pair, m.freeze_ms, m.coordinator_freeze_ms, m.total_ms, m.writes_to_slice
        );
    }
    println!(
        "freeze per slice (longest wait of a write to it during its move): median {:.1} ms, worst {:.1} ms \
         (coordinator: median {:.0} ms)",
        report.freeze_median_ms, report.freeze_worst_ms, report.coordinator_freeze_median_ms
    );
    println!(
        "other slices: {:.0} writes/s while moving, {:.0} writes/s without moves ({:.0}%); {} writes failed",
        report.rest_while_moving_per_s,
        report.rest_without_moves_per_s,
        report.rest_ratio * 100.0,
        report.failed_writes
    );
    Ok(())
}
