//! Durable Raft storage on RocksDB: the log, the hard state, the conf state,
//! the apply state and the state machine's keys, all in one RocksDB instance.
//!
//! Key layout (one byte prefix per region, big-endian numbers so that keys
//! sort in index order):
//!
//! | key                     | value                                         |
//! |-------------------------|-----------------------------------------------|
//! | `0x01 'h'`              | `eraftpb.HardState`                           |
//! | `0x01 't'`              | truncated state: index u64, term u64          |
//! | `0x02 index`            | `eraftpb.Entry`                               |
//! | `0x03 'a'`              | applied index u64                             |
//! | `0x03 'c'`              | `eraftpb.ConfState` as of the applied index   |
//! | `0x03 'p' replica_id`   | a peer's gRPC address (as of applied index)   |
//! | `0x04 …`                | the state machine's keys                      |
//!
//! Invariants this module keeps:
//! - `truncated_index < first_index = truncated_index + 1 <= last_index + 1`;
//!   every index in `first_index..=last_index` has an entry on disk.
//! - Log appends and the hard state are written in one batch; the batch is
//!   fsynced when raft says `must_sync`, before any message acknowledging it
//!   leaves the process (the caller sends persisted messages only afterwards).
//! - The applied index, the conf state and the state machine's changes are
//!   written in one atomic batch ([`RaftStorage::write_apply`]).
//! - The log is only compacted up to the applied index, and the compaction is
//!   written after the apply batch that reached that index, so the WAL order
//!   makes any crash recover a prefix: never "compacted but not applied".
//! - Any RocksDB error panics: a replica that cannot persist must not run.

use std::collections::VecDeque;
use std::path::Path;

pub use crate::snapshot::SnapshotBodyError;
use crate::snapshot::{BodyRef, SnapshotDir};
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{WriteBatch, WriteOptions, DB};

pub const HARD_STATE_KEY: &[u8] = b"\x01h";
pub const TRUNCATED_STATE_KEY: &[u8] = b"\x01t";
pub const LOG_PREFIX: u8 = 0x02;
pub const APPLIED_INDEX_KEY: &[u8] = b"\x03a";
pub const CONF_STATE_KEY: &[u8] = b"\x03c";
pub const PEER_PREFIX: &[u8] = b"\x03p";
/// Present while a snapshot is being installed (its body reference and
/// metadata): a replica that stops half way installs it again at start.
pub const INSTALLING_KEY: &[u8] = b"\x01s";
/// Every state machine key starts with this byte.
pub const STATE_PREFIX: u8 = 0x04;

/// A founded cell starts with its log truncated at this index and term, so
/// that the founding conf state exists only in snapshots: a replica that
/// joins later cannot replay entries from 1 (which would not tell it the
/// founders) and is sent a snapshot instead.
pub const BOOTSTRAP_INDEX: u64 = 5;
pub const BOOTSTRAP_TERM: u64 = 5;

/// Most bytes of recent log entries kept in memory for replication.
pub const ENTRY_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;

pub fn log_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = LOG_PREFIX;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

pub fn peer_key(replica_id: u64) -> Vec<u8> {
    let mut key = PEER_PREFIX.to_vec();
    key.extend_from_slice(&replica_id.to_be_bytes());
    key
}

pub(crate) fn fatal(what: &str, err: impl std::fmt::Display) -> ! {
    panic!("storage failure ({what}): {err}; stopping the replica rather than diverge")
}

/// The block cache of a replica: data, index and filter blocks.
pub const BLOCK_CACHE_BYTES: usize = 128 * 1024 * 1024;

pub fn open_db(path: &Path) -> Arc<DB> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.set_max_background_jobs(2);
    // Measured with `cellbank bench` on one cell of three (CPU the replicas
    // spent per transfer, batched and unary through a router): universal
    // compaction keeps the write amplification, and so the background CPU,
    // low for this write-heavy workload. Memtables trade two costs: a
    // large one makes each insert a deeper, cache-missing skip-list search
    // (unary entries of ~50 transfers land at random places: 86 us per
    // transfer at 64 MiB against 67 at 16), a small one flushes often and
    // writes Raft log entries to files before they are deleted (batched:
    // 28 us at 64 MiB against 40 at 16). Four 16 MiB memtables merged into
    // one flush give both: cheap inserts, and flushes that drop what was
    // written and deleted in between (28 us batched, 70-74 unary).
    options.set_compaction_style(rocksdb::DBCompactionStyle::Universal);
    options.set_write_buffer_size(16 * 1024 * 1024);
    options.set_min_write_buffer_number_to_merge(4);
    options.set_max_write_buffer_number(6);
    options.set_keep_log_file_num(4);
    // Most point reads during apply are misses (a new transfer id): bloom
    // filters on the memtable and on SST files let them skip the search.
    options.set_memtable_whole_key_filtering(true);
    options.set_memtable_prefix_bloom_ratio(0.1);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES));
    // Index and filter blocks live in the block cache, partitioned, so a
    // replica's memory is bounded by the cache whatever its data grows to
    // (held outside it, they grew with every file: a replica's resident
    // memory went from 300 to 560 MiB over ten minutes of batched load).
    // Only the small top level of each file's partitioned index and filter
    // stays pinned (universal compaction keeps its sorted runs in level 0,
    // so pinning level 0 would pin blocks in proportion to the data).
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_partition_filters(true);
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_top_level_index_and_filter(true);
    options.set_block_based_table_factory(&table);
    match DB::open(&options, path) {
        Ok(db) => Arc::new(db),
        Err(err) => fatal("open", err),
    }
}

pub(crate) fn read_u64_pair(bytes: &[u8]) -> (u64, u64) {
    assert_eq!(bytes.len(), 16, "truncated state must be 16 bytes");
    let a = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let b = u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes"));
    (a, b)
}

/// Snapshots are built off the Raft thread: building one means reading the
/// whole state region, which must not stall heartbeats.
enum SnapshotBuild {
    Idle,
    Building,
    Ready(Snapshot),
}

/// Raft storage backed by RocksDB, with the recent log tail cached in memory.
pub struct RaftStorage {
    db: Arc<DB>,
    hard_state: HardState,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    /// Contiguous entries ending at `last_index` (may be empty).
    cache: VecDeque<Entry>,
    cache_bytes: usize,
    /// Encoded size of every entry in `first_index..=last_index`, in order,
    /// so the log can be compacted by bytes as well as by count.
    entry_sizes: VecDeque<(u64, u64)>,
    log_bytes: u64,
    snapshot_build: Arc<Mutex<SnapshotBuild>>,
    snapshots: Arc<SnapshotDir>,
    /// An install a stop interrupted was completed when the storage opened:
    /// the state machine must drop what it loaded before.
    pub resumed_install: bool,
}

impl RaftStorage {
    /// Opens the storage. When the database is new and `initial_voters` is not
    /// empty, bootstraps the conf state with them (every founding replica does
    /// the same); a replica that joins later starts with no voters and is
    /// initialized by a snapshot from the leader.
    pub fn open(db: Arc<DB>, initial_voters: &[u64], snapshots: Arc<SnapshotDir>) -> RaftStorage {
        let resumed_install = match db.get(INSTALLING_KEY).unwrap_or_else(|e| fatal("read", e)) {
            Some(marker) => {
                let (body, meta) = decode_marker(&marker);
                tracing::warn!(index = meta.index, "a snapshot install was interrupted: installing it again");
                write_snapshot_state(&db, &snapshots, &body, &meta)
                    .unwrap_or_else(|e| fatal("resume the snapshot install", e));
                true
            }
            None => {
                // Bodies received (or pinned, before their install began)
                // before a stop: raft asks again if it still needs one.
                snapshots.prune("received");
                snapshots.prune("installing");
                false
            }
        };
        let get = |key: &[u8]| db.get(key).unwrap_or_else(|e| fatal("read", e));
        let conf_state = match get(CONF_STATE_KEY) {
            Some(bytes) => ConfState::parse_from_bytes(&bytes).unwrap_or_else(|e| fatal("conf state", e)),
            None => {
                let mut cs = ConfState::default();
                cs.voters = initial_voters.to_vec();
                if !initial_voters.is_empty() {
                    let mut batch = WriteBatch::default();
                    batch.put(CONF_STATE_KEY, cs.write_to_bytes().expect("encode"));
                    let mut truncated = BOOTSTRAP_INDEX.to_be_bytes().to_vec();
                    truncated.extend_from_slice(&BOOTSTRAP_TERM.to_be_bytes());
                    batch.put(TRUNCATED_STATE_KEY, truncated);
                    batch.put(APPLIED_INDEX_KEY, BOOTSTRAP_INDEX.to_be_bytes());
                    let mut hs = HardState::default();
                    hs.term = BOOTSTRAP_TERM;
                    hs.commit = BOOTSTRAP_INDEX;
                    batch.put(HARD_STATE_KEY, hs.write_to_bytes().expect("encode"));
                    let mut opts = WriteOptions::default();
                    opts.set_sync(true);
                    db.write_opt(batch, &opts).unwrap_or_else(|e| fatal("bootstrap", e));
                }
                cs
            }
        };
        let hard_state = match get(HARD_STATE_KEY) {
            Some(bytes) => HardState::parse_from_bytes(&bytes).unwrap_or_else(|e| fatal("hard state", e)),
            None => HardState::default(),
        };
        let (truncated_index, truncated_term) = match get(TRUNCATED_STATE_KEY) {
            Some(bytes) => read_u64_pair(&bytes),
            None => (0, 0),
        };
        let mut last_index = truncated_index;
        let mut iter = db.raw_iterator();
        iter.seek_for_prev(log_key(u64::MAX));
        if iter.valid() {
            let key = iter.key().expect("valid iterator has a key");
            if key[0] == LOG_PREFIX {
                last_index = u64::from_be_bytes(key[1..9].try_into().expect("9-byte log key"));
            }
        }
        iter.status().unwrap_or_else(|e| fatal("scan log", e));
        drop(iter);
        assert!(last_index >= truncated_index, "log ends before the truncation point");
        let mut entry_sizes = VecDeque::new();
        let mut log_bytes = 0;
        let mut iter = db.raw_iterator();
        iter.seek(log_key(truncated_index + 1));
        while iter.valid() {
            let key = iter.key().expect("valid iterator has a key");
            if key[0] != LOG_PREFIX {
                break;
            }
            let index = u64::from_be_bytes(key[1..9].try_into().expect("9-byte log key"));
            let size = iter.value().expect("value").len() as u64;
            entry_sizes.push_back((index, size));
            log_bytes += size;
            iter.next();
        }
        iter.status().unwrap_or_else(|e| fatal("scan log", e));
        drop(iter);
        RaftStorage {
            db,
            hard_state,
            conf_state,
            truncated_index,
            truncated_term,
            last_index,
            cache: VecDeque::new(),
            cache_bytes: 0,
            entry_sizes,
            log_bytes,
            snapshot_build: Arc::new(Mutex::new(SnapshotBuild::Idle)),
            snapshots,
            resumed_install,
        }
    }

    pub fn snapshots(&self) -> &Arc<SnapshotDir> {
        &self.snapshots
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn applied_index(&self) -> u64 {
        match self.db.get(APPLIED_INDEX_KEY).unwrap_or_else(|e| fatal("read", e)) {
            Some(bytes) => u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            None => 0,
        }
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn truncated_index(&self) -> u64 {
        self.truncated_index
    }

    /// Appends entries (truncating any conflicting tail) and writes the hard
    /// state, in one batch; fsyncs when `sync`.
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>, sync: bool) {
        let mut batch = WriteBatch::default();
        if let Some(first) = entries.first() {
            let first_index = first.index;
            assert!(
                first_index > self.truncated_index,
                "append at {first_index} at or below the truncation point {}",
                self.truncated_index
            );
            assert!(
                first_index <= self.last_index + 1,
                "append at {first_index} leaves a gap after {}",
                self.last_index
            );
            for (offset, entry) in entries.iter().enumerate() {
                assert_eq!(entry.index, first_index + offset as u64, "entries not contiguous");
                batch.put(log_key(entry.index), entry.write_to_bytes().expect("encode entry"));
            }
            let new_last = entries.last().expect("non-empty").index;
            if new_last < self.last_index {
                batch.delete_range(log_key(new_last + 1), log_key(self.last_index + 1));
            }
        }
        if let Some(hs) = hard_state {
            batch.put(HARD_STATE_KEY, hs.write_to_bytes().expect("encode hard state"));
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        if sync {
            crate::faults::disk_sync().unwrap_or_else(|e| fatal("append", e));
        }
        self.db.write_opt(batch, &opts).unwrap_or_else(|e| fatal("append", e));
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        if let Some(first) = entries.first() {
            self.cache_append(first.index, entries);
            self.sizes_append(first.index, entries);
            self.last_index = entries.last().expect("non-empty").index;
        }
    }

    fn sizes_append(&mut self, first_index: u64, entries: &[Entry]) {
        while let Some(&(index, size)) = self.entry_sizes.back() {
            if index < first_index {
                break;
            }
            self.log_bytes -= size;
            self.entry_sizes.pop_back();
        }
        for entry in entries {
            let size = entry.compute_size() as u64;
            self.entry_sizes.push_back((entry.index, size));
            self.log_bytes += size;
        }
    }

    /// Bytes of log entries held (after the truncation point).
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// The lowest compaction index that leaves at most `bytes_max` of log.
    pub fn compaction_index_for_bytes(&self, bytes_max: u64) -> u64 {
        let mut remaining = self.log_bytes;
        let mut index = self.truncated_index;
        for &(entry_index, size) in &self.entry_sizes {
            if remaining <= bytes_max {
                break;
            }
            remaining -= size;
            index = entry_index;
        }
        index
    }

    fn cache_append(&mut self, first_index: u64, entries: &[Entry]) {
        while let Some(back) = self.cache.back() {
            if back.index >= first_index {
                self.cache_bytes -= back.compute_size() as usize;
                self.cache.pop_back();
            } else {
                break;
            }
        }
        if let Some(back) = self.cache.back() {
            if back.index + 1 != first_index {
                self.cache.clear();
                self.cache_bytes = 0;
            }
        }
        for entry in entries {
            self.cache_bytes += entry.compute_size() as usize;
            self.cache.push_back(entry.clone());
        }
        while self.cache_bytes > ENTRY_CACHE_BYTES_MAX && self.cache.len() > 1 {
            let front = self.cache.pop_front().expect("non-empty");
            self.cache_bytes -= front.compute_size() as usize;
        }
    }

    /// Writes an apply batch: the state machine's changes plus the applied
    /// index and the conf state. When the applied index passes the commit
    /// index on disk, the last persisted hard state goes in the same batch
    /// with its commit raised to the applied index (never beyond: every
    /// applied entry is already in the persisted log, while raft's in-memory
    /// commit may cover entries that are not). Not fsynced: the entries it
    /// applies are already durable in the log, and any later synced write
    /// makes it durable too (one WAL).
    pub fn write_apply(&mut self, mut batch: WriteBatch, applied_index: u64, conf_state: Option<&ConfState>) {
        assert!(
            applied_index <= self.last_index,
            "applied {applied_index} beyond the persisted log {}",
            self.last_index
        );
        batch.put(APPLIED_INDEX_KEY, applied_index.to_be_bytes());
        if let Some(cs) = conf_state {
            batch.put(CONF_STATE_KEY, cs.write_to_bytes().expect("encode conf state"));
            self.conf_state = cs.clone();
        }
        if self.hard_state.commit < applied_index {
            self.hard_state.commit = applied_index;
            batch.put(HARD_STATE_KEY, self.hard_state.write_to_bytes().expect("encode hard state"));
        }
        let opts = WriteOptions::default();
        self.db.write_opt(batch, &opts).unwrap_or_else(|e| fatal("apply", e));
    }

    /// Releases the cached snapshot body (it may be large) once a follower
    /// has it or gave up on it; the next request builds a fresh one.
    pub fn release_snapshot(&self) {
        let mut build = self.snapshot_build.lock().expect("snapshot lock");
        if matches!(*build, SnapshotBuild::Ready(_)) {
            *build = SnapshotBuild::Idle;
        }
    }

    /// Drops log entries up to and including `index` (which must be applied).
    pub fn compact(&mut self, index: u64, applied_index: u64) {
        if index <= self.truncated_index {
            return;
        }
        assert!(index <= applied_index, "compact to {index} beyond applied {applied_index}");
        assert!(index <= self.last_index, "compact to {index} beyond last {}", self.last_index);
        let term = raft::Storage::term(self, index).unwrap_or_else(|e| fatal("term for compaction", e));
        let mut batch = WriteBatch::default();
        let mut state = index.to_be_bytes().to_vec();
        state.extend_from_slice(&term.to_be_bytes());
        batch.put(TRUNCATED_STATE_KEY, state);
        batch.delete_range(log_key(self.truncated_index + 1), log_key(index + 1));
        self.db.write_opt(batch, &WriteOptions::default()).unwrap_or_else(|e| fatal("compact", e));
        self.truncated_index = index;
        self.truncated_term = term;
        while let Some(&(entry_index, size)) = self.entry_sizes.front() {
            if entry_index > index {
                break;
            }
            self.log_bytes -= size;
            self.entry_sizes.pop_front();
        }
        while let Some(front) = self.cache.front() {
            if front.index <= index {
                self.cache_bytes -= front.compute_size() as usize;
                self.cache.pop_front();
            } else {
                break;
            }
        }
    }

    /// Replaces the whole state with a snapshot from the leader, durably,
    /// from its received body file (checked again first: a body damaged on
    /// this disk stops the replica before anything is changed).
    pub fn install_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), SnapshotBodyError> {
        let meta = snapshot.get_metadata();
        let body = BodyRef::decode(&snapshot.data)?;
        // Pinned under a name no pruning touches before anything changes.
        let path = self.snapshots.pin_for_install(meta, &body)?;
        if let Err(error) = SnapshotDir::read(&path, &body, &mut |_, _| Ok(())) {
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        let hs = write_snapshot_state(&self.db, &self.snapshots, &body, meta)?;
        self.hard_state = hs;
        self.conf_state = meta.get_conf_state().clone();
        self.truncated_index = meta.index;
        self.truncated_term = meta.term;
        self.last_index = meta.index;
        self.cache.clear();
        self.cache_bytes = 0;
        self.entry_sizes.clear();
        self.log_bytes = 0;
        Ok(())
    }

    fn read_entry(&self, index: u64) -> Entry {
        if let Some(front) = self.cache.front() {
            if index >= front.index && index <= self.last_index {
                let entry = &self.cache[(index - front.index) as usize];
                debug_assert_eq!(entry.index, index);
                return entry.clone();
            }
        }
        let bytes = self
            .db
            .get(log_key(index))
            .unwrap_or_else(|e| fatal("read entry", e))
            .unwrap_or_else(|| fatal("read entry", format!("entry {index} missing from the log")));
        Entry::parse_from_bytes(&bytes).unwrap_or_else(|e| fatal("decode entry", e))
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= self.last_index + 1, "entries({low}, {high}) past last index {}", self.last_index);
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for index in low..high {
            let entry = self.read_entry(index);
            size += entry.compute_size() as u64;
            if !entries.is_empty() && size > max_size {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.truncated_index {
            return Ok(self.truncated_term);
        }
        if index < self.truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.read_entry(index).term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    /// Hands out the snapshot built in the background if it is still usable
    /// (its index is not below the compacted log); otherwise starts building
    /// one and answers "temporarily unavailable", so raft asks again later.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut build = self.snapshot_build.lock().expect("snapshot lock");
        match &*build {
            SnapshotBuild::Building => return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
            SnapshotBuild::Ready(snapshot) => {
                let meta = snapshot.get_metadata();
                let conf = meta.get_conf_state();
                // A receiver refuses a snapshot whose configuration does not
                // name it, so one built before a membership change is stale.
                let current = conf == &self.conf_state && (conf.voters.contains(&to) || conf.learners.contains(&to));
                if current && meta.index >= self.truncated_index && meta.index >= request_index {
                    return Ok(snapshot.clone());
                }
            }
            SnapshotBuild::Idle => {}
        }
        *build = SnapshotBuild::Building;
        let db = self.db.clone();
        let slot = self.snapshot_build.clone();
        let snapshots = self.snapshots.clone();
        std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn(move || {
                let built = snapshots.build(&db);
                let mut slot = slot.lock().expect("snapshot lock");
                match built {
                    Ok(snapshot) => {
                        let body = BodyRef::decode(&snapshot.data).expect("a body reference");
                        tracing::info!(index = snapshot.get_metadata().index, bytes = body.len, "built a snapshot");
                        *slot = SnapshotBuild::Ready(snapshot);
                    }
                    Err(error) => {
                        // A full disk, say: raft asks again later.
                        tracing::error!(%error, "cannot build a snapshot");
                        *slot = SnapshotBuild::Idle;
                    }
                }
            })
            .expect("spawn snapshot builder");
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

/// Reads a big-endian u64 (the applied index, say) from a consistent view.
pub fn read_u64(view: &rocksdb::SnapshotWithThreadMode<'_, DB>, key: &[u8]) -> Option<u64> {
    view.get(key)
        .unwrap_or_else(|e| fatal("read", e))
        .map(|bytes| u64::from_be_bytes(bytes[..8].try_into().expect("8-byte value")))
}

/// Whether `view` shows a snapshot install under way: its state region is
/// then part old, part new, and nothing should be read from it.
pub fn installing(view: &rocksdb::SnapshotWithThreadMode<'_, DB>) -> bool {
    view.get(INSTALLING_KEY).unwrap_or_else(|e| fatal("read", e)).is_some()
}

/// Most bytes of pairs written to RocksDB in one batch while installing.
const INSTALL_BATCH_BYTES: usize = 4 * 1024 * 1024;

fn encode_marker(body: &BodyRef, meta: &SnapshotMetadata) -> Vec<u8> {
    let mut marker = body.encode();
    marker.extend_from_slice(&meta.write_to_bytes().expect("encode snapshot metadata"));
    marker
}

fn decode_marker(marker: &[u8]) -> (BodyRef, SnapshotMetadata) {
    let split = BodyRef::ENCODED_BYTES.min(marker.len());
    let body = BodyRef::decode(&marker[..split]).unwrap_or_else(|e| fatal("snapshot install marker", e));
    let meta =
        SnapshotMetadata::parse_from_bytes(&marker[split..]).unwrap_or_else(|e| fatal("snapshot install marker", e));
    (body, meta)
}

/// Writes a pinned snapshot body's state in bounded batches: first (fsynced)
/// the install marker with the old log and state deleted, then the pairs,
/// then (fsynced) the snapshot's log, apply and conf state with the marker
/// removed. A stop in between leaves the marker, and the storage installs
/// the same pinned file again when it opens; the file is removed after.
/// Returns the hard state written.
fn write_snapshot_state(
    db: &DB,
    snapshots: &SnapshotDir,
    body: &BodyRef,
    meta: &SnapshotMetadata,
) -> Result<HardState, SnapshotBodyError> {
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    let mut batch = WriteBatch::default();
    batch.put(INSTALLING_KEY, encode_marker(body, meta));
    batch.delete_range(vec![LOG_PREFIX], vec![LOG_PREFIX + 1]);
    batch.delete_range(vec![STATE_PREFIX], vec![STATE_PREFIX + 1]);
    let mut peer_end = PEER_PREFIX.to_vec();
    peer_end.push(0xff);
    peer_end.extend_from_slice(&[0xff; 8]);
    batch.delete_range(PEER_PREFIX.to_vec(), peer_end);
    db.write_opt(batch, &synced).unwrap_or_else(|e| fatal("start a snapshot install", e));

    let path = snapshots.installing(meta, body);
    let mut batch = WriteBatch::default();
    SnapshotDir::read(&path, body, &mut |key, value| {
        batch.put(key, value);
        if crate::faults::crash_installing_snapshot() {
            db.write(std::mem::take(&mut batch)).unwrap_or_else(|e| fatal("install snapshot", e));
            tracing::error!("injected fault: stopping in the middle of a snapshot install");
            std::process::abort();
        }
        if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
            db.write(std::mem::take(&mut batch)).unwrap_or_else(|e| fatal("install snapshot", e));
        }
        Ok(())
    })?;
    let mut state = meta.index.to_be_bytes().to_vec();
    state.extend_from_slice(&meta.term.to_be_bytes());
    batch.put(TRUNCATED_STATE_KEY, state);
    batch.put(APPLIED_INDEX_KEY, meta.index.to_be_bytes());
    batch.put(CONF_STATE_KEY, meta.get_conf_state().write_to_bytes().expect("encode"));
    let mut hs = match db.get(HARD_STATE_KEY).unwrap_or_else(|e| fatal("read", e)) {
        Some(bytes) => HardState::parse_from_bytes(&bytes).unwrap_or_else(|e| fatal("hard state", e)),
        None => HardState::default(),
    };
    hs.commit = hs.commit.max(meta.index);
    if meta.term > hs.term {
        hs.term = meta.term;
        hs.vote = 0;
    }
    batch.put(HARD_STATE_KEY, hs.write_to_bytes().expect("encode"));
    batch.delete(INSTALLING_KEY);
    db.write_opt(batch, &synced).unwrap_or_else(|e| fatal("install snapshot", e));
    let _ = std::fs::remove_file(&path);
    snapshots.prune_received_through(meta.index);
    Ok(hs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        let mut entry = Entry::default();
        entry.index = index;
        entry.term = term;
        entry.data = format!("entry {index:08}").into_bytes().into();
        entry
    }

    #[test]
    fn founding_starts_past_the_bootstrap_index() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open_in(dir.path(), &[1, 2, 3]);
        assert_eq!(storage.first_index().unwrap(), BOOTSTRAP_INDEX + 1);
        assert_eq!(storage.last_index().unwrap(), BOOTSTRAP_INDEX);
        assert_eq!(storage.term(BOOTSTRAP_INDEX).unwrap(), BOOTSTRAP_TERM);
        assert_eq!(storage.applied_index(), BOOTSTRAP_INDEX);
        assert_eq!(storage.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        assert!(matches!(
            storage.entries(1, 6, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
    }

    /// The commit index on disk never passes the persisted log, even when
    /// raft's in-memory commit does, so a restart always finds
    /// `commit <= last_index` and `applied <= commit`.
    #[test]
    fn apply_raises_commit_only_to_the_applied_index() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut storage = open_in(dir.path(), &[1]);
            let mut hs = storage.hard_state().clone();
            hs.term = 6;
            storage.append(&[entry(6, 6), entry(7, 6), entry(8, 6)], Some(&hs), true);
            storage.write_apply(WriteBatch::default(), 7, None);
        }
        let storage = open_in(dir.path(), &[1]);
        let state = storage.initial_state().unwrap();
        assert_eq!(state.hard_state.commit, 7);
        assert_eq!(state.hard_state.term, 6);
        assert_eq!(storage.applied_index(), 7);
        assert_eq!(storage.last_index().unwrap(), 8);
    }

    #[test]
    fn conflicting_append_truncates_the_tail_and_compaction_keeps_terms() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = open_in(dir.path(), &[1]);
        storage.append(&[entry(6, 6), entry(7, 6), entry(8, 6)], None, true);
        storage.append(&[entry(7, 7)], None, true);
        assert_eq!(storage.last_index().unwrap(), 7);
        assert_eq!(storage.term(7).unwrap(), 7);
        storage.write_apply(WriteBatch::default(), 7, None);
        storage.compact(6, 7);
        assert_eq!(storage.first_index().unwrap(), 7);
        assert_eq!(storage.term(6).unwrap(), 6);
        drop(storage);
        let storage = open_in(dir.path(), &[1]);
        assert_eq!((storage.first_index().unwrap(), storage.last_index().unwrap()), (7, 7));
        assert_eq!(storage.entries(7, 8, None, GetEntriesContext::empty(false)).unwrap()[0].term, 7);
    }

    #[test]
    fn log_bytes_are_counted_through_appends_conflicts_compaction_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut storage = open_in(dir.path(), &[1]);
        let entries: Vec<Entry> = (6..=15).map(|i| entry(i, 6)).collect();
        let size = entries[0].compute_size() as u64;
        storage.append(&entries, None, true);
        assert_eq!(storage.log_bytes(), 10 * size);
        storage.append(&[entry(14, 7)], None, true);
        assert_eq!(storage.log_bytes(), 9 * size);
        // Keeping at most 4 entries' worth means compacting through index 10.
        assert_eq!(storage.compaction_index_for_bytes(4 * size), 10);
        storage.write_apply(WriteBatch::default(), 14, None);
        storage.compact(10, 14);
        assert_eq!(storage.log_bytes(), 4 * size);
        drop(storage);
        let storage = open_in(dir.path(), &[1]);
        assert_eq!(storage.log_bytes(), 4 * size);
        assert_eq!(storage.compaction_index_for_bytes(u64::MAX), 10);
    }

    fn open_in(dir: &Path, voters: &[u64]) -> RaftStorage {
        RaftStorage::open(open_db(&dir.join("db")), voters, Arc::new(SnapshotDir::open(&dir.join("snapshots"))))
    }

    fn state_of(db: &DB) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for prefix in [PEER_PREFIX.to_vec(), vec![STATE_PREFIX]] {
            for item in db.prefix_iterator(&prefix) {
                let (key, value) = item.unwrap();
                if !key.starts_with(&prefix) {
                    break;
                }
                out.push((key.to_vec(), value.to_vec()));
            }
        }
        out
    }

    #[test]
    fn a_snapshot_goes_through_files_and_an_interrupted_install_completes_at_the_next_start() {
        let leader_dir = tempfile::tempdir().unwrap();
        let leader_db = open_db(&leader_dir.path().join("db"));
        let leader_snapshots = Arc::new(SnapshotDir::open(&leader_dir.path().join("snapshots")));
        let _leader = RaftStorage::open(leader_db.clone(), &[1, 2], leader_snapshots.clone());
        leader_db.put(peer_key(2), b"127.0.0.1:7120").unwrap();
        for i in 0..2_000u32 {
            leader_db.put([&[STATE_PREFIX][..], &i.to_be_bytes()].concat(), vec![7; 1 + (i % 300) as usize]).unwrap();
        }
        let snapshot = leader_snapshots.build(&leader_db).unwrap();
        assert_eq!(snapshot.get_metadata().index, BOOTSTRAP_INDEX);
        assert_eq!(snapshot.data.len(), BodyRef::ENCODED_BYTES, "raft carries a reference, not the body");
        let want = state_of(&leader_db);

        // A follower receives the body a piece at a time and installs it.
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"));
        let snapshots = Arc::new(SnapshotDir::open(&dir.path().join("snapshots")));
        let mut storage = RaftStorage::open(db.clone(), &[], snapshots.clone());
        db.put([STATE_PREFIX, 0xee], b"stale").unwrap();
        snapshots.carry_from(&leader_snapshots, &snapshot, |_, _| Ok(())).unwrap();
        storage.install_snapshot(&snapshot).unwrap();
        assert_eq!(state_of(&db), want);
        assert_eq!(storage.applied_index(), BOOTSTRAP_INDEX);
        assert_eq!(raft::Storage::first_index(&storage).unwrap(), BOOTSTRAP_INDEX + 1);
        let body = BodyRef::decode(&snapshot.data).unwrap();
        let meta = snapshot.get_metadata();
        assert!(!snapshots.received(meta, &body).exists(), "the body file is removed once installed");
        assert!(!snapshots.installing(meta, &body).exists(), "the body file is removed once installed");

        // Another stops after the install began (the marker written, the
        // old state deleted, some pairs in): at its next start the storage
        // installs the same file again before anything reads the state.
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"));
        let snapshots = Arc::new(SnapshotDir::open(&dir.path().join("snapshots")));
        drop(RaftStorage::open(db.clone(), &[], snapshots.clone()));
        snapshots.carry_from(&leader_snapshots, &snapshot, |_, _| Ok(())).unwrap();
        snapshots.pin_for_install(meta, &body).unwrap();
        // A newer body arriving meanwhile prunes nothing the install needs.
        snapshots.prune_received_through(u64::MAX);
        db.put(INSTALLING_KEY, encode_marker(&body, snapshot.get_metadata())).unwrap();
        db.put([STATE_PREFIX, 0, 0, 0, 1], b"half written").unwrap();
        let storage = RaftStorage::open(db.clone(), &[], snapshots.clone());
        assert!(storage.resumed_install);
        assert_eq!(state_of(&db), want);
        assert_eq!(storage.applied_index(), BOOTSTRAP_INDEX);
        assert!(db.get(INSTALLING_KEY).unwrap().is_none());
        assert!(!snapshots.installing(meta, &body).exists());

        // A body damaged on the follower's disk is refused before anything
        // changes.
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db"));
        let snapshots = Arc::new(SnapshotDir::open(&dir.path().join("snapshots")));
        let mut storage = RaftStorage::open(db.clone(), &[], snapshots.clone());
        db.put([STATE_PREFIX, 1], b"kept").unwrap();
        snapshots.carry_from(&leader_snapshots, &snapshot, |_, _| Ok(())).unwrap();
        let path = snapshots.received(meta, &body);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(storage.install_snapshot(&snapshot), Err(SnapshotBodyError::Mismatch(_))));
        assert_eq!(state_of(&db), vec![(vec![STATE_PREFIX, 1], b"kept".to_vec())]);
    }
}
