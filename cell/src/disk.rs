//! The data disk's free space, watched. Below the watermark a replica stops
//! taking what would grow its disk: the leader refuses client writes and
//! incoming credits (RESOURCE_EXHAUSTED, saying so), and every replica drops
//! incoming Raft appends and snapshots (the leader resends; the cell keeps
//! its quorum through the replicas with room). RocksDB then never fails a
//! write for lack of space, which would stop the replica (a write it cannot
//! make is a fatal storage error) and, restarted on the same full disk,
//! stop it again. Reads, settlements of credits already sent, envelope
//! expiry and admin calls go on. Above the watermark again, writes resume
//! by themselves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;

/// How often free space is looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Free space on the data disk against a watermark.
pub struct DiskWatch {
    path: PathBuf,
    min_free_bytes: u64,
    free: AtomicU64,
    /// Shared with the Raft transport, which drops appends while it is set.
    low: Arc<AtomicBool>,
    free_gauge: IntGauge,
    low_gauge: IntGauge,
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

impl DiskWatch {
    /// Looks once now, so that a replica started on a full disk refuses
    /// writes from its first request.
    pub fn new(path: &Path, min_free_bytes: u64, registry: &prometheus::Registry) -> Arc<DiskWatch> {
        let watch = Arc::new(DiskWatch {
            path: path.to_path_buf(),
            min_free_bytes,
            free: AtomicU64::new(u64::MAX),
            low: Arc::new(AtomicBool::new(false)),
            free_gauge: cellbank_raft::metrics::gauge(registry, "disk_free_bytes", "Free bytes on the data disk."),
            low_gauge: cellbank_raft::metrics::gauge(
                registry,
                "disk_low",
                "1 while free space is below the watermark and writes are refused.",
            ),
        });
        cellbank_raft::metrics::gauge(
            registry,
            "disk_min_free_bytes",
            "The watermark: below this many free bytes, writes are refused.",
        )
        .set(i64::try_from(min_free_bytes).unwrap_or(i64::MAX));
        watch.check();
        watch
    }

    /// The flag the Raft transport reads.
    pub fn low_flag(&self) -> Arc<AtomicBool> {
        self.low.clone()
    }

    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    fn check(&self) {
        let free = match free_bytes(&self.path) {
            Ok(free) => free,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot read free disk space: {e}");
                return;
            }
        };
        self.free.store(free, Ordering::Relaxed);
        self.free_gauge.set(free.min(i64::MAX as u64) as i64);
        let low = free < self.min_free_bytes;
        let was = self.low.swap(low, Ordering::Relaxed);
        self.low_gauge.set(i64::from(low));
        if low && !was {
            tracing::error!(
                free,
                watermark = self.min_free_bytes,
                path = %self.path.display(),
                "data disk nearly full: refusing writes until space is freed"
            );
        } else if was && !low {
            tracing::info!(free, watermark = self.min_free_bytes, "data disk has room again: writes resume");
        }
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECK_INTERVAL).await;
            self.check();
        }
    }

    /// The refusal of a write while the disk is low; `None` otherwise.
    pub fn refusal(&self, cell_id: u64, replica_id: u64) -> Option<tonic::Status> {
        if !self.is_low() {
            return None;
        }
        let free = self.free.load(Ordering::Relaxed);
        let message = format!(
            "cell {cell_id} replica {replica_id}: {free} bytes free on its data disk, below the watermark of {} \
             bytes; writes are refused until space is freed (nothing was applied)",
            self.min_free_bytes
        );
        Some(cellbank_client::errors::disk_low(message))
    }
}
