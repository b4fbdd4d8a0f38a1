//! `cellbank capacity status`: what each pair and each slice holds (user
//! accounts, balances, stored bytes: `ReplicaAdmin.SliceFigures` of every
//! active cell's leader) and carries (requests and writes per second over a
//! window, and since the routers started: `RouterAdmin.SliceLoad` of every
//! router, added up), with the hottest slices first. What a capacity
//! planner reads before adding a pair or moving slices.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cellbank_client::planes::Plane;
use cellbank_client::{channel, CellClient, ChannelSettings};
use cellbank_proto::cell::SliceFiguresRequest;
use cellbank_proto::router::{SliceCounters, SliceLoadRequest};
use serde::Serialize;

/// One pair's share of the cluster.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PairLoad {
    pub pair_id: u64,
    pub active_cell_id: u64,
    pub slices: u32,
    pub accounts: u64,
    /// Sums of user balances, by currency (decimal).
    pub balances: BTreeMap<String, String>,
    pub bytes: u64,
    pub requests_per_s: f64,
    pub writes_per_s: f64,
    pub requests: u64,
    pub writes: u64,
}

/// One slice.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SliceLoad {
    pub slice: u32,
    pub pair_id: u64,
    pub accounts: u64,
    pub bytes: u64,
    pub requests_per_s: f64,
    pub writes_per_s: f64,
    /// Since the routers started.
    pub requests: u64,
    pub writes: u64,
    pub request_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub slice_count: u32,
    /// The window the rates were measured over.
    pub window_ms: u64,
    /// Routers that answered, of those in the table's group.
    pub routers_counted: usize,
    pub routers: usize,
    pub pairs: Vec<PairLoad>,
    /// Every slice with accounts or traffic, hottest first (writes per
    /// second, then requests per second, then writes since start).
    pub slices: Vec<SliceLoad>,
}

/// Every router's counters, added up by slice; how many routers answered.
async fn counters(routers: &[String]) -> (BTreeMap<u32, SliceCounters>, usize) {
    let asks = routers.iter().map(|addr| async move {
        let channel = ChannelSettings::OPERATOR.connect(&Plane::Admin.of(addr)).await.ok()?;
        channel::router_admin(channel).slice_load(SliceLoadRequest {}).await.ok().map(|r| r.into_inner())
    });
    let mut sum: BTreeMap<u32, SliceCounters> = BTreeMap::new();
    let mut answered = 0;
    for answer in futures::future::join_all(asks).await.into_iter().flatten() {
        answered += 1;
        for c in answer.slices {
            let entry = sum.entry(c.slice).or_insert_with(|| SliceCounters { slice: c.slice, ..Default::default() });
            entry.requests += c.requests;
            entry.writes += c.writes;
            entry.request_bytes += c.request_bytes;
        }
    }
    (sum, answered)
}

/// Gathers the report through the routers at `endpoints`, measuring rates
/// over `window`.
pub async fn gather(endpoints: &[String], window: Duration) -> anyhow::Result<Report> {
    let status = cellbank_client::routers::ClusterClient::new(endpoints, None).status().await?;
    let table = status.table.context("the routers have no table yet")?;
    anyhow::ensure!(table.slice_count > 0, "the routing table is not bootstrapped yet");
    let routers: Vec<String> = status.routers.iter().map(|r| r.addr.clone()).collect();
    let (before, _) = counters(&routers).await;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let (after, routers_counted) = counters(&routers).await;
    let seconds = started.elapsed().as_secs_f64().max(0.001);

    let mut slices: BTreeMap<u32, SliceLoad> = BTreeMap::new();
    let slice = |slices: &mut BTreeMap<u32, SliceLoad>, s: u32| -> SliceLoad {
        slices.remove(&s).unwrap_or_else(|| SliceLoad {
            slice: s,
            pair_id: table.slice_pair.get(s as usize).copied().unwrap_or(0),
            ..Default::default()
        })
    };
    for (s, now) in &after {
        let then = before.get(s).cloned().unwrap_or_default();
        let mut row = slice(&mut slices, *s);
        row.requests = now.requests;
        row.writes = now.writes;
        row.request_bytes = now.request_bytes;
        row.requests_per_s = now.requests.saturating_sub(then.requests) as f64 / seconds;
        row.writes_per_s = now.writes.saturating_sub(then.writes) as f64 / seconds;
        slices.insert(*s, row);
    }

    let mut pairs = Vec::new();
    for pair in &table.pairs {
        let replicas =
            table.cells.iter().find(|c| c.cell_id == pair.active_cell_id).map(|c| c.replicas.clone()).with_context(
                || format!("pair {}: active cell {} is not in the table", pair.pair_id, pair.active_cell_id),
            )?;
        let client =
            CellClient::with_settings(replicas, ChannelSettings::OPERATOR, cellbank_client::RetryPolicy::OPERATOR);
        let (leader, _) = client.find_leader().await.with_context(|| format!("cell {}", pair.active_cell_id))?;
        let figures = client
            .admin(leader)?
            .slice_figures(SliceFiguresRequest { slice_count: table.slice_count })
            .await
            .with_context(|| format!("cell {}", pair.active_cell_id))?
            .into_inner();
        let mut balances: BTreeMap<String, i128> = BTreeMap::new();
        let mut load = PairLoad { pair_id: pair.pair_id, active_cell_id: pair.active_cell_id, ..Default::default() };
        for figure in figures.slices {
            // A cell holds only its pair's slices; a figure for another
            // pair's slice would be a moved slice's leftovers.
            if table.slice_pair.get(figure.slice as usize) != Some(&pair.pair_id) {
                continue;
            }
            let mut row = slice(&mut slices, figure.slice);
            row.accounts = figure.accounts;
            row.bytes = figure.bytes;
            slices.insert(figure.slice, row);
            load.accounts += figure.accounts;
            load.bytes += figure.bytes;
            for (currency, sum) in figure.balance_by_currency {
                let sum: i128 =
                    sum.parse().with_context(|| format!("cell {}: balance {sum:?}", pair.active_cell_id))?;
                *balances.entry(currency).or_default() += sum;
            }
        }
        load.balances = balances.into_iter().map(|(c, b)| (c, b.to_string())).collect();
        load.slices = table.slice_pair.iter().filter(|p| **p == pair.pair_id).count() as u32;
        pairs.push(load);
    }
    for row in slices.values() {
        if let Some(pair) = pairs.iter_mut().find(|p| p.pair_id == row.pair_id) {
            pair.requests += row.requests;
            pair.writes += row.writes;
            pair.requests_per_s += row.requests_per_s;
            pair.writes_per_s += row.writes_per_s;
        }
    }
    let mut slices: Vec<SliceLoad> = slices.into_values().collect();
    slices.sort_by(|a, b| {
        b.writes_per_s
            .total_cmp(&a.writes_per_s)
            .then(b.requests_per_s.total_cmp(&a.requests_per_s))
            .then(b.writes.cmp(&a.writes))
            .then(a.slice.cmp(&b.slice))
    });
    Ok(Report {
        slice_count: table.slice_count,
        window_ms: window.as_millis() as u64,
        routers_counted,
        routers: routers.len(),
        pairs,
        slices,
    })
}

/// The report as the CLI prints it: pairs, then the `top` hottest slices.
pub fn render(report: &Report, top: usize) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} slices; rates over {} ms from {} of {} routers\n",
        report.slice_count, report.window_ms, report.routers_counted, report.routers
    ));
    out.push_str("pair  active  slices  accounts        bytes  writes/s  requests/s      writes  balances\n");
    for p in &report.pairs {
        let balances: Vec<String> = p.balances.iter().map(|(c, b)| format!("{b} {c}")).collect();
        out.push_str(&format!(
            "{:<5} {:<7} {:>6} {:>9} {:>12} {:>9.1} {:>11.1} {:>11}  {}\n",
            p.pair_id,
            p.active_cell_id,
            p.slices,
            p.accounts,
            p.bytes,
            p.writes_per_s,
            p.requests_per_s,
            p.writes,
            if balances.is_empty() { "-".into() } else { balances.join(", ") }
        ));
    }
    out.push_str(&format!("hottest slices (of {} with accounts or traffic):\n", report.slices.len()));
    out.push_str("slice  pair  accounts        bytes  writes/s  requests/s      writes    requests\n");
    for s in report.slices.iter().take(top) {
        out.push_str(&format!(
            "{:<6} {:<5} {:>8} {:>12} {:>9.1} {:>11.1} {:>11} {:>11}\n",
            s.slice, s.pair_id, s.accounts, s.bytes, s.writes_per_s, s.requests_per_s, s.writes, s.requests
        ));
    }
    out
}

/// One move of a capacity plan.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PlannedMove {
    pub slice: u32,
    pub from_pair_id: u64,
    pub to_pair_id: u64,
    /// The slice's weight in the plan (its writes, or its accounts when
    /// the routers counted no writes at all).
    pub load: f64,
    pub bytes: u64,
}

/// A plan and what it leaves each pair with.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Plan {
    pub moves: Vec<PlannedMove>,
    /// Pair -> (load before, load after).
    pub loads: BTreeMap<u64, (f64, f64)>,
    pub bytes_moved: u64,
    /// What the load is weighed by: `writes` or `accounts`.
    pub weighed_by: String,
    /// A slice that alone carries more than a target's fair share (no plan
    /// evens that out: a slice is the smallest unit that moves).
    pub dominant: Option<(u32, f64)>,
}

/// Proposes moves that spread the load over `targets` with few bytes moved:
/// every slice of a pair not in `targets` leaves it (to the least loaded
/// target); then, while the most loaded target is more than `tolerance`
/// (a fraction) above the mean, its slice with the most load per byte that
/// does not overshoot goes to the least loaded one. At most `max_moves`.
/// `slice_pair` is the table's slice-to-pair map; slices not in `slices`
/// weigh nothing.
pub fn plan(slices: &[SliceLoad], slice_pair: &[u64], targets: &[u64], tolerance: f64, max_moves: usize) -> Plan {
    let by_writes = slices.iter().any(|s| s.writes > 0);
    let weight = |s: &SliceLoad| if by_writes { s.writes as f64 } else { s.accounts as f64 };
    let known: BTreeMap<u32, &SliceLoad> = slices.iter().map(|s| (s.slice, s)).collect();
    let mut owner: Vec<u64> = slice_pair.to_vec();
    let load_of = |owner: &[u64], pair: u64| -> f64 {
        owner
            .iter()
            .enumerate()
            .filter(|(_, p)| **p == pair)
            .map(|(s, _)| known.get(&(s as u32)).map(|l| weight(l)).unwrap_or(0.0))
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    };
    let pairs: std::collections::BTreeSet<u64> = owner.iter().copied().chain(targets.iter().copied()).collect();
    let before: BTreeMap<u64, f64> = pairs.iter().map(|p| (*p, load_of(&owner, *p))).collect();
    let mut moves = Vec::new();
    let lightest = |owner: &[u64]| {
        targets
            .iter()
            .copied()
            .min_by(|a, b| load_of(owner, *a).total_cmp(&load_of(owner, *b)).then(a.cmp(b)))
            .expect("at least one target")
    };
    // Drain the pairs that are not targets, heaviest slices first.
    let mut leaving: Vec<u32> = (0..owner.len() as u32).filter(|s| !targets.contains(&owner[*s as usize])).collect();
    leaving.sort_by(|a, b| {
        let w = |s: &u32| known.get(s).map(|l| weight(l)).unwrap_or(0.0);
        w(b).total_cmp(&w(a)).then(a.cmp(b))
    });
    for slice in leaving {
        if moves.len() >= max_moves {
            break;
        }
        let to = lightest(&owner);
        let from = owner[slice as usize];
        let row = known.get(&slice);
        moves.push(PlannedMove {
            slice,
            from_pair_id: from,
            to_pair_id: to,
            load: row.map(|l| weight(l)).unwrap_or(0.0),
            bytes: row.map(|l| l.bytes).unwrap_or(0),
        });
        owner[slice as usize] = to;
    }
    // Even the targets out.
    let total: f64 = targets.iter().map(|p| load_of(&owner, *p)).sum();
    let mean = total / targets.len() as f64;
    while moves.len() < max_moves && total > 0.0 {
        let hot = *targets
            .iter()
            .max_by(|a, b| load_of(&owner, **a).total_cmp(&load_of(&owner, **b)).then(b.cmp(a)))
            .expect("targets");
        let cold = lightest(&owner);
        let (hot_load, cold_load) = (load_of(&owner, hot), load_of(&owner, cold));
        if hot_load - mean <= tolerance * mean || hot == cold {
            break;
        }
        // A slice that narrows the gap without reversing it.
        let best = (0..owner.len() as u32)
            .filter(|s| owner[*s as usize] == hot)
            .filter_map(|s| known.get(&s).map(|l| (s, weight(l), l.bytes)))
            .filter(|(_, w, _)| *w > 0.0 && *w < hot_load - cold_load)
            .max_by(|a, b| (a.1 / (a.2 as f64 + 1.0)).total_cmp(&(b.1 / (b.2 as f64 + 1.0))).then(b.0.cmp(&a.0)));
        let Some((slice, load, bytes)) = best else { break };
        moves.push(PlannedMove { slice, from_pair_id: hot, to_pair_id: cold, load, bytes });
        owner[slice as usize] = cold;
    }
    let loads = pairs.iter().map(|p| (*p, (before[p], load_of(&owner, *p)))).collect();
    let bytes_moved = moves.iter().map(|m| m.bytes).sum();
    let dominant = slices
        .iter()
        .map(|s| (s.slice, weight(s)))
        .filter(|(_, w)| total > 0.0 && *w > mean)
        .max_by(|a, b| a.1.total_cmp(&b.1));
    Plan { moves, loads, bytes_moved, weighed_by: if by_writes { "writes" } else { "accounts" }.into(), dominant }
}

/// Runs a plan one move at a time (each through the routers' log and in
/// their audit log as `who`'s, with `why`), pausing `pause` between moves;
/// stops after a move whose freeze exceeded `max_freeze`, or at the first
/// move that fails. Returns the answers of the moves made.
pub async fn apply_plan(
    endpoints: &[String],
    plan: &Plan,
    who: &str,
    why: &str,
    max_freeze: Duration,
    pause: Duration,
    progress: bool,
) -> anyhow::Result<Vec<cellbank_proto::router::MoveSliceResponse>> {
    let client = cellbank_client::routers::ClusterClient::new(endpoints, None);
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(plan.moves.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("moving slices {bar:40} {pos}/{len} {msg}").expect("template"),
        );
        bar
    });
    let mut done = Vec::new();
    for (n, planned) in plan.moves.iter().enumerate() {
        if n > 0 {
            tokio::time::sleep(pause).await;
        }
        let request = cellbank_proto::router::MoveSliceRequest {
            slice: planned.slice,
            to_pair_id: planned.to_pair_id,
            who: who.to_string(),
            why: why.to_string(),
        };
        let answer = client
            .move_slice(request)
            .await
            .with_context(|| format!("moving slice {} to pair {}", planned.slice, planned.to_pair_id))?;
        if let Some(bar) = &bar {
            bar.set_message(format!(
                "slice {} -> pair {}: {} ms frozen",
                planned.slice, planned.to_pair_id, answer.freeze_ms
            ));
            bar.inc(1);
        }
        let freeze = Duration::from_millis(answer.freeze_ms);
        done.push(answer);
        anyhow::ensure!(
            freeze <= max_freeze,
            "slice {} was frozen {} ms, over --max-freeze-ms {}: stopped after {} of {} moves",
            planned.slice,
            freeze.as_millis(),
            max_freeze.as_millis(),
            done.len(),
            plan.moves.len()
        );
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(done)
}

/// The plan as the CLI prints it.
pub fn render_plan(plan: &Plan) -> String {
    let mut out = format!(
        "{} move(s), {} bytes; load weighed by {} counted by the routers\n",
        plan.moves.len(),
        plan.bytes_moved,
        plan.weighed_by
    );
    if let Some((slice, load)) = plan.dominant {
        out.push_str(&format!(
            "slice {slice} alone carries {load:.0}, more than a pair's fair share: moves cannot even that out \
             (a hot user stays hot in one slice)\n"
        ));
    }
    out.push_str("pair  load-before  load-after\n");
    for (pair, (before, after)) in &plan.loads {
        out.push_str(&format!("{pair:<5} {before:>11.0} {after:>11.0}\n"));
    }
    if !plan.moves.is_empty() {
        out.push_str("slice  from  to          load        bytes\n");
        for m in &plan.moves {
            out.push_str(&format!(
                "{:<6} {:<5} {:<5} {:>10.0} {:>12}\n",
                m.slice, m.from_pair_id, m.to_pair_id, m.load, m.bytes
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(slice: u32, writes: u64, bytes: u64) -> SliceLoad {
        SliceLoad { slice, writes, bytes, ..Default::default() }
    }

    #[test]
    fn a_plan_evens_the_load_over_the_targets_with_the_cheapest_slices() {
        // Pair 1 carries everything; pair 2 is new.
        let slices = vec![load(0, 100, 1000), load(1, 100, 10), load(2, 50, 10), load(3, 50, 5000)];
        let plan = plan(&slices, &[1, 1, 1, 1], &[1, 2], 0.05, 100);
        assert_eq!(plan.loads[&1].0, 300.0);
        assert_eq!(plan.loads[&1].1, 150.0);
        assert_eq!(plan.loads[&2].1, 150.0);
        // The cheap slices go: 100 writes in 10 bytes, then 50 in 10.
        let moved: Vec<u32> = plan.moves.iter().map(|m| m.slice).collect();
        assert_eq!(moved, vec![1, 2]);
        assert_eq!(plan.bytes_moved, 20);
        assert_eq!(plan.weighed_by, "writes");
        // Even already: nothing to do.
        let even = super::plan(&slices, &[1, 2, 2, 1], &[1, 2], 0.05, 100);
        assert!(even.moves.is_empty(), "{even:?}");
    }

    #[test]
    fn a_pair_left_out_of_the_targets_is_drained_and_the_cap_holds() {
        let slices = vec![load(0, 10, 1), load(1, 10, 1), load(2, 10, 1), load(3, 10, 1)];
        let drained = plan(&slices, &[1, 2, 3, 3], &[1, 2], 0.05, 100);
        assert!(drained.moves.iter().all(|m| m.from_pair_id == 3 && m.to_pair_id != 3));
        assert_eq!(drained.moves.len(), 2);
        assert_eq!(drained.loads[&3].1, 0.0);
        assert_eq!(drained.loads[&1].1 + drained.loads[&2].1, 40.0);
        let capped = plan(&slices, &[1, 1, 1, 1], &[1, 2], 0.05, 1);
        assert_eq!(capped.moves.len(), 1);
        // No writes counted: weighed by accounts.
        let quiet = vec![
            SliceLoad { slice: 0, accounts: 4, ..Default::default() },
            SliceLoad { slice: 1, accounts: 4, ..Default::default() },
        ];
        let by_accounts = plan(&quiet, &[1, 1], &[1, 2], 0.05, 10);
        assert_eq!(by_accounts.weighed_by, "accounts");
        assert_eq!(by_accounts.moves.len(), 1);
    }
}
