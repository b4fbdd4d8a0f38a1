//! Checksums on what replicas send each other: Raft batches, Raft snapshot
//! chunks, and the standby stream's entries and snapshot chunks. TLS already
//! protects bytes on the wire; these catch what TLS cannot: a sender's bug
//! or memory corruption between reading its log and sending, and a message
//! from a process of another cluster wired to the wrong address (also
//! refused by the cluster name the messages carry, with or without TLS).
//!
//! The checksum is CRC-32 (IEEE) over each field in a fixed order, every
//! variable-length field preceded by its length, so that moving bytes from
//! one field to the next changes it.

use cellbank_proto::cell::{RaftBatch, SnapshotChunk, SourceEntries, SourceSnapshotChunk};
use prost::Message as _;

/// Why a message failed its integrity check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    #[error("the sender belongs to cluster {found:?}, this process to {expected:?}")]
    OtherCluster { found: String, expected: String },
    #[error("checksum {found:08x} does not match the content ({computed:08x}): corrupted or forged")]
    Checksum { found: u32, computed: u32 },
}

impl From<IntegrityError> for tonic::Status {
    fn from(error: IntegrityError) -> tonic::Status {
        match error {
            IntegrityError::OtherCluster { .. } => tonic::Status::failed_precondition(format!("cluster: {error}")),
            IntegrityError::Checksum { .. } => tonic::Status::data_loss(format!("checksum: {error}")),
        }
    }
}

/// Accumulates fields in order.
struct Sum(crc32fast::Hasher);

impl Sum {
    fn new(kind: &[u8]) -> Sum {
        let mut sum = Sum(crc32fast::Hasher::new());
        sum.bytes(kind);
        sum
    }
    fn u64(&mut self, value: u64) -> &mut Sum {
        self.0.update(&value.to_be_bytes());
        self
    }
    fn bytes(&mut self, value: &[u8]) -> &mut Sum {
        self.0.update(&(value.len() as u64).to_be_bytes());
        self.0.update(value);
        self
    }
    fn finish(&mut self) -> u32 {
        std::mem::take(&mut self.0).finalize()
    }
}

pub fn raft_batch(batch: &RaftBatch) -> u32 {
    let mut sum = Sum::new(b"raft batch");
    sum.u64(batch.cell_id).u64(batch.from_replica_id).bytes(batch.from_addr.as_bytes());
    sum.bytes(batch.cluster.as_bytes()).u64(batch.messages.len() as u64);
    for message in &batch.messages {
        sum.bytes(message);
    }
    sum.finish()
}

pub fn snapshot_chunk(chunk: &SnapshotChunk) -> u32 {
    let mut sum = Sum::new(b"raft snapshot chunk");
    sum.u64(chunk.cell_id).bytes(chunk.cluster.as_bytes()).bytes(&chunk.message).u64(chunk.total_len);
    sum.bytes(&chunk.data).finish()
}

pub fn source_entries(entries: &SourceEntries) -> u32 {
    let mut sum = Sum::new(b"standby entries");
    sum.u64(entries.source_cell_id).u64(entries.epoch).u64(entries.first_index).u64(entries.entries.len() as u64);
    for entry in &entries.entries {
        sum.bytes(entry);
    }
    sum.finish()
}

pub fn source_snapshot(chunk: &SourceSnapshotChunk) -> u32 {
    let mut sum = Sum::new(b"standby snapshot chunk");
    sum.u64(chunk.source_cell_id).u64(chunk.epoch).u64(chunk.snapshot_index).u64(chunk.chunk);
    sum.u64(chunk.keys.len() as u64).u64(chunk.values.len() as u64);
    for (key, value) in chunk.keys.iter().zip(&chunk.values) {
        sum.bytes(key).bytes(value);
    }
    sum.u64(u64::from(chunk.last));
    match &chunk.source_state {
        Some(state) => sum.u64(1).bytes(&state.encode_to_vec()),
        None => sum.u64(0),
    };
    sum.finish()
}

/// Compares a carried checksum with the computed one.
pub fn check(found: u32, computed: u32) -> Result<(), IntegrityError> {
    if found != computed {
        return Err(IntegrityError::Checksum { found, computed });
    }
    Ok(())
}

/// Compares a carried cluster name with this process's.
pub fn check_cluster(found: &str, expected: &str) -> Result<(), IntegrityError> {
    if found != expected {
        return Err(IntegrityError::OtherCluster { found: found.into(), expected: expected.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_bytes_between_fields_or_flipping_one_changes_the_sum() {
        let batch = RaftBatch {
            cell_id: 1,
            messages: vec![b"ab".to_vec(), b"c".to_vec()],
            from_replica_id: 2,
            from_addr: "h:1".into(),
            cluster: "local".into(),
            checksum: 0,
        };
        let base = raft_batch(&batch);
        let moved = RaftBatch { messages: vec![b"a".to_vec(), b"bc".to_vec()], ..batch.clone() };
        assert_ne!(base, raft_batch(&moved));
        let other_cluster = RaftBatch { cluster: "prod".into(), ..batch.clone() };
        assert_ne!(base, raft_batch(&other_cluster));
        let mut flipped = batch.clone();
        flipped.messages[1][0] ^= 1;
        assert_ne!(base, raft_batch(&flipped));
        // The carried checksum itself is not part of the sum.
        assert_eq!(base, raft_batch(&RaftBatch { checksum: base, ..batch }));
        assert!(check(base, base).is_ok());
        assert!(matches!(check(base ^ 1, base), Err(IntegrityError::Checksum { .. })));
        assert!(matches!(check_cluster("a", "b"), Err(IntegrityError::OtherCluster { .. })));
    }

    #[test]
    fn a_standby_chunk_sum_covers_keys_values_and_state() {
        let chunk = SourceSnapshotChunk {
            source_cell_id: 1,
            epoch: 2,
            snapshot_index: 3,
            chunk: 0,
            keys: vec![b"k".to_vec()],
            values: vec![b"v".to_vec()],
            last: true,
            source_state: Some(Default::default()),
            checksum: 0,
        };
        let base = source_snapshot(&chunk);
        assert_ne!(base, source_snapshot(&SourceSnapshotChunk { values: vec![b"w".to_vec()], ..chunk.clone() }));
        assert_ne!(base, source_snapshot(&SourceSnapshotChunk { last: false, ..chunk.clone() }));
        assert_ne!(base, source_snapshot(&SourceSnapshotChunk { source_state: None, ..chunk.clone() }));
        let entries =
            SourceEntries { source_cell_id: 1, epoch: 2, first_index: 3, entries: vec![vec![1]], checksum: 0 };
        assert_ne!(source_entries(&entries), source_entries(&SourceEntries { first_index: 4, ..entries.clone() }));
    }
}
