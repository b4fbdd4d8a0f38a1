//! Generic Raft machinery, written once for every replicated group cellbank
//! runs: the ledger cells and the routers' routing table. It knows nothing of
//! money; a group supplies a [`StateMachine`].
//!
//! - [`storage`]: the durable log, hard state, conf state and apply state on
//!   RocksDB, and snapshots of the state region.
//! - [`node`]: [`node::RaftNode`], which owns the `RawNode` and a
//!   [`StateMachine`] and handles `Ready` exactly in the order of the raft-rs
//!   contract. It owns no socket and no clock: ticks, messages and proposals
//!   come in as calls, outgoing messages leave through a callback. That makes
//!   it deterministic and testable with a simulated network.
//! - [`driver`]: the one thread that owns a `RaftNode` in production: ticks on
//!   a fixed cadence, drains an input queue, batches proposals.
//! - [`group`]: opens a member's storage and starts its node and driver.
//! - [`snapshot`]: snapshot bodies as files: built, received and installed
//!   a bounded piece at a time;
//! - [`transport`]: peer messages over long-lived gRPC streams, snapshots in
//!   chunks; [`service`]: the `RaftTransport` service that receives them.
//! - [`config`]: election and log-compaction tuning; [`metrics`]: the
//!   process's Prometheus registry with the group's series, and its endpoint.
//! - [`faults`]: fault points for chaos drills (compiled in with the
//!   `fault-points` feature); [`mutation`]: deliberate bugs for the
//!   simulator's mutation checks.

// tonic::Status is the error of the transport service and its helpers.
#![allow(clippy::result_large_err)]
// raft-rs's protobuf types are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

pub mod config;
pub mod driver;
pub mod faults;
pub mod group;
pub mod metrics;
pub mod mutation;
pub mod node;
pub mod service;
pub mod snapshot;
pub mod storage;
pub mod transport;

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use rocksdb::{WriteBatch, DB};

/// Key-value access for a state machine's apply: reads see the writes made
/// earlier in the same batch.
pub trait Kv {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn put(&mut self, key: &[u8], value: &[u8]);
    fn delete(&mut self, key: &[u8]);
    /// Deletes every key in `[start, end)`.
    fn clear_range(&mut self, start: &[u8], end: &[u8]);
}

/// Read-only [`Kv`] over the database, for read paths outside apply.
pub struct ReadOnlyDb<'a>(pub &'a DB);

impl Kv for ReadOnlyDb<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).unwrap_or_else(|e| panic!("storage failure (read): {e}"))
    }
    fn put(&mut self, _key: &[u8], _value: &[u8]) {
        unreachable!("a read path never writes")
    }
    fn delete(&mut self, _key: &[u8]) {
        unreachable!("a read path never writes")
    }
    fn clear_range(&mut self, _start: &[u8], _end: &[u8]) {
        unreachable!("a read path never writes")
    }
}

/// A deterministic state machine replicated by a [`node::RaftNode`]. It keeps
/// all of its state under [`storage::STATE_PREFIX`] so that snapshots, which
/// copy that region, carry all of it.
pub trait StateMachine: Send + 'static {
    type Command: Send + 'static;
    type Output: Send + 'static;

    /// Encodes many commands (from many clients) as one Raft entry. The
    /// proposer's clock reading goes inside so that apply needs no clock.
    fn encode_batch(&self, commands: Vec<Self::Command>, timestamp_ms: u64) -> Vec<u8>;

    /// Applies one entry: one output per command, in order. Must be a pure
    /// function of (state, index, data). Panics on corruption.
    fn apply(&mut self, kv: &mut dyn Kv, index: u64, data: &[u8]) -> Vec<Self::Output>;

    /// Checks a normal entry that arrived from the network, before raft
    /// takes it: an entry `apply` could not decode is refused here, where
    /// nothing has changed yet, instead of panicking every replica at apply.
    /// The transport service calls it on its own threads (a full decode of
    /// every appended entry stays off the Raft thread).
    fn check_entry(_data: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Whether a pair of the state region may be in a snapshot body: called
    /// for every state pair of a snapshot as it is received, before raft
    /// sees the snapshot, so a body the state machine could not read is
    /// refused instead of installed. The transport calls it on its own
    /// threads.
    fn check_snapshot_pair(_key: &[u8], _value: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// The state was replaced by a snapshot: drop anything held in memory.
    fn restored(&mut self) {}
}

/// A batch of writes on top of a RocksDB instance, with an overlay so that
/// later commands in the batch read earlier commands' writes.
/// Most keys an apply batch is sized for up front (a full entry of transfers).
const APPLY_BATCH_KEYS_EXPECTED: usize = 16_384;

/// Each key is written once, with its last value, however often the batch
/// changed it (a hot account moved by many transfers in one entry).
pub struct ApplyBatch<'a> {
    db: &'a DB,
    overlay: FxHashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Ranges deleted in this batch (before any write in the overlay).
    cleared: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> ApplyBatch<'a> {
    pub fn new(db: &'a DB) -> ApplyBatch<'a> {
        ApplyBatch::for_bytes(db, usize::MAX)
    }

    /// A batch sized for entries holding `data_bytes` of commands (about one
    /// key written per 8 bytes of command), so that small entries do not pay
    /// for a table sized for the largest.
    pub fn for_bytes(db: &'a DB, data_bytes: usize) -> ApplyBatch<'a> {
        let keys = (data_bytes / 8).clamp(16, APPLY_BATCH_KEYS_EXPECTED);
        ApplyBatch { db, overlay: FxHashMap::with_capacity_and_hasher(keys, Default::default()), cleared: Vec::new() }
    }

    /// The batch, in ascending key order: RocksDB's memtable inserts a
    /// sorted run of keys much faster than a shuffled one (each insert starts
    /// its search where the previous one ended).
    pub fn into_write_batch(self) -> WriteBatch {
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = self.overlay.into_iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut batch = WriteBatch::default();
        for (start, end) in &self.cleared {
            batch.delete_range(start, end);
        }
        for (key, value) in writes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        batch
    }
}

impl Kv for ApplyBatch<'_> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(value) = self.overlay.get(key) {
            return value.clone();
        }
        if self.cleared.iter().any(|(start, end)| key >= start.as_slice() && key < end.as_slice()) {
            return None;
        }
        self.db.get(key).unwrap_or_else(|e| panic!("storage failure (read during apply): {e}"))
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.overlay.insert(key.to_vec(), Some(value.to_vec()));
    }

    fn delete(&mut self, key: &[u8]) {
        self.overlay.insert(key.to_vec(), None);
    }

    fn clear_range(&mut self, start: &[u8], end: &[u8]) {
        self.overlay.retain(|key, _| !(key.as_slice() >= start && key.as_slice() < end));
        self.cleared.push((start.to_vec(), end.to_vec()));
    }
}

/// An in-memory [`Kv`], for unit tests of state machines.
impl Kv for BTreeMap<Vec<u8>, Vec<u8>> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        BTreeMap::get(self, key).cloned()
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.insert(key.to_vec(), value.to_vec());
    }

    fn delete(&mut self, key: &[u8]) {
        self.remove(key);
    }

    fn clear_range(&mut self, start: &[u8], end: &[u8]) {
        self.retain(|key, _| !(key.as_slice() >= start && key.as_slice() < end));
    }
}

/// A slog drain that forwards raft-rs's log lines to `tracing`.
pub struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, _values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let message = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{message}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}"),
            slog::Level::Info => tracing::info!(target: "raft", "{message}"),
            _ => tracing::debug!(target: "raft", "{message}"),
        }
        Ok(())
    }
}

pub fn raft_logger(replica_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("replica" => replica_id))
}
