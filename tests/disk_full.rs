//! A replica on a nearly full disk refuses writes with a clear error
//! instead of failing a RocksDB write and stopping (then, restarted on the
//! same disk, stopping again). The disk is a small tmpfs mounted for the
//! test (root is needed, as in CI) and unmounted afterwards, whatever
//! happens.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cellbank_proto::v1::{DepositRequest, GetAccountRequest, ResultCode};
use common::Cell;
use tonic::Code;

/// A tmpfs of `size_mib`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size_mib: u64) -> Tmpfs {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("disk-full-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "cellbank-disk-full"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root): {status}");
        Tmpfs(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Fills the filesystem of `dir` until `leave` bytes are free.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let free = cellbank_cell::disk::free_bytes(dir).unwrap();
    let filler = dir.join("filler");
    let file = std::fs::File::create(&filler).unwrap();
    let size = free.saturating_sub(leave);
    let chunk = vec![0x5a_u8; 1 << 20];
    let mut written = 0;
    let mut writer = std::io::BufWriter::new(file);
    while written < size {
        let n = chunk.len().min((size - written) as usize);
        std::io::Write::write_all(&mut writer, &chunk[..n]).unwrap();
        written += n as u64;
    }
    std::io::Write::flush(&mut writer).unwrap();
    filler
}

fn deposit(id: &str, amount: u64) -> DepositRequest {
    DepositRequest {
        transfer_id: id.as_bytes().to_vec(),
        user_id: 1,
        currency: "CNY".into(),
        amount,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_a_full_disk_refuses_writes_and_serves_on() {
    const MIB: u64 = 1024 * 1024;
    let mount = Tmpfs::mount(128);
    let dir = tempfile::tempdir_in(mount.path()).unwrap();
    let watermark = 48 * MIB;
    let mut cell = Cell::start_in(dir, 1, &["--min-free-bytes", &watermark.to_string()]);
    cell.wait_for_leader(Duration::from_secs(15), 0).await.expect("a leader");
    let client = cell.client();
    common::open_and_seed(&client, &[1], "CNY", 100).await;

    // Below the watermark: a write is refused, saying why, and not retried.
    let filler = fill(mount.path(), 16 * MIB);
    tokio::time::sleep(cellbank_cell::disk::CHECK_INTERVAL * 2).await;
    let status = client.deposit(deposit("while-full", 5)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("below the watermark"), "{status:?}");
    assert_eq!(cellbank_client::errors::reason(&status).as_deref(), Some("DISK_LOW"));
    assert!(!cellbank_client::retry::retryable(&status, true), "a full disk is not retried");
    // Reads are served, and nothing was applied.
    let request = GetAccountRequest { user_id: 1, currency: "CNY".into() };
    assert_eq!(client.get_account(request.clone()).await.unwrap().balance, 100);
    // The replica keeps running: it did not stop on a failed write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cell.running(), vec![1]);
    assert!(cell.replicas.get_mut(&1).unwrap().child.as_mut().unwrap().try_wait().unwrap().is_none());
    let logs = cell.logs();
    assert!(logs.contains("data disk nearly full"), "the replica says why it refuses writes");

    // Space freed: writes resume by themselves.
    std::fs::remove_file(filler).unwrap();
    tokio::time::sleep(cellbank_cell::disk::CHECK_INTERVAL * 2).await;
    let written = client.deposit(deposit("after", 5)).await.expect("writes resume");
    assert_eq!(written.result.unwrap().code, ResultCode::Ok as i32);
    assert_eq!(client.get_account(request).await.unwrap().balance, 105);
    assert!(cell.logs().contains("writes resume"));
    drop(cell);
    drop(mount);
}
