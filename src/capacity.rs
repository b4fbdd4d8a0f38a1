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
