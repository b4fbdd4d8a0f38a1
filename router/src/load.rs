//! What a router carries to each slice: requests, writes and bytes, counted
//! as they pass (one relaxed atomic add each), for capacity planning.
//!
//! A call counts at the slice of the user it is routed by (the sender of a
//! transfer or an envelope, the owner of an account read); a cross-cell
//! credit counts as a write at its recipient's slice, where it is applied.
//! Each router counts its own traffic; `RouterAdmin.SliceLoad` answers it
//! and `cellbank capacity status` adds the routers up. Per slice the counts
//! live in memory only (a table may have 65,536 slices: too many series
//! for Prometheus); per pair they are also Prometheus counters
//! (`cellbank_router_pair_requests_total{pair,kind}`,
//! `cellbank_router_pair_request_bytes_total{pair}`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use cellbank_proto::router::{RoutingTable, SliceCounters};

use crate::metrics::RouterMetrics;
use crate::table;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    writes: AtomicU64,
    bytes: AtomicU64,
}

/// Whether a call changes the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
}

pub struct Load {
    started: Instant,
    /// One entry per slice, made when the first call is counted (the slice
    /// count never changes once the table is bootstrapped).
    slices: OnceLock<Box<[Counters]>>,
    metrics: Option<Arc<RouterMetrics>>,
}

impl Load {
    pub fn new(metrics: Option<Arc<RouterMetrics>>) -> Load {
        Load { started: Instant::now(), slices: OnceLock::new(), metrics }
    }

    /// Counts one call routed by `user_id` (nothing before the table is
    /// bootstrapped).
    pub fn record(&self, table: &RoutingTable, user_id: u64, kind: Kind, bytes: usize) {
        self.record_many(table, std::iter::once((user_id, kind, bytes)));
    }

    /// Counts many calls (the items of a batch, the credits of a delivery):
    /// each at its slice, and the per-pair Prometheus counters once per pair
    /// of the batch rather than once per item.
    pub fn record_many(&self, table: &RoutingTable, calls: impl IntoIterator<Item = (u64, Kind, usize)>) {
        if table.slice_count == 0 {
            return;
        }
        let slices = self.slices.get_or_init(|| (0..table.slice_count.max(1)).map(|_| Counters::default()).collect());
        // (pair, reads, writes, bytes): a batch names few pairs.
        let mut pairs: Vec<(u64, u64, u64, u64)> = Vec::new();
        for (user_id, kind, bytes) in calls {
            let Some(route) = table::route(table, user_id) else { continue };
            if let Some(counters) = slices.get(route.slice as usize) {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                if kind == Kind::Write {
                    counters.writes.fetch_add(1, Ordering::Relaxed);
                }
                counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            let at = match pairs.iter().position(|p| p.0 == route.pair_id) {
                Some(at) => at,
                None => {
                    pairs.push((route.pair_id, 0, 0, 0));
                    pairs.len() - 1
                }
            };
            let pair = &mut pairs[at];
            match kind {
                Kind::Read => pair.1 += 1,
                Kind::Write => pair.2 += 1,
            }
            pair.3 += bytes as u64;
        }
        let Some(metrics) = &self.metrics else { return };
        for (pair_id, reads, writes, bytes) in pairs {
            let pair = pair_id.to_string();
            for (kind, count) in [("read", reads), ("write", writes)] {
                if count > 0 {
                    metrics.pair_requests_total.with_label_values(&[&pair, kind]).inc_by(count);
                }
            }
            metrics.pair_request_bytes_total.with_label_values(&[&pair]).inc_by(bytes);
        }
    }

    /// The slices with any traffic so far, by slice.
    pub fn counters(&self) -> Vec<SliceCounters> {
        let Some(slices) = self.slices.get() else { return Vec::new() };
        slices
            .iter()
            .enumerate()
            .map(|(slice, c)| SliceCounters {
                slice: slice as u32,
                requests: c.requests.load(Ordering::Relaxed),
                writes: c.writes.load(Ordering::Relaxed),
                request_bytes: c.bytes.load(Ordering::Relaxed),
            })
            .filter(|c| c.requests > 0)
            .collect()
    }

    /// Milliseconds since counting began.
    pub fn counting_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_count_at_their_users_slice_and_nothing_before_a_table() {
        let load = Load::new(None);
        load.record(&RoutingTable::default(), 1, Kind::Write, 10);
        assert!(load.counters().is_empty());
        let table = RoutingTable {
            slice_count: 8,
            slice_pair: vec![1; 8],
            pairs: vec![cellbank_proto::router::Pair { pair_id: 1, active_cell_id: 1, epoch: 1, ..Default::default() }],
            ..Default::default()
        };
        for _ in 0..3 {
            load.record(&table, 42, Kind::Write, 100);
        }
        load.record(&table, 42, Kind::Read, 20);
        let other = (43..).find(|u| table::slice_of(*u, 8) != table::slice_of(42, 8)).unwrap();
        load.record(&table, other, Kind::Read, 5);
        let (a, b) = (table::slice_of(42, 8), table::slice_of(other, 8));
        let mut expected = vec![
            SliceCounters { slice: a, requests: 4, writes: 3, request_bytes: 320 },
            SliceCounters { slice: b, requests: 1, writes: 0, request_bytes: 5 },
        ];
        expected.sort_by_key(|c| c.slice);
        assert_eq!(load.counters(), expected);
    }
}
