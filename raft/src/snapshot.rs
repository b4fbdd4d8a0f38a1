//! Snapshots on disk: built into a file, sent from it a chunk at a time,
//! received into a file, checked as they arrive and installed from the file
//! in bounded batches, so no replica holds a whole ledger in memory.
//!
//! raft-rs carries a snapshot's data inside its messages; here that data is
//! a [`BodyRef`] (the body's length and CRC-32), and the body is a file in
//! the replica's snapshot directory named by the snapshot's index and term:
//! `built-<index>-<term>.snap` on the replica that made it,
//! `received-<index>-<term>.snap` on the one that got it. A body is the
//! state region as length-prefixed pairs (`u32` key length, key, `u32` value
//! length, value), decoded incrementally by [`BodyDecoder`].
//!
//! Files are written to a `.tmp` name, fsynced and renamed, so a file with
//! its final name is whole. A receiver refuses a body that does not decode,
//! whose keys leave the state region, whose pairs the state machine refuses
//! ([`crate::StateMachine::check_snapshot_pair`]), or whose length or CRC-32
//! differ from the reference: before raft-rs sees the snapshot.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use raft::eraftpb::{ConfState, Entry, Snapshot, SnapshotMetadata};
use rocksdb::DB;

use crate::storage::{
    fatal, log_key, read_u64, read_u64_pair, APPLIED_INDEX_KEY, CONF_STATE_KEY, PEER_PREFIX, STATE_PREFIX,
    TRUNCATED_STATE_KEY,
};

/// Largest key or value of a body: a length past it is a corrupt or
/// hostile body, refused before anything is buffered for it.
pub const PAIR_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes read from a body file at a time.
pub const READ_BYTES: usize = 1024 * 1024;

const MAGIC: &[u8; 8] = b"cbsnap01";

/// Why a snapshot body cannot be installed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotBodyError {
    #[error("snapshot body truncated in a length")]
    TruncatedLength,
    #[error("snapshot body truncated in a value")]
    TruncatedValue,
    #[error("snapshot key outside the state region: {0:02x?}")]
    KeyOutsideState(Vec<u8>),
    #[error("snapshot peer address is not UTF-8")]
    PeerAddressNotUtf8,
    #[error("a snapshot key or value of {0} bytes (at most {PAIR_BYTES_MAX})")]
    PairTooLarge(usize),
    #[error("snapshot data is not a reference to a body ({0} bytes)")]
    NotAReference(usize),
    #[error("snapshot body: {0}")]
    Mismatch(String),
    #[error("snapshot record refused: {0}")]
    Refused(String),
    #[error("snapshot file: {0}")]
    Io(String),
    #[error("a snapshot is being installed here")]
    Installing,
}

fn io(what: &str, path: &Path, error: std::io::Error) -> SnapshotBodyError {
    SnapshotBodyError::Io(format!("{what} {}: {error}", path.display()))
}

/// Called with every pair of a body, in order.
pub type EachPair<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), SnapshotBodyError> + 'a;
/// A body's pairs, owned.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// What raft-rs carries as a snapshot's data: the body's length and CRC-32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyRef {
    pub len: u64,
    pub crc: u32,
}

impl BodyRef {
    pub const ENCODED_BYTES: usize = 20;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub fn decode(data: &[u8]) -> Result<BodyRef, SnapshotBodyError> {
        if data.len() != Self::ENCODED_BYTES || &data[..8] != MAGIC {
            return Err(SnapshotBodyError::NotAReference(data.len()));
        }
        let len = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_be_bytes(data[16..20].try_into().expect("4 bytes"));
        Ok(BodyRef { len, crc })
    }
}

/// Whether a pair may be in a body at all: a state key, or a peer address
/// key with a UTF-8 address.
fn check_region(key: &[u8], value: &[u8]) -> Result<(), SnapshotBodyError> {
    let is_state = key.first() == Some(&STATE_PREFIX);
    let is_peer = key.starts_with(PEER_PREFIX) && key.len() == PEER_PREFIX.len() + 8;
    if !is_state && !is_peer {
        return Err(SnapshotBodyError::KeyOutsideState(key.to_vec()));
    }
    if is_peer && std::str::from_utf8(value).is_err() {
        return Err(SnapshotBodyError::PeerAddressNotUtf8);
    }
    Ok(())
}

/// Decodes a body pushed to it in pieces of any size, handing out each
/// pair (checked against the region rules) as soon as it is whole. Holds
/// at most one pair plus one piece.
#[derive(Default)]
pub struct BodyDecoder {
    pending: Vec<u8>,
    pairs: u64,
}

impl BodyDecoder {
    pub fn new() -> BodyDecoder {
        BodyDecoder::default()
    }

    pub fn push(&mut self, bytes: &[u8], each: &mut EachPair<'_>) -> Result<(), SnapshotBodyError> {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        let length = |buf: &[u8], at: usize| -> Option<Result<usize, SnapshotBodyError>> {
            let bytes = buf.get(at..at + 4)?;
            let len = u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize;
            Some(if len > PAIR_BYTES_MAX { Err(SnapshotBodyError::PairTooLarge(len)) } else { Ok(len) })
        };
        while let Some(key_len) = length(&self.pending, at) {
            let key_len = key_len?;
            let Some(value_len) = length(&self.pending, at + 4 + key_len) else { break };
            let value_len = value_len?;
            let end = at + 8 + key_len + value_len;
            if self.pending.len() < end {
                break;
            }
            let key = &self.pending[at + 4..at + 4 + key_len];
            let value = &self.pending[at + 8 + key_len..end];
            check_region(key, value)?;
            each(key, value)?;
            self.pairs += 1;
            at = end;
        }
        self.pending.drain(..at);
        Ok(())
    }

    /// The number of pairs, once the body ended on a pair's boundary.
    pub fn finish(self) -> Result<u64, SnapshotBodyError> {
        match self.pending.len() {
            0 => Ok(self.pairs),
            1..=3 => Err(SnapshotBodyError::TruncatedLength),
            n => {
                let key_len = u32::from_be_bytes(self.pending[..4].try_into().expect("4 bytes")) as usize;
                if n < 4 + key_len + 4 && n >= 4 + key_len {
                    Err(SnapshotBodyError::TruncatedLength)
                } else {
                    Err(SnapshotBodyError::TruncatedValue)
                }
            }
        }
    }
}

/// The pairs of a whole body held in memory (tests and fuzzing).
pub fn decode_body(body: &[u8]) -> Result<Pairs, SnapshotBodyError> {
    let mut pairs = Vec::new();
    let mut decoder = BodyDecoder::new();
    decoder.push(body, &mut |key, value| {
        pairs.push((key.to_vec(), value.to_vec()));
        Ok(())
    })?;
    decoder.finish()?;
    Ok(pairs)
}

/// Writes one pair in the body encoding.
pub fn encode_pair(out: &mut impl Write, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    out.write_all(&(key.len() as u32).to_be_bytes())?;
    out.write_all(key)?;
    out.write_all(&(value.len() as u32).to_be_bytes())?;
    out.write_all(value)
}

/// A body file being written under a name of its own (no other writer
/// touches it), counted and summed, renamed into place by
/// [`BodyWriter::finish`] once fsynced; dropped unfinished, it removes its
/// temporary file.
struct BodyWriter {
    /// Taken by `finish`.
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    len: u64,
    crc: crc32fast::Hasher,
}

impl BodyWriter {
    fn create(path: PathBuf) -> Result<BodyWriter, SnapshotBodyError> {
        let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
        let file =
            std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io("create", &tmp, e))?;
        Ok(BodyWriter {
            out: Some(BufWriter::with_capacity(READ_BYTES, file)),
            tmp,
            path,
            len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotBodyError> {
        let out = self.out.as_mut().expect("written before finish");
        out.write_all(bytes).map_err(|e| io("write", &self.tmp, e))?;
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<BodyRef, SnapshotBodyError> {
        let out = self.out.take().expect("finished once");
        let file = out.into_inner().map_err(|e| io("write", &self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io("sync", &self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| io("rename", &self.tmp, e))?;
        sync_dir(&self.path)?;
        Ok(BodyRef { len: self.len, crc: self.crc.clone().finalize() })
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<(), SnapshotBodyError> {
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("sync", dir, e))?;
    }
    Ok(())
}

/// A snapshot body arriving from the leader, checked as it is written.
pub struct Incoming {
    writer: BodyWriter,
    decoder: BodyDecoder,
    expected: BodyRef,
    check: fn(&[u8], &[u8]) -> Result<(), String>,
}

impl Incoming {
    /// Appends the next piece; refuses a body longer than its reference or
    /// a pair the region rules or the state machine refuse.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotBodyError> {
        if self.writer.len + bytes.len() as u64 > self.expected.len {
            return Err(SnapshotBodyError::Mismatch(format!("longer than its {} bytes", self.expected.len)));
        }
        let check = self.check;
        self.decoder.push(bytes, &mut |key, value| {
            if key.first() == Some(&STATE_PREFIX) {
                check(key, value).map_err(SnapshotBodyError::Refused)?;
            }
            Ok(())
        })?;
        self.writer.write(bytes)
    }

    /// Ends the body: whole pairs, the length and CRC-32 the leader named,
    /// fsynced under its final name.
    pub fn finish(self) -> Result<BodyRef, SnapshotBodyError> {
        self.decoder.finish()?;
        let writer = self.writer;
        if writer.len != self.expected.len {
            return Err(SnapshotBodyError::Mismatch(format!("{} of {} bytes", writer.len, self.expected.len)));
        }
        let crc = writer.crc.clone().finalize();
        if crc != self.expected.crc {
            return Err(SnapshotBodyError::Mismatch(format!(
                "CRC-32 {crc:08x}, the leader's {:08x}",
                self.expected.crc
            )));
        }
        writer.finish()
    }
}

/// One replica's snapshot files.
#[derive(Debug)]
pub struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    /// Opens (creates) the directory and drops what an interrupted write
    /// or build left there.
    pub fn open(path: &Path) -> SnapshotDir {
        std::fs::create_dir_all(path).unwrap_or_else(|e| fatal("create the snapshot directory", e));
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                let provisional = entry.file_name().to_string_lossy().starts_with("building-");
                if provisional || entry.path().extension().is_some_and(|ext| ext == "tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        SnapshotDir { path: path.to_path_buf() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self, kind: &str, metadata: &SnapshotMetadata, body: &BodyRef) -> PathBuf {
        self.path.join(format!("{kind}-{}-{}-{:08x}.snap", metadata.index, metadata.term, body.crc))
    }

    /// The body file of a snapshot this replica built.
    pub fn built(&self, metadata: &SnapshotMetadata, body: &BodyRef) -> PathBuf {
        self.file("built", metadata, body)
    }

    /// The body file of a snapshot this replica received (the CRC-32 in the
    /// name: two bodies for one index and term never share a file).
    pub fn received(&self, metadata: &SnapshotMetadata, body: &BodyRef) -> PathBuf {
        self.file("received", metadata, body)
    }

    /// A received body once its install began: named in the install marker
    /// (by the same metadata and reference), touched by no pruning, removed
    /// when the install is done.
    pub fn installing(&self, metadata: &SnapshotMetadata, body: &BodyRef) -> PathBuf {
        self.file("installing", metadata, body)
    }

    /// Takes a received body for installing (a rename, made durable).
    pub fn pin_for_install(&self, metadata: &SnapshotMetadata, body: &BodyRef) -> Result<PathBuf, SnapshotBodyError> {
        let (from, to) = (self.received(metadata, body), self.installing(metadata, body));
        std::fs::rename(&from, &to).map_err(|e| io("rename", &from, e))?;
        sync_dir(&to)?;
        Ok(to)
    }

    /// Starts receiving the body of the snapshot `metadata` names, which
    /// must match `expected`; `check` is the state machine's rule for its
    /// pairs.
    pub fn receive(
        &self,
        metadata: &SnapshotMetadata,
        expected: BodyRef,
        check: fn(&[u8], &[u8]) -> Result<(), String>,
    ) -> Result<Incoming, SnapshotBodyError> {
        let writer = BodyWriter::create(self.received(metadata, &expected))?;
        Ok(Incoming { writer, decoder: BodyDecoder::new(), expected, check })
    }

    /// Whether a received snapshot's body is here, whole (it was checked as
    /// it arrived; its length is checked again).
    pub fn check_received(&self, metadata: &SnapshotMetadata, body: &BodyRef) -> Result<(), SnapshotBodyError> {
        let path = self.received(metadata, body);
        let len = std::fs::metadata(&path).map_err(|e| io("read", &path, e))?.len();
        if len != body.len {
            return Err(SnapshotBodyError::Mismatch(format!("{} holds {len} of {} bytes", path.display(), body.len)));
        }
        Ok(())
    }

    /// Reads a body file, handing out its pairs, and checks its length and
    /// CRC-32 against `body` at the end.
    pub fn read(path: &Path, body: &BodyRef, each: &mut EachPair<'_>) -> Result<(), SnapshotBodyError> {
        let file = File::open(path).map_err(|e| io("open", path, e))?;
        let mut reader = BufReader::with_capacity(READ_BYTES, file);
        let mut decoder = BodyDecoder::new();
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            let n = reader.read(&mut buf).map_err(|e| io("read", path, e))?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            len += n as u64;
            decoder.push(&buf[..n], each)?;
        }
        decoder.finish()?;
        let crc = crc.finalize();
        if len != body.len || crc != body.crc {
            return Err(SnapshotBodyError::Mismatch(format!(
                "{}: {len} bytes with CRC-32 {crc:08x}, expected {} with {:08x}",
                path.display(),
                body.len,
                body.crc
            )));
        }
        Ok(())
    }

    /// The body files here: (kind, index, term, path) of every
    /// `<kind>-<index>-<term>-<crc>.snap`.
    fn bodies(&self) -> Vec<(String, u64, u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.path) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let mut parts = name.strip_suffix(".snap")?.split('-');
                let kind = parts.next()?.to_string();
                let index = parts.next()?.parse().ok()?;
                let term = parts.next()?.parse().ok()?;
                Some((kind, index, term, entry.path()))
            })
            .collect()
    }

    /// Removes the body files `remove` picks (by kind and index). A file
    /// that cannot be removed stays until the next pruning: nothing reads a
    /// body it was not handed by name.
    fn remove_where(&self, remove: impl Fn(&str, u64) -> bool) {
        for (kind, index, _, path) in self.bodies() {
            if remove(&kind, index) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Removes the received bodies of snapshots at or below `index`:
    /// raft will not install them (one at `index` was just installed).
    pub fn prune_received_through(&self, index: u64) {
        self.remove_where(|kind, at| kind == "received" && at <= index);
    }

    /// Keeps the newest built body and the one before it (a send of the
    /// previous snapshot may still be queued for a peer that is
    /// reconnecting), removing older ones.
    fn prune_built(&self) {
        let mut built: Vec<(u64, u64, PathBuf)> =
            self.bodies().into_iter().filter(|(kind, ..)| kind == "built").map(|(_, i, t, p)| (i, t, p)).collect();
        built.sort();
        let keep = built.len().saturating_sub(2);
        for (_, _, path) in built.into_iter().take(keep) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Removes every body file of `kind`.
    pub fn prune(&self, kind: &str) {
        self.remove_where(|k, _| k == kind);
    }

    /// Builds a snapshot of the applied state from one consistent RocksDB
    /// view (the applied index, the conf state and the state region are
    /// written together by each apply batch) into a body file, a pair at a
    /// time. Older built files are removed once this one is in place.
    pub fn build(&self, db: &DB) -> Result<Snapshot, SnapshotBodyError> {
        use protobuf::Message as _;
        let view = db.snapshot();
        if crate::storage::installing(&view) {
            return Err(SnapshotBodyError::Installing);
        }
        let applied = read_u64(&view, APPLIED_INDEX_KEY).unwrap_or(0);
        let conf_state = match view.get(CONF_STATE_KEY).unwrap_or_else(|e| fatal("read", e)) {
            Some(bytes) => ConfState::parse_from_bytes(&bytes).unwrap_or_else(|e| fatal("conf state", e)),
            None => ConfState::default(),
        };
        let (truncated_index, truncated_term) = match view.get(TRUNCATED_STATE_KEY).unwrap_or_else(|e| fatal("read", e))
        {
            Some(bytes) => read_u64_pair(&bytes),
            None => (0, 0),
        };
        let term = if applied == truncated_index {
            truncated_term
        } else {
            let bytes = view
                .get(log_key(applied))
                .unwrap_or_else(|e| fatal("read", e))
                .unwrap_or_else(|| fatal("snapshot", format!("applied entry {applied} is not in the log")));
            Entry::parse_from_bytes(&bytes).unwrap_or_else(|e| fatal("decode entry", e)).term
        };
        let mut meta = SnapshotMetadata::default();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(conf_state);
        // Written under a provisional name; renamed once its CRC-32 is known.
        let provisional = self.path.join(format!("building-{}-{}.snap", meta.index, meta.term));
        let mut writer = BodyWriter::create(provisional.clone())?;
        let mut pair = Vec::new();
        for prefix in [PEER_PREFIX.to_vec(), vec![STATE_PREFIX]] {
            let mut iter = view.raw_iterator();
            iter.seek(&prefix);
            while iter.valid() {
                let key = iter.key().expect("key");
                if !key.starts_with(&prefix) {
                    break;
                }
                pair.clear();
                encode_pair(&mut pair, key, iter.value().expect("value")).expect("write to memory");
                writer.write(&pair)?;
                iter.next();
            }
            iter.status().unwrap_or_else(|e| fatal("scan for snapshot", e));
        }
        let body = writer.finish()?;
        let path = self.built(&meta, &body);
        std::fs::rename(&provisional, &path).map_err(|e| io("rename", &provisional, e))?;
        sync_dir(&path)?;
        self.prune_built();
        let mut snapshot = Snapshot::default();
        snapshot.data = body.encode().into();
        snapshot.set_metadata(meta);
        Ok(snapshot)
    }

    /// Carries a snapshot from the replica that built it (`from`) to this
    /// one as the transport does, a piece at a time: for tests that pass
    /// messages in memory.
    pub fn carry_from(
        &self,
        from: &SnapshotDir,
        snapshot: &Snapshot,
        check: fn(&[u8], &[u8]) -> Result<(), String>,
    ) -> Result<(), SnapshotBodyError> {
        let body = BodyRef::decode(&snapshot.data)?;
        let path = from.built(snapshot.get_metadata(), &body);
        let mut file = File::open(&path).map_err(|e| io("open", &path, e))?;
        let mut incoming = self.receive(snapshot.get_metadata(), body, check)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|e| io("read", &path, e))?;
            if n == 0 {
                break;
            }
            incoming.write(&buf[..n])?;
        }
        incoming.finish().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in pairs {
            encode_pair(&mut out, key, value).unwrap();
        }
        out
    }

    #[test]
    fn a_body_decodes_the_same_in_pieces_of_any_size() {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..50u8)
            .map(|i| (vec![STATE_PREFIX, i], vec![i; usize::from(i) * 7]))
            .chain(std::iter::once((crate::storage::peer_key(3), b"127.0.0.1:7000".to_vec())))
            .collect();
        let bytes = body(&pairs);
        assert_eq!(decode_body(&bytes).unwrap(), pairs);
        for piece in [1, 2, 3, 5, 64, 1000] {
            let mut decoder = BodyDecoder::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                decoder
                    .push(chunk, &mut |k, v| {
                        got.push((k.to_vec(), v.to_vec()));
                        Ok(())
                    })
                    .unwrap();
            }
            assert_eq!(decoder.finish().unwrap(), pairs.len() as u64);
            assert_eq!(got, pairs, "pieces of {piece}");
        }
    }

    #[test]
    fn a_body_that_is_cut_short_leaves_the_state_region_or_claims_a_huge_pair_is_refused() {
        let bytes = body(&[(vec![STATE_PREFIX, 1], vec![9; 10])]);
        assert_eq!(decode_body(&bytes[..bytes.len() - 1]), Err(SnapshotBodyError::TruncatedValue));
        assert_eq!(decode_body(&bytes[..2]), Err(SnapshotBodyError::TruncatedLength));
        assert_eq!(decode_body(&bytes[..7]), Err(SnapshotBodyError::TruncatedLength));
        let foreign = body(&[(crate::storage::HARD_STATE_KEY.to_vec(), vec![1])]);
        assert_eq!(
            decode_body(&foreign),
            Err(SnapshotBodyError::KeyOutsideState(crate::storage::HARD_STATE_KEY.to_vec()))
        );
        let short_peer = body(&[(PEER_PREFIX.to_vec(), b"x".to_vec())]);
        assert_eq!(decode_body(&short_peer), Err(SnapshotBodyError::KeyOutsideState(PEER_PREFIX.to_vec())));
        let bad_peer = body(&[(crate::storage::peer_key(3), vec![0xff])]);
        assert_eq!(decode_body(&bad_peer), Err(SnapshotBodyError::PeerAddressNotUtf8));
        let huge = (PAIR_BYTES_MAX as u32 + 1).to_be_bytes();
        assert_eq!(decode_body(&huge), Err(SnapshotBodyError::PairTooLarge(PAIR_BYTES_MAX + 1)));
    }

    #[test]
    fn a_received_body_must_match_its_reference_and_the_state_machines_rule() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path());
        let bytes = body(&[(vec![STATE_PREFIX, 1], vec![1]), (vec![STATE_PREFIX, 2], vec![2])]);
        let reference = BodyRef { len: bytes.len() as u64, crc: crc32fast::hash(&bytes) };
        let mut meta = SnapshotMetadata::default();
        meta.index = 7;
        meta.term = 2;
        let ok = |_: &[u8], _: &[u8]| Ok(());
        let mut incoming = snapshots.receive(&meta, reference, ok).unwrap();
        incoming.write(&bytes[..5]).unwrap();
        incoming.write(&bytes[5..]).unwrap();
        assert_eq!(incoming.finish().unwrap(), reference);
        snapshots.check_received(&meta, &reference).unwrap();
        let mut read = 0;
        SnapshotDir::read(&snapshots.received(&meta, &reference), &reference, &mut |_, _| {
            read += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(read, 2);

        let wrong_crc = BodyRef { crc: reference.crc ^ 1, ..reference };
        let mut incoming = snapshots.receive(&meta, wrong_crc, ok).unwrap();
        incoming.write(&bytes).unwrap();
        assert!(matches!(incoming.finish(), Err(SnapshotBodyError::Mismatch(_))));
        let short = BodyRef { len: 3, ..reference };
        let mut incoming = snapshots.receive(&meta, short, ok).unwrap();
        assert!(matches!(incoming.write(&bytes), Err(SnapshotBodyError::Mismatch(_))));
        drop(incoming);
        let refuse_two = |key: &[u8], _: &[u8]| if key[1] == 2 { Err("no two".to_string()) } else { Ok(()) };
        let mut incoming = snapshots.receive(&meta, reference, refuse_two).unwrap();
        assert_eq!(incoming.write(&bytes), Err(SnapshotBodyError::Refused("no two".into())));
        drop(incoming);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_eq!(BodyRef::decode(&reference.encode()), Ok(reference));

        // Two bodies for one index and term never share a file; once one
        // at an index is installed, bodies at or below it go.
        let other = BodyRef { crc: reference.crc ^ 0xff, ..reference };
        assert_ne!(snapshots.received(&meta, &reference), snapshots.received(&meta, &other));
        let mut newer = meta.clone();
        newer.index = 9;
        std::fs::write(snapshots.received(&newer, &reference), b"x").unwrap();
        snapshots.prune_received_through(7);
        assert!(!snapshots.received(&meta, &reference).exists());
        assert!(snapshots.received(&newer, &reference).exists());
        assert_eq!(BodyRef::decode(&bytes), Err(SnapshotBodyError::NotAReference(bytes.len())));
    }
}
